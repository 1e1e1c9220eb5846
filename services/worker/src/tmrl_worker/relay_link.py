"""The worker's sender thread: owns the DEALER socket to the relay, the spool of unacknowledged batches and the acks.

The rollout loop hands over a filled :class:`~tmrl_common.batching.SampleBatchBuilder` with :meth:`RelayLink.submit`
(never blocks, no network I/O on the caller's thread). This thread then numbers the batch (:class:`SequenceCounter`),
builds and encodes it (compression happens here, off the real-time loop), spools it and sends it when the relay is
connected. A ``sample_ack`` removes batches from the spool; batches still unacknowledged after ``ack_timeout_s``
are resent, and every unacknowledged batch is resent after a reconnection (after a fresh ``hello``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass

import zmq
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationLayout
from tmrl_common.protocol import Error, Heartbeat, Hello, SampleAck, decode, encode
from tmrl_common.sockets import RelayEndpoint

from tmrl_worker.spool import SequenceCounter, Spool

log = logging.getLogger(__name__)

SOFTWARE = "tmrl-worker/0.1"
_POLL_MS = 20


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
    ) -> None:
        self.worker_id = worker_id
        self.layout = layout
        self.endpoint = endpoint
        self.sequence = sequence
        self.spool = spool
        self.ack_timeout_s = ack_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.counters = LinkCounters()
        self._context = context or zmq.Context.instance()
        self._inbox: queue.SimpleQueue[tuple[SampleBatchBuilder, int]] = queue.SimpleQueue()
        self._submitted = 0  # builders handed over by submit(); written by the rollout thread only
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()  # guards spool + counters against snapshot readers
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{worker_id}-sender", daemon=True)
        self._failure: BaseException | None = None

    # ---------------------------------------------------------------------------------------- rollout-thread side

    def start(self) -> None:
        self._thread.start()

    def submit(self, builder: SampleBatchBuilder, weights_version: int) -> None:
        """Queue a filled builder (the caller must use a new one afterwards). Never blocks."""
        if len(builder):
            self._submitted += 1
            self._inbox.put((builder, weights_version))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def snapshot(self) -> dict[str, int]:
        """Counters of the link and the spool, plus the spool's current size."""
        with self._lock:
            values = {**asdict(self.counters), **{f"spool_{k}": v for k, v in asdict(self.spool.counters).items()}}
            values["spool_batches"] = len(self.spool)
            values["spool_bytes"] = self.spool.nbytes
        return values

    def flush(self, timeout: float) -> bool:
        """Wait until every submitted batch is acknowledged (or ``timeout``); True when the spool is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:  # every submitted builder is built and spooled, and the spool is empty
                if self.counters.batches_built == self._submitted and not len(self.spool):
                    return True
            if not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._failure is not None:
            raise RuntimeError(f"{self.worker_id}: sender thread failed: {self._failure}") from self._failure

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    # ------------------------------------------------------------------------------------------ sender-thread side

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported through stop()/failure; the rollout loop checks it
            log.exception("%s: sender thread stopped on an unexpected error", self.worker_id)
            self._failure = exc

    def _loop(self) -> None:
        socket, monitor = self.endpoint.connect(self._context, zmq.DEALER,
                                                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                if monitor in events:
                    self._on_monitor(socket, monitor)
                if socket in events:
                    self._receive_all(socket)
                self._take_submissions()
                if self._connected.is_set():
                    self._send_due(socket)
                    now = time.monotonic()
                    if now >= next_heartbeat:
                        self._send(socket, encode(self._heartbeat(), self.worker_id))
                        next_heartbeat = now + self.heartbeat_interval_s
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close()
            self._connected.clear()

    def _on_monitor(self, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.counters.connections += 1
                with self._lock:
                    pending = self.spool.pending()
                    for entry in pending:  # resend everything unacknowledged: the old pipe's queue is gone
                        entry.last_sent = float("-inf")
                # the next batch sent is the oldest unacknowledged one (resent first), else a new one: every seq
                # below next_seq is acknowledged, dropped from the spool or was never used (restart reservation)
                next_seq = min([entry.seq for entry in pending] + [self.sequence.next_seq])
                hello = Hello(role="worker", software=SOFTWARE, layout=self.layout, next_seq=next_seq)
                self._send(socket, encode(hello, self.worker_id))
                self.counters.hellos_sent += 1
                log.info("%s: connected to the relay (%s); hello sent with next_seq=%d, %d unacknowledged batch(es) "
                         "to resend", self.worker_id, self.endpoint.describe(), next_seq, len(pending))
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self.counters.disconnections += 1
                if self._connected.is_set():
                    log.warning("%s: lost the relay connection; spooling until it comes back", self.worker_id)
                self._connected.clear()

    def _take_submissions(self) -> None:
        while True:
            try:
                builder, version = self._inbox.get_nowait()
            except queue.Empty:
                return
            steps = len(builder)
            batch = builder.build(seq=self.sequence.take(), weights_version=version)
            frames = encode(batch, self.worker_id)
            with self._lock:
                self.spool.add(batch.seq, frames)
                self.counters.batches_built += 1
                self.counters.steps_submitted += steps

    def _send_due(self, socket: zmq.Socket) -> None:
        with self._lock:
            due = self.spool.due(self.ack_timeout_s)
        for entry in due:
            if not self._send(socket, entry.frames):
                return
            with self._lock:
                if entry.sends:
                    log.info("%s: resending batch seq %d (send #%d, no ack yet)", self.worker_id, entry.seq, entry.sends + 1)
                self.spool.mark_sent(entry.seq)

    def _send(self, socket: zmq.Socket, frames: list[bytes]) -> bool:
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # high-water mark reached or no peer: keep it spooled, try again later
            self.counters.send_blocked += 1
            return False
        self.counters.sends += 1
        return True

    def _receive_all(self, socket: zmq.Socket) -> None:
        while True:
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                envelope, message = decode(frames)
            except ProtocolError as exc:
                self.counters.rejected_messages += 1
                log.warning("%s: ignored a message from the relay: %s", self.worker_id, exc)
                continue
            if isinstance(message, SampleAck):
                if message.worker != self.worker_id:
                    self.counters.rejected_messages += 1
                    log.warning("%s: ignored an ack addressed to %s", self.worker_id, message.worker)
                    continue
                with self._lock:
                    self.spool.ack(message.seqs)
                    self.counters.acks_received += 1
            elif isinstance(message, Error):
                self.counters.errors_received += 1
                log.warning("%s: relay rejected our %s%s: [%s] %s", self.worker_id, message.ref_type or "message",
                            f" seq {message.ref_seq}" if message.ref_seq is not None else "", message.reason, message.message)
            elif isinstance(message, Heartbeat):
                pass
            else:
                self.counters.rejected_messages += 1
                log.warning("%s: unexpected %s from %s on the samples link", self.worker_id, envelope.type, envelope.sender)

    def _heartbeat(self) -> Heartbeat:
        with self._lock:
            counters = {
                "batches": self.counters.batches_built,
                "steps": self.counters.steps_submitted,
                "spooled": len(self.spool),
                "dropped": self.spool.counters.dropped,
                "resent": self.spool.counters.resent,
                "restored": self.spool.counters.restored,
                "unreadable_spool_files": self.spool.counters.unreadable_files,
                "spool_write_errors": self.spool.counters.write_errors,
            }
        return Heartbeat(role="worker", uptime_s=time.monotonic() - self._started_at, counters=counters)
