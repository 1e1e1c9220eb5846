"""``tmrl-trainer run``: the distributed training loop.

Threads: the ingest thread (:class:`~tmrl_trainer.relay_link.TrainerLink`) receives batches, stores them in the
replay memory and acknowledges them; the main thread (:meth:`TrainerService.run`) runs SAC updates and publishes
weights; a small thread rewrites ``status.json`` every second. The replay memory is shared under one lock (adding a
batch and sampling a minibatch are short; the SAC update itself runs outside the lock).

Sampling (``sac.sampling``): on the host by default; with the ``cuda-graph`` backend on CUDA (``auto``), minibatches
are drawn on the GPU from a mirror of the memory (:mod:`tmrl_trainer.device_replay`) inside the update's CUDA graph.
The main thread syncs the mirror every :data:`REPLAY_SYNC_EVERY` updates; it holds the memory lock only while it
copies the new rows into a host staging buffer, so the ingest thread never waits for the GPU.

Update schedule:

* warm-up: no update until ``sac.learning_starts`` rows are stored;
* ratio: never more than ``sac.utd`` updates per row received (``updates <= utd * rows_received``), so a slow
  worker fleet is not over-fitted; the loop idles a few milliseconds when it is ahead;
* every ``publish_every`` updates the actor is published as a new ``weights_update`` (version + 1) and written to
  ``run_dir/policy.safetensors`` (:func:`export_policy`, readable by ``tmrl-worker run --expert --policy``);
* every ``checkpoint_every`` updates, and at shutdown, a checkpoint is saved (the last 3 are kept, with their memory
  files); when the service is built, the latest checkpoint under ``run_dir/checkpoints`` is restored (learner state,
  update count, weights version) and those weights are re-published at once so workers resume with them.

Learner guard (:mod:`tmrl_trainer.guard`): an update whose loss or gradient is not finite is not applied; such
updates are counted (``learner.updates_rejected`` in ``status.json``, ``updates_rejected`` in the ``train`` records of
``metrics.jsonl`` and TensorBoard) and logged at most every 10 s. Weights holding an inf or a NaN are never published
nor checkpointed (refused, counted as ``publishes_refused`` / ``checkpoints_refused``, logged). On resume, a checkpoint
that cannot be read or holds non-finite tensors is refused with an error naming it, renamed ``<name>.refused`` (kept
for inspection, never tried again; its replay memory file likewise) and the previous one is used; with none left the
trainer starts from scratch. A checkpoint written for another architecture or SAC config whose tensors do not fit
still stops the trainer (a configuration error, not damage). Settings: the config's, not the checkpoint's (the
changes are logged in one warning). On a full disk, all checkpoints but the newest are deleted to make room.

Replay memory across restarts:

* ``save_memory = false`` (default): the memory is not checkpointed. A restarted trainer starts with an empty memory,
  a fresh dedupe window and no update budget: it refills from the workers and the warm-up applies again.
* ``save_memory = true``: each checkpoint also writes the memory (``<checkpoint>.memory.safetensors``) and, in the
  checkpoint's JSON document, the ingest dedupe state. Both are copied under the memory lock, which the ingest thread
  holds from storing a batch to marking its seq (:attr:`Ingestor.store_lock`), so a batch is in both or in neither;
  the lock is held only for that in-memory copy (:meth:`ReplayMemory.to_bytes`), the file is written outside it.
  The memory file also records how many rows were ever added, checked against the checkpoint on restore (a memory file
  rewritten by a later save of the same name is not paired with an older dedupe state). On restart both come back
  from the latest checkpoint: a batch stored before it and resent afterwards is a duplicate, not stored twice. If that
  checkpoint's memory file is missing or unreadable, the learner still resumes and the trainer warns and restores the
  memory and dedupe window of the newest older checkpoint whose memory loads (naming the rows added between the two,
  which it lacks); when none loads, it starts with an empty memory and a fresh dedupe window (as with
  ``save_memory = false``), and the rows refill from the workers.
* update budget with a restored memory: the warm-up is already met by the restored rows (when they are at least
  ``sac.learning_starts``). The ratio ``updates <= utd * rows_received`` counts this run's rows, plus the budget the
  previous run had not used at its checkpoint (``utd * rows received - updates``, saved as ``update_credit``), capped
  at ``utd * restored rows``. So a restart neither grants fresh updates on data that was already trained on at the
  full ratio (a trainer that kept up resumes updating as new rows arrive) nor forfeits updates a slower trainer was
  still owed (it goes on training on the restored rows, as it would have without the restart).

Observation layout: fixed by configuration (``env`` name or ``layout_file``), never taken from the first worker to
speak, so one misconfigured worker cannot poison the replay memory; mismatching batches are rejected and counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq
from filelock import FileLock, Timeout
from pydantic import ValidationError
from tmrl_common.atomic_file import DISK_FULL_ERRNOS
from tmrl_common.config import validation_problems
from tmrl_common.errors import ConfigError
from tmrl_common.layout import (
    ObservationLayout,
    box_bounds,
    empty_space_problem,
    layout_for_box,
    tm20_full_layout,
    tm20_lidar_layout,
    tm20_pixel_lidar_layout,
    tm20_pixel_lidar_progress_layout,
)
from tmrl_common.log_limit import RateLimitedLog
from tmrl_common.networks import weights_update_from_actor
from tmrl_common.protocol import SampleBatch, WeightsUpdate
from tmrl_common.weights import tensors_from_bytes, tensors_to_bytes

from tmrl_trainer.checkpoint import (
    MEMORY_SUFFIX,
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    memory_path_for,
    save_checkpoint,
    saved_memory_state,
)
from tmrl_trainer.config import TrainerConfig
from tmrl_trainer.cuda_graph import CudaGraphLearner
from tmrl_trainer.device_replay import DeviceReplay
from tmrl_trainer.guard import first_non_finite
from tmrl_trainer.ingest import DedupeStateError, Ingestor, ValueBounds
from tmrl_trainer.learner import backend_name, make_learner
from tmrl_trainer.memory import MemoryFileError, MemoryMismatchError, ReplayMemory
from tmrl_trainer.relay_link import TrainerLink, TrainerRoleContested
from tmrl_trainer.sac import resolve_device
from tmrl_trainer.status import METRICS_FILE, STATUS_FILE, TENSORBOARD_DIR, RunRecorder, StatusFile
from tmrl_trainer.tensor_file import write_atomically
from tmrl_trainer.write_failures import WriteFailures

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
KEEP_CHECKPOINTS = 3
REFUSED_SUFFIX = ".refused"
"""Appended to a checkpoint refused on resume (unreadable or non-finite): kept for inspection, never tried again."""
PROGRESS_EVERY_S = 10.0
NO_BATCH_WARNING_S = 60.0
"""The progress line turns into a warning when no batch has been stored for this long (workers stopped, displaced,
refused, or the relay away): the updates wait for samples (``utd``), so the run has stalled."""
WORKERS_SHOWN = 8
"""The progress line names at most this many workers (``status.json`` has every one)."""
REPLAY_SYNC_EVERY = 8
"""With device sampling, the mirror copies the rows received since its last sync every this many updates."""
POLICY_FILE = "policy.safetensors"

_NAMED_LAYOUTS = {
    "sim": tm20_lidar_layout,
    "sim-fast": tm20_lidar_layout,
    "tm20-lidar": tm20_pixel_lidar_layout,  # pixel distances, scaled in the networks (TM20_LIDAR_SCALE)
    "tm20-lidar-progress": tm20_pixel_lidar_progress_layout,
    "tm20-full": tm20_full_layout,
}


def layout_for_env(env: str, layout_file: Path | None = None) -> ObservationLayout:
    """The observation layout the trainer expects (see :attr:`TrainerConfig.env`); raise :class:`ConfigError`."""
    if layout_file is not None:
        try:
            layout = ObservationLayout.model_validate_json(Path(layout_file).read_text())
        except (OSError, ValueError) as exc:
            where = "" if Path(layout_file).is_absolute() else f" ({Path(layout_file).absolute()}: a relative path is " \
                                                                 "read from the working directory, not the config's)"
            # pydantic's multi-line message on one line (a BYO probe), the JSON's own error or the field's
            problem = validation_problems(ObservationLayout, exc) if isinstance(exc, ValidationError) else exc
            raise ConfigError(f"layout_file {layout_file}{where} is not a readable ObservationLayout JSON "
                              f"(`tmrl-worker layout -c CONFIG > layout.json` writes one): {problem}") from exc
        own = _NAMED_LAYOUTS[env]() if env in _NAMED_LAYOUTS else None
        if own is not None and own != layout:  # legitimate (a TrackMania image size), but never silent: --env says one
            log.warning("layout_file %s overrides the layout of env %r (%s) with %s: batches in that env's own "
                        "layout will be refused, so its workers' env_options must make them send the file's",
                        layout_file, env, describe_layout(own), describe_layout(layout))
        return layout
    if env in _NAMED_LAYOUTS:
        return _NAMED_LAYOUTS[env]()
    if env.startswith("gym:"):
        import math

        import gymnasium
        from gymnasium import spaces

        try:
            probe = gymnasium.make(env[4:])
        except Exception as exc:  # gymnasium raises several types for unknown ids / missing extras
            raise ConfigError(f"env {env!r}: gymnasium cannot make {env[4:]!r}: {exc}") from exc
        try:
            declared = getattr(probe.unwrapped, "layout", None)
            if isinstance(declared, ObservationLayout):
                return declared
            if not isinstance(probe.observation_space, spaces.Box) or not isinstance(probe.action_space, spaces.Box):
                raise ConfigError(f"env {env!r} needs Box observation and action spaces; set layout_file instead")
            empty = empty_space_problem(probe.observation_space.shape, probe.action_space.shape)
            if empty is not None:
                raise ConfigError(f"env {env!r}: {empty}")
            return layout_for_box(math.prod(probe.observation_space.shape), math.prod(probe.action_space.shape),
                                  *box_bounds(probe.observation_space.low, probe.observation_space.high))
        finally:
            probe.close()
    raise ConfigError(f"env {env!r} has no built-in layout; use one of {sorted(_NAMED_LAYOUTS)} or gym:<id>, "
                      "or set layout_file to a JSON ObservationLayout (`tmrl-worker layout -c CONFIG > layout.json` "
                      "writes it from the worker's config, on any machine)")


def describe_layout(layout: ObservationLayout) -> str:
    """``layout`` in a few words: each component's name and shape, the actions kept in the observation, the action
    size."""
    parts = [f"{c.name} {'x'.join(map(str, c.observation_shape))}" for c in layout.components]
    if layout.action_history:
        parts.append(f"{layout.action_history} previous action(s)")
    return f"[{', '.join(parts)}; action {layout.action_dim}]"


def workers_summary(workers: dict[str, dict[str, Any]], shown: int = WORKERS_SHOWN) -> str:
    """The progress line's part on workers, from the ingest snapshot's ``workers``: the first ``shown`` workers (by
    name) that have a batch stored, then how many more there are, and how many said hello or sent only refused
    batches. ``status.json`` lists them all."""
    senders = [(name, stats) for name, stats in workers.items() if stats["batches"]]
    parts = [f"{name}: {stats['batches']} batches, v{stats['weights_version']}, last return "
             f"{'n/a' if stats['last_return'] is None else format(stats['last_return'], '.2f')}"
             for name, stats in senders[:shown]]
    if len(senders) > shown:
        parts.append(f"{len(senders) - shown} more worker(s) with batches (status.json lists every one)")
    if len(workers) > len(senders):
        parts.append(f"{len(workers) - len(senders)} worker(s) without a stored batch yet (starting, refused, or "
                     "--test viewers, which send none)")
    return ", ".join(parts)


def export_policy(update: WeightsUpdate, path: Path) -> Path:
    """Write the published actor as a standalone policy file: safetensors tensors, metadata ``architecture`` (JSON of
    the flat architecture dict) and ``version``. ``tmrl-worker run --expert --policy FILE`` and the demo read it."""
    metadata = {"architecture": json.dumps(update.architecture), "version": str(update.version), "format": "tmrl-actor"}
    return write_atomically(path, tensors_to_bytes(tensors_from_bytes(update.tensors), metadata=metadata))


def read_previous_status(path: Path) -> dict[str, Any] | None:
    """The last ``status.json`` a run left in ``path`` (None when there is none or it does not read)."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


