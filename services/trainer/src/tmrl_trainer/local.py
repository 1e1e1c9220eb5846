"""Synchronous single-process training: one environment, the learner and the replay memory in one loop.

Samples take the same path as in the distributed trainer: each step becomes a row of a
:class:`~tmrl_common.batching.SampleBatchBuilder`, whose :class:`~tmrl_common.protocol.SampleBatch` goes into
:meth:`ReplayMemory.add_batch`. Any gymnasium id works (``Pendulum-v1``, ``module.path:env/Id-v0``): an environment
whose unwrapped object has an ``ObservationLayout`` attribute ``layout`` uses it (tuple observations), one with a
flat ``Box`` observation uses :func:`~tmrl_common.layout.layout_for_box`. The policy acts in ``[-1, 1]``; actions are
rescaled to the environment's ``Box`` bounds.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationLayout, box_bounds, clipped_into_bounds, empty_space_problem, layout_for_box
from tmrl_common.log_limit import RateLimitedLog

from tmrl_trainer.checkpoint import save_checkpoint
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.metrics import TrainingMetrics
from tmrl_trainer.sac import SACConfig, check_batch_fits_the_memory

LOCAL_WORKER_ID = "local"
LATEST_LOCAL_CHECKPOINT = "latest.safetensors"
"""The checkpoint of a local run, in ``<run_dir>/checkpoints/`` (rewritten at each save)."""


class UnsupportedEnvironmentError(ValueError):
    """The environment cannot be trained on locally (unsupported spaces, unknown id)."""


class LocalEnvFailure(RuntimeError):
    """The environment failed while running: its ``reset`` or ``step`` raised, or it returned a NaN or infinite
    observation or reward. :func:`train_local` saves the checkpoint of the steps before, then raises it."""


EVAL_EPISODE_STEP_CAP = 10_000
"""An evaluation episode ends after this many steps: an env registered without ``max_episode_steps`` that never
ends its episodes hung the final evaluation for good (an outside probe; Ctrl-C and SIGTERM were not looked at)."""

log = logging.getLogger(__name__)


class LocalTrainingConfig(BaseModel):
    """Settings of :func:`train_local` besides the environment, the step budget and the seed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sac: SACConfig = Field(default_factory=SACConfig)
    memory_capacity: int = Field(default=1_000_000, ge=2)
    device: str = "auto"
    eval_episodes: int = Field(default=10, ge=0)
    """Deterministic episodes of the final evaluation (and of each periodic one)."""
    eval_every: int = Field(default=0, ge=0)
    """Environment steps between periodic evaluations (0: only at the end)."""
    log_every: int = Field(default=250, ge=1)
    """Updates between TensorBoard points for the learner metrics and speeds."""
    run_dir: Path | None = None
    """``tensorboard/`` and ``checkpoints/`` go here (nothing is written when unset)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Environment steps between checkpoints (0: only at the end); needs ``run_dir``."""
    save_memory: bool = False
    """Save the replay memory next to each checkpoint."""

    @model_validator(mode="after")
    def _can_learn(self) -> LocalTrainingConfig:
        if self.sac.learning_starts > self.memory_capacity:  # the service may only store; a local run must learn
            raise ValueError(f"sac.learning_starts ({self.sac.learning_starts}) exceeds memory_capacity "
                             f"({self.memory_capacity}): the memory never holds enough rows to start learning")
        check_batch_fits_the_memory(self.sac, self.memory_capacity)
        return self


@dataclass
class LocalTrainingResult:
    """What :func:`train_local` measured."""

    final_return: float
    """Mean undiscounted return of the final deterministic evaluation (NaN when ``eval_episodes`` is 0)."""
    final_returns: list[float]
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    """(environment step, mean deterministic return) of every evaluation, the final one included."""
    steps: int = 0
    """Environment steps taken: the budget, or fewer when a stop was asked for."""
    stopped: bool = False
    """Whether a stop (``stop`` set: Ctrl-C, SIGTERM) ended the run before its step budget; the run then saved its
    checkpoint but skipped the final evaluation."""
    updates: int = 0
    updates_rejected: int = 0
    """Updates the learner guard did not apply (a non-finite loss or gradient; see :mod:`tmrl_trainer.guard`)."""
    episodes: int = 0
    wall_s: float = 0.0
    checkpoint: Path | None = None
    """The last checkpoint written (``None``: none, or no run directory)."""
    checkpoint_step: int = 0
    """The environment steps that checkpoint holds."""
    checkpoint_error: str | None = None
    """Why the last checkpoint write failed (a full disk...), when it failed: :attr:`checkpoint`, if any, is older."""


