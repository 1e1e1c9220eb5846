"""The trainer's ingest thread: owns the DEALER socket to the relay.

It says ``hello`` on every (re)connection, feeds every received message to the :class:`~tmrl_trainer.ingest.Ingestor`
and sends back the acks it returns, sends heartbeats, and publishes the weights the main thread hands over with
:meth:`TrainerLink.publish` (only the newest pending update is kept; it is re-published after a reconnection so a
restarted relay's last-value cache is refilled at once).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import zmq
from tmrl_common.protocol import Heartbeat, Hello, WeightsUpdate, encode
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig
from zmq.utils.monitor import recv_monitor_message

from tmrl_trainer.ingest import Ingestor

log = logging.getLogger(__name__)

SOFTWARE = "tmrl-trainer/0.1"
_POLL_MS = 10


@dataclass
class TrainerLinkCounters:
    received: int = 0
    acks_sent: int = 0
    weights_sent: int = 0
    send_blocked: int = 0
    connections: int = 0
    disconnections: int = 0
    internal_errors: int = 0


class TrainerLink:
    """Ingest thread between the relay and the trainer (see the module docstring)."""

    def __init__(self, trainer_id: str, host: str, port: int, transport: TransportConfig, security: SecurityConfig,
                 ingestor: Ingestor, heartbeat_interval_s: float = 2.0, context: zmq.Context | None = None) -> None:
        self.trainer_id = trainer_id
        self.endpoint = RelayEndpoint(host, port, transport, security)
        self.ingestor = ingestor
        self.heartbeat_interval_s = heartbeat_interval_s
        self.counters = TrainerLinkCounters()
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._pending_weights: WeightsUpdate | None = None
        self._last_weights: WeightsUpdate | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{trainer_id}-ingest", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, update: WeightsUpdate) -> None:
        """Queue ``update`` for the relay (replaces an older update not yet sent). Never blocks."""
        with self._lock:
            self._pending_weights = update

    def check_security(self) -> None:
        """Load the CurveZMQ key files now so a misconfiguration stops the trainer before it starts."""
        self.endpoint.check_security()

    def describe(self) -> str:
        return self.endpoint.describe()

    # ------------------------------------------------------------------------------------------------ thread

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket]:
        # the monitor is attached before connect(): the first handshake's event must not be missed
        socket, monitor = self.endpoint.connect(self._context, zmq.DEALER,
                                                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        assert monitor is not None
        return socket, monitor

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            log.exception("%s: ingest thread stopped on an unexpected error", self.trainer_id)
            self.failure = exc

    def _loop(self) -> None:
        socket, monitor = self._connect()
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
                if self._connected.is_set():
                    self._send_weights(socket)
                    now = time.monotonic()
                    if now >= next_heartbeat:
                        snapshot = self.ingestor.snapshot()
                        heartbeat = Heartbeat(role="trainer", uptime_s=now - self._started_at, counters={
                            "batches": snapshot["batches_stored"], "rows": snapshot["rows_stored"],
                            "duplicates": snapshot["duplicates"], "rejects": sum(snapshot["rejects"].values()),
                        })
                        self._send(socket, encode(heartbeat, self.trainer_id))
                        next_heartbeat = now + self.heartbeat_interval_s
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close()

    def _on_monitor(self, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.counters.connections += 1
                self._send(socket, encode(Hello(role="trainer", software=SOFTWARE, layout=self.ingestor.layout),
                                          self.trainer_id))
                with self._lock:
                    if self._pending_weights is None and self._last_weights is not None:
                        self._pending_weights = self._last_weights  # refill a restarted relay's cache
                log.info("%s: connected to the relay (%s)", self.trainer_id, self.describe())
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self.counters.disconnections += 1
                if self._connected.is_set():
                    log.warning("%s: lost the relay connection; waiting for it to come back", self.trainer_id)
                self._connected.clear()

    def _send(self, socket: zmq.Socket, frames: list[bytes]) -> bool:
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters.send_blocked += 1
            return False
        return True

    def _send_weights(self, socket: zmq.Socket) -> None:
        with self._lock:
            update = self._pending_weights
        if update is None:
            return
        if self._send(socket, encode(update, self.trainer_id)):
            self.counters.weights_sent += 1
            with self._lock:
                if self._pending_weights is update:
                    self._pending_weights = None
                self._last_weights = update

    def _receive_all(self, socket: zmq.Socket) -> None:
        for _ in range(1000):  # bounded so weights and heartbeats still go out under a flood
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.counters.received += 1
            try:
                replies = self.ingestor.handle(frames)
            except Exception:  # a bug on one message must not stop ingestion: count, log, go on
                self.counters.internal_errors += 1
                log.exception("%s: could not process a message from the relay", self.trainer_id)
                continue
            for reply in replies:
                if self._send(socket, reply):
                    self.counters.acks_sent += 1
