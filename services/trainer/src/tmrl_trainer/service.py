"""``tmrl-trainer run``: the distributed training loop.

Threads: the ingest thread (:class:`~tmrl_trainer.relay_link.TrainerLink`) receives batches, stores them in the
replay memory and acknowledges them; the main thread (:meth:`TrainerService.run`) runs SAC updates and publishes
weights; a small thread rewrites ``status.json`` every second. The replay memory is shared under one lock (adding a
batch and sampling a minibatch are short; the SAC update itself runs outside the lock).

Update schedule:

* warm-up: no update until ``sac.learning_starts`` rows are stored;
* ratio: never more than ``sac.utd`` updates per row received (``updates <= utd * rows_received``), so a slow
  worker fleet is not over-fitted; the loop idles a few milliseconds when it is ahead;
* every ``publish_every`` updates the actor is published as a new ``weights_update`` (version + 1) and written to
  ``run_dir/policy.safetensors`` (:func:`export_policy`, readable by ``tmrl-worker run --expert --policy``);
* every ``checkpoint_every`` updates, and at shutdown, a checkpoint is saved (the last 3 are kept); at start the
  latest checkpoint under ``run_dir/checkpoints`` is restored (learner state, update count, weights version) and those
  weights are re-published at once so workers resume with them. The replay memory is not checkpointed: it refills
  from the workers (warm-up applies again).

Observation layout: fixed by configuration (``env`` name or ``layout_file``), never taken from the first worker to
speak, so one misconfigured worker cannot poison the replay memory; mismatching batches are rejected and counted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq
from tmrl_common.errors import ConfigError
from tmrl_common.layout import (
    ObservationLayout,
    layout_for_box,
    tm20_image_layout,
    tm20_lidar_layout,
    tm20_lidar_progress_layout,
)
from tmrl_common.networks import weights_update_from_actor
from tmrl_common.protocol import SampleBatch, WeightsUpdate
from tmrl_common.weights import tensors_from_bytes, tensors_to_bytes

from tmrl_trainer.checkpoint import load_checkpoint, save_checkpoint
from tmrl_trainer.config import TrainerConfig
from tmrl_trainer.ingest import Ingestor
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.relay_link import TrainerLink
from tmrl_trainer.sac import SACLearner, resolve_device
from tmrl_trainer.status import STATUS_FILE, RunRecorder, StatusFile
from tmrl_trainer.tensor_file import write_atomically

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
KEEP_CHECKPOINTS = 3
PROGRESS_EVERY_S = 10.0
POLICY_FILE = "policy.safetensors"

_NAMED_LAYOUTS = {
    "sim": tm20_lidar_layout,
    "sim-fast": tm20_lidar_layout,
    "tm20-lidar": tm20_lidar_layout,
    "tm20-lidar-progress": tm20_lidar_progress_layout,
    "tm20-full": tm20_image_layout,
}


def layout_for_env(env: str, layout_file: Path | None = None) -> ObservationLayout:
    """The observation layout the trainer expects (see :attr:`TrainerConfig.env`); raise :class:`ConfigError`."""
    if layout_file is not None:
        try:
            return ObservationLayout.model_validate_json(Path(layout_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"layout_file {layout_file} is not a readable ObservationLayout JSON: {exc}") from exc
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
            return layout_for_box(math.prod(probe.observation_space.shape), math.prod(probe.action_space.shape))
        finally:
            probe.close()
    raise ConfigError(f"env {env!r} has no built-in layout; use one of {sorted(_NAMED_LAYOUTS)} or gym:<id>, "
                      "or set layout_file to a JSON ObservationLayout")


def export_policy(update: WeightsUpdate, path: Path) -> Path:
    """Write the published actor as a standalone policy file: safetensors tensors, metadata ``architecture`` (JSON of
    the flat architecture dict) and ``version``. ``tmrl-worker run --expert --policy FILE`` and the demo read it."""
    metadata = {"architecture": json.dumps(update.architecture), "version": str(update.version), "format": "tmrl-actor"}
    return write_atomically(path, tensors_to_bytes(tensors_from_bytes(update.tensors), metadata=metadata))


class TrainerService:
    """Owns the memory, the learner, the ingest thread and the reports (see the module docstring)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.layout = layout_for_env(config.env, config.layout_file)
        self.device = resolve_device(config.device)
        torch.set_num_threads(config.torch_threads or max(1, min(8, (os.cpu_count() or 2) // 2)))
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.architecture = config.sac.architecture(self.layout)
        self.learner = SACLearner(config.sac, self.architecture, device=self.device, seed=config.seed)
        self.memory = ReplayMemory(self.layout, capacity=config.memory_capacity, seed=config.seed)
        self.memory_lock = threading.Lock()
        self.weights_version = 0
        self.rows_received = 0
        self.recorder = RunRecorder(self.run_dir)
        self.ingestor = Ingestor(
            config.trainer_id, self.layout, store=self._store, on_episode=self.recorder.episode,
            allowed_workers=frozenset(config.allowed_workers) or None,
        )
        self._context = zmq.Context()
        self.link = TrainerLink(config.trainer_id, config.relay_host, config.trainer_port, config.transport,
                                config.security, self.ingestor, config.heartbeat_interval_s, context=self._context)
        self.link.check_security()
        self.status = StatusFile(self.run_dir / STATUS_FILE, self.snapshot, config.status_interval_s)
        self.last_metrics: dict[str, float] = {}
        self._updates_at_start = 0
        self._started = time.time()

    # ------------------------------------------------------------------------------------------------- memory

    def _store(self, worker: str, batch: SampleBatch) -> int:
        with self.memory_lock:
            rows = self.memory.add_batch(worker, batch)
            self.rows_received += rows
        return rows

    # ------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint_paths(self) -> list[Path]:
        return sorted(self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*.safetensors"),
                      key=lambda p: p.name)  # zero-padded update counts: name order is update order

    def _resume(self) -> None:
        paths = [p for p in self._checkpoint_paths() if not p.name.endswith(".memory.safetensors")]
        if not paths:
            log.info("no checkpoint in %s: starting from scratch", self.checkpoint_dir)
            return
        restored = load_checkpoint(paths[-1], self.learner)
        self.weights_version = int(restored.counters.get("weights_version", 0))
        log.info("resumed from checkpoint %s: %d updates, weights version %d (the replay memory starts empty)",
                 paths[-1], self.learner.updates, self.weights_version)
        if self.weights_version > 0:
            self.link.publish(weights_update_from_actor(self.learner.actor, self.weights_version))

    def _checkpoint(self) -> None:
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.learner.updates:012d}.safetensors"
        save_checkpoint(path, self.learner, counters={"weights_version": self.weights_version,
                                                      "samples_received": self.rows_received})
        for old in self._checkpoint_paths()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        log.info("checkpoint saved: %s (%d updates, weights version %d)", path, self.learner.updates, self.weights_version)

    # ----------------------------------------------------------------------------------------------- reports

    def snapshot(self) -> dict[str, Any]:
        ingest = self.ingestor.snapshot()
        with self.memory_lock:
            stored = len(self.memory)
        return {
            "trainer_id": self.config.trainer_id,
            "env": self.config.env,
            "device": str(self.device),
            "uptime_s": time.time() - self._started,
            "connected": self.link.connected,
            "updates": self.learner.updates,
            "weights_version": self.weights_version,
            "samples_received": ingest["rows_stored"],  # same snapshot as the per-worker counts
            "samples_stored": stored,
            "metrics": self.last_metrics,
            "link": vars(self.link.counters),
            **ingest,
        }

    # -------------------------------------------------------------------------------------------------- loop

    def _publish(self) -> None:
        self.weights_version += 1
        update = weights_update_from_actor(self.learner.actor, self.weights_version)
        self.link.publish(update)
        export_policy(update, self.run_dir / POLICY_FILE)
        log.debug("published weights version %d after %d updates (%d samples received)", self.weights_version,
                 self.learner.updates, self.rows_received)

    def _report(self) -> None:
        snapshot = self.ingestor.snapshot()
        workers = ", ".join(f"{name}: {w['batches']} batches, v{w['weights_version']}, last return "
                            f"{'n/a' if w['last_return'] is None else format(w['last_return'], '.2f')}"
                            for name, w in snapshot["workers"].items())
        log.info("%d updates, weights version %d, %d samples received (%d duplicates, %d rejected); %s",
                 self.learner.updates, self.weights_version, self.rows_received, snapshot["duplicates"],
                 sum(snapshot["rejects"].values()), workers or "no worker yet")

    def _may_update(self) -> bool:
        sac = self.config.sac
        with self.memory_lock:
            stored, received = len(self.memory), self.rows_received
        return stored >= sac.learning_starts and self.learner.updates - self._updates_at_start < sac.utd * received

    def run(self, stop: threading.Event | None = None, max_updates: int | None = None) -> int:
        """Train until ``stop`` is set (or ``max_updates`` updates); return the number of updates done."""
        stop = stop or threading.Event()
        self._resume()
        self._updates_at_start = self.learner.updates  # the ratio counts updates made on this run's samples
        self.link.start()
        self.status.start()
        log.info("trainer %s on %s: layout %s, relay %s; warm-up %d rows, at most %.2f updates per row",
                 self.config.trainer_id, self.device, [c.name for c in self.layout.components], self.link.describe(),
                 self.config.sac.learning_starts, self.config.sac.utd)
        next_report = time.monotonic() + PROGRESS_EVERY_S
        try:
            while not stop.is_set() and (max_updates is None or self.learner.updates < max_updates):
                if time.monotonic() >= next_report:
                    self._report()
                    next_report = time.monotonic() + PROGRESS_EVERY_S
                if self.link.failure is not None:
                    raise RuntimeError(f"ingest thread failed: {self.link.failure}") from self.link.failure
                if not self._may_update():
                    stop.wait(0.005)
                    continue
                with self.memory_lock:
                    batch = self.memory.sample(self.config.sac.batch_size)
                publishing = (self.learner.updates + 1) % self.config.publish_every == 0
                metrics = self.learner.update(batch.to(self.device), with_metrics=publishing)
                updates = self.learner.updates
                if publishing:
                    self.last_metrics = {k: float(v) for k, v in metrics.items()}
                    self._publish()
                    self.recorder.training(updates, self.rows_received, self.weights_version, self.last_metrics)
                if updates % self.config.checkpoint_every == 0:
                    self._checkpoint()
        finally:
            self.shutdown()
        return self.learner.updates

    def shutdown(self) -> None:
        try:
            if self.learner.updates:
                self._checkpoint()
        finally:
            self.link.stop()
            self.status.stop()
            self.recorder.close()
            self._context.destroy(linger=0)

