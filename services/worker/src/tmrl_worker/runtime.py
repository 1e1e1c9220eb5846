"""The worker's rollout loop and the wiring around it (env, policy, sender thread, weights thread).

:class:`RolloutLoop` runs on the main thread: before **every** step it asks the weights feed for a newly prepared actor
(a lock and a pointer swap) and switches to it, so a weights update arriving mid-episode is used from the next step.
It never touches the network: filled sample builders are handed to the sender thread (:class:`~tmrl_worker.relay_link.RelayLink`)
every ``batch_steps`` steps and at every episode end. Real-time pacing is rtgym's job (``EnvHandle.realtime``);
synchronous envs simply run as fast as the CPU allows.

Until the first weights arrive the policy is uniform random in ``[-1, 1]`` (SAC's usual warm-up exploration).

Modes: ``train`` (samples sent, received weights used), ``test`` (no samples, received weights used, deterministic),
``expert`` (samples sent, weights ignored; the env's scripted expert or a safetensors policy file drives).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import zmq
from tmrl_common.atomic_file import write_atomically
from tmrl_common.batching import SampleBatchBuilder, batch_row_bytes, batch_steps_problem
from tmrl_common.layout import ObservationLayout
from tmrl_common.networks import PolicyFileError
from tmrl_common.sockets import RelayEndpoint

from tmrl_worker.config import WorkerConfig, WorkerMode
from tmrl_worker.envs import EnvFailure, EnvHandle, EnvInterrupted, EnvSpecError, finished_flag, make_env
from tmrl_worker.progress import ProgressFile, ProgressFileError, describe_unclean_stop, progress_path, read_progress
from tmrl_worker.relay_link import RelayLink, SenderFailure
from tmrl_worker.spool import SequenceCounter, Spool, lock_worker_state
from tmrl_worker.weights_feed import WRONG_LAYOUT_VERSIONS_TO_STOP, PreparedPolicy, WeightsFeed

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------------------------- policies


class Policy(Protocol):
    """What drives the env: an action in [-1, 1] for an observation tuple, tagged with a weights version."""

    version: int

    def act(self, observation: tuple) -> np.ndarray: ...


class UniformPolicy:
    """Uniform random actions in [-1, 1]: the policy before any weights arrive (version 0)."""

    def __init__(self, action_dim: int, seed: int | None = None) -> None:
        self.version = 0
        self.action_dim = action_dim
        self._rng = np.random.default_rng(seed)

    def act(self, observation: tuple) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, self.action_dim).astype(np.float32)


class ActorPolicy:
    """A torch :class:`~tmrl_common.networks.Actor` on the CPU (``Actor.act``); its exploration noise comes from
    ``noise`` (a seeded generator the rollout loop keeps across weight swaps) or, when ``None``, torch's global RNG."""

    def __init__(self, actor, version: int, deterministic: bool = False, noise: torch.Generator | None = None) -> None:
        self.actor = actor
        self.version = version
        self.deterministic = deterministic
        if noise is not None:
            actor.noise_generator = noise

    def act(self, observation: tuple) -> np.ndarray:
        return self.actor.act(observation, deterministic=self.deterministic)


