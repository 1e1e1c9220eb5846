"""The worker's sender thread: owns the DEALER socket to the relay, the spool of unacknowledged batches and the acks.

The socket, its monitor, the thread, heartbeats and non-blocking sends are a :class:`~tmrl_common.relay_client.RelayClient`
(shared with the trainer's link); this module says what the worker does on it.

The rollout loop hands over a filled :class:`~tmrl_common.batching.SampleBatchBuilder` with :meth:`RelayLink.submit`
(never blocks, no network I/O on the caller's thread). This thread then numbers the batch (:class:`SequenceCounter`),
builds and encodes it (compression happens here, off the real-time loop), spools it and sends it when the relay is
connected. A ``sample_ack`` removes batches from the spool; batches still unacknowledged after ``ack_timeout_s``
are resent, and every unacknowledged batch is resent after a reconnection (after a fresh ``hello``).

After each ``hello`` the relay hands the latest ``weights_update`` over this link; it goes to ``on_weights`` with its
envelope's ``sent_at`` (the worker's :meth:`~tmrl_worker.weights_feed.WeightsFeed.hand_over`), or is counted and
dropped when there is none.

A batch refused for good (the trainer's ``rejected`` answer, or a relay ``error`` in :data:`FINAL_AT_RELAY`) is
dropped and counted by reason. When ``max_consecutive_refusals`` of them come in a row with none stored in between
(:class:`RefusalStreak`), nothing this worker makes can be stored: this thread logs one error saying why and what to
do, and calls ``on_give_up`` (the worker's stop event), so the rollout stops as on any stop request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import zmq
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationLayout
from tmrl_common.log_limit import RateLimitedLog
from tmrl_common.protocol import Error, Heartbeat, Hello, SampleAck, WeightsUpdate, decode, encode
from tmrl_common.relay_client import HelloBackoff, RelayClient
from tmrl_common.sockets import RelayEndpoint

from tmrl_worker.spool import ReservationError, SequenceCounter, Spool, seq_ranges

log = logging.getLogger(__name__)
RESERVE_RETRY_S = 1.0
"""After sequence numbers could not be reserved (a full disk), the sender thread tries again this often."""
NO_ACK_WARNING_S = 30.0
"""A batch unacknowledged this long while connected makes the worker's progress line a warning: no trainer is
answering (:meth:`RelayLink.delivery_problem`)."""
RATE_LOG_INTERVAL_S = 10.0
HELLO_AGAIN_FIRST_S, HELLO_AGAIN_MAX_S = 1.0, 30.0
"""After the relay answers ``unknown_sender`` (its id was taken by another connection's hello, or the relay no longer
knows this connection), the link says hello again this long after, doubling up to the maximum while it keeps
happening: a second process under the same id (another ``state_dir``) is not fought every second, and once it
stops this one takes its id back within half a minute."""
HELLO_AGAIN_RESET_S = 60.0
"""Acknowledgements this long after the last ``unknown_sender`` bring the wait back to its first value."""
"""At most one line per this long about resent batches, reused seqs, or each reason of the relay's errors (the
counters carry every one)."""

SOFTWARE = "tmrl-worker/0.1"
FINAL_AT_RELAY = frozenset({"oversized", "malformed"})
"""Reasons for which a relay ``error`` about one of our batches is final: those bytes can never pass. Other relay
errors (an unregistered sender after a relay restart, say) are about the link: the batch stays spooled."""
BENIGN_REFUSALS = frozenset({"stale", "duplicate"})
"""Refusals that say nothing about the data this worker makes now: they neither count towards
``max_consecutive_refusals`` nor reset the count. ``stale``: a seq below the trainer's dedupe horizon, too old for it
to tell whether it was stored (docs/protocol.md §5.3.1), i.e. an old batch resent late, e.g. from a durable spool
after a restart; ``duplicate``: that ``(worker, seq)`` is stored already (the trainer answers it ``duplicate``, not
``rejected``; a service refusing one with that reason says the same). Every other reason is about the batch's content
(``schema``: another layout; ``*_out_of_bounds``, ``non_finite``, the relay's ``oversized`` and ``malformed``) or
about this worker (``unknown_sender``: outside the trainer's ``allowed_workers``): the next batch, made the same way,
is refused the same way."""
_POLL_MS = 20


class SenderFailure(RuntimeError):
    """The sender thread stopped on an unexpected error (logged with its traceback where it happened): the worker
    cannot deliver samples any more and stops."""


@dataclass
class LinkCounters:
    """What the sender thread did, for heartbeats, logs and tests."""

    batches_built: int = 0
    steps_submitted: int = 0
    sends: int = 0
    send_blocked: int = 0
    acks_received: int = 0
    errors_received: int = 0
    rejected_messages: int = 0
    connections: int = 0
    disconnections: int = 0
    hellos_sent: int = 0
    weights_received: int = 0
    batches_stored: int = 0
    """Batches the trainer answered ``stored`` or ``duplicate`` (delivered)."""
    ids_lost: int = 0
    """``unknown_sender`` answers from the relay: this connection did not hold the worker id (a hello follows)."""
    stale_batches_refused: int = 0
    """``unknown_sender`` answers to batches libzmq had queued before a reconnection and sent ahead of the new
    connection's hello (:meth:`RelayClient.refused_before_hello`): counted, resent after that hello like every
    unacknowledged batch, and starting no second hello."""
    seqs_reused: int = 0
    """Batches of this run the trainer answered ``duplicate`` on their only send: their seq had been used before (a
    state file rolled back), so their rows are not stored (counted in ``batches_stored`` too, as answered)."""
    batches_rejected: int = 0
    """Batches refused for good (the trainer's ``rejected`` answer, or the relay's ``oversized``/``malformed``): never
    resent."""
    waiting_dropped: int = 0
    """Batches handed over by :meth:`RelayLink.submit` and dropped before the sender thread took them: the spool's
    batch bound of them were already waiting (the sender thread fell behind, writing a durable spool on a slow or hung
    disk), and, as a full spool does, the link keeps the newest."""
    waiting_dropped_steps: int = 0
    reservations_failed: int = 0
    """Times a new block of sequence numbers could not be reserved in the state file (a full disk, a folder gone
    read-only): the batches wait unnumbered, in memory, until it can be (:class:`~tmrl_worker.spool.ReservationError`)."""


class RefusalStreak:
    """Batches refused for good since the last one stored, by reason (:data:`BENIGN_REFUSALS` left out), and the
    detail of the last: at ``limit`` of them (``WorkerConfig.max_consecutive_refusals``; ``None``: no limit) this
    worker's data cannot be stored and it gives up. Only ``stored`` ends a streak: a ``duplicate`` answers a resend of
    a batch stored earlier (perhaps by a trainer configured otherwise), which says nothing about the batches made now."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.reasons: Counter[str] = Counter()
        self.last_detail = ""

    @property
    def length(self) -> int:
        """Batches refused in a row so far."""
        return sum(self.reasons.values())

    def refused(self, reason: str, batches: int, detail: str) -> bool:
        """Count ``batches`` refused for ``reason``; True when they make the streak reach the limit."""
        if reason in BENIGN_REFUSALS or not batches:
            return False
        before = self.length
        self.reasons[reason] += batches
        self.last_detail = " ".join(detail.split())  # the trainer's detail may span lines; the error is one line
        return self.limit is not None and before < self.limit <= self.length

    def stored(self) -> None:
        """A batch was stored: the data this worker makes can be stored, the streak is over."""
        self.reasons.clear()
        self.last_detail = ""

    def describe(self, worker_id: str) -> str:
        """The error a worker that gives up logs: how many, why, the last refusal's detail, what to do."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.reasons.most_common())
        return (f"{worker_id}: {self.length} batches in a row were refused for good, none stored in between "
                f"({reasons}); the last: {self.last_detail}; nothing this worker sends can be stored, so it stops: "
                "fix what the reason names, in the env (its observation layout, values or rewards) or in the "
                "trainer's config (layout_file, max_abs_reward, max_abs_observation, allowed_workers), then restart "
                f"the worker (max_consecutive_refusals = {self.limit})")


class RelayLink:
    """Sender thread between the rollout loop and the relay (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        layout: ObservationLayout,
        endpoint: RelayEndpoint,
        sequence: SequenceCounter,
        spool: Spool,
        ack_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 2.0,
        context: zmq.Context | None = None,
        on_weights: Callable[[WeightsUpdate, float], None] | None = None,
        max_consecutive_refusals: int | None = None,
        on_give_up: Callable[[], None] | None = None,
        on_silent_link: Callable[[], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.on_weights = on_weights
        self.on_give_up = on_give_up
        """Called once, on this thread, when ``max_consecutive_refusals`` batches in a row were refused (the
        worker's stop event's ``set``): must be thread-safe and must not block."""
        self.layout = layout
        self.endpoint = endpoint
        self.sequence = sequence
        self.spool = spool
        self.ack_timeout_s = ack_timeout_s
        self.counters = LinkCounters()
        self._rate_log = RateLimitedLog(log, interval_s=RATE_LOG_INTERVAL_S)
        """Resends, reused seqs and the relay's errors: at most a line per kind (and reason) per interval."""
        self.rejects: Counter[str] = Counter()
        """Batches refused for good, by reason."""
        self.refusals = RefusalStreak(max_consecutive_refusals)
        """Batches refused in a row (guarded by ``_lock``)."""
        self._first_seq_of_run = sequence.next_seq
        """Batches below it were made by an earlier run (a durable spool's, resent after a restart): their refusals
        are counted by reason but say nothing about the data made now, so they do not lengthen the streak."""
        self._gave_up: str | None = None
        self._inbox: queue.SimpleQueue[tuple[SampleBatchBuilder, int]] = queue.SimpleQueue()
        self.id_refusal: str | None = None
        """The relay's reason the last time it did not take this connection's messages as this worker's (a revoked
        key, an id bound to another key, another process's hello): for the run's summary."""
        self._unnumbered: tuple[SampleBatchBuilder, int] | None = None
        """The builder the sender thread took but could not number (no sequence numbers could be reserved): it is
        numbered first at the next turn. Counted in :meth:`_not_numbered` with those still in the inbox."""
        self._reserve_again_at = float("-inf")
        """After a failed reservation, the next try waits until then (:data:`RESERVE_RETRY_S`)."""
        self._submitted = 0  # builders handed over by submit(); written by the rollout thread only
        self._lock = threading.Lock()  # guards spool + counters against snapshot readers
        self._started_at = time.monotonic()
        self._hello_again = HelloBackoff(HELLO_AGAIN_FIRST_S, HELLO_AGAIN_MAX_S)
        self._id_lost_at = float("-inf")
        self._acked_at = float("-inf")
        """When the last acknowledgement came: an ``unknown_sender`` since then is the link's state, not history."""
        self._hello_refused_at = float("-inf")
        """When the relay last refused this link's hello: the refusals that follow it do not replace its reason."""
        self._answered_at = float("-inf")
        """When the relay last answered as to a registered worker (an ack, a heartbeat, weights): after a refused
        hello, batches wait until then (:meth:`_on_turn`)."""
        self._client = RelayClient(
            worker_id, "sender", endpoint, self.counters, on_connected=self._say_hello, on_message=self._on_message,
            on_turn=self._on_turn, send_heartbeat=self._send_heartbeat, while_away="spooling until it comes back",
            heartbeat_interval_s=heartbeat_interval_s, on_silent_link=on_silent_link, poll_ms=_POLL_MS,
            context=context,
        )

    # ---------------------------------------------------------------------------------------- rollout-thread side

    def start(self) -> None:
        self._client.start()

    def submit(self, builder: SampleBatchBuilder, weights_version: int) -> None:
        """Queue a filled builder (the caller must use a new one afterwards). Never blocks: where the spool's batch
        bound of builders already wait for the sender thread, the oldest waiting one is dropped (counted, logged)."""
        if len(builder):
            self._submitted += 1
            self._inbox.put((builder, weights_version))
            if self._inbox.qsize() > self.spool.max_batches:
                self._drop_oldest_waiting()
            self._client.wake()  # spooled (on disk with durable_spool) now, not at the end of the sender's poll

    def _drop_oldest_waiting(self) -> None:
        """Drop the oldest builder the sender thread has not taken (it has fallen a whole spool behind: were it to
        catch up, the spool would drop the same oldest batches to keep its bound)."""
        try:
            builder, _ = self._inbox.get_nowait()
        except queue.Empty:  # the sender thread took them meanwhile
            return
        with self._lock:
            self.counters.waiting_dropped += 1
            self.counters.waiting_dropped_steps += len(builder)
            dropped = self.counters.waiting_dropped
        where = f" (its durable spool is in {self.spool.directory}: is that disk slow or hung?)" if (
            self.spool.directory is not None) else ""
        self._rate_log.log(logging.WARNING, "waiting", "%s: %d batches wait for the sender thread, which has fallen "
                           "behind%s: dropped the oldest (%d steps); %d dropped so far", self.worker_id,
                           self.spool.max_batches, where, len(builder), dropped)

    @property
    def connected(self) -> bool:
        return self._client.connected

    def handshake_advice(self) -> str | None:
        """What the latest failed handshake with the relay means and how to fix it (the error line it logged, without
        its 'retrying'), for the worker's summary; ``None`` when none failed."""
        watch = self._client.handshake
        if watch.last_failure is None:
            return None
        return watch.advice(watch.last_failure, retrying=False)

    def wait_connected(self, timeout: float) -> bool:
        return self._client.wait_connected(timeout)

    def delivery_problem(self) -> str | None:
        """For the worker's progress line: that the link is not connected to the relay and what waits; or, connected,
        that a batch has waited :data:`NO_ACK_WARNING_S` for the trainer's answer (the relay holds batches while no
        trainer is connected: without this, the line said only how many were handed over). None otherwise."""
        if self._client.connected:
            with self._lock:
                waited, waiting = self.spool.oldest_wait(), len(self.spool)
            if self._id_lost_at > self._acked_at and self.id_refusal is not None:  # no ack since the relay refused us
                return (f"connected to the relay, but it does not take this connection's messages as "
                        f"{self.worker_id}'s ({self.id_refusal}): {waiting} batch(es) waiting to be delivered")
            if waited < NO_ACK_WARNING_S:
                return None
            return (f"connected to the relay, but no answer from the trainer for {waited:.0f} s: {waiting} batch(es) "
                    "waiting to be acknowledged (is the trainer running and connected to this relay? the relay holds "
                    "batches for it until it is)")
        with self._lock:
            waiting = len(self.spool) + self._not_numbered()
        ever = "any more" if self.counters.connections else "yet"
        return (f"not connected to the relay at {self._client.describe()} {ever} ({self._client.unconnected_hint()}): "
                f"{waiting} batch(es) waiting to be delivered")

    def snapshot(self) -> dict[str, int]:
        """Counters of the link, the spool (and its current size) and the handshake watch (``handshake_refused``...)."""
        with self._lock:
            values = {**asdict(self.counters), **{f"spool_{k}": v for k, v in asdict(self.spool.counters).items()}}
            values["spool_batches"] = len(self.spool)
            values["spool_bytes"] = self.spool.nbytes
            values.update({f"rejected.{reason}": count for reason, count in self.rejects.items()})
            values["refused_in_a_row"] = self.refusals.length
            values["not_numbered"] = self._not_numbered()  # after the sender thread stopped: lost
        values.update({f"handshake_{k}": v for k, v in asdict(self._client.handshake.counters).items()})
        return values

    def _not_numbered(self) -> int:
        """Batches handed over by :meth:`submit` that the sender thread has not numbered and spooled yet (call with
        ``_lock`` held)."""
        return self._submitted - self.counters.batches_built - self.counters.waiting_dropped

    def flush(self, timeout: float) -> bool:
        """Wait until every submitted batch is acknowledged (or ``timeout``); True when the spool is empty. A link
        that never connected returns False as soon as every batch is spooled: no acknowledgement can be coming (a
        stopped worker that never reached the relay, or whose key it refuses, would otherwise wait it out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:  # every submitted builder is built and spooled, and the spool is empty
                built = not self._not_numbered()
                if built and not len(self.spool):
                    return True
                if built and not self.counters.connections:  # never reached the relay: no ack can be on its way
                    return False
            if not self._client.is_alive():
                return False
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 5.0, raise_failure: bool = True) -> None:
        """Stop the sender thread (it numbers and spools what is still in its inbox first); :class:`SenderFailure` if
        it had died on an error, unless ``raise_failure`` is off (the caller reports :attr:`failure` itself)."""
        self._client.stop(timeout)
        if raise_failure:
            self.check_alive()

    def check_alive(self) -> None:
        """:class:`SenderFailure` (from the error) if the sender thread died on one, which it logged with its traceback."""
        if self.failure is not None:
            raise SenderFailure(f"{self.worker_id}: sender thread failed: {self.failure}") from self.failure

    @property
    def gave_up(self) -> str | None:
        """The error logged when ``max_consecutive_refusals`` batches in a row were refused for good (the worker
        then stops with it), else ``None``."""
        with self._lock:
            return self._gave_up

    @property
    def failure(self) -> BaseException | None:
        """The exception that stopped the sender thread, or ``None``."""
        return self._client.failure

    # ------------------------------------------------------------------------------------------ sender-thread side

    def _say_hello(self) -> str:
        with self._lock:
            pending = self.spool.pending()
            for entry in pending:  # resend everything unacknowledged: the old pipe's queue is gone
                entry.last_sent = float("-inf")
        # the next batch sent is the oldest unacknowledged one (resent first), else a new one: every seq
        # below next_seq is acknowledged, dropped from the spool or was never used (restart reservation)
        next_seq = min([entry.seq for entry in pending] + [self.sequence.next_seq])
        hello = Hello(role="worker", software=SOFTWARE, layout=self.layout, next_seq=next_seq)
        self._send(encode(hello, self.worker_id))
        self.counters.hellos_sent += 1
        resent = sum(1 for entry in pending if entry.sends)
        return (f"hello sent with next_seq={next_seq}; unacknowledged batches: {resent} to resend, "
                f"{len(pending) - resent} not sent yet")

    def _on_turn(self) -> None:
        self._take_submissions()
        if self._client.connected:
            if self._hello_again.take_due(time.monotonic()):
                log.info("%s: saying hello again to take back its worker id at the relay: %s", self.worker_id,
                         self._say_hello())
            if self._hello_refused_at <= self._answered_at:
                self._send_due()
            # else the relay refused this worker's hello (max_workers reached, an id bound to another key) and has not
            # answered it as registered since: every batch would be refused too (a re-check probe's refused worker
            # sent 86 in 5 s); they wait in the spool until a hello again is answered

    def _send_heartbeat(self) -> None:
        self._send(encode(self._heartbeat(), self.worker_id))

    def _take_submissions(self) -> None:
        while True:
            if self._unnumbered is not None:
                if time.monotonic() < self._reserve_again_at:
                    return
                (builder, version), self._unnumbered = self._unnumbered, None
            else:
                try:
                    builder, version = self._inbox.get_nowait()
                except queue.Empty:
                    return
            try:
                seq = self.sequence.take()
            except ReservationError as exc:  # a full disk or a read-only folder: keep it, try again next turn
                self._unnumbered = (builder, version)
                self._reserve_again_at = time.monotonic() + RESERVE_RETRY_S
                with self._lock:
                    self.counters.reservations_failed += 1
                    waiting = self._not_numbered()
                self._rate_log.log(logging.ERROR, "reserve", "%s: %s; %d batch(es) wait unnumbered in memory (the "
                                   "oldest are dropped, counted, past the spool's bound) and numbering resumes once "
                                   "the state file can be written: free disk space or fix %s", self.worker_id,
                                   exc.strerror, waiting, self.sequence.state_dir)
                return
            steps = len(builder)
            batch = builder.build(seq=seq, weights_version=version)
            frames = encode(batch, self.worker_id)
            with self._lock:
                self.spool.add(batch.seq, frames)
                self.counters.batches_built += 1
                self.counters.steps_submitted += steps

    def _send_due(self) -> None:
        with self._lock:
            due = self.spool.due(self.ack_timeout_s)
        resent: list[tuple[int, int]] = []
        try:
            for entry in due:
                if not self._send(entry.frames):
                    return
                with self._lock:
                    if entry.sends:
                        resent.append((entry.seq, entry.sends + 1))
                    self.spool.mark_sent(entry.seq)
        finally:
            if resent:  # one line per round, at most one every RATE_LOG_INTERVAL_S (a trainer away for minutes)
                seqs = sorted(seq for seq, _ in resent)
                self._rate_log.log(logging.INFO, "resend", "%s: resending %d batch(es) with no ack yet (seq %s, "
                                   "up to send #%d)", self.worker_id, len(resent), seq_ranges(seqs),
                                   max(sends for _, sends in resent))

    def _numbers_used_before(self, seqs: list[int]) -> None:
        """A batch this run built and sent once cannot be a resend: answered ``duplicate``, its seq was used before
        (the state file was restored from an older copy, or copied from another worker's ``state_dir``) and its rows
        are not stored. Count it, say so, and move the numbering to the clock's microseconds, above any number a
        state file started from the clock can have reached, so that the batches after it are stored."""
        self.counters.seqs_reused += len(seqs)
        moved = self.sequence.start_above(time.time_ns() // 1000)
        self._rate_log.log(logging.ERROR, "reused", "%s: the trainer already held batch seq %s, which this run "
                           "built and sent once: its number was used before (state file %s restored from an older "
                           "copy, or copied from another worker), so its rows are NOT stored (%d batch(es) so far)%s",
                           self.worker_id, seq_ranges(seqs), self.sequence.path, self.counters.seqs_reused,
                           f"; numbering moves on from seq {self.sequence.next_seq}" if moved else "")

    def _send(self, frames: list[bytes]) -> bool:
        if not self._client.send(frames):  # refused (counted as send_blocked): keep it spooled, try again later
            return False
        self.counters.sends += 1
        return True

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            envelope, message = decode(frames)
        except ProtocolError as exc:
            self.counters.rejected_messages += 1
            log.warning("%s: ignored a message from the relay: %s", self.worker_id, exc)
            return
        if isinstance(message, SampleAck | Heartbeat | WeightsUpdate):
            self._answered_at = time.monotonic()  # answered as a registered worker (weights: handed over at hello)
        if isinstance(message, SampleAck | Heartbeat):
            self._client.answered_since_connect = True  # the relay takes this connection as this worker's
        if isinstance(message, SampleAck):
            if message.worker != self.worker_id:
                self.counters.rejected_messages += 1
                log.warning("%s: ignored an ack addressed to %s", self.worker_id, message.worker)
                return
            if message.outcome == "rejected":
                self._refused(message.seqs, message.reason, f"the trainer refused it: {message.detail}")
            else:
                with self._lock:
                    reused = ([seq for seq in message.seqs
                               if seq >= self._first_seq_of_run and self.spool.sends_of(seq) == 1]
                              if message.outcome == "duplicate" else [])
                    self.counters.batches_stored += self.spool.ack(message.seqs)
                    if message.outcome == "stored":  # not "duplicate": see RefusalStreak
                        self.refusals.stored()
                if reused:
                    self._numbers_used_before(reused)
            self._acked_at = time.monotonic()
            if self._acked_at - self._id_lost_at >= HELLO_AGAIN_RESET_S:
                self._hello_again.accepted()
            self.counters.acks_received += 1  # last: whoever waits for it sees what the answer did
        elif isinstance(message, Error):
            self.counters.errors_received += 1
            if self._client.refused_before_hello(message, "sample_batch"):
                self.counters.stale_batches_refused += 1
                log.debug("%s: the relay refused batch seq %s, sent ahead of this connection's hello: %s",
                          self.worker_id, message.ref_seq, message.message)
                return
            # at most a line per reason every 10 s: a displaced connection (two processes under one id) is refused
            # at every resend, for as long as it runs
            self._rate_log.warning(("relay error", message.reason), "%s: relay rejected our %s%s: [%s] %s",
                                   self.worker_id, message.ref_type or "message",
                                   f" seq {message.ref_seq}" if message.ref_seq is not None else "",
                                   message.reason, message.message)
            if message.ref_type == "sample_batch" and message.ref_seq is not None and message.reason in FINAL_AT_RELAY:
                self._refused([message.ref_seq], message.reason, f"the relay refused it: {message.message}")
            if message.reason == "unknown_sender":
                self._id_lost(message.message, from_hello=message.ref_type == "hello")
        elif isinstance(message, WeightsUpdate):
            self.counters.weights_received += 1
            if self.on_weights is not None:
                self.on_weights(message, envelope.sent_at)
        elif not isinstance(message, Heartbeat):
            self.counters.rejected_messages += 1
            log.warning("%s: unexpected %s from %s on the samples link", self.worker_id, envelope.type, envelope.sender)

    def _refused(self, seqs: list[int], reason: str, detail: str) -> None:
        """Batches refused for good: dropped from the spool, counted by reason, never resent, never counted stored;
        the ``max_consecutive_refusals``-th in a row makes the worker give up (once)."""
        batches = ",".join(map(str, seqs))
        this_run = [seq for seq in seqs if seq >= self._first_seq_of_run]
        with self._lock:  # refuse() is 0 for a second answer about a batch already dropped: counted once
            removed_this_run = self.spool.refuse(this_run) if this_run else 0
            removed = removed_this_run + self.spool.refuse([seq for seq in seqs if seq < self._first_seq_of_run])
            self.counters.batches_rejected += removed
            self.rejects[reason] += removed
            reached = self.refusals.refused(reason, removed_this_run, f"batch seq {batches} [{reason}]: {detail}")
            gives_up = reached and self._gave_up is None  # once: a later streak (after a stored batch) changes nothing
            if gives_up:
                self._gave_up = self.refusals.describe(self.worker_id)
        if removed:
            log.warning("%s: batch seq %s rejected [%s], dropped without resending: %s", self.worker_id, batches,
                        reason, detail)
        if gives_up:
            log.error("%s", self._gave_up)
            if self.on_give_up is not None:
                self.on_give_up()

    def _id_lost(self, detail: str, from_hello: bool = False) -> None:
        """The relay does not take this connection's messages as this worker's (another connection said hello under
        its id since, a restarted relay that missed the hello, a revoked key): say hello again after a wait, which
        grows while it keeps happening (:data:`HELLO_AGAIN_FIRST_S`). Without it a worker displaced by a second
        process under its id sent nothing any more, even after that process stopped."""
        self.counters.ids_lost += 1
        if from_hello or self._hello_refused_at <= self._acked_at:
            # after a refused hello, the heartbeats' refusals only say "sent before saying hello": keep the hello's
            # reason, which says what frees the id (a re-check probe saw it overwritten at every heartbeat)
            self.id_refusal = detail
        if from_hello:
            self._hello_refused_at = time.monotonic()
        now = time.monotonic()
        self._id_lost_at = now
        wait = self._hello_again.refused(now)
        if wait is not None:
            # a key removed from the allow-list, or an id bound to another key, is not two processes trading the id
            # nor is a relay that registers as many workers as it may (max_workers)
            two_processes = ("" if "key" in detail or "max_workers" in detail else " (if another process runs under "
                             "this worker_id, they take the id from each other: stop one)")
            log.warning("%s: the relay does not take this connection's messages as %s's (%s); saying hello again in "
                        "%.0f s%s", self.worker_id, self.worker_id, detail, wait, two_processes)

    def _heartbeat(self) -> Heartbeat:
        with self._lock:
            counters = {
                "batches": self.counters.batches_built,
                "steps": self.counters.steps_submitted,
                "spooled": len(self.spool),
                "dropped": self.spool.counters.dropped,
                "dropped_waiting": self.counters.waiting_dropped,
                "resent": self.spool.counters.resent,
                "restored": self.spool.counters.restored,
                "unreadable_spool_files": self.spool.counters.unreadable_files,
                "spool_write_errors": self.spool.counters.write_errors,
                "stored": self.counters.batches_stored,
                "rejected": self.counters.batches_rejected,
                **{f"rejected.{reason}": count for reason, count in sorted(self.rejects.items())[:40]},
            }
        return Heartbeat(role="worker", uptime_s=time.monotonic() - self._started_at, counters=counters)
