"""One DEALER connection to the relay, run on its own thread: the part the worker's and the trainer's links share.

:class:`RelayClient` owns the socket and its monitor and runs the loop; the link that creates it says what happens on
that loop through four callables, each called on the client's thread:

* ``on_connected()`` once per (re)connection (ZeroMQ handshake done), before :attr:`RelayClient.connected` turns true:
  send the ``hello`` here (a relay that restarted knows nothing of this peer). It returns what to add to the
  ``connected to the relay`` log line ("" for nothing);
* ``on_message(frames)`` for every message received (multipart frames, not decoded: decoding and counting bad
  messages is the link's business, since what counts as bad depends on the link); at most ``max_receive_per_turn``
  messages are read per turn, so a flood cannot starve the link's sends and heartbeats;
* ``on_turn()`` once per loop turn (about every ``poll_ms``, and at once after :meth:`RelayClient.wake`), connected
  or not: spool, send what is due...;
* ``send_heartbeat()`` every ``heartbeat_interval_s`` while connected.

A connection that fails its handshake (key not allow-listed, wrong ``--server-key``, ``--insecure`` on one side only)
or a relay that never answers is diagnosed by a :class:`~tmrl_common.handshake.HandshakeWatch` (``client.handshake``):
one error line within seconds naming the cause and the fix; a socket libzmq gave up on is rebuilt every ``retry_s``.
A connection the relay has answered on, then left silent for :func:`link_silence_s` (it answers every heartbeat), is
taken as dead: a network path that stopped carrying bytes without closing the connection (a NAT or Wi-Fi link that
died, a partition) goes unnoticed by TCP until its buffers fill, 43 s into a 90 s black hole in an outside probe and
never in a 30 s one. The client says so (a warning) and connects a new socket (counted in
:attr:`RelayClient.silent_links`); what the link had not had acknowledged is resent after its hello, as after any
reconnection.

The callables send with :meth:`RelayClient.send`, which never blocks: a send refused by ZeroMQ (high-water mark
reached, no peer) is counted in ``counters.send_blocked`` and reported as ``False``. Connections and disconnections
(from the socket monitor) are counted in ``counters.connections`` / ``counters.disconnections`` and logged. The sockets
are closed when the loop ends (:meth:`RelayClient.stop`, or an error). An exception escaping a callable ends the thread:
it is logged and kept in :attr:`RelayClient.failure` for the owner to check (a link that must survive bad input counts
and catches it inside its callable).

Typical use (inside a link)::

    self._client = RelayClient(self.worker_id, "sender", endpoint, self.counters, on_connected=self._say_hello,
                               on_message=self._on_message, on_turn=self._on_turn,
                               send_heartbeat=self._send_heartbeat, while_away="spooling until it comes back")
    self._client.start()
"""

from __future__ import annotations

import logging
import math
import socket as _socketlib
import threading
import time
from collections.abc import Callable
from typing import Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from tmrl_common.handshake import WATCHED_EVENTS, HandshakeWatch
from tmrl_common.protocol import Error
from tmrl_common.sockets import RelayEndpoint

log = logging.getLogger(__name__)

SILENT_HEARTBEATS = 5
"""Heartbeats left unanswered, in a row, after which a connection the relay had answered on is taken as dead."""


MIN_LINK_SILENCE_S = 20.0
"""The least silence taken as a dead path. A live relay can leave a worker unanswered for a while: it stops reading
workers while its trainer's queue is full, until the trainer drains it or has been silent for the relay's
``peer_timeout_s`` (10 s), when it holds batches and reads again. Twice that, so such a pause is not taken for a dead
path (which would only add a reconnection and resends to the load)."""
SUSPENDED_NOTE_S = 5.0
"""How long after a suspension a lost connection is said to follow it (:attr:`RelayClient._suspended_note`)."""
SUSPENDED_GAP_S = 5.0
"""A poll that returns this long past its time-out means this process did not run meanwhile (SIGSTOP, a paused VM or
container, a starved machine): the relay's silence over that time is not the relay's
(:meth:`RelayClient._noticed_suspension`)."""


def link_silence_s(heartbeat_interval_s: float) -> float:
    """How long a connected client waits without any message from the relay before it takes the connection as dead:
    :data:`SILENT_HEARTBEATS` heartbeat intervals, and at least :data:`MIN_LINK_SILENCE_S`."""
    return max(MIN_LINK_SILENCE_S, SILENT_HEARTBEATS * heartbeat_interval_s)

