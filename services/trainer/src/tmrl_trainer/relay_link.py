"""The trainer's ingest thread: owns the DEALER socket to the relay.

It says ``hello`` on every (re)connection, feeds every received message to the :class:`~tmrl_trainer.ingest.Ingestor`
and sends back the acks it returns, sends heartbeats, and publishes the weights the main thread hands over with
:meth:`TrainerLink.publish` (only the newest pending update is kept; it is re-published after a reconnection so a
restarted relay's weights cache is refilled at once).

A trainer always recovers its role (issue 14): an ``error`` from the relay with reason ``unknown_sender`` means "you
do not hold the trainer role on this connection now" (another trainer took it after this one was silent, the relay
forgot this connection, or it refused this hello because a trainer is alive on another connection: another one, or
a second process with this key). The link logs why and says hello again after a backoff
(:class:`HelloBackoff`: 0.2 s, doubling up to 5 s, back to 0.2 s once the relay answers a heartbeat, which it only
does for the trainer that holds the role; while refused, only the heartbeat sent with each hello asks). Other errors
are logged and counted.

The socket, its monitor, the thread, heartbeats and non-blocking sends are a :class:`~tmrl_common.relay_client.RelayClient`
(shared with the worker's link); this module says what the trainer does on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq
from tmrl_common.errors import ConfigError, ProtocolError
from tmrl_common.protocol import Error, Heartbeat, Hello, WeightsUpdate, decode, decode_envelope, encode
from tmrl_common.relay_client import HelloBackoff, RelayClient
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

from tmrl_trainer.ingest import Ingestor

log = logging.getLogger(__name__)

SOFTWARE = "tmrl-trainer/0.1"
_POLL_MS = 10
CONTESTED_LOSSES = 3
CONTESTED_WINDOW_S = 60.0
"""Losing the trainer role this many times within this many seconds, each time after holding it, means another live
trainer takes it back as often: two trainers under one key (an outside probe saw 22 takeovers in 23 s, for ever)."""


class TrainerRoleContested(ConfigError):
    """Another live trainer with this trainer's key keeps taking the role back: this one stops (status 2)."""


@dataclass
class TrainerLinkCounters:
    received: int = 0
    acks_sent: int = 0
    weights_sent: int = 0
    send_blocked: int = 0
    connections: int = 0
    disconnections: int = 0
    internal_errors: int = 0
    errors_received: int = 0
    hellos_sent: int = 0
    role_lost: int = 0
    """``unknown_sender`` errors from the relay: this connection did not hold the trainer role (a hello follows)."""
    stale_acks_refused: int = 0
    """``unknown_sender`` answers to acks libzmq had queued before a reconnection and sent ahead of the new
    connection's hello: the hello is already on its way, so they are counted (the workers resend those batches)
    and start no second hello."""


