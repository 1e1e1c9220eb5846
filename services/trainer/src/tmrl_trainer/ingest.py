"""What the trainer does with each message the relay forwards: validate, dedupe, store, acknowledge, account.

:class:`Ingestor` is socket-free (the ingest thread in :mod:`tmrl_trainer.relay_link` feeds it frames and sends the
replies it returns), so every rule here is unit-testable:

* a message that does not decode (malformed, oversized, NaN/inf, bad schema...) is counted under its reject reason
  and logged; nothing is stored and nothing crashes;
* a batch from a sender outside ``allowed_workers`` (when that list is set) is rejected as ``unknown_sender``;
* a batch whose observation layout differs from the trainer's is rejected as ``schema`` **and acknowledged**: resending
  it could never succeed, so the worker may drop it from its spool; the trainer's counter and log keep it visible;
* a batch already stored (same ``(worker, seq)``, e.g. resent after a lost ack) is acknowledged again and counted as a
  duplicate, never stored twice (:class:`SeqDeduplicator`). The trainer saves the dedupe state with the replay memory
  (``save_memory``): storing a batch and marking its seq happen under one ``store_lock``, the lock the trainer holds
  while it copies both, so a restored trainer knows exactly which batches its restored memory holds;
* anything else is stored in the replay memory, acknowledged, and its rows feed per-worker episode returns
  (:class:`EpisodeTracker`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationLayout
from tmrl_common.protocol import DecodeLimits, Envelope, Heartbeat, Hello, SampleAck, SampleBatch, decode, encode

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- dedupe


DEDUPE_STATE_FORMAT = "tmrl-dedupe-1"


class DedupeStateError(ValueError):
    """A saved dedupe state (see :meth:`SeqDeduplicator.state`) is malformed."""


class _SavedWindow(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    watermark: int = Field(ge=0)
    above: list[int]

    @model_validator(mode="after")
    def _above_the_watermark_once(self) -> _SavedWindow:
        if len(set(self.above)) != len(self.above) or any(seq < self.watermark for seq in self.above):
            raise ValueError(f"above must hold distinct seqs at or above the watermark {self.watermark}")
        return self


class _DedupeState(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["tmrl-dedupe-1"]
    given_up: int = Field(ge=0)
    workers: dict[str, _SavedWindow]


@dataclass
class _WorkerWindow:
    watermark: int = 0
    """Every seq below this is stored (or was given up on, see :class:`SeqDeduplicator`)."""
    above: set[int] = field(default_factory=set)
    """Stored seqs at or above the watermark (out-of-order arrivals, gaps left by dropped batches or restarts)."""


class SeqDeduplicator:
    """Remembers which ``(worker, seq)`` were stored, in bounded memory.

    Per worker: a contiguous *watermark* (every seq below it is done) plus the set of stored seqs above it. Gaps
    (batches a worker dropped from a full spool, numbers a restarted worker skipped) would keep that set growing, so
    once it holds ``max_above`` entries the watermark jumps to the smallest stored seq: the seqs skipped that way are
    given up on (counted in :attr:`given_up`; one still arriving later is treated as a duplicate).
    Memory is ``O(workers × max_above)``. A worker's ``hello.next_seq`` (forwarded by the relay) moves the watermark
    past such gaps at once (:meth:`advance_to`): the worker promises every lower seq is settled.
    """

    def __init__(self, max_above: int = 4096) -> None:
        if max_above < 1:
            raise ValueError(f"max_above must be at least 1, got {max_above}")
        self.max_above = max_above
        self.given_up = 0
        self._windows: dict[str, _WorkerWindow] = {}

    def is_duplicate(self, worker: str, seq: int) -> bool:
        window = self._windows.get(worker)
        return window is not None and (seq < window.watermark or seq in window.above)

    def mark_stored(self, worker: str, seq: int) -> None:
        window = self._windows.setdefault(worker, _WorkerWindow())
        if seq < window.watermark or seq in window.above:
            return
        window.above.add(seq)
        self._advance(window)
        if len(window.above) > self.max_above:
            lowest = min(window.above)
            self.given_up += lowest - window.watermark
            log.warning("%s: giving up on seqs %d..%d (never received; %d stored above them)", worker,
                        window.watermark, lowest - 1, len(window.above))
            window.watermark = lowest
            self._advance(window)

    @staticmethod
    def _advance(window: _WorkerWindow) -> None:
        while window.watermark in window.above:
            window.above.remove(window.watermark)
            window.watermark += 1

    def advance_to(self, worker: str, seq: int) -> None:
        """Every seq below ``seq`` is settled for ``worker`` (its ``hello.next_seq``: acknowledged, dropped by the
        worker, or never used after a restart), so the window can move past gaps without giving anything up."""
        window = self._windows.setdefault(worker, _WorkerWindow())
        if seq <= window.watermark:
            return
        window.watermark = seq
        window.above = {s for s in window.above if s >= seq}
        self._advance(window)

    def state(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs, as plain JSON values (stored in the trainer's checkpoints)."""
        return {
            "format": DEDUPE_STATE_FORMAT,
            "given_up": self.given_up,
            "workers": {worker: {"watermark": window.watermark, "above": sorted(window.above)}
                        for worker, window in sorted(self._windows.items())},
        }

    def restore(self, state: Any) -> None:
        """Replace every worker's window with a :meth:`state` saved earlier; raise :class:`DedupeStateError` (and
        change nothing) when ``state`` is not one. A saved window holding more than ``max_above`` seqs above its
        watermark (saved with a larger window) gives the lowest ones up, as :meth:`mark_stored` would have."""
        try:
            saved = _DedupeState.model_validate(state)
        except ValidationError as exc:
            raise DedupeStateError(f"not a saved dedupe state ({DEDUPE_STATE_FORMAT}): {exc}") from exc
        windows: dict[str, _WorkerWindow] = {}
        given_up = saved.given_up
        for worker, saved_window in saved.workers.items():
            window = _WorkerWindow(saved_window.watermark, set(saved_window.above))
            self._advance(window)
            while len(window.above) > self.max_above:
                lowest = min(window.above)
                given_up += lowest - window.watermark
                window.watermark = lowest
                self._advance(window)
            windows[worker] = window
        self._windows, self.given_up = windows, given_up

    def watermark(self, worker: str) -> int:
        window = self._windows.get(worker)
        return 0 if window is None else window.watermark

    def pending_above(self, worker: str) -> int:
        window = self._windows.get(worker)
        return 0 if window is None else len(window.above)


