"""What the trainer does with each message the relay forwards: validate, dedupe, store, answer, account.

:class:`Ingestor` is socket-free (the ingest thread in :mod:`tmrl_trainer.relay_link` feeds it frames and sends the
replies it returns), so every rule here is unit-testable. **Every sample batch gets exactly one answer**, a
``sample_ack`` whose ``outcome`` is:

* ``stored``: it passed every check and its rows are in the replay memory;
* ``duplicate``: that exact ``(worker, seq)`` was stored before (a resend after a lost ack); nothing is stored twice
  (:class:`SeqDeduplicator`, exact in bounded memory: a late batch that was never stored is stored);
* ``rejected`` with a reason, never stored: it does not decode (``malformed``, ``non_finite``, ``schema``... answered
  whenever the sender and ``seq`` can still be read), its sender is outside ``allowed_workers`` (``unknown_sender``),
  it does not match the observation layout (``schema``), a value is outside what an honest worker can send
  (``observation_out_of_bounds``, ``action_out_of_bounds``, ``reward_out_of_bounds``: :class:`ValueBounds`), or its
  seq is below the worker's dedupe horizon (``stale``). Resending it could never succeed, so the worker drops it
  and counts it by reason; the trainer counts and logs it too.

One exception: a batch from a *new* worker id once ``max_workers`` ids are tracked, which could be stored, is not
answered (the worker keeps it and resends it), counted as ``over_max_workers`` and logged. A message that is not a
sample batch and does not decode is counted and logged only. Nothing crashes the loop.
The trainer saves the dedupe state with the replay memory (``save_memory``): storing a batch and marking its seq
happen under one ``store_lock``, the lock the trainer holds while it copies both, so a restored trainer knows exactly
which batches its restored memory holds. Stored rows feed per-worker episode returns (:class:`EpisodeTracker`).
"""

from __future__ import annotations

import bisect
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
from tmrl_common.log_limit import LineBudget, RateLimitedLog
from tmrl_common.protocol import (
    AckOutcome,
    DecodeLimits,
    Envelope,
    Heartbeat,
    Hello,
    SampleAck,
    SampleBatch,
    batch_seq_of,
    decode,
    decode_envelope,
    encode,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- dedupe


DEDUPE_STATE_FORMAT = "tmrl-dedupe-2"
DEFAULT_MAX_WORKERS = 1024
"""Worker ids one trainer keeps state for (``TrainerConfig.max_workers``), as many as a relay registers."""
_OLD_DEDUPE_STATE_FORMAT = "tmrl-dedupe-1"
"""Read for compatibility: ``watermark`` + ``above`` (every seq below the watermark counted as stored)."""

SeqStatus = Literal["new", "stored", "stale"]
"""What the trainer knows of one ``(worker, seq)``: never stored, stored, or below the worker's horizon (too old to
tell: refused, never stored again and never claimed stored)."""


class DedupeStateError(ValueError):
    """A saved dedupe state (see :meth:`SeqDeduplicator.state`) is malformed."""


def _interval_pairs(value: list[list[int]]) -> list[list[int]]:
    previous_end = None
    for pair in value:
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] or (previous_end is not None and pair[0] <= previous_end):
            raise ValueError(f"stored must hold sorted, disjoint, non-adjacent [start, end) pairs, got {value}")
        previous_end = pair[1]
    return value