class TrainerLink:
    """Ingest thread between the relay and the trainer (see the module docstring)."""

    def __init__(self, trainer_id: str, host: str, port: int, transport: TransportConfig, security: SecurityConfig,
                 ingestor: Ingestor, heartbeat_interval_s: float = 2.0, context: zmq.Context | None = None) -> None:
        self.trainer_id = trainer_id
        self.endpoint = RelayEndpoint(host, port, transport, security)
        self.ingestor = ingestor
        self.counters = TrainerLinkCounters()
        self._losses: deque[float] = deque(maxlen=CONTESTED_LOSSES)
        self._holding: int | None = None
        """``counters.connections`` when the relay last answered a heartbeat (it does for the role's holder only);
        None once the role was lost. A loss on a newer connection (a relay restart) is no contest."""
        self.contested: str | None = None
        """Set (the reason) once the role was lost :data:`CONTESTED_LOSSES` times within :data:`CONTESTED_WINDOW_S`
        after holding it; the service then stops with :class:`TrainerRoleContested`."""
        self._lock = threading.Lock()
        self._pending_weights: WeightsUpdate | None = None
        self._last_weights: WeightsUpdate | None = None
        self._started_at = time.monotonic()
        self._backoff = HelloBackoff()
        self._client = RelayClient(
            trainer_id, "ingest", self.endpoint, self.counters, on_connected=self._say_hello,
            on_message=self._on_message, on_turn=self._on_turn, send_heartbeat=self._send_periodic_heartbeat,
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
        """Load the CurveZMQ key files now so a misconfiguration stops the trainer before it starts (and warn when
        the relay's host name does not resolve)."""
        self.endpoint.check_security()
        self.endpoint.warn_if_unresolvable()

    def describe(self) -> str:
        return self.endpoint.describe()

    def unconnected_hint(self) -> str:
        return self._client.unconnected_hint()

    # ------------------------------------------------------------------------------------------------ thread

    def _say_hello(self) -> str:
        self._client.send(encode(Hello(role="trainer", software=SOFTWARE, layout=self.ingestor.layout), self.trainer_id))
        self.counters.hellos_sent += 1
        self._send_heartbeat()  # answered only if the hello took the role: the holder knows it holds it at once
        with self._lock:
            if self._pending_weights is None and self._last_weights is not None:
                self._pending_weights = self._last_weights  # refill a restarted relay's cache
        return ""

    def _on_turn(self) -> None:
        if self._client.connected:
            if self._backoff.take_due(time.monotonic()):
                log.info("%s: saying hello again to take the trainer role", self.trainer_id)
                self._say_hello()
            self._send_weights()

    def _send_periodic_heartbeat(self) -> None:
        """Every ``heartbeat_interval_s``, but not while refused: a hello is then scheduled, and its own heartbeat asks
        whether it took the role. A standby trainer (another holds the role) sent one refused heartbeat each interval
        besides its hellos, each answered, counted and logged at the relay."""
        if self._backoff.due_at is None:
            self._send_heartbeat()

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
        kind = self._peek_type(frames)
        if kind == "error":
            self._on_error(frames)
            return
        if kind == "heartbeat":  # the relay answers heartbeats of the trainer that holds the role only
            self._client.answered_since_connect = True
            self._backoff.accepted()
            self._holding = self.counters.connections
        try:
            replies = self.ingestor.handle(frames)
        except Exception:  # a bug on one message must not stop ingestion: count, log, go on
            self.counters.internal_errors += 1
            log.exception("%s: could not process a message from the relay", self.trainer_id)
            return
        for reply in replies:
            if self._client.send(reply):
                self.counters.acks_sent += 1

    def _note_loss(self, now: float, message: str) -> None:
        self._losses.append(now)
        if len(self._losses) == CONTESTED_LOSSES and now - self._losses[0] <= CONTESTED_WINDOW_S \
                and self.contested is None:
            self.contested = (
                f"{self.trainer_id} lost the trainer role {CONTESTED_LOSSES} times in {now - self._losses[0]:.0f} s, "
                f"each time after holding it (the relay: {message}): another trainer with this key "
                f"({self.endpoint.security.secret_key_file or 'no key, --insecure'}) is running and takes the role "
                "back as often; stop one of them, or give each its own key pair and trainer_id (a relay allows one "
                "trainer at a time)")

    @staticmethod
    def _peek_type(frames: list[bytes]) -> str | None:
        """The envelope's type (cheap: the envelope only), or None when it does not decode (the ingestor counts it)."""
        if len(frames) != 2:
            return None
        try:
            return decode_envelope(frames[0]).type
        except ProtocolError:
            return None

    def _on_error(self, frames: list[bytes]) -> None:
        self.counters.errors_received += 1
        try:
            _, error = decode(frames)
        except ProtocolError as exc:
            log.warning("%s: ignored an undecodable error message from the relay: %s", self.trainer_id, exc)
            return
        assert isinstance(error, Error)
        if self._client.refused_before_hello(error, "sample_ack"):
            self.counters.stale_acks_refused += 1
            log.debug("%s: the relay refused an ack sent ahead of this connection's hello: %s", self.trainer_id,
                      error.message)
            return
        if error.reason != "unknown_sender":
            log.warning("%s: relay rejected our %s: [%s] %s", self.trainer_id, error.ref_type or "message",
                        error.reason, error.message)
            return
        self.counters.role_lost += 1
        now = time.monotonic()
        if self._holding == self.counters.connections:  # lost on the connection that held it: not a claim refused
            self._note_loss(now, error.message)  # (a standby trainer), nor a relay that restarted (a new connection)
        self._holding = None
        wait = self._backoff.refused(now)
        if wait is not None:
            log.warning("%s: the relay says this connection does not hold the trainer role (%s: %s); saying hello "
                        "again in %.1fs", self.trainer_id, error.ref_type or "message", error.message, wait)