MEMORY_WARNING_FRACTION = 0.8
"""A replay memory whose full size passes this share of the machine's RAM is warned of at start."""


def physical_memory_bytes() -> int | None:
    """The machine's RAM (None where ``os.sysconf`` cannot say, as on Windows)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def writable_directory(directory: Path) -> None:
    """Create ``directory`` if needed and check that a file can be written in it; :class:`ConfigError` naming it
    (and the OS's reason) otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write in {directory} ({exc}): the trainer keeps its checkpoints there; choose "
                          "another run_dir or fix its permissions") from exc


RUN_LOCK = "trainer.lock"
"""The lock file a running trainer holds in its run directory (:func:`lock_run_directory`)."""


def lock_run_directory(run_dir: Path) -> FileLock:
    """Hold ``run_dir``'s lock file for this trainer: released at :meth:`TrainerService.shutdown`, or by the OS
    when the process ends however it ends. Two trainers in one run directory would write, prune and resume each
    other's checkpoints (and take the trainer role from each other at the relay); :class:`ConfigError` when another
    trainer holds it."""
    lock = FileLock(str(run_dir / RUN_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise ConfigError(f"run directory {run_dir} is in use by another trainer (it holds {run_dir / RUN_LOCK}): "
                          "stop that trainer first, or give this one another run_dir (--run-dir)") from exc
    except OSError as exc:  # a folder where the lock file goes: a traceback before (an outside probe)
        raise ConfigError(f"run directory {run_dir} cannot hold the trainer's lock file {run_dir / RUN_LOCK}: "
                          f"{exc.strerror or exc}; move what is there aside, or choose another run_dir") from exc
    return lock


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of ``path``; ``None`` when it cannot be read (deleted)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class TrainerService:
    """Owns the memory, the learner, the ingest thread and the reports (see the module docstring)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.layout = layout_for_env(config.env, config.layout_file)
        try:
            self.architecture = config.sac.architecture(self.layout)
        except ValidationError as exc:  # the networks cannot take this layout (an image too small for the CNN)
            raise ConfigError(f"[trainer.sac] does not fit the observation layout: {exc.errors()[0]['msg']}") from exc
        self.device = resolve_device(config.device)
        torch.set_num_threads(config.torch_threads or max(1, min(8, (os.cpu_count() or 2) // 2)))
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        writable_directory(self.checkpoint_dir)  # now, not at the first checkpoint minutes later
        self._run_lock = lock_run_directory(self.run_dir)
        self._lock_identity = _file_identity(self.run_dir / RUN_LOCK)
        """Device and inode of the lock file this trainer holds: another file there means the folder was replaced."""
        self._run_directory_lost = False
        self.learner = make_learner(config.sac, self.architecture, device=self.device, seed=config.seed)
        self.memory = self._empty_memory()
        self.memory_lock = threading.RLock()
        """Guards the memory and ``rows_received``; the ingestor also holds it from storing a batch to marking its seq
        (re-entered by :meth:`_store`), so a checkpoint copies memory and dedupe state from one moment."""
        self._waiting_log = RateLimitedLog(log, interval_s=30.0)
        self._make_room_log = RateLimitedLog(log, interval_s=60.0)
        self._checkpoint_failed_log = RateLimitedLog(log, interval_s=60.0)
        self._batches_seen = 0
        self._batch_seen_at = time.monotonic()
        """The ingest's ``batches_stored`` at the last progress line that saw it change, and when (stall warning)."""
        self.weights_version = 0
        self._published_at_updates = 0
        """The update count of the actor the current weights version labels."""
        self.rows_received = 0
        self.samples_before_run = 0
        """Rows the runs before this one received (from the checkpoint resumed): ``updates`` counts across restarts,
        and ``samples_received_total`` with it."""
        self.samples_lost_in_restarts = 0
        """With ``save_memory``: rows earlier runs stored (and acknowledged to their workers) after the checkpoint the
        next run resumed, so in no saved memory: lost with the process that held them (killed, crashed). Across
        restarts, from the checkpoints' counters and the last run's ``status.json``."""
        self.recorder = self._run_recorder()
        self.ingestor = Ingestor(
            config.trainer_id, self.layout, store=self._store, on_episode=self.recorder.episode,
            allowed_workers=frozenset(config.allowed_workers) or None, store_lock=self.memory_lock,
            bounds=ValueBounds(config.max_abs_reward, config.max_abs_observation), max_workers=config.max_workers,
            published_version=lambda: self.weights_version,
        )
        self._context = zmq.Context()
        self.link = TrainerLink(config.trainer_id, config.relay_host, config.trainer_port, config.transport,
                                config.security, self.ingestor, config.heartbeat_interval_s, context=self._context)
        self.link.check_security()
        self.status = StatusFile(self.run_dir / STATUS_FILE, self.snapshot, config.status_interval_s)
        self.last_metrics: dict[str, float] = {}
        self.guard_counts = {"updates_rejected": 0, "publishes_refused": 0, "checkpoints_refused": 0,
                             "checkpoints_failed": 0}
        """The learner guard's counters as of the last report, and the checkpoints the disk refused (``learner`` in
        ``status.json``, with ``policy_exports_failed`` from :attr:`_policy_file_failures`)."""
        self._policy_file_failures = WriteFailures(
            log, str(self.run_dir / POLICY_FILE), "the workers got these weights over the relay all the same")
        self._carried_update_credit = 0
        """Updates the checkpoint's run was still owed on the restored memory (see the module docstring)."""
        self._resumed_memory: tuple[Path, int] | None = None
        """(checkpoint resumed from, rows ever added to the replay memory saved with it) when it holds one: a
        checkpoint at the same update count (no update since) would replace it, and must not with less memory."""
        self._refused_on_resume: list[Path] = []
        """Checkpoints refused (and set aside) by this start, newest first: the lost-progress warning names them."""
        self.last_checkpoint_updates: int | None = None
        """Updates of the newest checkpoint saved or resumed by this service (None: none yet)."""
        self.final_checkpoint_missing = False
        self._stopped = False
        """Set by :meth:`shutdown` before the last status snapshot: this process stopped, not killed."""
        """True when the checkpoint at shutdown could not be saved (``tmrl-trainer run`` then exits with status 1)."""
        self._started = time.time()
        previous_run = read_previous_status(self.run_dir / STATUS_FILE)  # before this run's status replaces it
        self._resumed_checkpoint: str | None = None
        """The name of the checkpoint this run resumed from (``None``: a fresh start)."""
        try:
            self._resume()  # before anything is ingested: a saved memory is loaded into the empty one
        except BaseException:
            self._context.destroy(linger=0)
            self._run_lock.release()
            raise
        # metrics.jsonl / TensorBoard rates count this run's progress: updates continue the checkpoint's count
        self.recorder.set_rate_baseline(self.learner.updates, self.rows_received)
        self.recorder.start(self.learner.updates, self.weights_version, self._resumed_checkpoint)
        self._report_lost_progress(previous_run)
        if config.sac.learning_starts > config.memory_capacity:  # an ingest-only trainer, or a typo: say which it is
            log.warning("sac.learning_starts (%d) exceeds memory_capacity (%d): this trainer stores samples but will "
                        "never train", config.sac.learning_starts, config.memory_capacity)
        self._warn_of_a_memory_larger_than_this_machine()
        # the ratio counts the updates made beyond this baseline against this run's rows; a restored memory's unused
        # budget moves the baseline up, so that many updates come on top of utd * rows received
        self._ratio_baseline = self.learner.updates + self._carried_update_credit
        """``updates - _ratio_baseline <= utd * rows_received`` is the update-to-data cap."""
        self.replay = self._make_replay()
        """The memory's mirror on the learner's device when minibatches are drawn there (``sac.sampling``), else
        ``None``."""

    def _report_lost_progress(self, previous_run: dict[str, Any] | None) -> None:
        """Warn when the last run got further than the checkpoint resumed (killed, crashed, power cut): its updates,
        weights versions and acknowledged rows after that checkpoint are lost, and the versions will be reused."""
        if not previous_run:
            return
        updates, version = int(previous_run.get("updates", 0)), int(previous_run.get("weights_version", 0))
        samples = previous_run.get("samples_received_total", previous_run.get("samples_received"))
        lost_rows = max(0, int(samples) - self.samples_before_run) if samples is not None else 0
        if self.config.save_memory:  # without it every restart starts from an empty memory, by design
            self.samples_lost_in_restarts += lost_rows
        else:
            lost_rows = 0
        if updates <= self.learner.updates and not lost_rows:
            return
        if self._refused_on_resume:  # the last run may well have stopped cleanly: its newest checkpoints were refused
            cause = (f"the newer checkpoint(s) {', '.join(p.name for p in self._refused_on_resume)} were refused "
                     "(above), and what the last run learned and stored after the one resumed is lost")
        elif previous_run.get("final_checkpoint_missing"):  # a storage probe: a full disk at the stop was "not clean"
            cause = ("it stopped, but could not save its final checkpoint (its log says why: a full disk, a folder "
                     "gone read-only), and what it learned and stored after its last checkpoint is lost")
        elif previous_run.get("stopped"):
            cause = (f"it stopped cleanly, so its newer checkpoints are gone from {self.checkpoint_dir} (deleted or "
                     "moved?), and what it learned and stored after the one resumed is lost")
        else:
            cause = ("it did not stop cleanly, and what it learned and stored after its last checkpoint is lost (a "
                     "SIGTERM or Ctrl-C saves one; checkpoint_every sets how often)")
        # at least: status.json is rewritten every status_interval_s, so rows of the last interval before a kill
        # are in no count
        where = ("after that checkpoint" if self._resumed_checkpoint is not None else "and no checkpoint was saved")
        lost = (f" ({lost_rows} or more of them {where}: acknowledged to their workers but in no saved memory, so "
                f"lost; {self.samples_lost_in_restarts} so far in this run directory, samples_lost_in_restarts in "
                "status.json)" if lost_rows else "")
        log.warning("the last run reached %d updates and weights version %d (status.json)%s%s, but this one resumes "
                    "from %d updates and version %d: %s", updates, version,
                    f", {samples} samples received" if samples is not None else "", lost, self.learner.updates,
                    self.weights_version, cause)

    def _empty_memory(self) -> ReplayMemory:
        sac = self.config.sac
        return ReplayMemory(self.layout, capacity=self.config.memory_capacity, seed=self.config.seed, n_step=sac.n_step,
                            gamma=sac.gamma)

    def _make_replay(self) -> DeviceReplay | None:
        sampling = self.config.sac.sampling
        if sampling == "auto":
            sampling = "device" if isinstance(self.learner, CudaGraphLearner) and self.learner.capture else "host"
        if sampling == "host":
            return None
        return DeviceReplay(self.memory, self.device, seed=self.config.seed + 1)

    # ------------------------------------------------------------------------------------------------- memory

    def _store(self, worker: str, batch: SampleBatch) -> int:
        with self.memory_lock:
            rows = self.memory.add_batch(worker, batch)
            self.rows_received += rows
        return rows

    # ------------------------------------------------------------------------------------------ checkpoints

    def _run_recorder(self) -> RunRecorder:
        """The run's records (``metrics.jsonl``, ``tensorboard/``), after checking that the files the trainer rewrites
        later (``status.json``, ``policy.safetensors``) are not folders: a run directory the trainer cannot write its
        records in is a :class:`ConfigError` now, in one line, rather than a traceback now or a failure later."""
        try:
            for name in (STATUS_FILE, POLICY_FILE):
                if (self.run_dir / name).is_dir():
                    raise IsADirectoryError(f"{self.run_dir / name} is a folder, where the trainer writes a file")
            return RunRecorder(self.run_dir, train_every_s=self.config.train_record_every_s)
        except OSError as exc:
            self._run_lock.release()
            raise ConfigError(f"cannot write the run's records in {self.run_dir} ({exc}): {METRICS_FILE}, "
                              f"{STATUS_FILE} and {POLICY_FILE} must be writable files there and {TENSORBOARD_DIR} a "
                              "writable folder; fix them or choose another run_dir") from exc

    def _checkpoint_paths(self) -> list[Path]:
        """Checkpoints (not their memory files), oldest first."""
        return sorted((p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*.safetensors")
                       if not p.name.endswith(MEMORY_SUFFIX)),
                      key=lambda p: p.name)  # zero-padded update counts: name order is update order

    def _resume(self) -> None:
        """Restore the newest checkpoint that loads and is finite; refuse (and set aside) the ones after it."""
        paths = self._checkpoint_paths()
        if not paths:
            log.info("no checkpoint in %s: starting from scratch", self.checkpoint_dir)
            return
        for path in reversed(paths):
            try:
                restored = load_checkpoint(path, self.learner)
            except CheckpointMismatchError:
                raise  # written for another configuration: every older one was too; the operator must choose
            except CheckpointError as exc:
                log.error("refusing checkpoint %s: %s; %s, trying the previous one", path, exc, self._set_aside(path))
                self._refused_on_resume.append(path)
                continue
            self._resumed_from(path, restored)
            return
        log.error("no usable checkpoint in %s (every one was refused, see above): starting from scratch",
                  self.checkpoint_dir)
        # a refused checkpoint may have been partly loaded before its fault showed: start from a fresh learner
        self.learner = make_learner(self.config.sac, self.architecture, device=self.device, seed=self.config.seed)

    @staticmethod
    def _set_aside(path: Path) -> str:
        """Rename a refused checkpoint ``<name>.refused`` (never tried again, kept for inspection), and its replay
        memory file with it: the memory was not what was refused and may be intact, and under its own name the next
        prune would delete it as belonging to no checkpoint. Say what happened."""
        refused = path.with_name(path.name + REFUSED_SUFFIX)
        try:
            path.replace(refused)
        except OSError as exc:  # a read-only run directory: it will be refused again next time, which is harmless
            return f"could not set it aside ({exc})"
        memory_file = memory_path_for(path)
        if not memory_file.exists():
            return f"set aside as {refused.name}"
        memory_refused = memory_file.with_name(memory_file.name + REFUSED_SUFFIX)
        try:
            memory_file.replace(memory_refused)
        except OSError as exc:
            return f"set aside as {refused.name}; its replay memory file could not be ({exc})"
        return f"set aside as {refused.name}, its replay memory file as {memory_refused.name}"

    def _resumed_from(self, path: Path, restored: Checkpoint) -> None:
        self._resumed_checkpoint = path.name
        self.last_checkpoint_updates = self.learner.updates
        self.weights_version = int(restored.counters.get("weights_version", 0))
        self._published_at_updates = self.learner.updates  # a checkpoint's version labels its actor (shutdown)
        self.samples_before_run = int(restored.counters.get("samples_received", 0))
        self.samples_lost_in_restarts = int(restored.counters.get("samples_lost_in_restarts", 0))
        memory = "the replay memory starts empty"
        if restored.memory_saved:
            self._resumed_memory = (path, int(restored.extra.get("memory_rows_added", 0)))
            if not self.config.save_memory:
                log.warning("checkpoint %s holds a saved replay memory, but save_memory is off: the replay memory "
                            "starts empty (set save_memory = true to restore it); the saved one is kept until newer "
                            "checkpoints replace it", path)
        if self.config.save_memory:
            rows = self._restore_memory(path, restored)
            if rows:
                memory = (f"replay memory restored: {rows} rows, {self._carried_update_credit} updates still owed "
                          "on them")
        log.info("resumed from checkpoint %s: %d updates, weights version %d (%s)",
                 path, self.learner.updates, self.weights_version, memory)
        if self.weights_version > 0:
            self.link.publish(weights_update_from_actor(self.learner.actor, self.weights_version))

    def _restore_memory(self, path: Path, restored: Checkpoint) -> int:
        """Load the memory and dedupe state saved with checkpoint ``path``; return the rows restored. Where that
        memory cannot be, the newest older checkpoint's that can (its rows and dedupe window: rows acknowledged after
        it are not in the memory); where none can, the memory starts empty with a fresh dedupe window. Logged."""
        memory_file = memory_path_for(path)
        if not restored.memory_saved or "dedupe" not in restored.extra:
            log.warning("checkpoint %s holds no replay memory (saved with save_memory off, or by local training): the "
                        "replay memory starts empty and the warm-up applies again", path)
            return 0
        try:
            problem = self._load_saved_memory(memory_file, restored.extra)
        except MemoryMismatchError as exc:
            # resumed with an empty memory, the next checkpoints would prune the saved one: the operator chooses
            raise CheckpointMismatchError(
                f"the replay memory saved with checkpoint {path.name} ({memory_file.name}) was written with "
                f"memory_capacity = {exc.saved_capacity} (or another observation layout), and this trainer has "
                f"memory_capacity = {self.config.memory_capacity}: a memory cannot be resized on resume. Set "
                f"memory_capacity = {exc.saved_capacity} to restore it; or, to resume the learner with an empty "
                "memory, start once with save_memory = false (the saved memory is then deleted as newer checkpoints "
                "replace it) or give this trainer another run_dir") from exc
        if problem is not None:
            log.warning("replay memory %s could not be restored (%s)", memory_file, problem)
            older = self._restore_older_memory(path)
            if older is None:
                log.warning("the learner is resumed from %s, but the replay memory starts empty with a fresh dedupe "
                            "window and the warm-up applies again", path.name)
                return 0
            log.warning("the learner is resumed from %s with the replay memory saved with the older checkpoint %s "
                        "(%d rows; %d rows were added between the two, which are not in the memory), and its dedupe "
                        "window", path.name, older.name, len(self.memory),
                        int(restored.extra.get("memory_rows_added", 0)) - self.memory.rows_added)
        credit = max(0, int(restored.counters.get("update_credit", 0)))
        self._carried_update_credit = min(credit, int(self.config.sac.utd * len(self.memory)))
        return len(self.memory)

    def _load_saved_memory(self, memory_file: Path, extra: dict[str, Any]) -> str | None:
        """Load one saved memory and the dedupe state saved with it (``extra``, its checkpoint's); why it could not
        be, else ``None``. A failure leaves the memory empty and the dedupe window as it was; a memory of another
        capacity or layout raises :class:`MemoryMismatchError`."""
        try:
            # into the empty memory (no second allocation), its values held to the ingest's bounds before it replaces
            self.memory.load(memory_file, bounds=self.ingestor.bounds)
            expected = extra.get("memory_rows_added")
            if self.memory.rows_added != expected:
                raise MemoryFileError(f"it holds {self.memory.rows_added} rows ever added where the checkpoint "
                                      f"expects {expected} (not the memory saved with this checkpoint)")
            self.ingestor.restore_dedupe(extra["dedupe"])  # last: it changes nothing when it fails
        except MemoryMismatchError:
            raise  # a configuration change, not damage: the caller decides (it loaded nothing)
        except (OSError, MemoryFileError, DedupeStateError) as exc:
            self.memory = self._empty_memory()
            return str(exc)
        return None

    def _restore_older_memory(self, newest: Path) -> Path | None:
        """Restore the memory of the newest checkpoint older than ``newest`` that saved one that loads; which one,
        or ``None``. Each that does not load is logged (its files stay: pruning removes them in time)."""
        for path in reversed([p for p in self._checkpoint_paths() if p.name < newest.name]):
            extra = saved_memory_state(path)
            if extra is None:
                continue
            try:
                problem = self._load_saved_memory(memory_path_for(path), extra)
            except MemoryMismatchError as exc:  # an older configuration's: not this run's memory to restore
                problem = str(exc)
            if problem is None:
                return path
            log.warning("the older replay memory %s could not be restored either (%s)", memory_path_for(path), problem)
        return None

    def _update_credit(self) -> int:
        """Updates this run may still make at the utd ratio (call with the memory lock held)."""
        allowed = self.config.sac.utd * self.rows_received
        return max(0, int(allowed - (self.learner.updates - self._ratio_baseline)))

    def _checkpoint(self, final: bool = False) -> bool:
        """Save a checkpoint of the learner (and the replay memory with ``save_memory``); False when none could be
        saved, which is logged (``final``: at shutdown, where training does not go on). The previous ones stay."""
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.learner.updates:012d}.safetensors"
        counters = {"weights_version": self.weights_version,
                    "samples_received": self.samples_before_run + self.rows_received,  # across restarts
                    "samples_lost_in_restarts": self.samples_lost_in_restarts}
        memory: bytes | None = None
        extra: dict[str, Any] = {}
        if self.config.save_memory:
            with self.memory_lock:  # no batch is between being stored and being marked while this is held
                memory = self.memory.to_bytes()
                extra = {"dedupe": self.ingestor.dedupe_state(), "memory_rows_added": self.memory.rows_added}
                counters["update_credit"] = self._update_credit()
        if self._resumed_memory is not None and self._resumed_memory[0] == path:  # no update since resuming
            saved_rows = self._resumed_memory[1]
            rows = extra.get("memory_rows_added", 0) if memory is not None else 0
            if rows < saved_rows:
                log.warning("checkpoint %s not replaced: no update since it was resumed, and it holds a replay memory "
                            "of %d rows ever added where this run would save %s", path, saved_rows,
                            f"{rows}" if memory is not None else "none (save_memory is off)")
                return True  # it holds this learner's state already
        try:
            try:
                save_checkpoint(path, self.learner, counters=counters, memory=memory, extra=extra)
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS or not self._make_room(exc):  # tried once more after pruning
                    raise
                save_checkpoint(path, self.learner, counters=counters, memory=memory, extra=extra)
        except CheckpointError as exc:  # non-finite state: keep the previous checkpoints, say why
            self.guard_counts["checkpoints_refused"] += 1
            log.error("checkpoint at %d updates not saved: %s; the previous checkpoints are kept",
                      self.learner.updates, exc)
            return False
        except OSError as exc:  # a full disk, a quota, permissions: training goes on, the next checkpoint tries again
            self.guard_counts["checkpoints_failed"] += 1
            kept = "the previous checkpoints are kept" if self._checkpoint_paths() else "no checkpoint of this run is on disk yet"
            message = "checkpoint at %d updates could not be written (%s); %s%s: free disk space or fix %s"
            args = (self.learner.updates, exc, kept, "" if final else " and training goes on", self.checkpoint_dir)
            if final:
                log.error(message, *args)
            else:  # a line per checkpoint while the disk stays full was 37 lines in a probe's minutes: once a minute
                # with the count (status.json's checkpoints_failed counts each)
                self._checkpoint_failed_log.log(logging.ERROR, "checkpoint failed", message, *args)
            return False
        self._prune_checkpoints(just_saved=path)
        self.last_checkpoint_updates = self.learner.updates
        log.info("checkpoint saved: %s (%d updates, weights version %d%s)", path, self.learner.updates,
                 self.weights_version, f", {extra['memory_rows_added']} rows added to the memory" if extra else "")
        return True

    def _prune_checkpoints(self, keep: int = KEEP_CHECKPOINTS, just_saved: Path | None = None) -> list[str]:
        """Keep the newest ``keep`` checkpoints (and ``just_saved``, whatever its name sorts as: a run resumed from a
        checkpoint whose counters say fewer updates than its name must not delete what it just wrote); delete older
        ones, every memory file that does not belong to a kept checkpoint (one written for a checkpoint that failed,
        say), and temporary files left by a write that a SIGKILL or power cut interrupted. Return the names deleted."""
        paths = [p for p in self._checkpoint_paths() if p != just_saved]
        if just_saved is not None:
            paths.append(just_saved)  # newest by definition: it is what this learner holds now
        deleted = []
        for old in paths[:-keep]:
            old.unlink(missing_ok=True)
            deleted.append(old.name)
        for stale in self.checkpoint_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # write_atomically's leftovers
            stale.unlink(missing_ok=True)
            deleted.append(stale.name)
        kept_memory = {memory_path_for(p) for p in paths[-keep:]}
        for memory_file in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*{MEMORY_SUFFIX}"):
            if memory_file not in kept_memory:
                memory_file.unlink(missing_ok=True)
                deleted.append(memory_file.name)
        return deleted

    def _make_room(self, exc: OSError) -> bool:
        """On a full disk, delete every checkpoint but the newest (and memory files of none kept), so that the
        checkpoint can be tried once more: pruning otherwise follows a successful save, and a disk that cannot hold
        one more checkpoint beside the kept ones would never get a new one. Return whether anything was deleted."""
        deleted = self._prune_checkpoints(keep=1)
        if deleted:  # at every checkpoint while the disk stays full: once a minute
            self._make_room_log.warning("make room", "checkpoint at %d updates could not be written (%s): deleted %s "
                                        "to make room, keeping the newest checkpoint, and trying once more",
                                        self.learner.updates, exc, ", ".join(deleted))
        return bool(deleted)

    # ----------------------------------------------------------------------------------------------- reports

    def snapshot(self) -> dict[str, Any]:
        ingest = self.ingestor.snapshot()
        with self.memory_lock:
            stored = len(self.memory)
            counts = self.memory.verification
            verification = {**vars(counts), "mismatched_by_worker": dict(counts.mismatched_by_worker),  # a copy
                            "orphan_rows": self.memory.orphan_rows}
        return {
            "trainer_id": self.config.trainer_id,
            "env": self.config.env,
            "device": str(self.device),
            "uptime_s": time.time() - self._started,
            "connected": self.link.connected,
            "updates": self.learner.updates,
            "weights_version": self.weights_version,
            "samples_received": ingest["rows_stored"],  # this run's; same snapshot as the per-worker counts
            "samples_received_total": self.samples_before_run + ingest["rows_stored"],  # across restarts, as updates
            "samples_lost_in_restarts": self.samples_lost_in_restarts,
            "samples_stored": stored,
            "verification": verification,
            "metrics": self.last_metrics,
            "learner": {**self.guard_counts, "policy_exports_failed": self._policy_file_failures.total},
            "records": self.recorder.write_failures(),
            "link": vars(self.link.counters),
            # the last snapshot (written at shutdown) says how this process ended, for the next one's "lost" warning
            "stopped": self._stopped,
            "final_checkpoint_missing": self.final_checkpoint_missing,
            **ingest,
        }

    # -------------------------------------------------------------------------------------------------- loop

    def _publish(self, publish: bool = True) -> None:
        """Give the actor the next weights version: send it to the relay (``publish``) and write ``policy.safetensors``.
        Without ``publish`` (at shutdown, the link stopped) only the file gets it, so that the final checkpoint's
        version labels the very actor it holds (an export of a final checkpoint otherwise bore the version of an actor
        published some updates before, with other tensors: a restart probe)."""
        bad = first_non_finite(self.learner.actor.state_dict())
        if bad is not None:  # the guard should make this impossible; if it happens, workers keep their weights
            self.guard_counts["publishes_refused"] += 1
            log.error("weights not published after %d updates: actor tensor %s holds a non-finite value "
                      "(%d publications refused so far)", self.learner.updates, bad,
                      self.guard_counts["publishes_refused"])
            return
        self.weights_version += 1
        self._published_at_updates = self.learner.updates
        update = weights_update_from_actor(self.learner.actor, self.weights_version)
        if publish:
            self.link.publish(update)
        try:
            export_policy(update, self.run_dir / POLICY_FILE)
        except OSError as exc:  # a full disk, a quota: the workers have the weights; the next publication tries again
            self._policy_file_failures.failed(exc)
        else:
            self._policy_file_failures.succeeded()
        log.debug("published weights version %d after %d updates (%d samples received)", self.weights_version,
                 self.learner.updates, self.rows_received)

    def _warn_of_a_memory_larger_than_this_machine(self) -> None:
        """Its pages are committed as rows come: a memory that does not fit fails hours into a run, not at start."""
        physical = physical_memory_bytes()
        full = self.memory.nbytes_when_full
        if physical is not None and full > MEMORY_WARNING_FRACTION * physical:
            log.warning("the replay memory takes %s when full (memory_capacity = %d rows), %.0f%% of this machine's %s "
                        "of RAM: it fills as samples come, so the trainer would run out of memory hours from now; "
                        "lower memory_capacity", _megabytes(full), self.memory.capacity, 100 * full / physical,
                        _megabytes(physical))

    def _check_run_directory(self) -> None:
        """Say so (an error, once) when the run directory or its lock file was deleted or replaced while this
        trainer runs: its later files go to a re-created folder, and another trainer could take that folder."""
        if self._run_directory_lost:
            return
        lock_path = self.run_dir / RUN_LOCK
        if _file_identity(lock_path) != self._lock_identity:
            self._run_directory_lost = True
            log.error("the run directory %s or its lock file %s was deleted or replaced while this trainer runs: "
                      "another trainer could now start in it, and this one's status, metrics and checkpoints go to "
                      "a re-created folder; stop this trainer (its final checkpoint is saved) and restart it",
                      self.run_dir, lock_path)

    def _report(self) -> None:
        """The progress line: a warning while the trainer is not connected to the relay or has stored no batch for
        :data:`NO_BATCH_WARNING_S`, with the warm-up's progress until the first update."""
        self._check_run_directory()
        snapshot = self.ingestor.snapshot()
        now = time.monotonic()
        if snapshot["batches_stored"] != self._batches_seen:
            self._batches_seen, self._batch_seen_at = snapshot["batches_stored"], now
        notes = []
        with self.memory_lock:
            stored = len(self.memory)
        if stored < self.config.sac.learning_starts:
            notes.append(f"warm-up: {stored} of {self.config.sac.learning_starts} rows stored before the first update")
        quiet = now - self._batch_seen_at
        if quiet >= NO_BATCH_WARNING_S:
            notes.append(f"no batch stored for {quiet:.0f} s: updates wait for samples; are the workers running, and "
                         "connected (their logs, the relay's tmrl_relay_connected_workers and rejects)?")
        workers = workers_summary(snapshot["workers"])
        if not self.link.connected:  # the warning's cause, also once workers have sent (a relay that went away)
            unconnected = f"not connected to the relay at {self.link.describe()} ({self.link.unconnected_hint()})"
            if workers:
                notes.insert(0, unconnected + ": the workers' batches wait in their spools and the relay")
        log.log(logging.WARNING if quiet >= NO_BATCH_WARNING_S or not self.link.connected else logging.INFO,
                "%d updates, weights version %d, %d samples received (%d duplicates, %d rejected); %s%s",
                self.learner.updates, self.weights_version, self.rows_received, snapshot["duplicates"],
                sum(snapshot["rejects"].values()),
                workers or ("no worker yet" if self.link.connected else unconnected),
                "".join(f"; {note}" for note in notes))

    def _may_update(self) -> bool:
        sac = self.config.sac
        with self.memory_lock:
            stored, received = len(self.memory), self.rows_received
        return stored >= sac.learning_starts and self.learner.updates - self._ratio_baseline < sac.utd * received

    def run(self, stop: threading.Event | None = None, max_updates: int | None = None) -> int:
        """Train until ``stop`` is set (or ``max_updates`` updates); return the number of updates done."""
        stop = stop or threading.Event()
        self.link.start()
        self.status.start()
        source = (f"layout_file {self.config.layout_file}" if self.config.layout_file is not None
                  else f"env {self.config.env!r}")
        log.info("trainer %s on %s (%s learner, %s networks): layout %s from %s, relay %s; warm-up %d rows, at most "
                 "%.2f updates per row, %d-step returns; replay memory of %d rows, %s when full", self.config.trainer_id,
                 self.device, backend_name(self.learner), self.architecture.kind, describe_layout(self.layout), source,
                 self.link.describe(),
                 self.config.sac.learning_starts, self.config.sac.utd, self.memory.n_step, self.memory.capacity,
                 _megabytes(self.memory.nbytes_when_full))
        next_report = time.monotonic() + PROGRESS_EVERY_S
        self._batch_seen_at = time.monotonic()  # a trainer waiting for its first batch warns from NO_BATCH_WARNING_S
        try:
            while not stop.is_set() and (max_updates is None or self.learner.updates < max_updates):
                if time.monotonic() >= next_report:
                    self._report()
                    next_report = time.monotonic() + PROGRESS_EVERY_S
                if self.link.failure is not None:
                    raise RuntimeError(f"ingest thread failed: {self.link.failure}") from self.link.failure
                if self.link.contested is not None:
                    raise TrainerRoleContested(self.link.contested)
                if not self._may_update():
                    stop.wait(0.005)
                    continue
                publishing = (self.learner.updates + 1) % self.config.publish_every == 0
                if not self.memory.has_transition():  # e.g. a worker that sent only first rows, over the whole ring
                    if self.replay is not None:
                        self.replay.forget_ready()  # the mirror's index is stale: count it again once rows come
                    self._waiting_log.warning("no transition", "the replay memory holds %d rows but none ends a "
                                              "complete transition (each starts an episode or follows a gap): "
                                              "waiting for more samples", len(self.memory))
                    stop.wait(0.05)
                    continue
                if self.replay is not None:
                    if self.learner.updates % REPLAY_SYNC_EVERY == 0 or not self.replay.ready():
                        self.replay.sync(self.memory_lock)  # the memory lock only while a chunk is copied on the host
                        if not self.replay.ready():
                            stop.wait(0.005)
                            continue
                    metrics = self.learner.update_sampled(self.replay, with_metrics=publishing)
                else:
                    with self.memory_lock:
                        batch = self.memory.sample(self.config.sac.batch_size)
                    metrics = self.learner.update(batch.to(self.device), with_metrics=publishing)
                updates = self.learner.updates
                if publishing:
                    self.guard_counts["updates_rejected"] = self.learner.guard.report(updates)
                    # status.json is strict JSON: a rejected update's inf loss is left out (the guard counted it)
                    self.last_metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
                    self.last_metrics["updates_rejected"] = self.guard_counts["updates_rejected"]
                    self._publish()
                    self.recorder.training(updates, self.rows_received, self.weights_version, self.last_metrics)
                if updates % self.config.checkpoint_every == 0:
                    self._checkpoint()
        finally:
            self.shutdown()
        return self.learner.updates

    def shutdown(self) -> None:
        # the ingest thread first: a batch answered `stored` after the final checkpoint copied the memory would be in
        # no memory (its worker drops an answered batch); one that arrives now stays unanswered, and is resent
        self.link.stop()
        try:
            holds_memory = self.config.save_memory and self.memory.rows_added > (
                self._resumed_memory[1] if self._resumed_memory is not None else 0)
            if self.learner.updates > self._published_at_updates:  # the final checkpoint's version: its own actor
                self._publish(publish=False)
            if (self.learner.updates or holds_memory) and not self._checkpoint(final=True):
                self.final_checkpoint_missing = True
                kept = (f"a restart resumes from the newest one kept, at {self.last_checkpoint_updates} updates"
                        if self.last_checkpoint_updates is not None else "no checkpoint was saved, a restart starts "
                        "from scratch")
                log.error("stopping without a final checkpoint (above): this run reached %d updates, and %s",
                          self.learner.updates, kept)
        finally:
            self._stopped = True
            self.link.stop()
            self.status.stop()
            self.recorder.close()
            self._context.destroy(linger=0)
            self._run_lock.release()