class ScriptedPolicy:
    """The env's own expert (e.g. the simulator's pure-pursuit driver, an interface's ``expert_action``); version 0.
    What it returns must be ``action_dim`` finite numbers: anything else is an :class:`EnvFailure` naming the expert,
    before it reaches the env (a NaN would go to the robot as a command)."""

    def __init__(self, expert, action_dim: int | None = None) -> None:
        self.version = 0
        self._expert = expert
        self.action_dim = action_dim
        self.name = getattr(expert, "__qualname__", None) or "the expert"

    def act(self, observation: tuple) -> np.ndarray:
        returned = self._expert(observation)
        try:
            action = np.asarray(returned, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise EnvFailure(f"{self.name} returned a {type(returned).__name__}, not an action of "
                             f"{self.action_dim} numbers ({exc})") from exc
        if self.action_dim is not None and action.size != self.action_dim:
            raise EnvFailure(f"{self.name} returned {action.size} value(s) (shape {action.shape}); the action space "
                             f"has {self.action_dim}")
        if not np.isfinite(action).all():
            raise EnvFailure(f"{self.name} returned a non-finite action {action.reshape(-1).tolist()}: it was not "
                             "applied")
        return action


def describe_layout(layout: ObservationLayout) -> str:
    """``observation (1,) (4, 19) (3,) (3,) -> 3 actions``: a layout on one line, for error messages."""
    parts = " ".join(str(shape) for shape in layout.observation_shapes())
    return f"observation {parts} -> {layout.action_dim} action{'s' if layout.action_dim != 1 else ''}"


def load_policy_file(path: Path, layout: ObservationLayout) -> ActorPolicy:
    """The deterministic actor of a policy file (:func:`~tmrl_common.networks.read_policy_file`: safetensors, metadata
    ``architecture`` and ``version``, the format :func:`save_policy_file` writes) whose layout must be ``layout``."""
    from tmrl_common.networks import read_policy_file

    actor, version = read_policy_file(path)
    _check_policy_layout(path, actor.architecture.layout, layout)
    return ActorPolicy(actor, version=version, deterministic=True)


class OnnxPolicy:
    """The deterministic policy of an ONNX file written by ``tmrl-trainer export --onnx``, run by onnxruntime on the
    CPU: the same ``act`` as :class:`ActorPolicy` (one observation tuple in, an action in ``[-1, 1]`` out)."""

    def __init__(self, session, layout: ObservationLayout, version: int) -> None:
        self.version = version
        self._session = session
        self._names = [node.name for node in session.get_inputs()]
        self._dtypes = [np.dtype(dtype) for dtype in layout.observation_dtypes()]
        self._output = session.get_outputs()[0].name

    def act(self, observation: tuple) -> np.ndarray:
        if len(observation) != len(self._names):
            raise ValueError(f"observation has {len(observation)} parts, the ONNX policy expects {len(self._names)}")
        feed = {name: np.asarray(part, dtype=dtype)[None]
                for name, part, dtype in zip(self._names, observation, self._dtypes, strict=True)}
        (action,) = self._session.run([self._output], feed)
        return np.asarray(action[0], dtype=np.float32)


def load_onnx_policy(path: Path, layout: ObservationLayout) -> OnnxPolicy:
    """The policy of an ONNX export (:class:`OnnxPolicy`), whose layout (the ``tmrl_architecture`` metadata the export
    writes) must be ``layout``. Needs onnxruntime; :class:`PolicyFileError` when it is missing, when the file is not
    an ONNX model, or when the model was not exported by tmrl."""
    from tmrl_common.networks import PolicyArchitecture

    try:
        import onnxruntime
    except ImportError:
        raise PolicyFileError(f"{path} is an ONNX model: running it needs onnxruntime (pip install onnxruntime)") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one observation at a time, as Actor.act on one torch thread
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, one per failure  # noqa: BLE001
        raise PolicyFileError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if "tmrl_architecture" not in metadata:
        raise PolicyFileError(f"{path} is an ONNX model without tmrl's metadata (tmrl_architecture): export the policy "
                              "with tmrl-trainer export --onnx")
    try:
        architecture = PolicyArchitecture.from_flat_dict(json.loads(metadata["tmrl_architecture"]))
        version = int(metadata.get("tmrl_version", "0"))
    except (ValueError, TypeError) as exc:
        raise PolicyFileError(f"{path}: its tmrl_architecture metadata is not a policy architecture: "
                              f"{str(exc).splitlines()[0]}") from None
    _check_policy_layout(path, architecture.layout, layout)
    expected = len(layout.observation_shapes())
    if len(session.get_inputs()) != expected:
        raise PolicyFileError(f"{path} takes {len(session.get_inputs())} inputs; its metadata's layout has {expected} parts")
    return OnnxPolicy(session, layout, version)


def load_evaluated_policy(path: Path, layout: ObservationLayout) -> Policy:
    """A policy file to drive deterministically: ONNX (:func:`load_onnx_policy`) when its name ends in ``.onnx``,
    else a safetensors policy file (:func:`load_policy_file`)."""
    if Path(path).suffix.lower() == ".onnx":
        return load_onnx_policy(path, layout)
    return load_policy_file(path, layout)


class WeightsLayoutError(EnvFailure):
    """The trainer published :data:`~tmrl_worker.weights_feed.WRONG_LAYOUT_VERSIONS_TO_STOP` weights versions in a row
    for other observation shapes than this worker's env returns, none usable in between: the worker delivers what it
    sent, then stops with the two layouts."""


def weights_layout_problem(env: EnvHandle, policy_layout: ObservationLayout) -> str | None:
    """Why a policy for ``policy_layout`` cannot act in ``env`` (other observation shapes or action count, e.g.
    another ``img_hist_len``: it would fail at the first step), or None when it can. The worker's weights feed
    refuses such weights (:class:`~tmrl_worker.weights_feed.WeightsFeed`)."""
    env_layout = env.layout
    if (policy_layout.observation_shapes(), policy_layout.action_dim) == (env_layout.observation_shapes(),
                                                                          env_layout.action_dim):
        return None
    return (f"the trainer's weights are for another observation layout than this worker's env: policy "
            f"{describe_layout(policy_layout)}; env {describe_layout(env_layout)}; " + (
                "the trainer's layout_file is not your interface's layout: write it again from the interface "
                "(`tmrl-worker layout --env ...`) and restart the trainer with a fresh run_dir"
                if ":" in env.spec and not env.spec.startswith("gym:") else
                "give the worker the env options the trainer's layout was made with (e.g. the same img_hist_len)"))


def _check_policy_layout(path: Path, policy_layout: ObservationLayout, env_layout: ObservationLayout) -> None:
    """Refuse (:class:`PolicyFileError`) a policy file trained for another layout than the env's; one that differs
    only in the components' value bounds is used, with a warning naming them: the networks do not depend on bounds
    (:meth:`ObservationLayout.without_bounds`), and policies written before the layouts declared bounds have none."""
    if policy_layout == env_layout:
        return
    if policy_layout.without_bounds() == env_layout.without_bounds():
        log.warning("policy file %s was trained with other observation bounds than this env's (%s): the networks are "
                    "the same, so it is used; the env's observations are clipped into the env's bounds", path,
                    "; ".join(policy_layout.bounds_changes(env_layout)))
        return
    policy, env = describe_layout(policy_layout), describe_layout(env_layout)
    detail = f"policy {policy}; env {env}" if policy != env else f"both {env}, but component names, dtypes or scales differ"
    raise PolicyFileError(f"policy file {path} was trained for another observation layout than this env's: {detail}")


def save_policy_file(actor, path: Path, version: int = 0) -> Path:
    """Write ``actor`` as a safetensors file :func:`load_policy_file` reads back (no pickle)."""
    Path(path).write_bytes(policy_file_bytes(actor, version))
    return Path(path)


def policy_file_bytes(actor, version: int = 0) -> bytes:
    """What :func:`save_policy_file` writes."""
    from tmrl_common.networks import weights_update_from_actor
    from tmrl_common.weights import tensors_from_bytes, tensors_to_bytes

    update = weights_update_from_actor(actor, version)
    metadata = {"architecture": json.dumps(update.architecture), "version": str(version), "format": "tmrl-actor"}
    return tensors_to_bytes(tensors_from_bytes(update.tensors), metadata=metadata)


# -------------------------------------------------------------------------------------------------------- rollout


class SampleSink(Protocol):
    def submit(self, builder: SampleBatchBuilder, weights_version: int) -> None: ...


class PolicySource(Protocol):
    def take_latest(self) -> PreparedPolicy | None: ...


@dataclass(frozen=True)
class EpisodeOutcome:
    """How one episode went, as :class:`BestPolicyKeeper` ranks it."""

    episode_return: float
    steps: int
    finished: bool | None
    """The env's ``info["finished"]`` at the last step (the simulator's and TrackMania's finish line); ``None`` when
    the env does not report it."""

    def rank(self) -> tuple[bool, int, float]:
        """Larger is better: a finished episode beats an unfinished one, then fewer steps (a faster lap), then the
        higher return; an env that reports no finish is ranked by its return alone."""
        return bool(self.finished), -self.steps if self.finished else 0, self.episode_return


def best_policy_paths(directory: Path, worker_id: str) -> tuple[Path, Path]:
    """Where :class:`BestPolicyKeeper` keeps ``worker_id``'s best policy and its summary: ``(policy, summary)``."""
    return directory / f"{worker_id}.best-policy.safetensors", directory / f"{worker_id}.best-policy.json"


class BestPolicyKeeper:
    """Keeps the policy of the best episode a test worker has driven (``WorkerConfig.keep_best``): its actor in
    ``<directory>/<worker_id>.best-policy.safetensors`` (what ``tmrl-worker eval --policy`` and ``--expert --policy``
    read) and what it did in ``.best-policy.json``. Both files are replaced atomically, the policy first.

    One deterministic episode is a noisy score (the start position varies, and one lucky lap can win); evaluate the
    kept file on a few seeds with ``tmrl-worker eval`` before trusting it."""

    def __init__(self, directory: Path, worker_id: str) -> None:
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        self.policy_path, self.summary_path = best_policy_paths(directory, worker_id)
        self.best: EpisodeOutcome | None = None
        self.best_version: int | None = None
        self.saved = 0
        """Policies written so far (each one beat the one before)."""
        self._restore(worker_id)

    def _restore(self, worker_id: str) -> None:
        """Compete against the best an earlier run of this worker kept (its files are the best *so far*: a restart,
        an upgrade, must not replace them with a worse episode); said in the log, with how to start afresh."""
        if not self.policy_path.is_file():
            return
        try:
            saved = json.loads(self.summary_path.read_text())
            best = EpisodeOutcome(float(saved["return"]), int(saved["steps"]),
                                  None if saved["finished"] is None else bool(saved["finished"]))
            version = int(saved["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: the kept best policy %s has no readable summary %s (%s): the first whole episode "
                        "replaces it", worker_id, self.policy_path, self.summary_path, exc)
            return
        self.best, self.best_version = best, version
        log.info("%s: an earlier run kept its best episode in %s (weights version %d, return %.2f, %d steps%s): an "
                 "episode replaces it only by beating it (delete both best-policy files to start afresh)", worker_id,
                 self.policy_path, version, best.episode_return, best.steps,
                 {True: ", finished", False: ", not finished", None: ""}[best.finished])

    def consider(self, policy: Policy, outcome: EpisodeOutcome) -> bool:
        """Save ``policy`` when ``outcome`` (an episode it drove from start to end) beats the best so far; only a
        received actor (not the random warm-up policy) can be kept. True when it was saved."""
        actor = getattr(policy, "actor", None)
        if actor is None or (self.best is not None and outcome.rank() <= self.best.rank()):
            return False
        write_atomically(self.policy_path, policy_file_bytes(actor, policy.version), mode=0o644)
        summary = {"version": policy.version, "return": outcome.episode_return, "steps": outcome.steps,
                   "finished": outcome.finished, "saved_at": time.time(), "policy": str(self.policy_path)}
        write_atomically(self.summary_path, (json.dumps(summary, indent=1) + "\n").encode(), mode=0o644)
        self.best, self.best_version = outcome, policy.version
        self.saved += 1
        return True


SLOW_STEPS_FRACTION = 0.8
"""A real-time env stepping at less than this fraction of its rate (1 / time_step_duration) is reported as slow."""
RESETS_WARNING_FRACTION = 0.5
"""Time in resets is a warning from this share of a progress line's time on; less is noted on its INFO line."""
LATE_STEP_FACTOR = 1.5
"""A real-time step (the policy's action and ``env.step``) that takes longer than this many time steps is late: rtgym
stretched it because a call overran (it warns at each, which the CLI hides: the progress line counts them)."""
LATE_STEPS_WARNING_FRACTION = 0.02
"""Late steps are a warning from this share of a progress line's steps on; fewer are noted on its INFO line."""


@dataclass
class RolloutStats:
    """What the loop did so far."""

    steps: int = 0
    episodes: int = 0
    batches_submitted: int = 0
    swaps: int = 0
    weights_version: int = 0
    episode_return: float = 0.0
    recent_returns: deque = field(default_factory=lambda: deque(maxlen=20))
    step_seconds: float = 0.0
    """Total wall time spent inside ``env.step`` + inference, for steps/s reports."""
    late_steps: int = 0
    """Real-time steps that took over ``LATE_STEP_FACTOR`` time steps (:data:`LATE_STEP_FACTOR`)."""
    reset_seconds: float = 0.0
    """Total wall time spent inside ``env.reset`` (a TrackMania reset may wait minutes for the game to come back)."""
    resets: int = 0
    rows_handed_over: int = 0
    """Rows in the batches handed to the sink (the batch being filled holds the rest of the rows built)."""
    delivery: dict[str, int] = field(default_factory=dict)
    """The sender thread's counters at the end (:meth:`RelayLink.snapshot`); empty in test mode."""
    handshake_advice: str | None = None
    """What the sender's latest failed handshake with the relay means (:meth:`RelayLink.handshake_advice`)."""
    id_refusal: str | None = None
    """Why the relay last refused this connection's messages as this worker's (:attr:`RelayLink.id_refusal`)."""


class BatchesRefused(RuntimeError):
    """``max_consecutive_refusals`` batches in a row were refused for good, none stored in between: nothing this worker
    makes can be stored. The worker stopped as on a stop request (env closed, what it sent delivered or left in the
    spool); the message is the error the sender thread logged, ``stats`` what the run did (``delivery`` counts the
    refusals by reason)."""

    def __init__(self, message: str, stats: RolloutStats) -> None:
        super().__init__(message)
        self.stats = stats


class RolloutLoop:
    """Runs episodes, swaps policies between steps, hands filled batches to the sink (see the module docstring)."""

    def __init__(
        self,
        env: EnvHandle,
        sink: SampleSink | None,
        feed: PolicySource | None,
        policy: Policy,
        batch_steps: int = 100,
        compress: bool = True,
        deterministic: bool = False,
        seed: int | None = None,
        worker_id: str = "worker",
        max_steps_per_second: float | None = None,
        progress: ProgressFile | None = None,
        verify_observations: bool = False,
        best: BestPolicyKeeper | None = None,
    ) -> None:
        self.env = env
        self.sink = sink
        self.feed = feed
        self.policy = policy
        self._generation = 0
        """The trainer restarts behind the acting policy (:attr:`PreparedPolicy.generation`)."""
        self.batch_steps = batch_steps
        self.codec = "zlib" if compress else "raw"
        self.verify_observations = verify_observations
        """Batches carry each row's full-observation digest (``WorkerConfig.verify_observations``)."""
        self.deterministic = deterministic
        self.seed = seed
        self.noise = None if seed is None else torch.Generator().manual_seed(seed)
        """Exploration noise of every actor this loop swaps in, one sequence across swaps: ``seed`` fixes it (issue
        13, finding 7: it used to come from torch's global RNG whatever the seed)."""
        self.worker_id = worker_id
        self.min_step_interval = 0.0 if max_steps_per_second is None or env.realtime else 1.0 / max_steps_per_second
        self.stats = RolloutStats(weights_version=policy.version)
        self.action_versions: list[int] = []
        """Weights version that chose each step's action (kept only when ``record_versions`` is set; for tests)."""
        self.record_versions = False
        self.progress = progress
        """Rewritten after every step when given (``state_dir/<worker_id>.progress.json``, :mod:`tmrl_worker.progress`)."""
        self.best = best
        """Keeps the policy of the best whole episode (test mode, ``keep_best``); weights are then swapped in at
        episode starts only, so that each episode has one version to credit."""
        self._episode_steps = 0
        self._episode_versions: set[int] = set()
        """Weights versions that chose this episode's actions (one, for an episode :attr:`best` may credit)."""
        self._builder = self._new_builder()

    def _new_builder(self) -> SampleBatchBuilder:
        return SampleBatchBuilder(self.env.layout, codec=self.codec, digests=self.verify_observations)  # type: ignore[arg-type]

    def _swap_policy(self) -> None:
        if self.feed is None:
            return
        if self.best is not None and self._episode_steps and self.policy.version:
            return  # mid-episode: the new weights wait for the next episode (the random warm-up policy gives way now)
        prepared = self.feed.take_latest()
        if prepared is None or (prepared.generation, prepared.version) <= (self._generation, self.policy.version):
            return
        self._generation = prepared.generation  # a restarted trainer's lower versions replace the old ones
        self.policy = ActorPolicy(prepared.actor, prepared.version, self.deterministic, self.noise)
        self.stats.swaps += 1
        self.stats.weights_version = prepared.version
        log.debug("%s: now acting with weights version %d (step %d)", self.worker_id, prepared.version, self.stats.steps)

    def _flush(self) -> None:
        if self.sink is None or not len(self._builder):
            return
        self.stats.rows_handed_over += len(self._builder)
        self.sink.submit(self._builder, self.policy.version)
        self.stats.batches_submitted += 1
        self._builder = self._new_builder()

    def _reset(self, seed: int | None) -> tuple:
        started = time.monotonic()
        try:
            observation = self.env.reset(seed=seed)
        finally:
            self.stats.reset_seconds += time.monotonic() - started
        self.stats.episode_return = 0.0
        self._episode_steps = 0
        self._episode_versions = set()
        self.stats.resets += 1
        if self.sink is not None:
            self._builder.add_reset(observation, self.env.default_action)
        return observation

    def record_progress(self, running: bool = True) -> None:
        """Write the progress record (no-op without a progress file). Rows built are those handed over plus those of
        the batch being filled (the record's readers check them against ``steps + resets``)."""
        if self.progress is not None:
            stats, unfinished = self.stats, len(self._builder)
            self.progress.update(steps=stats.steps, resets=stats.resets, rows_built=stats.rows_handed_over + unfinished,
                                 rows_handed_over=stats.rows_handed_over, batches_handed_over=stats.batches_submitted,
                                 rows_unfinished=unfinished, running=running)

    def _report(self, seconds: float, steps: int, reset_seconds: float = 0.0, late_steps: int = 0,
                longest_step: float = 0.0) -> None:
        """The progress line over the last ``seconds``, which held ``steps`` steps and ``reset_seconds`` of resets: a
        real-time env slower than its time step is named, judged on the time outside resets (a reset that waited for
        the game is no slow step), and so are its ``late_steps`` (the longest: ``longest_step`` s), a warning from
        :data:`LATE_STEPS_WARNING_FRACTION` of the steps on."""
        recent = self.stats.recent_returns
        # the acting (exploring) policy's returns, warm-up episodes at random included: `tmrl-worker eval` scores a policy
        mean = (f"{sum(recent) / len(recent):.2f} over the last {len(recent)} episode(s) as acted" if recent else "n/a")
        problems = [getattr(self.sink, "delivery_problem", lambda: None)(),  # a RelayLink says when it cannot deliver
                    getattr(self.feed, "weights_problem", lambda: None)()]  # a WeightsFeed, when it refuses weights
        notes: list[str] = []
        rate = steps / max(seconds, 1e-9)
        step_seconds = self.env.step_seconds if self.env.realtime else None
        stepping = max(seconds - reset_seconds, 1e-9)
        if reset_seconds >= 1.0:  # a warning only past half the line's time: TrackMania's every reset waits 1.5 s
            # (sleep_time_at_reset), and a probe found every healthy progress line a warning for it
            (problems if reset_seconds >= RESETS_WARNING_FRACTION * seconds else notes).append(
                f"{reset_seconds:.1f} s of the last {seconds:.0f} s in resets (the env waited, e.g. for the game)")
        if step_seconds and steps >= 3 and steps / stepping < SLOW_STEPS_FRACTION / step_seconds:
            # rtgym stretches a step whose calls overran it (it warns at every such step: the CLI hides those)
            problems.append(f"slower than the {1 / step_seconds:.0f} steps/s of time_step_duration {step_seconds:g} "
                            f"s: the env's calls (get_obs_rew_terminated_info, send_control) or the policy take "
                            f"longer than a step, which rtgym stretched to about {stepping / steps:.3f} s on average "
                            "(more than the calls take: a step that overran also waits for its next start)")
        if step_seconds and late_steps:  # a BYO probe: a 120 ms stall every 25th 50 ms step was never reported
            late = (f"{late_steps} late step(s) of {steps} (over {LATE_STEP_FACTOR:g} time steps of {step_seconds:g} s, "
                    f"the longest {longest_step:.3f} s: a call of the env or the policy overran its step now and then, "
                    "and rtgym stretched it)")
            (problems if late_steps >= LATE_STEPS_WARNING_FRACTION * steps else notes).append(late)
        problems = [p for p in problems if p]
        said = "; ".join(problems + notes)
        log.log(logging.WARNING if problems else logging.INFO,
                "%s: %d steps (%.0f steps/s), %d episodes, mean return %s, weights version %d, %d batches handed over%s",
                self.worker_id, self.stats.steps, rate, self.stats.episodes, mean,
                self.policy.version, self.stats.batches_submitted, f"; {said}" if said else "")

    def _keep_if_best(self, keeper: BestPolicyKeeper, info: dict) -> None:
        outcome = EpisodeOutcome(self.stats.episode_return, self._episode_steps, finished_flag(info))
        if keeper.consider(self.policy, outcome):
            ending = f"finished in {outcome.steps} steps" if outcome.finished else f"{outcome.steps} steps"
            log.info("%s: best episode so far (weights version %d, return %.2f, %s): policy kept in %s", self.worker_id,
                     self.policy.version, outcome.episode_return, ending, keeper.policy_path)

    def run(self, max_steps: int | None = None, stop: threading.Event | None = None,
            health_check=None) -> RolloutStats:
        """Step until ``max_steps`` steps, ``stop`` is set, or ``health_check()`` raises. Sends what is left at the end."""
        try:
            observation = self._reset(self.seed)
        except EnvInterrupted as exc:  # stopped while the first reset waited (e.g. for the game to start)
            log.info("%s: %s", self.worker_id, exc)
            return self.stats
        self.record_progress()
        target = None if max_steps is None else self.stats.steps + max_steps
        next_health = time.monotonic() + 1.0
        next_step_at = report_from = time.monotonic()
        next_report, report_steps = report_from + PROGRESS_EVERY_S, self.stats.steps
        report_resets, report_late, longest_step = self.stats.reset_seconds, self.stats.late_steps, 0.0
        late_after = LATE_STEP_FACTOR * self.env.step_seconds if self.env.realtime and self.env.step_seconds else None
        try:
            while (target is None or self.stats.steps < target) and not (stop is not None and stop.is_set()):
                if self.min_step_interval:
                    delay = next_step_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_step_at = max(next_step_at, time.monotonic() - 1.0) + self.min_step_interval
                self._swap_policy()
                started = time.perf_counter()
                action = self.env.policy_action(self.policy.act(observation))  # as applied, and as recorded
                if self.record_versions:
                    self.action_versions.append(self.policy.version)
                observation, reward, terminated, truncated, info = self.env.step(action)
                took = time.perf_counter() - started
                self.stats.step_seconds += took
                if late_after is not None and took > late_after:
                    self.stats.late_steps += 1
                    longest_step = max(longest_step, took)
                self.stats.steps += 1
                self._episode_steps += 1
                self._episode_versions.add(self.policy.version)
                self.stats.episode_return += reward
                if self.sink is not None:
                    self._builder.add_step(action, observation, reward, terminated, truncated)
                done = terminated or truncated
                if done or len(self._builder) >= self.batch_steps:
                    self._flush()
                if done:
                    self.stats.episodes += 1
                    self.stats.recent_returns.append(self.stats.episode_return)
                    if self.best is not None and len(self._episode_versions) == 1:
                        self._keep_if_best(self.best, info)
                    elif self.best is not None:
                        log.info("%s: episode %d (return %.2f) was driven by weights versions %s (the random policy "
                                 "gives way to the first weights mid-episode): not a candidate for the best policy",
                                 self.worker_id, self.stats.episodes, self.stats.episode_return,
                                 sorted(self._episode_versions))
                    log.debug("%s: episode %d ended after step %d: return %.2f (weights version %d)", self.worker_id,
                             self.stats.episodes, self.stats.steps, self.stats.episode_return, self.policy.version)
                    try:
                        observation = self._reset(None)
                    except EnvInterrupted as exc:  # stop requested while the env waited (e.g. for the game)
                        log.info("%s: %s", self.worker_id, exc)
                        break
                self.record_progress()
                now = time.monotonic()
                if now >= next_health:
                    if health_check is not None:
                        health_check()
                    next_health = now + 1.0
                if now >= next_report:
                    self._report(now - report_from, self.stats.steps - report_steps,
                                 self.stats.reset_seconds - report_resets, self.stats.late_steps - report_late,
                                 longest_step)
                    report_from, report_steps, next_report = now, self.stats.steps, now + PROGRESS_EVERY_S
                    report_resets, report_late, longest_step = self.stats.reset_seconds, self.stats.late_steps, 0.0
        finally:
            self._flush()
            self.record_progress()
        return self.stats


# ------------------------------------------------------------------------------------------------------- service


def _with_delivery(stats: RolloutStats, link: RelayLink | None) -> RolloutStats:
    """``stats`` with the sender thread's counts, once it stopped (or died: its counts as it left them)."""
    if link is not None:
        stats.delivery = link.snapshot()
        stats.handshake_advice = link.handshake_advice()
        stats.id_refusal = link.id_refusal
    return stats


def _flush_before_stop(link: RelayLink | None, config: WorkerConfig) -> None:
    """Wait up to ``flush_timeout_s`` for the relay to acknowledge every batch sent; warn about what stays unacknowledged."""
    if link is not None and not link.flush(timeout=config.flush_timeout_s):
        # not acknowledged is not known to be lost: a batch the relay passed on may be stored, its answer on the way
        # (a network probe: "lost" said of 4 batches the trainer had all stored)
        fate = (f"kept in {link.spool.directory} for the next run" if link.spool.directory is not None
                else "any of them the trainer did not get are lost with this process (some may be stored, their "
                "answers not back yet); durable_spool keeps them on disk")
        unwritten = len(link.spool.unwritten) if link.spool.directory is not None else 0
        if unwritten:  # their spool files could not be written (a full disk, permissions, a file size limit)
            fate += f", except {unwritten} whose spool file could not be written: lost with this process"
        log.warning("%s: stopping with %d unacknowledged batch(es) in the spool (%s)", config.worker_id,
                    link.snapshot()["spool_batches"], fate)


def _end_a_stuck_rollout(stop: threading.Event, returned: threading.Event, env: EnvHandle, link: RelayLink,
                         config: WorkerConfig) -> None:
    """The stop watchdog of ``tmrl-worker run``: once ``stop`` is set, give the rollout ``stop_grace_s`` to return
    from the env; if it has not (a reset or step that blocks without seeing the stop), deliver what was sent
    (:func:`_flush_before_stop`, on this thread: the sender thread still runs) and end the process with status 1.
    The env is not closed: it is the thing that is stuck."""
    stop.wait()
    if returned.wait(config.stop_grace_s):
        return
    message = (f"{config.worker_id}: the env's {env.in_call or 'current call'} did not return within "
               f"{config.stop_grace_s:g} s of the stop request (it does not see the stop); stopping without it")
    log.error(message)
    _flush_before_stop(link, config)
    delivery = link.snapshot()
    print(f"tmrl-worker: {message}; {delivery['spool_acked']} batch(es) acknowledged, {delivery['spool_batches']} "
          "unacknowledged", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


def _warn_of_long_env_calls(returned: threading.Event, env: EnvHandle, config: WorkerConfig) -> None:
    """Until the rollout returns: warn when the env's current reset or step has not returned for
    ``long_call_warning_s``, again each time that wait doubles, and say how long it took once it returns. A BYO probe:
    an interface blocked in its reset left 53 s without a line (the progress lines come from the rollout loop)."""
    call, since, warned_at = None, 0.0, 0.0
    while not returned.wait(0.25):
        current, started = env.in_call, env.in_call_since
        if (current, started) != (call, since):  # another call, or none
            if warned_at:
                log.info("%s: the env's %s returned after %.0f s", config.worker_id, call, time.monotonic() - since)
            call, since, warned_at = current, started, 0.0
        if call is None:
            continue
        waited = time.monotonic() - since
        if waited >= max(config.long_call_warning_s, 2 * warned_at):
            warned_at = waited
            log.warning("%s: the env's %s has not returned for %.0f s: the rollout waits for it (no progress lines "
                        "meanwhile). An env that waits on purpose logs why (TrackMania: for the game); otherwise its "
                        "%s may be blocked on the hardware or a lock (a stop request gives it stop_grace_s = %g s)",
                        config.worker_id, call, waited, "reset" if call == "reset" else
                        "get_obs_rew_terminated_info or send_control", config.stop_grace_s)


def warn_if_time_limit_unused(config: WorkerConfig) -> None:
    """A ``gym:<id>`` env keeps its own time limit: say so when ``max_episode_steps`` was set for one (an outside
    probe's 50 gave MountainCar's 1000-step episodes without a word)."""
    if config.env.strip().startswith("gym:") and "max_episode_steps" in config.model_fields_set \
            and "max_episode_steps" not in config.env_options:
        log.warning("max_episode_steps = %d is not applied to %s, which keeps its own time limit; to change that, "
                    "set it in [worker.env_options] (max_episode_steps = %d), which goes to gymnasium.make",
                    config.max_episode_steps, config.env.strip(), config.max_episode_steps)


def initial_policy(mode: WorkerMode, env: EnvHandle, policy_file: Path | None, seed: int | None) -> Policy:
    """What acts before any weights arrive: the expert in expert mode, else uniform random."""
    if mode == "expert":
        if policy_file is not None:
            return load_policy_file(policy_file, env.layout)
        if env.expert is None:
            raise PolicyFileError(f"env {env.spec!r} offers no scripted expert; give a trained policy with --policy FILE")
        return ScriptedPolicy(env.expert, env.action_dim)
    if policy_file is not None:  # a shared config file's, or --policy without --expert
        log.warning("policy_file %s is not used: only an expert worker (--expert) acts with a policy file; this %s "
                    "worker acts with the trainer's weights", policy_file, mode)
    return UniformPolicy(env.action_dim, seed)


def spool_directory(config: WorkerConfig) -> Path | None:
    """Where the durable spool keeps unacknowledged batches (``None`` unless ``durable_spool``)."""
    return Path(config.state_dir).expanduser() / f"{config.worker_id}.spool" if config.durable_spool else None


def open_progress_file(config: WorkerConfig, restored_batches: int = 0) -> ProgressFile:
    """The progress file of ``config.worker_id`` in ``state_dir``; first logs what the previous run lost if it did not
    stop cleanly (killed, crashed, power cut; ``restored_batches``: what the durable spool loaded)."""
    path = progress_path(config.state_dir, config.worker_id)
    try:
        previous = read_progress(path)
    except ProgressFileError as exc:
        log.warning("%s: %s; overwriting it", config.worker_id, exc)
        previous = None
    if previous is not None and previous.running:
        log.warning("%s: %s", config.worker_id, describe_unclean_stop(previous, config.durable_spool, restored_batches))
    return ProgressFile(path)


def _check_batch_size(env: EnvHandle, config: WorkerConfig) -> None:
    """Before any step: refuse a ``batch_steps`` whose batches could not be sent (such a batch stopped the sender
    thread mid-run, its samples lost), and warn of a spool that holds fewer than two batches."""
    too_large = batch_steps_problem(env.layout, config.batch_steps, config.compress, config.verify_observations)
    if too_large is not None:
        env.close()
        raise EnvSpecError(f"env {config.env!r}: {too_large}")
    batch_bytes = config.batch_steps * batch_row_bytes(env.layout, config.verify_observations)
    if config.spool_max_bytes < 2 * batch_bytes:
        # a second re-check: 262 MB batches against the default 256 MiB spool dropped 4 of 5 in an outage
        log.warning("%s: spool_max_bytes (%d) holds fewer than two batches of %d rows of this env's layout (up to "
                    "%d bytes each before compression): while the relay or trainer is away, every batch but the "
                    "newest is dropped; raise spool_max_bytes or lower batch_steps", config.worker_id,
                    config.spool_max_bytes, config.batch_steps, batch_bytes)


def run_worker(config: WorkerConfig, stop: threading.Event | None = None, exit_if_stuck: bool = False) -> RolloutStats:
    """Build env, sender and weights threads from ``config`` and run the rollout loop until done or ``stop``.

    When ``max_consecutive_refusals`` batches in a row are refused for good, the sender thread sets ``stop`` (one of
    its own when none is given): the rollout stops, what was sent is delivered (``flush_timeout_s``), and
    :class:`BatchesRefused` is raised with the error it logged.

    ``exit_if_stuck`` (the ``tmrl-worker run`` process, never a library caller: it ends the process): when ``stop``
    is set and the env's current call has not returned ``stop_grace_s`` later, :func:`_end_a_stuck_rollout` delivers
    what was sent and exits with status 1."""
    endpoint = RelayEndpoint(config.relay_host, config.worker_port, config.transport, config.security)
    endpoint.check_security()
    endpoint.warn_if_unresolvable()
    if stop is None:
        stop = threading.Event()  # still needed: the sender thread sets it when it gives up
    state_lock = lock_worker_state(config.state_dir, config.worker_id)  # one process per worker id and state folder
    warn_if_time_limit_unused(config)
    try:
        env = make_env(config.env, time_step_duration=config.time_step_duration,
                       max_episode_steps=config.max_episode_steps, options=config.env_options)
        if config.mode in ("train", "expert"):  # a --test worker sends no batch
            _check_batch_size(env, config)
    except BaseException:
        state_lock.release()
        raise
    context = zmq.Context()
    link: RelayLink | None = None
    feed: WeightsFeed | None = None
    progress: ProgressFile | None = None
    try:
        policy = initial_policy(config.mode, env, config.policy_file, config.seed)
        if config.mode in ("train", "test"):
            feed = WeightsFeed(config.worker_id, RelayEndpoint(config.relay_host, config.weights_port, config.transport,
                                                               config.security), context=context,
                               layout_problem=functools.partial(weights_layout_problem, env))
            feed.start()
        # the state file and the spool before the progress file: a start that fails on them must not overwrite the
        # record of what a killed run lost
        sequence = SequenceCounter(config.state_dir, config.worker_id)
        spool = Spool(config.spool_max_batches, config.spool_max_bytes, owner=config.worker_id,
                      directory=spool_directory(config))
        if spool.highest_restored is not None and sequence.start_above(spool.highest_restored):
            log.warning("%s: the spool holds batch seq %d, at or above the state file's next number: numbering goes "
                        "on from seq %d (the state file was older than the spool)", config.worker_id,
                        spool.highest_restored, sequence.next_seq)
        if config.mode in ("train", "expert"):
            progress = open_progress_file(config, spool.counters.restored)
        # every mode opens the samples link: the relay answers its hello with the latest weights (issue 14)
        link = RelayLink(
            worker_id=config.worker_id,
            layout=env.layout,
            endpoint=RelayEndpoint(config.relay_host, config.worker_port, config.transport, config.security),
            sequence=sequence,
            spool=spool,
            ack_timeout_s=config.ack_timeout_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            context=context,
            on_weights=feed.hand_over if feed is not None else None,
            max_consecutive_refusals=config.max_consecutive_refusals,
            on_give_up=stop.set,  # the rollout loop and a waiting env see it as any stop request
            on_silent_link=feed.reconnect if feed is not None else None,  # the feed's path is most likely dead too
        )
        link.start()
        samples_sink = None if config.mode == "test" else link  # a test worker sends no samples
        loop = RolloutLoop(env, samples_sink, feed, policy, batch_steps=config.batch_steps, compress=config.compress,
                           deterministic=config.deterministic or config.mode == "test", seed=config.seed,
                           worker_id=config.worker_id, max_steps_per_second=config.max_steps_per_second,
                           progress=progress, verify_observations=config.verify_observations,
                           best=BestPolicyKeeper(config.state_dir, config.worker_id) if config.keep_best else None)
        log.info("%s: %s mode on env %s (%s, layout %s), relay %s", config.worker_id, config.mode, env.spec,
                 "real time" if env.realtime else "synchronous",
                 [c.name for c in env.layout.components], config.relay_host)
        if config.mode == "train" and not env.realtime and config.max_steps_per_second is None:
            log.warning("%s: the synchronous env %s steps as fast as the CPU lets it (max_steps_per_second is not "
                        "set): it may make most of its samples before the trainer's first weights arrive, every one "
                        "of them with the random policy, and takes CPU from a trainer on the same machine; set "
                        "max_steps_per_second (about the trainer's updates/s divided by its utd) to learn as it "
                        "collects", config.worker_id, env.spec)

        def health_check() -> None:
            if link is not None:
                link.check_alive()
            if feed is not None and feed.wrong_layout_streak >= WRONG_LAYOUT_VERSIONS_TO_STOP:
                raise WeightsLayoutError(f"{config.worker_id}: the trainer published {feed.wrong_layout_streak} weights "
                                         f"versions in a row that this worker cannot use; the latest, "
                                         f"{feed.wrong_layout_problem}")

        returned = threading.Event()
        env.attach_stop(stop)
        if exit_if_stuck:
            threading.Thread(target=_end_a_stuck_rollout, args=(stop, returned, env, link, config),
                             name="stop-watchdog", daemon=True).start()
        threading.Thread(target=_warn_of_long_env_calls, args=(returned, env, config), name="env-call-watch",
                         daemon=True).start()
        try:
            try:
                stats = loop.run(max_steps=config.max_steps, stop=stop, health_check=health_check)
            finally:
                returned.set()
        except (EnvFailure, SenderFailure) as exc:  # the env cannot go on, or the sender thread died
            if isinstance(exc, EnvFailure):  # what was sent reaches the trainer before the worker stops
                _flush_before_stop(link, config)
            if link is not None:
                link.stop(raise_failure=False)  # a sender thread that died is logged where it did, with its traceback
            exc.stats = _with_delivery(loop.stats, link)  # type: ignore[attr-defined]  # the CLI's run summary
            loop.record_progress(running=False)
            raise
        _flush_before_stop(link, config)
        if link is not None:  # the sender thread numbers and spools what is still in its inbox before it ends
            link.stop(raise_failure=False)
        _with_delivery(stats, link)  # so: counted after
        loop.record_progress(running=False)
        if link is not None:
            try:
                link.check_alive()
            except SenderFailure as failure:  # it died after the last step
                failure.stats = stats  # type: ignore[attr-defined]
                raise
        if link is not None and link.gave_up is not None:
            raise BatchesRefused(link.gave_up, stats)
        return stats
    finally:
        if progress is not None:
            progress.close()
        try:
            if feed is not None:
                feed.stop()
            if link is not None:  # stopped above, unless the run ended on another error (a sender that died is
                link.stop(raise_failure=False)  # logged where it did; raising here would hide that error)
        finally:
            env.close()
            context.destroy(linger=0)
            state_lock.release()