def what_was_saved(result: LocalTrainingResult) -> str:
    """What a run kept on disk, for the one-line message of a run that ends on an env failure or on a checkpoint
    that could not be written."""
    if result.checkpoint_error is not None:
        return result.checkpoint_error + (f"; the last one written is {result.checkpoint} (step "
                                          f"{result.checkpoint_step})" if result.checkpoint else "; none was written")
    if result.checkpoint is None:
        return "nothing was saved (no run directory)"
    return f"the learner after {result.checkpoint_step} steps is in {result.checkpoint}"


class _EnvAdapter:
    """Observation tuples and [-1, 1] actions for one gymnasium environment."""

    def __init__(self, env: gym.Env) -> None:
        self.env = env
        space = env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise UnsupportedEnvironmentError(f"local training needs a 1-D Box action space, {env.spec.id if env.spec else env} has {space}")
        empty = empty_space_problem(getattr(env.observation_space, "shape", None) or (1,), space.shape)
        if empty is not None:
            raise UnsupportedEnvironmentError(empty)
        self.low = space.low.astype(np.float64)
        self.high = space.high.astype(np.float64)
        if not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise UnsupportedEnvironmentError(f"action space {space} must be bounded: the policy's tanh output is rescaled to it")
        layout = getattr(env.unwrapped, "layout", None)
        if isinstance(layout, ObservationLayout):
            self.layout, self.flat = layout, False
        elif isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1:
            # with the space's bounds, as the trainer service and the worker build it: a policy trained here is then
            # the same layout that `tmrl-worker eval` and a worker on this env expect
            bounds = box_bounds(env.observation_space.low, env.observation_space.high)
            self.layout, self.flat = layout_for_box(int(env.observation_space.shape[0]), int(space.shape[0]), *bounds), True
        else:
            raise UnsupportedEnvironmentError(f"observation space {env.observation_space} is neither a flat Box nor described by an "
                                   "ObservationLayout attribute 'layout' on the unwrapped environment")
        if self.layout.action_dim != space.shape[0]:
            raise UnsupportedEnvironmentError(f"layout action_dim {self.layout.action_dim} differs from the action space {space}")
        self.clipped: dict[str, int] = {}
        """Observations clipped into their part's bounds, by part name (the first of each part is logged)."""

    def observation(self, raw) -> tuple[np.ndarray, ...]:
        """The observation as the layout's parts; :class:`LocalEnvFailure` for NaN or infinite values; values outside
        a part's declared bounds are clipped into them, as the worker does (the policy must learn from what a worker
        on this env would send; an outside probe trained on raw values that ``eval`` then clipped)."""
        parts = [np.asarray(raw, dtype=np.float32)] if self.flat else [np.asarray(part) for part in raw]
        for index, component in enumerate(self.layout.components):
            values = parts[index]
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise LocalEnvFailure(f"returned NaN or infinite values in observation part {component.name!r}: fix or "
                                      "clip the env's observation")
            within = clipped_into_bounds(component, values)
            if within is not None:
                if component.name not in self.clipped:
                    log.warning("the env returned observation part %r with values in [%.6g, %.6g], outside its "
                                "space's [%s, %s]: clipped into them, as a worker would (logged once)", component.name,
                                values.min(), values.max(), component.low, component.high)
                self.clipped[component.name] = self.clipped.get(component.name, 0) + 1
                parts[index] = within
        return tuple(parts)

    def step(self, action: np.ndarray) -> tuple[tuple[np.ndarray, ...], float, bool, bool]:
        """One step of the env with a policy action in [-1, 1]: (observation, reward, terminated, truncated), or
        :class:`LocalEnvFailure` when the env raised or returned a NaN or infinite value."""
        try:
            raw, reward, terminated, truncated, _ = self.env.step(self.env_action(action))
        except Exception as exc:  # noqa: BLE001 - the env's own code
            raise LocalEnvFailure(f"its step raised {type(exc).__name__}: {exc}") from exc
        try:
            reward = float(reward)
        except (TypeError, ValueError) as exc:
            raise LocalEnvFailure(f"returned a reward of type {type(reward).__name__}, not a number") from exc
        if not math.isfinite(reward):
            raise LocalEnvFailure(f"returned reward {reward}: NaN and infinite rewards cannot be learned from")
        return self.observation(raw), reward, bool(terminated), bool(truncated)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, ...]:
        try:
            raw, _ = self.env.reset(seed=seed)
        except Exception as exc:  # noqa: BLE001 - the env's own code
            raise LocalEnvFailure(f"its reset raised {type(exc).__name__}: {exc}") from exc
        return self.observation(raw)

    def env_action(self, action: np.ndarray) -> np.ndarray:
        scaled = self.low + (np.asarray(action, dtype=np.float64) + 1.0) * 0.5 * (self.high - self.low)
        return np.clip(scaled, self.low, self.high).astype(self.env.action_space.dtype)