# ----------------------------------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class EpisodeRecord:
    """One finished episode, rebuilt from a worker's rows."""

    worker: str
    episode_return: float
    length: int
    worker_steps: int
    """Environment steps this worker had sent when the episode ended (the learning curve's x axis)."""
    weights_version: int
    finished_at: float


@dataclass
class _OpenEpisode:
    episode_return: float = 0.0
    length: int = 0
    open: bool = False


class EpisodeTracker:
    """Per-worker running returns from ``first``/``rewards``/``terminated``/``truncated`` rows."""

    def __init__(self) -> None:
        self._open: dict[str, _OpenEpisode] = {}
        self.steps: Counter[str] = Counter()
        self.abandoned = 0
        """Episodes that never saw their end (a later reset arrived first: rows lost or a worker restarted)."""

    def add(self, worker: str, batch: SampleBatch) -> list[EpisodeRecord]:
        first = batch.first.array
        rewards = batch.rewards.array
        ended = batch.terminated.array | batch.truncated.array
        episode = self._open.setdefault(worker, _OpenEpisode())
        finished: list[EpisodeRecord] = []
        now = time.time()
        for row in range(batch.steps):
            if first[row]:
                if episode.open and episode.length:
                    self.abandoned += 1
                episode.episode_return, episode.length, episode.open = 0.0, 0, True
                continue
            self.steps[worker] += 1
            if not episode.open:
                continue  # joined mid-episode: its return would be partial, so it is not reported
            episode.episode_return += float(rewards[row])
            episode.length += 1
            if ended[row]:
                finished.append(EpisodeRecord(worker, episode.episode_return, episode.length, self.steps[worker],
                                              batch.weights_version, now))
                episode.open = False
        return finished


# ------------------------------------------------------------------------------------------------------ ingestor


@dataclass
class WorkerStats:
    """What the trainer knows about one worker (reported in ``status.json``)."""

    batches: int = 0
    steps: int = 0
    duplicates: int = 0
    rejected: int = 0
    weights_version: int = 0
    """Weights version carried by this worker's most recent stored batch."""
    max_weights_version: int = 0
    episodes: int = 0
    last_return: float | None = None
    hellos: int = 0
    last_seen: float = 0.0
    min_seq: int | None = None
    """Lowest and highest ``seq`` stored from this worker: with ``batches`` they show whether the stored seqs form
    one contiguous range (``batches == max_seq - min_seq + 1``), i.e. nothing in between was lost or stored twice."""
    max_seq: int | None = None


