"""The trainer's ingest thread: owns the DEALER socket to the relay.

It says ``hello`` on every (re)connection, feeds every received message to the :class:`~tmrl_trainer.ingest.Ingestor`
and sends back the acks it returns, sends heartbeats, and publishes the weights the main thread hands over with
:meth:`TrainerLink.publish` (only the newest pending update is kept; it is re-published after a reconnection so a
restarted relay's last-value cache is refilled at once).

The socket, its monitor, the thread, heartbeats and non-blocking sends are a :class:`~tmrl_common.relay_client.RelayClient`
(shared with the worker's link); this module says what the trainer does on it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import zmq
from tmrl_common.protocol import Heartbeat, Hello, WeightsUpdate, encode
from tmrl_common.relay_client import RelayClient
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

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
        self.counters = TrainerLinkCounters()
        self._lock = threading.Lock()
        self._pending_weights: WeightsUpdate | None = None
        self._last_weights: WeightsUpdate | None = None
        self._started_at = time.monotonic()
        self._client = RelayClient(
            trainer_id, "ingest", self.endpoint, self.counters, on_connected=self._say_hello,
            on_message=self._on_message, on_turn=self._on_turn, send_heartbeat=self._send_heartbeat,
            while_away="waiting for it to come back", role="trainer", heartbeat_interval_s=heartbeat_interval_s, poll_ms=_POLL_MS,
            context=context,
        )

    def start(self) -> None:
        self._client.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._client.stop(timeout)

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def failure(self) -> BaseException | None:
        """The exception that stopped the ingest thread, or ``None`` (the service loop checks it)."""
        return self._client.failure

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

    def _say_hello(self) -> str:
        self._client.send(encode(Hello(role="trainer", software=SOFTWARE, layout=self.ingestor.layout), self.trainer_id))
        with self._lock:
            if self._pending_weights is None and self._last_weights is not None:
                self._pending_weights = self._last_weights  # refill a restarted relay's cache
        return ""

    def _on_turn(self) -> None:
        if self._client.connected:
            self._send_weights()

    def _send_heartbeat(self) -> None:
        snapshot = self.ingestor.snapshot()
        heartbeat = Heartbeat(role="trainer", uptime_s=time.monotonic() - self._started_at, counters={
            "batches": snapshot["batches_stored"], "rows": snapshot["rows_stored"],
            "duplicates": snapshot["duplicates"], "rejects": sum(snapshot["rejects"].values()),
        })
        self._client.send(encode(heartbeat, self.trainer_id))

    def _send_weights(self) -> None:
        with self._lock:
            update = self._pending_weights
        if update is None:
            return
        if self._client.send(encode(update, self.trainer_id)):
            self.counters.weights_sent += 1
            with self._lock:
                if self._pending_weights is update:
                    self._pending_weights = None
                self._last_weights = update

    def _on_message(self, frames: list[bytes]) -> None:
        self.counters.received += 1
        try:
            replies = self.ingestor.handle(frames)
        except Exception:  # a bug on one message must not stop ingestion: count, log, go on
            self.counters.internal_errors += 1
            log.exception("%s: could not process a message from the relay", self.trainer_id)
            return
        for reply in replies:
            if self._client.send(reply):
                self.counters.acks_sent += 1