def evaluate(actor, adapter: _EnvAdapter, episodes: int, seed: int, stop: threading.Event | None = None,
             step_cap: int = EVAL_EPISODE_STEP_CAP) -> list[float]:
    """Undiscounted returns of ``episodes`` deterministic episodes (reset seeds ``seed``, ``seed + 1``...), each
    ended after ``step_cap`` steps at the latest (logged); fewer returns when ``stop`` is set meanwhile."""
    returns = []
    for episode in range(episodes):
        observation = adapter.reset(seed=seed + episode)
        total, done, length = 0.0, False, 0
        while not done:
            if stop is not None and stop.is_set():
                return returns
            action = actor.act(observation, deterministic=True)
            observation, reward, terminated, truncated = adapter.step(action)
            total += reward
            length += 1
            done = terminated or truncated
            if not done and length >= step_cap:
                log.warning("evaluation episode %d ended at %d steps without the env ending it (registered without "
                            "max_episode_steps?): its return is that of its first %d steps", episode, length, length)
                done = True
        returns.append(total)
    return returns


def _make_env(env_id: str) -> gym.Env:
    try:
        return gym.make(env_id)
    except (gym.error.Error, ImportError) as exc:  # an unknown id, or gym:module:Id whose module does not import
        raise UnsupportedEnvironmentError(f"gymnasium cannot make {env_id!r}: {str(exc).rstrip('.')}"
                                          f"{_interface_hint(env_id)}") from exc


def _interface_hint(env_id: str) -> str:
    """What to do instead when ``env_id`` names an rtgym interface (``module:Class``), which gymnasium cannot make:
    a BYO probe ran train-local on the cart example's and was told only ``Environment `MyRobotInterface` doesn't
    exist``."""
    module_name, _, name = env_id.rpartition(":")
    if not module_name or not name.isidentifier():
        return ""
    try:
        found = getattr(importlib.import_module(module_name), name, None)
    except Exception:  # noqa: BLE001 - any import failure: no hint, gymnasium's message stands
        return ""
    if not (isinstance(found, type) and hasattr(found, "get_obs_rew_terminated_info")):
        return ""
    return (f"; {env_id} is an rtgym interface, which train-local does not run: train it with `tmrl-worker run --env "
            f"{env_id}` beside a relay and a trainer (docs/byo-robot.md)")


def check_local_env(env_id: str) -> None:
    """Raise :class:`UnsupportedEnvironmentError` now, before a run directory or a progress bar is made, when
    ``env_id`` cannot be trained here (gymnasium cannot make it, or its spaces do not fit); the env is closed again."""
    env = _make_env(env_id)
    try:
        _EnvAdapter(env)
    finally:
        env.close()


