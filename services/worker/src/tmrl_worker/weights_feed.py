"""The worker's weights thread: receives ``weights_update`` on a SUB socket and prepares the new actor off the hot path.

The rollout loop calls :meth:`WeightsFeed.take_latest` between two steps: it returns the newest prepared
``(version, actor)`` at most once (or ``None``), which costs a lock and a pointer swap, never network I/O or
network construction. Older versions and malformed updates are counted and skipped, never crash the worker.

A refused key stops libzmq from ever reconnecting the SUB socket: its :class:`~tmrl_common.handshake.HandshakeWatch`
(silent: the sender thread's watch logs the advice for the same key) has it rebuilt every ``retry_s``, so weights
flow as soon as the key is allowed.

Weights come from the SUB socket (every new version the relay publishes) and from the worker's samples link: after
each ``hello`` the relay hands the latest weights over that link (:meth:`WeightsFeed.hand_over`), so a worker starts
from them at once. Both are prepared on this thread; a version already prepared is skipped as stale.

A trainer that restarts (from an older checkpoint, or a new run) publishes lower versions again, and the relay
publishes them as they come. The SUB socket delivers in the relay's order, so a version lower than the previous one
*on that socket* means a restarted trainer, not a late message: the feed then follows the new versions (a new
:attr:`PreparedPolicy.generation`) and logs it, instead of ignoring every update until they pass the old peak. So
does a lower version that the trainer sent later (its envelope's ``sent_at``, the trainer's clock, kept by the relay
on both paths) than the newest one prepared: a worker whose only weights came by hand-over, with no earlier version
on its SUB socket to compare with, once stayed on the old run's policy while a new trainer's versions climbed.

Weights for another observation layout than the worker's env (``layout_problem``) are refused and counted like any
malformed update, and the worker keeps the policy it has: one such update (forged, in a probe) used to stop every
worker that received it. :attr:`WeightsFeed.wrong_layout_streak` counts such versions in a row, none usable in
between: a trainer that trains for another layout publishes nothing else, and the worker stops at
:data:`WRONG_LAYOUT_VERSIONS_TO_STOP` of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from tmrl_common.errors import ProtocolError
from tmrl_common.handshake import WATCHED_EVENTS, HandshakeWatch
from tmrl_common.layout import ObservationLayout
from tmrl_common.log_limit import RateLimitedLog
from tmrl_common.networks import Actor, actor_from_weights_update
from tmrl_common.protocol import DecodeLimits, WeightsUpdate, decode
from tmrl_common.sockets import RelayEndpoint
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)
_disconnect_log = RateLimitedLog(log, interval_s=60.0)
_layout_log = RateLimitedLog(log, interval_s=60.0)

_POLL_MS = 50
WRONG_LAYOUT_VERSIONS_TO_STOP = 3
"""Weights versions for another observation layout in a row, none usable in between, that stop the worker (the
rollout's health check raises): its trainer trains a policy it cannot use."""
SUB_RCVHWM = 4
"""Weights updates queued on receipt at most (each may be megabytes; only the newest matters)."""


@dataclass
class FeedCounters:
    received: int = 0
    prepared: int = 0
    stale: int = 0
    rejected: int = 0
    swapped: int = 0
    trainer_restarts: int = 0
    """Times a restarted trainer's lower versions were taken up (module docstring), followed since."""
    wrong_layout: int = 0
    """Updates refused (also counted in ``rejected``) because their policy is for another observation layout."""


@dataclass(frozen=True)
class PreparedPolicy:
    """A ready-to-use actor, the weights version it carries and the trainer restarts seen before it (``generation``:
    a policy of a later generation replaces one of a higher version)."""

    version: int
    actor: Actor
    generation: int = 0


class WeightsFeed:
    """Mailbox of the newest prepared actor, filled by a SUB thread (:meth:`start`) or directly (:meth:`offer`)."""

    def __init__(self, worker_id: str, endpoint: RelayEndpoint | None = None, context: zmq.Context | None = None,
                 limits: DecodeLimits | None = None,
                 layout_problem: Callable[[ObservationLayout], str | None] | None = None) -> None:
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.layout_problem = layout_problem
        """Why a policy for a layout cannot act in this worker's env (None: it can): such weights are refused."""
        self.counters = FeedCounters()
        self.limits = limits or DecodeLimits()
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._latest: PreparedPolicy | None = None
        self._handed: tuple[WeightsUpdate, float | None] | None = None
        self._newest_version = -1
        self._newest_sent_at: float | None = None
        """The trainer's ``sent_at`` of the newest version prepared (None: not known)."""
        self.wrong_layout_streak = 0
        """Distinct weights versions refused for another layout since the last one prepared."""
        self.wrong_layout_problem: str | None = None
        """Why the latest of them was refused (:attr:`layout_problem`'s answer, its version first)."""
        self._wrong_layout_version: int | None = None
        self._feed_version: int | None = None
        """The version the SUB socket delivered last (its order is the relay's)."""
        self._generation = 0
        self._stop = threading.Event()
        self._reconnect = threading.Event()
        """Set by :meth:`reconnect`: the feed's thread connects a new socket at its next turn."""
        self.reconnections = 0
        """Sockets replaced at :meth:`reconnect`'s request."""
        self._thread: threading.Thread | None = None
        self.handshake = HandshakeWatch(worker_id, endpoint, "worker", report=False) if endpoint is not None else None

    # ---------------------------------------------------------------------------------------- rollout-thread side

    def take_latest(self) -> PreparedPolicy | None:
        """The newest actor prepared since the last call, or ``None``. Cheap: call it before every step."""
        with self._lock:
            latest, self._latest = self._latest, None
            if latest is not None:
                self.counters.swapped += 1
            return latest

    def weights_problem(self) -> str | None:
        """For the worker's progress line: the trainer's latest weights were refused for another layout."""
        if not self.wrong_layout_streak:
            return None
        return (f"the trainer's weights are refused ({self.wrong_layout_streak} version(s) in a row for another "
                f"observation layout, see the error above)")

    # ------------------------------------------------------------------------------------------- feeding side

    def offer(self, update: WeightsUpdate, sent_at: float | None = None) -> bool:
        """Build an actor from ``update`` (which the trainer sent at ``sent_at``, its envelope's) on the calling thread
        and make it the latest; False when stale or refused."""
        self.counters.received += 1
        restarted = False
        if update.version <= self._newest_version:
            restarted = (update.version < self._newest_version and sent_at is not None and
                         self._newest_sent_at is not None and sent_at > self._newest_sent_at)
            if not restarted:
                self.counters.stale += 1
                return False
        try:
            actor = actor_from_weights_update(update)
        except ProtocolError as exc:
            self.counters.rejected += 1
            log.warning("%s: weights version %d rejected: %s", self.worker_id, update.version, exc)
            return False
        problem = self.layout_problem(actor.architecture.layout) if self.layout_problem is not None else None
        if problem is not None:
            self.counters.rejected += 1
            self.counters.wrong_layout += 1
            if update.version != self._wrong_layout_version:  # one version may come on both links
                self._wrong_layout_version = update.version
                self.wrong_layout_streak += 1
            self.wrong_layout_problem = f"weights version {update.version}: {problem}"
            _layout_log.log(logging.ERROR, "layout", "%s: weights version %d refused: %s. The worker keeps acting with "
                            "the policy it has, and stops after %d such versions in a row", self.worker_id,
                            update.version, problem, WRONG_LAYOUT_VERSIONS_TO_STOP)
            return False
        self.wrong_layout_streak, self.wrong_layout_problem = 0, None
        if restarted:  # only for weights that pass: a refused update says nothing of who publishes
            self._follow_a_restart(update.version, self._newest_version, "was sent after it")
            if self._feed_version is not None:  # the old run's order on the SUB socket says nothing of the new one's
                self._feed_version = min(self._feed_version, update.version)
        actor.requires_grad_(False)
        with self._lock:
            self._newest_version = update.version
            self._newest_sent_at = sent_at
            self._latest = PreparedPolicy(version=update.version, actor=actor, generation=self._generation)
            self.counters.prepared += 1
        log.debug("%s: weights version %d ready (%d bytes)", self.worker_id, update.version, len(update.tensors))
        return True

    def hand_over(self, update: WeightsUpdate, sent_at: float | None = None) -> None:
        """Weights received another way than the SUB socket (the samples link; ``sent_at``: the trainer's envelope's):
        prepared on the weights thread, or at once on the caller's thread when the feed has no thread. Never blocks
        on the network; the last handed over wins (the relay hands over its latest)."""
        if self._thread is None:
            self._prepare(update, sent_at)
            return
        with self._lock:
            self._handed = (update, sent_at)

    def start(self) -> None:
        if self.endpoint is None:
            raise ValueError("WeightsFeed.start needs a relay endpoint")
        self._thread = threading.Thread(target=self._run, name=f"{self.worker_id}-weights", daemon=True)
        self._thread.start()

    def reconnect(self) -> None:
        """Connect a new socket (thread-safe, returns at once): the samples link found its connection to the relay
        dead without a close (a network path that stopped carrying bytes). A SUB socket sends nothing, so it never
        notices such a path itself: in a network probe a worker's feed sat on one for 114 s while the weights moved
        on, its versions coming only from the relay's handover after each hello."""
        self._reconnect.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        assert self.endpoint is not None and self.handshake is not None
        socket, monitor = self._connect()
        try:
            while not self._stop.is_set():
                while monitor.poll(0):
                    event = recv_monitor_message(monitor)
                    self.handshake.on_event(event["event"], event["value"])
                    if event["event"] == zmq.EVENT_DISCONNECTED and self.endpoint.frame_cap_hint():
                        # the one case ZeroMQ says nothing about: every publication then closes the feed again
                        _disconnect_log.warning(self.worker_id, "%s: the weights feed's connection closed (the relay "
                                                "stopped, or the network dropped%s)", self.worker_id,
                                                self.endpoint.frame_cap_hint())
                if self.handshake.pause_due():  # libzmq would retry a dropped handshake ~5 times a second
                    self.endpoint.stop_retrying(socket)
                if self._reconnect.is_set():
                    self._reconnect.clear()
                    self.reconnections += 1
                    log.info("%s: the weights feed connects again (the samples link found its path dead)",
                             self.worker_id)
                    self._close(socket, monitor)
                    socket = monitor = None
                    socket, monitor = self._connect()
                if self.handshake.due_for_new_socket():  # a refused SUB is never reconnected by libzmq
                    self._close(socket, monitor)
                    socket = monitor = None  # if connecting again raises (a key file gone bad), that error stands
                    socket, monitor = self._connect()
                with self._lock:
                    handed, self._handed = self._handed, None
                if handed is not None:
                    self._prepare(*handed)
                newest = self._newest_queued(socket) if socket.poll(_POLL_MS) else None
                if newest is not None:
                    self._follow_published(newest[0])
                    self._prepare(*newest)
        finally:
            if socket is not None and monitor is not None:
                self._close(socket, monitor)

    def _newest_queued(self, socket: zmq.Socket) -> tuple[WeightsUpdate, float] | None:
        """Drain the SUB socket: only the newest queued update (with its ``sent_at``) is worth building an actor for."""
        newest = None
        while True:
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return newest
            update = self._decode(frames)
            if update is not None:
                if newest is not None:
                    self.counters.received += 1
                    self.counters.stale += 1
                newest = update

    def _follow_published(self, update: WeightsUpdate) -> None:
        """Before preparing what the SUB socket delivered: a version below the one it delivered before means the
        trainer restarted, so versions start again from this one (module docstring)."""
        previous, self._feed_version = self._feed_version, update.version
        if previous is not None and update.version < previous:
            self._follow_a_restart(update.version, previous, "came after it on the weights socket")

    def _follow_a_restart(self, version: int, previous: int, why: str) -> None:
        """A restarted trainer's ``version`` (below ``previous``, and ``why`` that means a restart): its versions are
        followed from here, as a new generation."""
        self._generation += 1
        self._newest_version = -1
        self._newest_sent_at = None
        with self._lock:
            self._handed = None  # a hand-over still queued is the old run's latest
        self.counters.trainer_restarts += 1
        log.warning("%s: weights version %d %s version %d: the trainer restarted; following its versions from here",
                    self.worker_id, version, why, previous)

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket]:
        assert self.endpoint is not None
        socket, monitor = self.endpoint.connect(self._context, zmq.SUB, WATCHED_EVENTS, before_connect=self._configure_sub)
        assert monitor is not None
        return socket, monitor

    @staticmethod
    def _close(socket: zmq.Socket, monitor: zmq.Socket) -> None:
        socket.disable_monitor()
        monitor.close(linger=0)
        socket.close()

    def _prepare(self, update: WeightsUpdate, sent_at: float | None = None) -> None:
        try:
            self.offer(update, sent_at)
        except Exception:  # a broken update must not stop the feed; count it and keep listening
            self.counters.rejected += 1
            log.exception("%s: could not prepare weights version %d", self.worker_id, update.version)

    @staticmethod
    def _configure_sub(socket: zmq.Socket) -> None:
        socket.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
        socket.setsockopt(zmq.SUBSCRIBE, b"")

    def _decode(self, frames: list[bytes]) -> tuple[WeightsUpdate, float] | None:
        try:
            envelope, message = decode(frames, self.limits)
        except ProtocolError as exc:
            self.counters.rejected += 1
            log.warning("%s: ignored a malformed message on the weights feed: %s", self.worker_id, exc)
            return None
        if not isinstance(message, WeightsUpdate):
            self.counters.rejected += 1
            log.warning("%s: ignored a %s from %s on the weights feed", self.worker_id, envelope.type, envelope.sender)
            return None
        return message, envelope.sent_at