class Ingestor:
    """Turns forwarded frames into stored rows and replies (see the module docstring). Thread-safe per instance:
    call :meth:`handle` from one thread; :meth:`snapshot` may be called from any."""

    def __init__(
        self,
        trainer_id: str,
        layout: ObservationLayout,
        store: Callable[[str, SampleBatch], int],
        allowed_workers: frozenset[str] | None = None,
        on_episode: Callable[[EpisodeRecord], None] | None = None,
        limits: DecodeLimits | None = None,
        dedupe_window: int = 4096,
        store_lock: AbstractContextManager | None = None,
    ) -> None:
        self.trainer_id = trainer_id
        self.layout = layout
        self.store = store
        self.store_lock = store_lock or nullcontext()
        """Held around storing a batch *and* marking its seq stored, so whoever holds it (the trainer saving a
        checkpoint) sees the memory and :meth:`dedupe_state` at one moment: a batch is in both or in neither."""
        self.allowed_workers = allowed_workers or None
        self.on_episode = on_episode
        self.limits = limits or DecodeLimits()
        self.dedupe = SeqDeduplicator(dedupe_window)
        self.episodes = EpisodeTracker()
        self.rejects: Counter[str] = Counter()
        self.workers: dict[str, WorkerStats] = {}
        self.batches_stored = 0
        self.rows_stored = 0
        self.duplicates = 0
        self._lock = threading.Lock()

    def dedupe_state(self) -> dict[str, Any]:
        """:meth:`SeqDeduplicator.state` of the stored seqs. To pair it with the memory's content, call it while
        holding ``store_lock``."""
        with self._lock:
            return self.dedupe.state()

    def restore_dedupe(self, state: Any) -> None:
        """:meth:`SeqDeduplicator.restore` (raise :class:`DedupeStateError`, nothing changed, on a malformed state)."""
        with self._lock:
            self.dedupe.restore(state)

    def _worker(self, worker: str) -> WorkerStats:
        stats = self.workers.get(worker)
        if stats is None:
            stats = self.workers[worker] = WorkerStats()
        stats.last_seen = time.time()
        return stats

    def _reject(self, reason: str, message: str, worker: str | None = None) -> None:
        with self._lock:
            self.rejects[reason] += 1
            if worker is not None and worker in self.workers:
                self.workers[worker].rejected += 1
        log.warning("rejected a message%s: [%s] %s", f" from {worker}" if worker else "", reason, message)

    def _ack(self, worker: str, seq: int) -> list[bytes]:
        return encode(SampleAck(worker=worker, seqs=[seq]), self.trainer_id)

    def handle(self, frames: list[bytes]) -> list[list[bytes]]:
        """Process one message from the relay; return the messages to send back (acks)."""
        try:
            envelope, message = decode(frames, self.limits)
        except ProtocolError as exc:
            self._reject(exc.reason, exc.detail)
            return []
        if isinstance(message, SampleBatch):
            return self._handle_batch(envelope, message)
        if isinstance(message, Hello):
            self._handle_hello(envelope, message)
        elif not isinstance(message, Heartbeat):
            self._reject("unknown_type", f"{envelope.type} is not expected on the trainer link", envelope.sender)
        return []

    def _handle_hello(self, envelope: Envelope, hello: Hello) -> None:
        if hello.role != "worker":
            return
        with self._lock:
            self._worker(envelope.sender).hellos += 1
            self.dedupe.advance_to(envelope.sender, hello.next_seq)
        if hello.layout is not None and hello.layout != self.layout:
            log.warning("%s announced an observation layout that differs from the trainer's; its batches will be "
                        "rejected (worker components %s, trainer components %s)", envelope.sender,
                        [c.name for c in hello.layout.components], [c.name for c in self.layout.components])
        log.info("%s said hello (next_seq %d)", envelope.sender, hello.next_seq)

    def _handle_batch(self, envelope: Envelope, batch: SampleBatch) -> list[list[bytes]]:
        worker = envelope.sender
        if self.allowed_workers is not None and worker not in self.allowed_workers:
            self._reject("unknown_sender", f"worker {worker!r} is not in allowed_workers", worker)
            return []
        with self._lock:
            stats = self._worker(worker)
            if self.dedupe.is_duplicate(worker, batch.seq):
                self.duplicates += 1
                stats.duplicates += 1
                log.debug("%s: duplicate batch seq %d acknowledged again", worker, batch.seq)
                return [self._ack(worker, batch.seq)]
        try:
            batch.check_layout(self.layout)
            with self.store_lock:
                rows = self.store(worker, batch)
                with self._lock:
                    self.dedupe.mark_stored(worker, batch.seq)
        except ProtocolError as exc:
            self._reject(exc.reason, f"batch seq {batch.seq}: {exc.detail}", worker)
            with self._lock:
                self.dedupe.mark_stored(worker, batch.seq)  # acknowledged: resending cannot make it fit
            return [self._ack(worker, batch.seq)]
        finished = self.episodes.add(worker, batch)
        with self._lock:
            self.batches_stored += 1
            self.rows_stored += rows
            stats.batches += 1
            stats.steps += rows
            stats.min_seq = batch.seq if stats.min_seq is None else min(stats.min_seq, batch.seq)
            stats.max_seq = batch.seq if stats.max_seq is None else max(stats.max_seq, batch.seq)
            stats.weights_version = batch.weights_version
            stats.max_weights_version = max(stats.max_weights_version, batch.weights_version)
            for record in finished:
                stats.episodes += 1
                stats.last_return = record.episode_return
        for record in finished:
            log.debug("%s: episode return %.2f over %d steps (weights version %d)", worker, record.episode_return,
                     record.length, record.weights_version)
            if self.on_episode is not None:
                self.on_episode(record)
        return [self._ack(worker, batch.seq)]

    def snapshot(self) -> dict:
        """Counters and per-worker stats as plain JSON-ready values."""
        with self._lock:
            return {
                "batches_stored": self.batches_stored,
                "rows_stored": self.rows_stored,
                "duplicates": self.duplicates,
                "rejects": dict(self.rejects),
                "dedupe_given_up": self.dedupe.given_up,
                "episodes_abandoned": self.episodes.abandoned,
                "workers": {name: {**vars(stats)} for name, stats in sorted(self.workers.items())},
            }