def train_local(
    env_id: str,
    steps: int,
    seed: int = 0,
    config: LocalTrainingConfig | None = None,
    on_progress: Callable[[int, dict[str, float]], None] | None = None,
    stop: threading.Event | None = None,
) -> LocalTrainingResult:
    """Train SAC on ``env_id`` for ``steps`` environment steps; evaluate deterministically at the end.

    ``on_progress(step, info)`` is called after every step (``info`` holds ``episode_return`` when one finished,
    ``eval_return`` after an evaluation): the CLI drives a progress bar with it. Once ``stop`` is set the run ends
    after the step it is in: it saves its checkpoint and skips the final evaluation (``result.stopped``).
    """
    config = config or LocalTrainingConfig()
    started = time.perf_counter()
    env, eval_env = _make_env(env_id), _make_env(env_id)
    adapter, eval_adapter = _EnvAdapter(env), _EnvAdapter(eval_env)
    eval_adapter.clipped = adapter.clipped  # one count, and one log line per part, for both
    layout = adapter.layout

    learner = make_learner(config.sac, config.sac.architecture(layout), device=config.device, seed=seed)
    learner.actor.noise_generator = torch.Generator(learner.device).manual_seed(seed + 2)
    memory = ReplayMemory(layout, capacity=config.memory_capacity, seed=seed + 3, n_step=config.sac.n_step,
                          gamma=config.sac.gamma)
    builder = SampleBatchBuilder(layout)
    metrics = TrainingMetrics(config.run_dir / "tensorboard" if config.run_dir else None)
    checkpoint_path = config.run_dir / "checkpoints" / LATEST_LOCAL_CHECKPOINT if config.run_dir else None
    exploration = np.random.default_rng(seed + 4)
    env.action_space.seed(seed)

    result = LocalTrainingResult(final_return=float("nan"), final_returns=[])
    batches = 0
    update_debt = 0.0
    episode_return, episode_length = 0.0, 0

    checkpoint_failed_log = RateLimitedLog(log, interval_s=60.0)

    def checkpoint(step: int) -> None:
        if checkpoint_path is not None:
            # weights_version: what an exported policy file says it is (it said 0 for every local run)
            counters = {"env_steps": step, "episodes": result.episodes, "updates": learner.updates,
                        "weights_version": learner.updates}
            try:
                result.checkpoint = save_checkpoint(checkpoint_path, learner, counters,
                                                    memory if config.save_memory else None)
            except OSError as exc:  # a full disk: a traceback before, and a memory file newer than its checkpoint
                result.checkpoint_error = f"the checkpoint at step {step} could not be written ({exc})"
                kept = (f"{result.checkpoint} (step {result.checkpoint_step}) is kept" if result.checkpoint
                        else "no earlier checkpoint of this run")
                # one line a minute with the count: a run checkpointing every 5 steps on a full disk wrote 119
                checkpoint_failed_log.warning("checkpoint failed", "%s; %s, and training goes on",
                                              result.checkpoint_error, kept)
                return
            result.checkpoint_step, result.checkpoint_error = step, None

    def evaluation(step: int) -> float:
        returns = evaluate(learner.actor, eval_adapter, config.eval_episodes, seed=seed + 1_000_000, stop=stop)
        if len(returns) < config.eval_episodes:  # stopped meanwhile: no figure for a part of the episodes
            return float("nan")
        mean = float(np.mean(returns))
        result.evaluations.append((step, mean))
        metrics.log_evaluation(step, mean)
        result.final_returns = returns
        return mean

    try:
        try:
            observation = adapter.reset(seed=seed)
            builder.add_reset(observation)
            for step in range(1, steps + 1):
                if stop is not None and stop.is_set():
                    result.stopped = True
                    break
                result.steps = step
                info: dict[str, float] = {}
                if len(memory) < config.sac.learning_starts:
                    action = exploration.uniform(-1.0, 1.0, layout.action_dim).astype(np.float32)
                else:
                    action = learner.actor.act(observation, deterministic=False)
                observation, reward, terminated, truncated = adapter.step(action)
                builder.add_step(action, observation, reward, terminated, truncated)
                episode_return += reward
                episode_length += 1
                if terminated or truncated:
                    result.episodes += 1
                    metrics.log_episode(step, episode_return, episode_length)
                    info["episode_return"] = episode_return
                    observation = adapter.reset()
                    builder.add_reset(observation)
                    episode_return, episode_length = 0.0, 0
                memory.add_batch(LOCAL_WORKER_ID, builder.build(seq=batches, weights_version=learner.updates))
                batches += 1

                if len(memory) >= config.sac.learning_starts:
                    update_debt += config.sac.utd
                    while update_debt >= 1.0 and not (stop is not None and stop.is_set()):
                        update_debt -= 1.0
                        log_now = (learner.updates + 1) % config.log_every == 0
                        update_metrics = learner.update(memory.sample(config.sac.batch_size), with_metrics=log_now)
                        if log_now:
                            update_metrics["updates_rejected"] = learner.guard.report(learner.updates)
                            metrics.log_update(step, update_metrics)
                            metrics.log_rates(step, learner.updates, step)

                if config.eval_every and step % config.eval_every == 0 and step != steps and config.eval_episodes:
                    info["eval_return"] = evaluation(step)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step != steps:
                    checkpoint(step)
                if on_progress is not None:
                    on_progress(step, info)
        except (KeyboardInterrupt, SystemExit):  # raised by the env's own code: keep the steps before, then go on
            checkpoint(max(result.steps - 1, 0))
            raise
        except LocalEnvFailure as exc:  # the steps before are learned from: keep them
            done = max(result.steps - 1, 0)
            checkpoint(done)
            raise LocalEnvFailure(f"env {env_id!r} {exc} (at step {result.steps}); {what_was_saved(result)}") from exc
        checkpoint(result.steps)  # before the final evaluation, which an env may fail or a stop may cut short
        if config.eval_episodes and not result.stopped:
            try:
                result.final_return = evaluation(steps)
            except LocalEnvFailure as exc:
                raise LocalEnvFailure(f"env {env_id!r} {exc} in the final evaluation; {what_was_saved(result)}") from exc
            result.stopped = stop is not None and stop.is_set() and math.isnan(result.final_return)
    finally:
        metrics.close()
        env.close()
        eval_env.close()
    result.updates = learner.updates
    result.updates_rejected = learner.guard.report(learner.updates)
    result.wall_s = time.perf_counter() - started
    return result