MONITOR_EVENTS = WATCHED_EVENTS
"""What the client watches: a handshake done is a (re)connection, a disconnection is the relay gone (for now), TCP
connections and failed handshakes feed the :class:`~tmrl_common.handshake.HandshakeWatch`."""


class ConnectionCounters(Protocol):
    """The counters :class:`RelayClient` keeps up to date (a link's own counters dataclass has these fields)."""

    connections: int
    disconnections: int
    send_blocked: int


class RelayClient:
    """A DEALER socket connected to the relay, served by one thread (see the module docstring)."""

    def __init__(
        self,
        owner_id: str,
        thread_role: str,
        endpoint: RelayEndpoint,
        counters: ConnectionCounters,
        *,
        on_connected: Callable[[], str],
        on_message: Callable[[list[bytes]], None],
        on_turn: Callable[[], None],
        send_heartbeat: Callable[[], None],
        while_away: str = "waiting for it to come back",
        role: str = "worker",
        heartbeat_interval_s: float = 2.0,
        on_silent_link: Callable[[], None] | None = None,
        poll_ms: int = 20,
        max_receive_per_turn: int = 1000,
        context: zmq.Context | None = None,
    ) -> None:
        """``owner_id`` (worker or trainer id) and ``thread_role`` ("sender", "ingest") name the thread and start every
        log line; ``while_away`` ends the ``lost the relay connection`` warning (what the link does meanwhile); ``role``
        ("worker" or "trainer") names the allow-list in the advice logged when the relay refuses this client's key;
        ``on_silent_link`` (thread-safe, non-blocking) is called when a silent connection is replaced."""
        if max_receive_per_turn < 1:
            raise ValueError(f"max_receive_per_turn must be at least 1, got {max_receive_per_turn}")
        self.owner_id = owner_id
        self.thread_role = thread_role
        self.endpoint = endpoint
        self.counters = counters
        self.while_away = while_away
        self.heartbeat_interval_s = heartbeat_interval_s
        self.poll_ms = poll_ms
        self.max_receive_per_turn = max_receive_per_turn
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_turn = on_turn
        self._send_heartbeat = send_heartbeat
        # the relay answers every heartbeat: nothing back after a few intervals means it drops what we send
        self.handshake = HandshakeWatch(owner_id, endpoint, role, reply_timeout_s=max(5.0, 3 * heartbeat_interval_s))
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._failure: BaseException | None = None
        self.answered_since_connect = False
        """Set by the link (on the client's thread) when the relay answers on this connection as to a peer that said
        hello (a heartbeat, an ack); cleared at each (re)connection. See :meth:`refused_before_hello`."""
        self.silence_s = link_silence_s(heartbeat_interval_s)
        self._heard_at: float | None = None
        """When the relay last sent anything on the current connection; ``None`` until it has (the handshake watch's
        ``unanswered`` covers a relay that never answers) and while not connected."""
        self.silent_links = 0
        """Connections taken as dead after :attr:`silence_s` without a message, and replaced."""
        self.suspensions = 0
        """Times a poll returned :data:`SUSPENDED_GAP_S` or more past its time-out (this process did not run)."""
        self._suspended_note = ""
        """Said with a disconnection noticed within :data:`SUSPENDED_NOTE_S` of a suspension: the relay drops a peer
        that stopped reading, so a paused process otherwise blamed the relay or the network for its own pause (a pause
        probe)."""
        self._resumed_at = -math.inf
        """When the last suspension was noticed."""
        self._on_silent_link = on_silent_link
        # a local socket pair the loop polls beside ZeroMQ: a byte written by wake() ends the current poll at once
        self._wake_reader, self._wake_writer = _socketlib.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"{owner_id}-{thread_role}", daemon=True)

    # ------------------------------------------------------------------------------------------------ owner side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait for it (up to ``timeout``); the sockets are closed on the way out."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: no loop will close the wake-up pair
            self._wake_reader.close()
            self._wake_writer.close()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """Run the next turn now instead of at the end of the current poll (any thread; never blocks). A link calls
        it when it hands work to the loop, e.g. a worker's new batch, so the batch is spooled and sent within about a
        millisecond rather than up to ``poll_ms`` later."""
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pair's buffer is full: a wake-up is pending already
        except OSError:
            pass  # the loop has ended and closed the pair: there is no turn left to run

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def failure(self) -> BaseException | None:
        """The exception that ended the thread, or ``None``."""
        return self._failure

    def describe(self) -> str:
        return self.endpoint.describe()

    def unconnected_hint(self) -> str:
        """What to check while not connected, for a status line: the network path when the last connection went
        silent (a network probe's status lines asked about ports and keys then), else the set-up."""
        if self.handshake.path_down:
            return "its last connection went silent: a network path that stopped carrying bytes, or a paused relay?"
        if self.handshake.connection_lost:  # the kernel closed it first (tcp_max_retransmit_ms): a network probe's
            # partitions were all reported as a set-up question about ports and keys
            return "it was reached until that connection closed: is the relay still running, and the network up?"
        return "is it running there, on that port, with the same --insecure or keys?"

    # ----------------------------------------------------------------------------------------- client-thread side

    def send(self, frames: list[bytes]) -> bool:
        """Send without blocking (call from the callables only); ``False``, and counted, when ZeroMQ refuses it."""
        if self._socket is None:
            raise RuntimeError(f"{self.owner_id}: RelayClient.send called outside the {self.thread_role} thread's loop")
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # high-water mark reached or no peer: the caller keeps it and tries again later
            self.counters.send_blocked += 1
            return False
        return True

    def refused_before_hello(self, error: Error, data_type: str) -> bool:
        """An ``unknown_sender`` answer to a ``data_type`` message (the worker's batches, the trainer's acks) on a
        connection the relay has not answered yet: a message sent before this connection that reached the relay
        ahead of its hello (ZMQ_IMMEDIATE leaves few: one in flight as the old connection broke). That hello is on
        its way: the link counts them and starts no second one (a refused heartbeat, sent after the hello, still
        does)."""
        return error.reason == "unknown_sender" and error.ref_type == data_type and not self.answered_since_connect

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported through failure; the owner checks it
            log.exception("%s: %s thread stopped on an unexpected error", self.owner_id, self.thread_role)
            self._failure = exc

    def _open(self, poller: zmq.Poller) -> tuple[zmq.Socket, zmq.Socket]:
        # the monitor is attached before connect(): the first handshake's event must not be missed. ZMQ_IMMEDIATE:
        # libzmq queues nothing for a connection that is not up, and drops what a lost connection had queued, instead
        # of keeping a DEALER's queue across reconnections, where it went out on the next connection ahead of its
        # hello: heartbeats, acks and weights refused as unknown_sender (a pause probe: 233 weights updates and 44
        # acks after a relay pause and restart, each ack costing a resend). A send while not connected is refused at
        # once (counted as send_blocked): batches stay in the spool, the latest weights wait, acks are re-earned.
        socket, monitor = self.endpoint.connect(self._context, zmq.DEALER, MONITOR_EVENTS,
                                                before_connect=lambda new: new.setsockopt(zmq.IMMEDIATE, 1))
        assert monitor is not None
        self._socket = socket
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        return socket, monitor

    def _close(self, poller: zmq.Poller, socket: zmq.Socket, monitor: zmq.Socket, replaced: bool = False) -> None:
        """Close ``socket``; one being ``replaced`` by a new one drops what it still queues (linger 0): left to linger
        on its old connection, it reached the relay after the new connection's hello (a relay paused past the
        silence limit took 233 such weights updates from a connection that no longer held the trainer role)."""
        self._connected.clear()
        self._socket = None
        poller.unregister(socket)
        poller.unregister(monitor)
        socket.disable_monitor()
        monitor.close(linger=0)
        socket.close(linger=0 if replaced else None)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_reader, zmq.POLLIN)
        socket, monitor = self._open(poller)
        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        try:
            while not self._stop.is_set():
                polled_at = time.monotonic()
                events = dict(poller.poll(self.poll_ms))
                self._noticed_suspension(polled_at)
                if monitor in events:
                    self._on_monitor(monitor)
                if socket in events:
                    self._receive(socket)
                if self._wake_reader.fileno() in events:
                    self._drain_wake_ups()
                self.handshake.check()
                if self.handshake.pause_due():  # libzmq would retry a dropped handshake ~5 times a second
                    self.endpoint.stop_retrying(socket)
                if self.handshake.due_for_new_socket():  # libzmq never reconnects a refused socket: a new one
                    self._close(poller, socket, monitor, replaced=True)
                    socket = monitor = None  # if opening the new one raises (a key file gone bad), that error stands
                    socket, monitor = self._open(poller)
                self._on_turn()
                if self._connected.is_set():
                    now = time.monotonic()
                    # (a message waiting unread is not silence: this thread may have been busy, or paused itself)
                    if (self._heard_at is not None and now - self._heard_at >= self.silence_s
                            and not socket.poll(0, zmq.POLLIN)):
                        self._replace_silent_link(now)
                        self._close(poller, socket, monitor, replaced=True)
                        socket = monitor = None
                        socket, monitor = self._open(poller)
                        continue
                    if now >= next_heartbeat:
                        self._send_heartbeat()
                        next_heartbeat = now + self.heartbeat_interval_s
        finally:
            if socket is not None and monitor is not None:
                self._close(poller, socket, monitor)
            self._wake_reader.close()
            self._wake_writer.close()

    def _noticed_suspension(self, polled_at: float) -> None:
        """Say so when a poll that began at ``polled_at`` returned :data:`SUSPENDED_GAP_S` or more past its time-out:
        the process did not run (a pause probe's SIGSTOPped worker then took the relay's silence for a dead link and
        reconnected, blaming "a paused relay"). The relay's silence is counted from now, and a disconnection seen
        within :data:`SUSPENDED_NOTE_S` is said to follow the pause. Only the poll is timed: a turn's own work (a slow
        disk under the durable spool) is no suspension."""
        now = time.monotonic()
        gap = now - polled_at - self.poll_ms / 1000
        if now - self._resumed_at > SUSPENDED_NOTE_S:  # a re-check saw the disconnection come a turn after the resume
            self._suspended_note = ""
        if gap >= SUSPENDED_GAP_S:
            self._resumed_at = now
            self.suspensions += 1
            log.warning("%s: this process did not run for %.0f s (suspended: SIGSTOP, a paused VM or container, or a "
                        "machine starved of CPU); the relay's silence over that time is not the relay's", self.owner_id,
                        gap)
            if self._heard_at is not None:
                self._heard_at = now
            self.handshake.process_resumed(now)
            self._suspended_note = (f"; this process had just not run for {gap:.0f} s, and a relay closes a "
                                    "connection that stops reading, unless it stopped itself meanwhile")

    def _replace_silent_link(self, now: float) -> None:
        assert self._heard_at is not None
        self.silent_links += 1
        log.warning("%s: no message from the relay (%s) for %.0f s, though it answers every heartbeat (one each %g s): "
                    "the connection is taken as dead (a network path that stopped carrying bytes without closing it, "
                    "or a paused relay); connecting again, %s", self.owner_id, self.describe(), now - self._heard_at,
                    self.heartbeat_interval_s, self.while_away)
        self._heard_at = None
        # until the next handshake: its time-outs are warnings, and the status lines point at the network path
        self.handshake.path_down = True
        if self._on_silent_link is not None:  # e.g. the worker's weights feed, most likely on the same dead path
            self._on_silent_link()

    def _drain_wake_ups(self) -> None:
        while True:
            try:
                if not self._wake_reader.recv(4096):
                    return
            except (BlockingIOError, InterruptedError):
                return

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            message = recv_monitor_message(monitor)
            event = message["event"]
            self.handshake.on_event(event, message["value"])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.counters.connections += 1
                self.answered_since_connect = False
                self._heard_at = None
                detail = self._on_connected()
                log.info("%s: connected to the relay (%s)%s", self.owner_id, self.describe(),
                         f"; {detail}" if detail else "")
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self.counters.disconnections += 1
                self._heard_at = None
                if self._connected.is_set():
                    log.warning("%s: lost the relay connection (the relay stopped, or the network dropped%s%s); %s",
                                self.owner_id, self.endpoint.frame_cap_hint(), self._suspended_note, self.while_away)
                self._connected.clear()

    def _receive(self, socket: zmq.Socket) -> None:
        for _ in range(self.max_receive_per_turn):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.handshake.heard_from_relay()
            self._heard_at = time.monotonic()
            self._on_message(frames)


class HelloBackoff:
    """When to say hello again after the relay answered ``unknown_sender`` (this connection does not hold its id, or
    the trainer role): the first refusal schedules a hello ``first_s`` later, each further one before an acceptance
    doubles the wait up to ``max_s``. Used by the trainer's and the worker's links."""

    def __init__(self, first_s: float = 0.2, max_s: float = 5.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s
        self.due_at: float | None = None

    def refused(self, now: float) -> float | None:
        """Schedule a hello (unless one is scheduled); returns the wait, or None when one was already scheduled."""
        if self.due_at is not None:
            return None
        wait, self.due_at = self.delay_s, now + self.delay_s
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return wait

    def take_due(self, now: float) -> bool:
        """True once when the scheduled hello is due."""
        if self.due_at is None or now < self.due_at:
            return False
        self.due_at = None
        return True

    def accepted(self) -> None:
        """The relay treats this connection as the id's (or the role's) holder again: the next refusal waits
        ``first_s``."""
        self.delay_s = self.first_s