class _Saved(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SavedWindow(_Saved):
    horizon: int = Field(ge=0)
    stored: list[list[int]]

    @model_validator(mode="after")
    def _intervals_above_the_horizon(self) -> _SavedWindow:
        _interval_pairs(self.stored)
        if self.stored and self.stored[0][0] < self.horizon:
            raise ValueError(f"stored intervals must start at or above the horizon {self.horizon}")
        return self


class _DedupeState(_Saved):
    format: Literal["tmrl-dedupe-2"]
    given_up: int = Field(ge=0)
    workers: dict[str, _SavedWindow]


class _OldSavedWindow(_Saved):
    watermark: int = Field(ge=0)
    above: list[int]

    @model_validator(mode="after")
    def _above_the_watermark_once(self) -> _OldSavedWindow:
        if len(set(self.above)) != len(self.above) or any(seq < self.watermark for seq in self.above):
            raise ValueError(f"above must hold distinct seqs at or above the watermark {self.watermark}")
        return self


class _OldDedupeState(_DedupeState):
    format: Literal["tmrl-dedupe-1"]  # type: ignore[assignment]
    workers: dict[str, _OldSavedWindow]  # type: ignore[assignment]


@dataclass
class _WorkerWindow:
    """One worker's stored seqs: sorted, disjoint, non-adjacent half-open intervals ``[start, end)``, all at or above
    ``horizon``. Seqs below the horizon were closed when the window overflowed (status ``stale``)."""

    horizon: int = 0
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    forgotten: int = 0
    """Stored seqs in the intervals forgotten below the horizon (in this process), so counts stay whole."""
    lowest: int | None = None
    """The lowest seq ever stored (for a restored window: its first interval's start, or its horizon once raised):
    the seqs below it were never numbered by the worker, so closing the lowest gap does not count them as lost (a
    spec probe's worker starting at 1000 was told '1000 of them, from 0 up, never arrived'; with clock-based seqs
    that would be about 10^15)."""

    def __post_init__(self) -> None:
        if self.lowest is None and self.starts:
            self.lowest = self.starts[0] if self.horizon == 0 else self.horizon

    def status(self, seq: int) -> SeqStatus:
        if seq < self.horizon:
            return "stale"
        index = bisect.bisect_right(self.starts, seq) - 1
        return "stored" if index >= 0 and seq < self.ends[index] else "new"

    def add(self, seq: int) -> None:
        """Mark ``seq`` (status ``new``) stored, merging it with the intervals it touches."""
        if self.lowest is None or seq < self.lowest:
            self.lowest = seq
        starts, ends = self.starts, self.ends
        if ends and ends[-1] == seq:  # the usual case: the next seq in order
            ends[-1] += 1
            return
        index = bisect.bisect_right(starts, seq)  # starts[index - 1] <= seq < starts[index]
        joins_left = index > 0 and ends[index - 1] == seq
        joins_right = index < len(starts) and starts[index] == seq + 1
        if joins_left and joins_right:
            ends[index - 1] = ends[index]
            del starts[index], ends[index]
        elif joins_left:
            ends[index - 1] += 1
        elif joins_right:
            starts[index] = seq
        else:
            starts.insert(index, seq)
            ends.insert(index, seq + 1)

    def close_lowest_gap(self) -> tuple[int, int]:
        """Raise the horizon to the end of the lowest interval (forgetting it); return the never-stored seqs closed
        and the first of them (the worker's seqs: none below the lowest it ever had stored)."""
        first = self.horizon if self.lowest is None else max(self.horizon, self.lowest)
        gap = max(0, self.starts[0] - first)
        self.forgotten += self.ends[0] - self.starts[0]
        self.horizon = self.ends[0]
        del self.starts[0], self.ends[0]
        return gap, first


class SeqDeduplicator:
    """Remembers exactly which ``(worker, seq)`` were stored, in bounded memory.

    Per worker, the stored seqs are kept as sorted intervals ``[start, end)``: a worker whose batches arrive in order
    costs one interval, and each gap (a batch still in flight, one a full spool dropped, the numbers a restarted
    worker skipped) costs one more. A seq is a duplicate only if it lies in an interval; a late batch that fills a gap
    is stored. Once a worker holds more than ``max_gaps`` gaps, the lowest interval is forgotten and the worker's
    *horizon* rises to its end: a seq below the horizon is ``stale``, refused (never stored twice, never claimed
    stored); the never-stored seqs closed that way are counted in :attr:`given_up` and logged.
    Memory is ``O(workers × max_gaps)``. ``hello.next_seq`` never moves the window: a batch is judged by its own seq.
    """

    def __init__(self, max_gaps: int = 4096) -> None:
        if max_gaps < 1:
            raise ValueError(f"max_gaps must be at least 1, got {max_gaps}")
        self.max_gaps = max_gaps
        self.given_up = 0
        self._windows: dict[str, _WorkerWindow] = {}
        self._horizon_log = RateLimitedLog(log, interval_s=30.0)
        """Per worker: a line per 30 s (a spec probe's gappy seqs wrote one per batch, 18 in a few milliseconds)."""

    def status(self, worker: str, seq: int) -> SeqStatus:
        window = self._windows.get(worker)
        return "new" if window is None else window.status(seq)

    def is_duplicate(self, worker: str, seq: int) -> bool:
        return self.status(worker, seq) == "stored"

    def mark_stored(self, worker: str, seq: int) -> None:
        window = self._windows.setdefault(worker, _WorkerWindow())
        if window.status(seq) != "new":
            return
        window.add(seq)
        self._bound(worker, window)

    def _bound(self, worker: str, window: _WorkerWindow) -> None:
        while len(window.starts) > self.max_gaps + 1:
            closed, first = window.close_lowest_gap()
            self.given_up += closed
            self._horizon_log.warning((worker, "horizon"), "%s: more than %d gaps in the stored seqs; seqs below %d "
                                      "are now refused as stale (%d of them, from %d up, never arrived)", worker,
                                      self.max_gaps, window.horizon, closed, first)

    def flush_log(self) -> None:
        """Log the horizon lines held back whose interval is over (call now and then)."""
        self._horizon_log.flush()

    def state(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs, as plain JSON values (stored in the trainer's checkpoints)."""
        return {
            "format": DEDUPE_STATE_FORMAT,
            "given_up": self.given_up,
            "workers": {worker: {"horizon": window.horizon,
                                 "stored": [list(pair) for pair in zip(window.starts, window.ends, strict=True)]}
                        for worker, window in sorted(self._windows.items())},
        }

    def restore(self, state: Any) -> None:
        """Replace every worker's window with a :meth:`state` saved earlier (or one of format ``tmrl-dedupe-1``);
        raise :class:`DedupeStateError` (and change nothing) when ``state`` is not one. A saved window holding more
        gaps than ``max_gaps`` closes its lowest ones, as :meth:`mark_stored` would have."""
        windows: dict[str, _WorkerWindow] = {}
        try:
            if isinstance(state, dict) and state.get("format") == _OLD_DEDUPE_STATE_FORMAT:
                old = _OldDedupeState.model_validate(state)
                given_up = old.given_up
                for worker, saved_old in old.workers.items():
                    watermark = saved_old.watermark
                    window = windows[worker] = _WorkerWindow(0, [0] if watermark else [], [watermark] if watermark else [])
                    for seq in sorted(saved_old.above):
                        window.add(seq)
            else:
                saved = _DedupeState.model_validate(state)
                given_up = saved.given_up
                for worker, saved_window in saved.workers.items():
                    windows[worker] = _WorkerWindow(saved_window.horizon, [p[0] for p in saved_window.stored],
                                                    [p[1] for p in saved_window.stored])
        except ValidationError as exc:
            raise DedupeStateError(f"not a saved dedupe state ({DEDUPE_STATE_FORMAT}): {exc}") from exc
        self._windows, self.given_up = windows, given_up
        for worker, window in windows.items():
            self._bound(worker, window)

    def horizon(self, worker: str) -> int:
        window = self._windows.get(worker)
        return 0 if window is None else window.horizon

    def stored_count(self, worker: str) -> int:
        """Distinct seqs of ``worker`` stored: those in its intervals, and those forgotten below its horizon."""
        window = self._windows.get(worker)
        if window is None:
            return 0
        return window.forgotten + sum(end - start for start, end in zip(window.starts, window.ends, strict=True))

    def workers(self) -> list[str]:
        """Workers with a window (a seq stored or restored)."""
        return list(self._windows)

    def knows(self, worker: str) -> bool:
        """Whether ``worker`` has a window (a seq stored or restored)."""
        return worker in self._windows

    def tracked_intervals(self, worker: str) -> int:
        window = self._windows.get(worker)
        return 0 if window is None else len(window.starts)


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
    batches_ahead: int = 0
    """Stored batches whose ``weights_version`` is above every version this trainer had published when they came:
    the worker acts with another trainer run's weights (a new run folder), or misreports its version."""
    episodes: int = 0
    last_return: float | None = None
    hellos: int = 0
    last_seen: float = 0.0
    min_seq: int | None = None
    """Lowest and highest ``seq`` stored from this worker: with ``batches`` they show whether the stored seqs form
    one contiguous range (``batches == max_seq - min_seq + 1``), i.e. nothing in between was lost or stored twice.
    The snapshot adds ``distinct_seqs`` (the dedupe's count of distinct seqs stored by this run, those of a restored
    dedupe state left out): ``batches - distinct_seqs`` is the number of batches stored twice, which must be 0."""
    max_seq: int | None = None
    next_seq: int | None = None
    """``next_seq`` of this worker's latest hello: the lowest seq it may still send (informational)."""


@dataclass(frozen=True)
class ValueBounds:
    """What an honest batch can hold beyond the layout's shapes (:meth:`SampleBatch.check_bounds`)."""

    max_abs_reward: float = 1e4
    max_abs_observation: float = 1e6
    """Applies to observation components that declare no ``low``/``high`` of their own."""


def layout_differences(worker: ObservationLayout, trainer: ObservationLayout) -> tuple[list[str], bool]:
    """What differs between a worker's announced layout and the trainer's, as ``field: worker vs trainer`` lines,
    and whether :meth:`SampleBatch.check_layout` will reject that worker's batches (components, frame shapes, dtypes,
    action size). Histories, bounds and scales are the trainer's to apply: a worker that declares other ones is still
    stored.
    """
    lines: list[str] = []
    rejected = False
    mine = {c.name: c for c in trainer.components}
    theirs = {c.name: c for c in worker.components}
    if list(theirs) != list(mine):
        lines.append(f"components {list(theirs)} vs {list(mine)}")
        rejected = set(theirs) != set(mine)
    for name in [n for n in mine if n in theirs]:
        for attr in ("frame_shape", "dtype", "history", "low", "high", "scale"):
            a, b = getattr(theirs[name], attr), getattr(mine[name], attr)
            if a != b:
                lines.append(f"{name}.{attr} {a} vs {b}")
                rejected = rejected or attr in ("frame_shape", "dtype")
    for attr in ("action_dim", "action_history"):
        a, b = getattr(worker, attr), getattr(trainer, attr)
        if a != b:
            lines.append(f"{attr} {a} vs {b}")
            rejected = rejected or attr == "action_dim"
    return lines, rejected


class Ingestor:
    """Turns forwarded frames into stored rows and answers (see the module docstring). Thread-safe per instance:
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
        bounds: ValueBounds | None = ValueBounds(),  # noqa: B008 - frozen, shared safely
        max_workers: int = DEFAULT_MAX_WORKERS,
        published_version: Callable[[], int] | None = None,
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
        self.bounds = bounds
        """``None`` skips the value checks (only for measuring what they cost: ``benchmarks/ingest_checks.py``)."""
        self.dedupe = SeqDeduplicator(dedupe_window)
        self._restored_seqs: dict[str, int] = {}
        """Distinct seqs per worker that a restored dedupe state brought in: not stored by this run's ``batches``."""
        self.episodes = EpisodeTracker()
        self.rejects: Counter[str] = Counter()
        self._reject_log = RateLimitedLog(log)
        self._hello_log = RateLimitedLog(log, interval_s=30.0)
        """Per worker, its hello lines (a probe's 5,000 hellos were 5,000 lines here, while the relay held its own
        to one per interval); the held-back count is said with the next one."""
        self._hello_lines = LineBudget(lines=20, window_s=10.0)
        """Hello lines of all workers together: an id is the sender's choice, so past this budget the lines go under
        one shared key (a hostile-peer probe's 5,000 invented ids were 5,252 lines here, 22 at the relay)."""
        self.workers: dict[str, WorkerStats] = {}
        self.max_workers = max_workers
        """Worker ids this trainer keeps state for (stats, dedupe window, episode, batch tails); see
        :meth:`_admit`."""
        self.over_worker_cap = 0
        """Messages from a new worker id left unanswered because ``max_workers`` ids are already tracked."""
        self._cap_log = RateLimitedLog(log, interval_s=30.0)
        self.published_version = published_version
        """The newest weights version this trainer has published (``None``: batches' versions are not judged)."""
        self._ahead_log = RateLimitedLog(log, interval_s=300.0)
        self.batches_stored = 0
        self.rows_stored = 0
        self.duplicates = 0
        self.answers: Counter[str] = Counter()
        """Answers sent, by outcome (``stored``, ``duplicate``, ``rejected``)."""
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
            self._restored_seqs = {worker: self.dedupe.stored_count(worker) for worker in self.dedupe.workers()}

    def _distinct_seqs_this_run(self, worker: str) -> int:
        return self.dedupe.stored_count(worker) - self._restored_seqs.get(worker, 0)

    def _admit(self, worker: str) -> WorkerStats | None:
        """The stats of ``worker`` (created for a new id), or ``None`` when it is new and ``max_workers`` ids are
        already tracked (call with ``_lock`` held). Ids are the senders' choice: in ``--insecure`` mode anyone can
        invent them, and every id stored from costs state for the whole run (saved in checkpoints too), so the
        count is bounded. A worker whose seqs a restored checkpoint holds is always admitted."""
        stats = self.workers.get(worker)
        if stats is None:
            if len(self.workers) >= self.max_workers and not self.dedupe.knows(worker) and not self._forget_one():
                return None
            stats = self.workers[worker] = WorkerStats()
        stats.last_seen = time.time()
        return stats

    def _forget_one(self) -> bool:
        """Make room for a new id by forgetting the longest-silent worker that never had a batch stored (it said
        hello, or sent only refused batches: no dedupe window, no rows, nothing a resend could be judged against);
        False when every tracked worker has stored rows, which are kept for the run."""
        idle = [(stats.last_seen, name) for name, stats in self.workers.items() if not self.dedupe.knows(name)]
        if not idle:
            return False
        del self.workers[min(idle)[1]]
        return True

    def _turn_away(self, worker: str, what: str) -> None:
        """Count and log a message from a worker id :meth:`_admit` refused. It is not answered: its batch stays in
        the worker's spool and is sent again, so nothing is lost if room is made (a trainer restarted with a larger
        ``max_workers``)."""
        with self._lock:
            self.over_worker_cap += 1
            count = self.over_worker_cap
        self._cap_log.warning("cap", "%s: this trainer already keeps state for max_workers = %d worker ids that have "
                              "stored rows, kept until it restarts (messages turned away so far: %d); raise max_workers "
                              "in the trainer's config if the fleet is that large, give workers stable ids, or look for "
                              "a client inventing ids", what, self.max_workers, count)

    def _reject(self, reason: str, message: str, worker: str | None = None) -> None:
        with self._lock:
            self.rejects[reason] += 1
            stats = self._admit(worker) if worker is not None else None
            if stats is not None:
                stats.rejected += 1
        # at most a line per worker and reason every few seconds: a worker sending bad batches flat out cannot flood
        # the log (the counters and each refusal's answer carry every one)
        self._reject_log.warning((worker, reason), "rejected a message%s: [%s] %s", f" from {worker}" if worker else "",
                                 reason, message)

    def _answer(self, worker: str, seq: int, outcome: AckOutcome, reason: str = "", detail: str = "") -> list[bytes]:
        with self._lock:
            self.answers[outcome] += 1
        ack = SampleAck(worker=worker, seqs=[seq], outcome=outcome, reason=reason, detail=detail[:1024])
        return encode(ack, self.trainer_id)

    def _refuse(self, worker: str, seq: int, reason: str, detail: str) -> list[list[bytes]]:
        """Count, log and answer a batch that is not stored (the worker drops it and never resends it)."""
        self._reject(reason, f"batch seq {seq}: {detail}", worker)
        return [self._answer(worker, seq, "rejected", reason, detail)]

    def handle(self, frames: list[bytes]) -> list[list[bytes]]:
        """Process one message from the relay; return the messages to send back (one answer per sample batch)."""
        try:
            envelope, message = decode(frames, self.limits, self.layout)  # headers checked before any inflation
        except ProtocolError as exc:
            return self._refuse_undecodable(frames, exc)
        if isinstance(message, SampleBatch):
            return self._handle_batch(envelope, message)
        if isinstance(message, Hello):
            self._handle_hello(envelope, message)
        elif not isinstance(message, Heartbeat):
            self._reject("unknown_type", f"{envelope.type} is not expected on the trainer link", envelope.sender)
        return []

    def _refuse_undecodable(self, frames: list[bytes], exc: ProtocolError) -> list[list[bytes]]:
        """A message that does not decode: a sample batch whose sender and seq can still be read is answered
        ``rejected`` (NaN rewards, a wrong dtype, a missing field...); anything else is only counted and logged."""
        try:
            envelope = decode_envelope(frames[0], self.limits) if len(frames) == 2 else None
        except ProtocolError:
            envelope = None
        seq = batch_seq_of(frames[1]) if envelope is not None and envelope.type == "sample_batch" else None
        if envelope is None or seq is None:
            self._reject(exc.reason, exc.detail)
            return []
        return self._refuse(envelope.sender, seq, exc.reason, exc.detail)

    def _handle_hello(self, envelope: Envelope, hello: Hello) -> None:
        if hello.role != "worker":
            return
        with self._lock:
            stats = self._admit(envelope.sender)
        if stats is None:
            self._turn_away(envelope.sender, f"hello from {envelope.sender} ignored")
            return
        with self._lock:
            stats.hellos += 1
            stats.next_seq = hello.next_seq
        if hello.layout is not None and hello.layout != self.layout:
            differences, rejected = layout_differences(hello.layout, self.layout)
            consequence = ("its batches will be rejected (schema)" if rejected else "its batches still match the "
                           "trainer's frames and are judged by the trainer's layout (its histories, bounds and scales)")
            if not rejected and hello.layout.observation_shapes() != self.layout.observation_shapes():
                # a TrackMania probe: img_hist_len 8 against the trainer's 4 trained a policy the worker never used
                consequence += (", but the policy trained on them reads other observation shapes than this worker's: "
                                "it refuses the weights and stops; make the two agree (the worker's `tmrl-worker "
                                "layout -c CONFIG > layout.json` as the trainer's layout_file, or the worker's "
                                "env_options as the trainer's layout has them)")
            elif not rejected and any(line.split(" ", 1)[0].endswith(".scale") for line in differences):
                # an operator probe's trainer ran --env tm20-lidar for sim workers: one line, then 1,377 updates
                consequence += (": the networks scale this worker's values as the trainer's layout says, which fits "
                                "another env's units (the trainer's --env, or its layout_file, is not this worker's "
                                "env? they must be the same)")
            key, flood = self._hello_line_key(envelope.sender, "layout")
            self._hello_log.warning(key, "%s announced an observation layout that differs from the trainer's (worker "
                                    "vs trainer: %s); %s%s", envelope.sender, "; ".join(differences), consequence,
                                    flood)
        key, flood = self._hello_line_key(envelope.sender, "hello")
        self._hello_log.log(logging.INFO, key, "%s said hello (next_seq %d)%s", envelope.sender, hello.next_seq, flood)

    def _hello_line_key(self, sender: str, kind: str) -> tuple[tuple[str, str], str]:
        """The rate-limit key of a hello line of ``sender`` and what the line adds: its own, or past the budget of
        all workers' lines a key they share (a churn of new ids: one line per interval), saying so. A line its own key
        holds back costs no budget."""
        if not self._hello_log.due((sender, kind)) or self._hello_lines.take():
            return (sender, kind), ""
        return ("many workers", kind), f"; {self._hello_lines.exceeded('hello lines')}: one line per interval from here"

    def _handle_batch(self, envelope: Envelope, batch: SampleBatch) -> list[list[bytes]]:
        worker, seq = envelope.sender, batch.seq
        if self.allowed_workers is not None and worker not in self.allowed_workers:
            return self._refuse(worker, seq, "unknown_sender", f"worker {worker!r} is not in allowed_workers")
        with self._lock:
            stats = self._admit(worker)
        if stats is None:  # a batch no trainer could store is still refused, so the worker drops it
            try:
                self._check(batch)
            except ProtocolError as exc:
                return self._refuse(worker, seq, exc.reason, exc.detail)
            self._turn_away(worker, f"batch seq {seq} from {worker} not answered (the worker keeps it and resends)")
            return []
        with self._lock:
            status = self.dedupe.status(worker, seq)
            if status == "stored":
                self.duplicates += 1
                stats.duplicates += 1
        if status == "stored":
            log.debug("%s: duplicate batch seq %d acknowledged again", worker, seq)
            return [self._answer(worker, seq, "duplicate")]
        if status == "stale":
            return self._refuse(worker, seq, "stale", f"below this worker's horizon {self.dedupe.horizon(worker)} "
                                "(more gaps than the dedupe window holds): cannot tell whether it was stored")
        try:
            self._check(batch)
            with self.store_lock:
                rows = self.store(worker, batch)
                with self._lock:
                    self.dedupe.mark_stored(worker, seq)
        except ProtocolError as exc:  # resending cannot make it fit: refused for good
            return self._refuse(worker, seq, exc.reason, exc.detail)
        finished = self.episodes.add(worker, batch)
        with self._lock:
            self.batches_stored += 1
            self.rows_stored += rows
            stats.batches += 1
            stats.steps += rows
            stats.min_seq = seq if stats.min_seq is None else min(stats.min_seq, seq)
            stats.max_seq = seq if stats.max_seq is None else max(stats.max_seq, seq)
            stats.weights_version = batch.weights_version
            stats.max_weights_version = max(stats.max_weights_version, batch.weights_version)
            published = self.published_version() if self.published_version is not None else None
            ahead = published is not None and batch.weights_version > published
            stats.batches_ahead += ahead
            for record in finished:
                stats.episodes += 1
                stats.last_return = record.episode_return
        if ahead:
            self._ahead_log.warning(("ahead", worker), "%s: batch seq %d says it was collected with weights version "
                                    "%d, but this trainer has published up to %d: the worker acts with weights this "
                                    "process did not publish (a trainer killed after the checkpoint this one resumed "
                                    "from had published further, or another run's trainer; it follows this one's as "
                                    "they come) or misreports its version (stored; counted per worker as "
                                    "batches_ahead)", worker, seq,
                                    batch.weights_version, published)
        for record in finished:
            log.debug("%s: episode return %.2f over %d steps (weights version %d)", worker, record.episode_return,
                     record.length, record.weights_version)
            if self.on_episode is not None:
                self.on_episode(record)
        return [self._answer(worker, seq, "stored")]

    def _check(self, batch: SampleBatch) -> None:
        """Raise :class:`ProtocolError` unless ``batch`` fits the layout, the protocol's first rows and the bounds."""
        batch.check_layout(self.layout)
        batch.check_first_rows()
        if self.bounds is not None:
            batch.check_bounds(self.layout, self.bounds.max_abs_reward, self.bounds.max_abs_observation)

    def snapshot(self) -> dict:
        """Counters and per-worker stats as plain JSON-ready values (and the held-back reject counts logged: the
        status writer and the heartbeat call this every few seconds)."""
        self._reject_log.flush()
        self._hello_log.flush()
        self.dedupe.flush_log()
        with self._lock:
            return {
                "batches_stored": self.batches_stored,
                "rows_stored": self.rows_stored,
                "duplicates": self.duplicates,
                "rejects": dict(self.rejects),
                "answers": dict(self.answers),
                "dedupe_given_up": self.dedupe.given_up,
                "episodes_abandoned": self.episodes.abandoned,
                "over_max_workers": self.over_worker_cap,
                "workers": {name: {**vars(stats), "distinct_seqs": self._distinct_seqs_this_run(name)}
                            for name, stats in sorted(self.workers.items())},
            }
