"""The relay: one poll loop over three sockets (see ``docs/architecture.md``).

* ``workers`` (ROUTER, ``worker_port``): workers' ``hello``, ``sample_batch`` and ``heartbeat`` come in;
  ``sample_ack``, ``error`` and ``heartbeat`` go back to the worker's routing id.
* ``trainer`` (ROUTER, ``trainer_port``): sample batches go out, frames unchanged (zero-copy); the trainer's
  ``hello``, ``sample_ack``, ``weights_update`` and ``heartbeat`` come in.
* ``weights`` (XPUB, ``weights_port``): every validated ``weights_update`` is cached and published, at most once per
  ``weights_min_interval_s``; subscriptions are counted and never cause a publication. A worker gets the latest
  weights at once over its own link after its ``hello`` (once per version and connection), not by a re-publication
  to every subscriber. This socket is not polled: its subscriptions are read at each housekeeping turn, a bounded
  number at a time, and the socket is re-opened when topics no worker uses pile up
  (:class:`~tmrl_relay.subscriptions.SubscriptionLedger`).

The state that belongs together lives in small objects with verbs: :class:`~tmrl_relay.trainer_seat.TrainerSeat`
(who holds the trainer role, alive, back-pressured; role rules), :class:`~tmrl_relay.weights_cache.WeightsCache`
(latest weights, publication rate) and :class:`~tmrl_relay.allowlist.AllowlistWatcher` (ZAP, trainer keys, reloads).

Every message's envelope is checked (version, type allowed on that link, registered sender, size) before anything
else; a reject is counted per reason, logged (rate-limited) and answered with an ``error`` message. Sample batches
are forwarded without decoding their arrays; weights are decoded and verified in full (size, sha256) because a bad
one would reach every worker. Nothing a peer sends stops the loop.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
from tmrl_common.curve import KeyFileError, load_secret_key
from tmrl_common.errors import ProtocolError
from tmrl_common.log_limit import LineBudget, RateLimitedLog
from tmrl_common.protocol import (
    RESERVED_WORKER_IDS,
    WORKER_HEARTBEAT_COUNTERS,
    Error,
    Heartbeat,
    Hello,
    SampleAck,
    WeightsUpdate,
    decode_body,
    decode_envelope,
    encode,
)
from tmrl_common.sockets import (
    apply_transport,
    enable_ipv6_if_needed,
    secure_server_socket,
    tcp_address,
    tcp_endpoint,
)
from zmq.utils.monitor import parse_monitor_message

from tmrl_relay import __version__
from tmrl_relay.allowlist import ZAP_DOMAINS, AllowlistWatcher, RelaySetupError, require_keys_configured
from tmrl_relay.config import RelayConfig
from tmrl_relay.envelope import EnvelopeChecker, check_envelope, read_batch_head, read_batch_seq, sent_at_of
from tmrl_relay.metrics import RelayMetrics, WorkerReports
from tmrl_relay.open_files import OpenFilesWatch, raise_open_file_limit
from tmrl_relay.peers import DisplacedConnection, Peer, PeerTable
from tmrl_relay.pending import PendingBatch, PendingBatches
from tmrl_relay.subscriptions import CANCEL, SUBSCRIBE, SubscriptionLedger
from tmrl_relay.trainer_seat import RoleRefused, TrainerSeat
from tmrl_relay.weights_cache import WeightsCache

log = logging.getLogger(__name__)

RELAY_SENDER = "relay"
SOFTWARE = f"tmrl-relay/{__version__}"
WORKER_LINK_TYPES = frozenset({"hello", "sample_batch", "heartbeat"})
TRAINER_LINK_TYPES = frozenset({"hello", "sample_ack", "weights_update", "heartbeat"})
_DRAIN_BUDGET = 512  # messages read from one socket before the loop looks at the others
_DRAIN_TIME_S = 0.05
"""And the longest a socket is read before the loop looks at the others, housekeeping and a stop: a recheck probe's
flood of slow-to-decode messages kept one drain going for seconds (a SIGTERM took 37 s to be seen)."""
_MAX_FRAMES = 4  # routing id + envelope + body, and one more to tell "too many frames"
_IDLE_POLL_MS = 100
_BACKPRESSURE_POLL_MS = 1
_SUSPENDED_GAP_S = 5.0
"""A poll that returns this long past its time-out means the relay did not run in between (SIGSTOP, a paused VM or
container): its peers could not be heard, so their silence over that time is not theirs (:meth:`Relay._resumed`)."""
_HOUSEKEEPING_S = 0.25
_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE
_SUBSCRIPTION_FRAME_CAP = {"plain": 128, "curve": 512}
"""``ZMQ_MAXMSGSIZE`` of the weights socket, per security mode. A worker's subscription is 1 or 10 bytes, but the cap
applies to the handshake too (a plain-text READY is about 30 bytes, CurveZMQ's INITIATE about 300), and libzmq's
subscription tree costs tens of bytes per byte of topic."""
_SUBSCRIPTION_RCVHWM = 2
"""``ZMQ_RCVHWM`` of the weights socket: what libzmq takes in from each peer at each of the relay's calls into the
socket (a worker sends one subscription; a flood waits in its own socket and the kernel's buffers). Not 1: with ZAP
(CurveZMQ), libzmq 4.3.5 then never delivers a subscriber's first subscription to an XPUB that is not polled."""
_SUBSCRIPTION_DRAIN_BUDGET = 1024
"""Subscription notifications read at one housekeeping turn at most (a quarter of a second: 4,096 a second, far
more than workers reconnecting at once send). More waiting after that is a flood: libzmq takes in more from every
peer at each read, faster than the relay can count it, so the socket is re-opened."""
_PEER_SOCKET_TYPES = {"workers": "DEALER", "trainer": "DEALER", "weights": "SUB or XSUB"}
"""The ZeroMQ socket types each link's peers must use: ZeroMQ closes any other kind during the handshake, and says
only that the connection closed."""

_HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other",
}


def _frame_count(frames: list) -> str:
    return f"{len(frames) - 1}+" if len(frames) >= _MAX_FRAMES else str(len(frames) - 1)


@dataclass(frozen=True)
class RelayPorts:
    """The ports the three sockets are bound to (useful when the config asked for port 0)."""

    worker_port: int
    trainer_port: int
    weights_port: int


class Relay:
    """The broker. ``bind()`` then ``run()`` (blocks until :meth:`stop`); ``run()`` closes everything on exit."""

    def __init__(self, config: RelayConfig, metrics: RelayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.limits = config.decode_limits()
        self._check_envelope = EnvelopeChecker(self.limits)
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._secure = not config.security.insecure
        self.allowlist: AllowlistWatcher | None = None
        self._sockets_open = False
        self.ports: RelayPorts | None = None
        self.workers = PeerTable("worker", config.max_workers, live_within_s=config.peer_timeout_s,
                                 limit_name="[relay] max_workers")
        self.metrics.registry.register(WorkerReports(self.workers, config.peer_timeout_s))
        self.trainers = PeerTable("trainer", 8)
        self.trainer = TrainerSeat(config.peer_timeout_s)
        self.pending = PendingBatches(config.max_pending_bytes)
        self.weights = WeightsCache(config.weights_min_interval_s)
        self.subscriptions = SubscriptionLedger()
        self.open_files = OpenFilesWatch(raise_open_file_limit())
        """Every connection holds a file: at the limit no new peer gets in (tmrl_relay.open_files)."""
        self._poller = zmq.Poller()
        self._started = time.monotonic()
        self._rate_log = RateLimitedLog(log)
        self._refused_not_closed: dict[str, int] = {}
        """Per link, connections refused during the handshake whose close libzmq has not reported yet: that close is
        the refused connection's, logged already (:meth:`_on_disconnect` says nothing more about it)."""
        self._hello_lines = LineBudget(lines=20, window_s=10.0)
        """Workers' hello lines: each is logged until a churn of connections (new ids) passes this many per window."""
        self._heartbeat_frames: list[bytes] | None = None
        self._heartbeat_built = 0.0

    # ------------------------------------------------------------------------------------------------- lifecycle

    def bind(self) -> RelayPorts:
        """Create, secure and bind the three sockets (and the ZAP authenticator under CurveZMQ)."""
        config = self.config
        try:
            if self._secure:
                self._start_authenticator()
            self.workers_socket = self._router("workers", config.worker_port)
            self.trainer_socket = self._router("trainer", config.trainer_port)
            self.weights_socket = self._xpub(config.weights_port)
        except BaseException:
            self._close()
            raise
        self._monitors = {
            link: self._monitor(socket) for link, socket in (("workers", self.workers_socket),
                                                             ("trainer", self.trainer_socket),
                                                             ("weights", self.weights_socket))
        }
        self._sockets_open = True
        self.ports = RelayPorts(self._port_of(self.workers_socket), self._port_of(self.trainer_socket),
                                self._port_of(self.weights_socket))
        log.info("relay listening on %s: workers %d, trainer %d, weights %d (%s)", config.bind_host,
                 self.ports.worker_port, self.ports.trainer_port, self.ports.weights_port,
                 "CurveZMQ" if self._secure else "PLAIN TEXT, --insecure")
        if not self._secure:
            self._warn_insecure()
        return self.ports

    def _warn_insecure(self) -> None:
        host = self.config.bind_host
        try:
            address = ipaddress.ip_address(host.strip("[]"))
            mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback; Python says it is not
            loopback = host == "localhost" or (mapped or address).is_loopback
        except ValueError:  # "*" or a host name
            loopback = False
        log.warning("INSECURE: no CurveZMQ, no authentication, no encryption. Any process that reaches %s can send "
                    "samples, subscribe to weights and, once the running trainer is silent or gone, say hello as "
                    "the trainer (which publishes the policy every worker runs).%s", host, "" if loopback else
                    f" {host} is NOT loopback: use this only on a network you fully trust, or drop --insecure "
                    "(docs/security.md)")
        unused = self.config.security.unused_key_settings()
        if unused:
            log.warning("--insecure: the key settings given (%s) are not used", unused)

    def stop(self) -> None:
        """Ask :meth:`run` to return (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> None:
        """Serve until :meth:`stop`; closes sockets, authenticator and context before returning."""
        if not self._sockets_open:
            self.bind()
        try:
            self._loop()
        finally:
            self._close()

    def _start_authenticator(self) -> None:
        require_keys_configured(self.config)
        try:  # the relay's own pair first: a public certificate given as its secret key is the error to show
            relay_public_key, _ = load_secret_key(self.config.security.secret_key_file)
        except KeyFileError as exc:
            raise RelaySetupError(str(exc)) from exc
        self.allowlist = AllowlistWatcher(self.config, self.metrics, relay_public_key)
        self.allowlist.start(self._context)

    def _router(self, link: str, port: int) -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        with self._closed_on_error(socket):
            apply_transport(socket, self.config.transport)
            socket.setsockopt(zmq.MAXMSGSIZE, self.config.socket_frame_cap(link))
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises instead of dropping silently
        # no ROUTER_HANDOVER: clients never set a routing id (the relay makes one per connection; a reconnect is a new
        # connection that says hello again), so a connection claiming one already in use is refused, never given it
        self._secure_and_bind(socket, link, port)
        return socket

    def _xpub(self, port: int) -> zmq.Socket:
        socket = self._context.socket(zmq.XPUB)
        with self._closed_on_error(socket):
            apply_transport(socket, self.config.transport)
            socket.setsockopt(zmq.SNDHWM, self.config.weights_send_hwm)
            socket.setsockopt(zmq.RCVHWM, _SUBSCRIPTION_RCVHWM)
            socket.setsockopt(zmq.MAXMSGSIZE, self._subscription_frame_cap)
            # every subscribe and every cancel, also those of a peer that leaves: the ledger follows libzmq's tree
            socket.setsockopt(zmq.XPUB_VERBOSER, 1)
        self._secure_and_bind(socket, "weights", port)
        return socket

    @property
    def _subscription_frame_cap(self) -> int:
        return _SUBSCRIPTION_FRAME_CAP["curve" if self._secure else "plain"]

    @staticmethod
    def _monitor(socket: zmq.Socket) -> zmq.Socket:
        return socket.get_monitor_socket(sum(_HANDSHAKE_EVENTS) | zmq.EVENT_DISCONNECTED)

    @staticmethod
    @contextlib.contextmanager
    def _closed_on_error(socket: zmq.Socket) -> Iterator[None]:
        """Close ``socket`` if setting it up fails: a socket never handed to the relay would otherwise stay open, and
        ``context.term()`` at shutdown would wait for it for ever (a relay that hangs silently at start)."""
        try:
            yield
        except BaseException:
            socket.close(linger=0)
            raise

    def _secure_and_bind(self, socket: zmq.Socket, link: str, port: int) -> None:
        host = self.config.bind_host
        try:
            if self._secure:
                socket.zap_domain = ZAP_DOMAINS[link].encode()
                secure_server_socket(socket, self.config.security)
            enable_ipv6_if_needed(socket, host)
            if port == 0:
                socket.bind_to_random_port(tcp_address(host))  # "[::1]" was bracketed twice (an outside probe)
            else:
                socket.bind(tcp_endpoint(host, port))
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            hint = ""
            if exc.errno == zmq.EADDRINUSE:
                option = {"workers": "worker_port", "trainer": "trainer_port", "weights": "weights_port"}[link]
                hint = (f" (another relay, or another program, holds that port): stop it, or choose another port "
                        f"with --{option.replace('_', '-')} N ({option} in [relay]; its clients must use the same)")
            raise RelaySetupError(f"cannot bind the {link} socket on {host}:{port}: {exc}{hint}") from exc
        except BaseException:
            socket.close(linger=0)
            raise

    @staticmethod
    def _port_of(socket: zmq.Socket) -> int:
        return int(socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def _close(self) -> None:
        sockets = [getattr(self, name, None) for name in ("workers_socket", "trainer_socket", "weights_socket")]
        monitors = getattr(self, "_monitors", {})
        for socket in sockets:
            if socket is not None and not socket.closed and monitors:
                socket.disable_monitor()
        for monitor_socket in monitors.values():
            monitor_socket.close(linger=0)
        self._monitors = {}
        for socket in sockets:
            if socket is not None and not socket.closed:
                socket.close(linger=self.config.transport.linger_ms)
        if self.allowlist is not None:
            self.allowlist.stop()
        self._sockets_open = False
        self._context.term()

    # ------------------------------------------------------------------------------------------------- poll loop

    def _loop(self) -> None:
        poller = self._poller
        poller.register(self.workers_socket, zmq.POLLIN)
        poller.register(self.trainer_socket, zmq.POLLIN)
        # not the weights socket: its subscriptions are read at housekeeping, a bounded number at a time
        for monitor in self._monitors.values():
            poller.register(monitor, zmq.POLLIN)
        reading_workers = True
        next_housekeeping = 0.0
        while not self._stop.is_set():
            try:
                reading_workers, next_housekeeping = self._serve_once(poller, reading_workers, next_housekeeping)
            except zmq.ContextTerminated:
                return
            except Exception:  # never let one bad turn stop the relay: count, log, go on
                self.metrics.reject("internal", "relay")
                log.exception("relay loop: unexpected error; continuing")
                time.sleep(0.01)

    def _serve_once(self, poller: zmq.Poller, reading_workers: bool, next_housekeeping: float) -> tuple[bool, float]:
        """One turn of the poll loop; returns the loop state (are workers polled, next housekeeping time)."""
        timeout_ms = _BACKPRESSURE_POLL_MS if self.trainer.backpressured or self.weights.waiting else _IDLE_POLL_MS
        polled_at = time.monotonic()
        events = dict(poller.poll(timeout_ms))
        gap = time.monotonic() - polled_at - timeout_ms / 1000
        if gap >= _SUSPENDED_GAP_S:
            self._resumed(gap)
        if self.trainer_socket in events:
            self._drain(self.trainer_socket, self._on_trainer_message, "trainer")
        if self.pending:
            self._flush_pending()
        if self.workers_socket in events and not self.trainer.backpressured:
            self._drain(self.workers_socket, self._on_worker_message, "workers")
        for link, monitor in self._monitors.items():
            if monitor in events:
                self._on_monitor_events(monitor, link)
        if self.trainer.backpressured == reading_workers:  # stop polling the workers while the trainer is full
            reading_workers = not self.trainer.backpressured
            poller.modify(self.workers_socket, zmq.POLLIN if reading_workers else 0)
        now = time.monotonic()
        if self.weights.publish_due(now):
            self._publish_weights(now)
        if now >= next_housekeeping:
            self._drain_subscriptions()
            self._housekeeping(now)
            next_housekeeping = now + _HOUSEKEEPING_S
        return reading_workers, next_housekeeping

    def _resumed(self, gap: float) -> None:
        """The relay did not run for ``gap`` seconds: say so, and move every peer's last-heard time on by as much. A
        pause probe's relay, SIGSTOPped for 90 s, logged its trainer as silent for 90.2 s ("another trainer may take
        the role now") and back in the same millisecond."""
        log.warning("the relay did not run for %.0f s (suspended: SIGSTOP, a paused VM or container, or a machine "
                    "starved of CPU); its peers' silence over that time is not theirs", gap)
        for table in (self.workers, self.trainers):
            for peer in table.by_sender.values():
                peer.last_seen += gap
        holder = self.trainer.peer
        if holder is not None and all(holder is not peer for peer in self.trainers.by_sender.values()):
            holder.last_seen += gap

    def _drain(self, socket: zmq.Socket, handle, link: str) -> None:
        traffic = self.metrics.traffic
        recv = socket.recv
        deadline = time.monotonic() + _DRAIN_TIME_S
        for _ in range(_DRAIN_BUDGET):
            # recv + Frame.more instead of recv_multipart: a third of the per-message Python cost on the hot path.
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame]
            size = len(frame)
            while frame.more:  # the rest of a multipart message is already there (delivered atomically)
                frame = recv(zmq.NOBLOCK, copy=False)
                size += len(frame)
                if len(frames) < _MAX_FRAMES:  # keep a few: enough to reject it as malformed, bounded memory
                    frames.append(frame)
                else:
                    frames[-1] = frame
            traffic.received_bytes[link] += size
            traffic.received_messages[link] += 1
            try:
                handle(frames)
            except ProtocolError as exc:
                self._reject(socket, link, frames, exc)
            except Exception:  # a bug must not take the relay down; count it and keep serving
                self.metrics.reject("internal", link)
                log.exception("%s link: unexpected error while handling a message; dropped", link)
            if self.trainer.backpressured and link == "workers":
                return
            if time.monotonic() > deadline or self._stop.is_set():
                return

    # ------------------------------------------------------------------------------------------------ workers

    def _open(self, frames: list, accepted: frozenset[str], source: str) -> tuple:
        """Split ``[routing id, envelope, body]`` from a ROUTER, check the envelope and that ``source`` may send its
        type; return ``(routing_id, envelope, body, fields, user_id)``."""
        if len(frames) != 3:
            raise ProtocolError("malformed", f"a message has 2 frames (envelope, body), got {_frame_count(frames)}")
        envelope, body = frames[1], frames[2]
        fields = self._check_envelope(envelope.buffer)
        if fields.type not in accepted:
            raise ProtocolError("unknown_type", f"{fields.type!r} is not accepted from {source} (only {sorted(accepted)})")
        return frames[0].bytes, envelope, body, fields, self._user_id(envelope)

    def _on_worker_message(self, frames: list) -> None:
        routing_id, envelope, body, fields, user_id = self._open(frames, WORKER_LINK_TYPES, "workers")
        if self.allowlist is not None and user_id not in self.allowlist.worker_keys:
            # ZeroMQ authenticates a connection once: a key removed since then still has its open connection, but
            # nothing it sends passes any more (the trainer's key loses its role the same way, _drop_revoked_trainer)
            raise ProtocolError("unknown_sender", "this connection's key was removed from the relay's worker "
                                "allow-list; nothing it sends is accepted (allow the key again, or stop this worker)")
        if fields.type == "sample_batch":
            if len(body) > self.config.max_body_bytes:
                raise ProtocolError("oversized", f"sample_batch body is {len(body)} bytes, limit {self.config.max_body_bytes}")
            peer = self.workers.check(routing_id, fields.sender, user_id)
            seq, steps = read_batch_head(body.buffer, self.limits.max_batch_steps)
            peer.last_seen = time.monotonic()
            nbytes = len(envelope) + len(body)
            if self.pending or not self.trainer.ready or not self._send_batch(envelope, body, steps, nbytes):
                self._hold(PendingBatch(fields.sender, seq, steps, envelope, body, nbytes))
                self._flush_pending()
        elif fields.type == "hello":
            hello = self._decode_control(envelope, body, "hello")
            assert isinstance(hello, Hello)
            self._check_hello_role(hello, "worker", "workers")
            if fields.sender in RESERVED_WORKER_IDS:
                raise ProtocolError("unknown_sender", f"worker id {fields.sender!r} is reserved (the relay's and the "
                                    "trainer's): this worker must take another worker_id")
            forgotten = self.workers.forgotten_silent
            peer, previous = self.workers.register(routing_id, fields.sender, user_id, sent_at_of(envelope.buffer))
            if self.workers.forgotten_silent > forgotten:
                self._rate_log.log(logging.INFO, "forgot silent", "forgot a worker silent for more than %g s to "
                                   "register %s (max_workers %d reached; %d forgotten so far)",
                                   self.config.peer_timeout_s, fields.sender, self.config.max_workers,
                                   self.workers.forgotten_silent)
            again = " again on a new connection" if previous is not None and previous.routing_id != routing_id else ""
            if self._hello_lines.take():
                log.info("worker %s said hello (next_seq=%d, %s)%s", fields.sender, hello.next_seq, hello.software,
                         again)
            else:  # hundreds of connections coming and going: one line per interval, with the count
                self._rate_log.log(logging.INFO, ("hello", "many"), "worker %s said hello (next_seq=%d, %s)%s; %s: "
                                   "one line per interval from here", fields.sender, hello.next_seq, hello.software,
                                   again, self._hello_lines.exceeded("hellos"))
            self.metrics.connected_workers.set(self.workers.alive(self.config.peer_timeout_s))
            peer.hello = (envelope.bytes, body.bytes)  # at most max_hello_heartbeat_bytes, one per registered worker
            self._pass_hello_to_trainer(envelope, body)
            self._hand_over_weights(peer)
        else:  # heartbeat
            peer = self.workers.check(routing_id, fields.sender, user_id)
            heartbeat = self._decode_control(envelope, body, "heartbeat")
            self._check_heartbeat_role(heartbeat, "worker", "workers")
            peer.last_seen = time.monotonic()
            peer.reported = {name: value for name, value in heartbeat.counters.items()
                             if name in WORKER_HEARTBEAT_COUNTERS}
            self._send_heartbeat(self.workers_socket, routing_id)

    def _pass_hello_to_trainer(self, envelope: zmq.Frame | bytes, body: zmq.Frame | bytes) -> bool:
        """Workers' hellos go on to the trainer (best effort) so it can check their observation layout early; False
        when it cannot take one now."""
        if not self.trainer.ready:
            return False
        try:
            self.trainer_socket.send_multipart([self.trainer.peer.routing_id, envelope, body], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            return False
        return True

    def _pass_workers_hellos_to_the_new_trainer(self) -> None:
        """A trainer that takes the role gets the latest hello of every registered worker, before any held batch: a
        worker that said hello before the trainer came was otherwise never checked (a TrackMania probe: a worker of
        another history length, started 1 s before its trainer, had 418 samples stored without a word). Only of the
        workers heard from within ``peer_timeout_s``: a trainer restarted beside a long-running relay was handed the
        hellos of 20 workers gone for minutes, listed them as live and warned of their layouts (a probe)."""
        now = time.monotonic()
        for worker in list(self.workers.by_sender.values()):
            if now - worker.last_seen > self.config.peer_timeout_s:
                continue
            if worker.hello is not None and not self._pass_hello_to_trainer(*worker.hello):
                return

    def _user_id(self, frame: zmq.Frame) -> str | None:
        if not self._secure:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError as exc:
            raise ProtocolError("unknown_sender", "message carries no authenticated CurveZMQ key") from exc

    def _decode_control(self, envelope: zmq.Frame, body: zmq.Frame, type_name: str):
        limit = self.config.max_control_bytes
        if type_name in ("hello", "heartbeat"):
            limit = min(limit, self.config.max_hello_heartbeat_bytes)
        if len(body) > limit:
            raise ProtocolError("oversized", f"{type_name} body is {len(body)} bytes, limit {limit}")
        return decode_body(decode_envelope(envelope.bytes, self.limits), body.buffer, self.limits)

    # ------------------------------------------------------------------------------------------- samples → trainer

    def _send_batch(self, envelope: zmq.Frame, body: zmq.Frame, steps: int, nbytes: int) -> bool:
        """Try to hand a batch to the trainer's socket (zero-copy); False when it cannot take it now."""
        trainer = self.trainer.peer
        if trainer is None:
            return False
        send = self.trainer_socket.send
        try:
            # ROUTER checks the high-water mark and the peer on the routing-id frame; once it is taken, the
            # envelope and body frames follow into the same pipe and cannot fail.
            send(trainer.routing_id, _NOBLOCK_MORE)
            send(envelope, _NOBLOCK_MORE, copy=False)
            send(body, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the trainer's queue is full: hold the batch and stop reading workers until it drains
            self.trainer.backpressured = True
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("trainer %s disconnected; holding sample batches (up to %d bytes) until a trainer says hello",
                        trainer.sender, self.config.max_pending_bytes)
            self.trainer.mark_gone()
            self.metrics.trainer_connected.set(0)
            return False
        traffic = self.metrics.traffic
        traffic.batches += 1
        traffic.steps += steps
        traffic.batch_bytes += nbytes
        return True

    def _hold(self, batch: PendingBatch) -> None:
        resends = self.pending.resends_not_held
        dropped_now = self.pending.append(batch)
        if self.pending.resends_not_held != resends:
            self.metrics.held_resends.inc()
        for dropped in dropped_now:
            self.metrics.dropped_batches.inc()
            self.metrics.dropped_bytes.inc(dropped.nbytes)
            self._rate_log.warning(
                "drop", "no trainer: dropped the oldest held batch (worker %s seq %d, %d bytes) to stay under "
                "max_pending_bytes=%d; the worker resends it if still unacknowledged",
                dropped.sender, dropped.seq, dropped.nbytes, self.config.max_pending_bytes)
        self._update_pending_gauges()

    def _flush_pending(self) -> None:
        if not self.trainer.ready:
            return
        pending = self.pending
        while pending:
            batch = pending.peek()
            if not self._send_batch(batch.envelope, batch.body, batch.steps, batch.nbytes):
                break
            pending.pop()
        self._update_pending_gauges()

    def _update_pending_gauges(self) -> None:
        self.metrics.pending_bytes.set(self.pending.nbytes)
        self.metrics.pending_batches.set(len(self.pending))
        if not self.pending:
            self.trainer.backpressured = False

    # ------------------------------------------------------------------------------------------------ trainer

    def _on_trainer_message(self, frames: list) -> None:
        routing_id, envelope, body, fields, user_id = self._open(frames, TRAINER_LINK_TYPES, "the trainer")
        if fields.type == "hello":
            self._on_trainer_hello(routing_id, envelope, body, fields.sender, user_id)
            return
        peer = self.trainers.check(routing_id, fields.sender, user_id)
        if not self.trainer.holds(peer):
            raise ProtocolError("unknown_sender", f"trainer {fields.sender!r} does not hold the trainer role on this "
                                                  "connection (another trainer took it, it went silent, or its key "
                                                  "left the trainer allow-list); say hello again")
        if self.trainer.heard_from():
            log.info("trainer %s is back; %d held batch(es) to deliver", peer.sender, len(self.pending))
            self.metrics.trainer_connected.set(1)
        if fields.type == "sample_ack":
            ack = self._decode_control(envelope, body, "sample_ack")
            assert isinstance(ack, SampleAck)
            self._route_ack(ack, envelope, body)
        elif fields.type == "weights_update":
            self._on_weights(envelope, body)
        else:  # heartbeat
            self._check_heartbeat_role(self._decode_control(envelope, body, "heartbeat"), "trainer", "trainer")
            self._send_heartbeat(self.trainer_socket, routing_id)

    def _on_trainer_hello(self, routing_id: bytes, envelope: zmq.Frame, body: zmq.Frame, sender: str,
                          user_id: str | None) -> None:
        """Give the trainer role to this connection if the role rules allow it (:mod:`tmrl_relay.trainer_seat`)."""
        hello = self._decode_control(envelope, body, "hello")
        assert isinstance(hello, Hello)
        self._check_hello_role(hello, "trainer", "trainer")
        trainer_keys = self.allowlist.trainer_keys if self.allowlist is not None else None
        holder = self.trainer.peer
        if holder is not None and holder.routing_id != routing_id and self.trainer.holds_live():
            self._release_the_role_if_its_connection_is_gone(holder)
        try:
            self.trainer.check_claim(sender, user_id, trainer_keys, routing_id)
        except RoleRefused as refused:
            self.metrics.role_refusals.labels(link="trainer", why=refused.why).inc()
            raise
        peer, _ = self.trainers.register(routing_id, sender, user_id, sent_at_of(envelope.buffer))
        log.info("trainer %s said hello (%s); %d held batch(es) to deliver", sender, hello.software, len(self.pending))
        self.trainer.take(peer)
        self.metrics.trainer_connected.set(1)
        self._pass_workers_hellos_to_the_new_trainer()
        self._flush_pending()

    def _release_the_role_if_its_connection_is_gone(self, holder: Peer) -> None:
        """Before another connection's hello is judged: a trainer that stopped cleanly left no silence to wait for,
        only a closed connection, so ask the socket. A heartbeat to the holder (``ROUTER_MANDATORY``) that finds no
        route frees the role now instead of after ``peer_timeout_s``; one that is queued or finds the queue full
        leaves it held."""
        try:
            self.trainer_socket.send_multipart([holder.routing_id, *self._heartbeat_body()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                return
            log.info("trainer %s: its connection closed (it stopped, or restarted); the trainer role is free, sample "
                     "batches are held until a trainer says hello", holder.sender)
            self.trainer.mark_gone()
            self.metrics.trainer_connected.set(0)

    def _check_hello_role(self, hello: Hello, role: str, link: str) -> None:
        if hello.role != role:
            self.metrics.role_refusals.labels(link=link, why="wrong_role").inc()
            raise ProtocolError("schema", f"hello on the {link} socket must have role {role!r}, got {hello.role!r}")

    @staticmethod
    def _check_heartbeat_role(heartbeat: Heartbeat, role: str, link: str) -> None:
        if heartbeat.role != role:
            raise ProtocolError("schema", f"heartbeat on the {link} socket must have role {role!r}, got {heartbeat.role!r}")

    def _route_ack(self, ack: SampleAck, envelope: zmq.Frame, body: zmq.Frame) -> None:
        worker = self.workers.by_sender.get(ack.worker)
        why = "worker not connected"
        if worker is not None:
            try:
                self.workers_socket.send_multipart([worker.routing_id, envelope, body], zmq.NOBLOCK, copy=False)
                self.metrics.acks.inc()
                return
            except zmq.Again:
                why = "the worker's queue is full (it does not read its socket)"
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
        self.metrics.acks_undeliverable.inc()
        # limited per cause, not per worker id: ids are the peers' choice, and one connection may cycle through many
        self._rate_log.warning(("ack", why), "ack for worker %s (seqs %d..%d) not delivered: %s; it resends and the "
                               "trainer acks again", ack.worker, min(ack.seqs), max(ack.seqs), why)

    def _on_weights(self, envelope: zmq.Frame, body: zmq.Frame) -> None:
        if len(body) > self.config.max_weights_bytes:
            raise ProtocolError("oversized", f"weights_update body is {len(body)} bytes, limit {self.config.max_weights_bytes}")
        update = decode_body(decode_envelope(envelope.bytes, self.limits), body.buffer, self.limits)
        assert isinstance(update, WeightsUpdate)  # sha256 of the tensors checked by the model
        if update.version < self.weights.version:  # a standby of its own run_dir took over from scratch (a probe)
            holder = self.trainer.peer
            log.warning("weights version went back from %d to %d: trainer %s resumed an older checkpoint, or started "
                        "from scratch (a run_dir of its own?); the workers get its policy from now on",
                        self.weights.version, update.version, holder.sender if holder is not None else "?")
        self.weights.store(envelope, body, update.version)
        self.metrics.weights_version.set(update.version)
        self.metrics.cached_weights_bytes.set(len(envelope) + len(body))
        now = time.monotonic()
        if self.weights.publish_due(now):
            self._publish_weights(now)

    def _publish_weights(self, now: float) -> None:
        assert self.weights.frames is not None
        if self.weights_socket is None:  # being bound again: published once it is
            return
        self.weights_socket.send_multipart(list(self.weights.frames), zmq.NOBLOCK, copy=False)  # XPUB drops at HWM
        self.weights.mark_published(now)
        self.metrics.weights_published.inc()
        # debug: up to 1 / weights_min_interval_s lines a second otherwise (tmrl_relay_weights_published_total counts)
        log.debug("weights version %d (%d bytes) published", self.weights.version, len(self.weights.frames[1]))

    def _hand_over_weights(self, worker: Peer) -> None:
        """A worker that said hello gets the latest weights on its own connection, once per version: a late joiner
        starts from them at once without a re-publication to every subscriber."""
        if not self.weights.owed_to(worker):
            return
        assert self.weights.frames is not None
        try:
            self.workers_socket.send_multipart([worker.routing_id, *self.weights.frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # its queue is full or it left: it gets the next version from the weights socket
            self.metrics.weights_handovers.labels(result="blocked").inc()
            return
        worker.weights_version = self.weights.version
        self.metrics.weights_handovers.labels(result="sent").inc()

    # ------------------------------------------------------------------------------------------------ weights

    def _drain_subscriptions(self) -> None:
        """Read the weights socket's subscription notifications, :data:`_SUBSCRIPTION_DRAIN_BUDGET` at most: count the
        workers' (the empty topic), keep the others in the ledger, and re-open the socket when they pass its bound or
        more than the budget waits (a flood)."""
        socket = self.weights_socket
        if socket is None:
            self._bind_weights_socket()
            return
        traffic = self.metrics.traffic
        flooded = True
        for _ in range(_SUBSCRIPTION_DRAIN_BUDGET + 1):  # one more than the budget tells a flood
            try:
                frame = socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                flooded = False
                break
            traffic.received_messages["weights"] += 1
            traffic.received_bytes["weights"] += len(frame)
            data = frame.bytes
            if frame.more:  # a multipart message from an XSUB: never a subscription
                while frame.more:
                    frame = socket.recv(zmq.NOBLOCK, copy=False)
                self._not_a_subscription("a multipart message")
            elif data[:1] == bytes([SUBSCRIBE]):
                if len(data) == 1:
                    self.metrics.subscriptions.inc()  # never a publication: workers get the latest after hello
                else:
                    self.metrics.foreign_subscriptions.inc()
                    self.subscriptions.subscribed(data[1:], self._subscriber(frame))
            elif data[:1] == bytes([CANCEL]):
                if len(data) > 1:
                    self.subscriptions.cancelled(data[1:])
            else:
                self._not_a_subscription(f"a {len(data)}-byte message")
        if flooded:
            self._reopen_weights_socket(f"more than {_SUBSCRIPTION_DRAIN_BUDGET} subscription messages waited at "
                                        "once, more than workers ever send")
        elif self.subscriptions.over_limit():
            ledger = self.subscriptions
            self._reopen_weights_socket(f"{ledger.topics} live subscriptions to topics no worker uses "
                                        f"({ledger.topic_bytes} bytes), past the bound of {ledger.max_topics} topics "
                                        f"or {ledger.max_bytes} bytes")

    def _not_a_subscription(self, what: str) -> None:
        self.metrics.reject("malformed", "weights")
        self._rate_log.warning(("weights", "malformed"), "weights socket: ignored %s that is not a subscription", what)

    def _subscriber(self, frame: zmq.Frame) -> str:
        """Who sent a subscription: its address, and its key under CurveZMQ (for the log line that names it)."""
        try:
            who = frame.get("Peer-Address")
        except zmq.ZMQError:
            who = "?"
        if self._secure:
            with contextlib.suppress(zmq.ZMQError):
                who = f"{who}, key {frame.get('User-Id')}"
        return who

    def _reopen_weights_socket(self, why: str) -> None:
        """Close the weights socket and bind a new one on the same port. libzmq frees the old one's subscription tree
        (the only way to drop what a connected peer subscribed); workers' SUB sockets reconnect and subscribe again,
        and a worker that misses a publication meanwhile gets the next one."""
        assert self.weights_socket is not None
        peer, count = self.subscriptions.busiest_peer()
        self._rate_log.warning(("weights", "reopened"), "weights socket: %s (subscriptions to topics no worker "
                               "uses: most from %s, %d since the socket opened): re-opening the socket to free "
                               "what libzmq keeps of them (subscribed workers reconnect on their own). A worker "
                               "never sends these: %s", why, peer, count,
                               "revoke that key (tmrl-relay keys remove)" if self._secure else
                               "keep untrusted hosts away from the weights port, or run with CurveZMQ")
        monitor = self._monitors.pop("weights", None)
        if monitor is not None:
            self.weights_socket.disable_monitor()
            with contextlib.suppress(KeyError):
                self._poller.unregister(monitor)
            monitor.close(linger=0)
        self.weights_socket.close(linger=0)
        self.weights_socket = None
        self.subscriptions.reset()
        self._bind_weights_socket()

    def _bind_weights_socket(self) -> None:
        """Bind the weights socket again (after :meth:`_reopen_weights_socket` closed it), with its monitor; when the
        port is not free yet, the next housekeeping turn tries again."""
        assert self.ports is not None
        try:
            socket = self._bind_weights_again(self.ports.weights_port)
        except RelaySetupError as exc:
            self._rate_log.warning(("weights", "rebind"), "weights socket: not bound again yet (%s); workers get the "
                                   "latest weights after hello meanwhile; retrying at the next housekeeping turn", exc)
            return
        self.weights_socket = socket
        self.metrics.weights_socket_reopened.inc()
        monitor = self._monitor(socket)
        self._monitors["weights"] = monitor
        self._poller.register(monitor, zmq.POLLIN)

    def _bind_weights_again(self, port: int) -> zmq.Socket:
        """The weights socket on ``port`` again; libzmq closes the old listener on its own thread, so the port may
        be taken for a moment (it is free again within a millisecond or two)."""
        deadline = time.monotonic() + 0.1
        while True:
            try:
                return self._xpub(port)
            except RelaySetupError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    # ------------------------------------------------------------------------------------------------ replies

    def _reject(self, socket: zmq.Socket, link: str, frames: list, exc: ProtocolError) -> None:
        early = (exc.sent_before_replacement(sent_at_of(frames[1].buffer))
                 if isinstance(exc, DisplacedConnection) and len(frames) >= 2 else None)
        if early is None:
            self.metrics.reject(exc.reason, link)
        routing_id = frames[0].bytes if frames else b""
        ref_type, ref_seq, sender = "", None, "?"
        if len(frames) >= 2:
            try:
                fields = check_envelope(frames[1].buffer, self.limits)
                ref_type, sender = fields.type, fields.sender
                if fields.type == "sample_batch" and len(frames) == 3:  # scanned no further than the body cap
                    ref_seq = read_batch_seq(frames[2].buffer[:self.config.max_body_bytes])
            except ProtocolError:
                pass
        what = f"{ref_type or 'a message'}{f' seq {ref_seq}' if ref_seq is not None else ''}"
        if early is not None:  # not a second process: what the peer sent before it replaced this connection (a
            # network probe: a client that took a black-holed path as dead got "two processes under one id?" for it).
            # Counted apart and not answered: the peer has left that connection, and what it holds it resends on the
            # new one (a pause re-check: a relay paused past the clients' silence limit counted 106 such "rejects")
            assert isinstance(exc, DisplacedConnection)
            self.metrics.late_messages.labels(link=link).inc()
            self._rate_log.log(logging.INFO, (link, "late", exc.sender), "%s link: ignored %s from %s, sent %.1f s "
                               "before it said hello on a new connection and delivered only now on the one it "
                               "replaced (a network path that stalled and came back, or this relay did not run "
                               "meanwhile)", link, what, exc.sender, early)
            return
        # limited per connection (the id it said hello with), never per envelope sender, which the peer chooses: a
        # peer that varies it would otherwise get a log line per message
        table = self.workers if link == "workers" else self.trainers if link == "trainer" else None
        bound = table.by_routing_id.get(routing_id) if table is not None else None
        connection = bound.sender if bound is not None else "?"
        said = table.said_hello_as(routing_id) if table is not None else "?"
        self._rate_log.warning((link, exc.reason, connection),
                               "%s link: rejected %s whose envelope says sender %s (routing id %s, said hello as %s): "
                               "%s", link, what, sender, routing_id.hex()[:16], said, exc)
        error = Error(reason=exc.reason, message=exc.detail[:1024], ref_type=ref_type[:32], ref_seq=ref_seq)
        try:
            socket.send_multipart([routing_id, *encode(error, RELAY_SENDER)], zmq.NOBLOCK)
            self.metrics.errors_sent.inc()
        except zmq.ZMQError:  # peer gone or its queue full: the count and the log are what is left
            pass

    def _heartbeat_body(self) -> list[bytes]:
        """The relay's heartbeat frames, rebuilt at most once a second."""
        now = time.monotonic()
        if self._heartbeat_frames is None or now - self._heartbeat_built > 1.0:
            heartbeat = Heartbeat(role="relay", uptime_s=now - self._started, counters={
                "workers": len(self.workers.by_sender), "pending_batches": len(self.pending),
                "weights_version": max(self.weights.version, 0),
            })
            self._heartbeat_frames = encode(heartbeat, RELAY_SENDER)
            self._heartbeat_built = now
        return self._heartbeat_frames

    def _send_heartbeat(self, socket: zmq.Socket, routing_id: bytes) -> None:
        try:
            socket.send_multipart([routing_id, *self._heartbeat_body()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------------------------------- housekeeping

    def _on_monitor_events(self, monitor: zmq.Socket, link: str) -> None:
        while True:
            try:
                message = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(message)
            except Exception:  # pragma: no cover - libzmq writes these frames itself
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._on_disconnect(link, event.get("endpoint", b"?"))
                continue
            kind = _HANDSHAKE_EVENTS.get(event["event"])
            if kind is None:
                continue
            if kind == "other" and event.get("value") == errno.EAGAIN:  # libzmq's handshake time limit (30 s)
                kind = "timeout"
            self.metrics.handshake_failures.labels(link=link, kind=kind).inc()
            self._refused_not_closed[link] = self._refused_not_closed.get(link, 0) + 1
            # libzmq's endpoint is this relay's end of the connection; the client's address is not given
            self._rate_log.warning(("handshake", link, kind), "%s link: refused a connection on %s during the "
                                   "handshake (%s: %s)", link, event.get("endpoint", b"?").decode(errors="replace"),
                                   kind, self._handshake_hint(link, kind, event.get("value")))

    def _handshake_hint(self, link: str, kind: str, value: object = None) -> str:
        """What a handshake failure of ``kind`` on ``link`` most likely means, for its log line (``value``: the
        event's errno, named in the ``other`` case, where libzmq says no more)."""
        if kind == "auth":
            return "public key not in the allow-list"
        if kind == "protocol" and not self._secure:  # an operator probe: both sides blamed the client's server key
            return ("this relay runs --insecure (plain text) and the client speaks CurveZMQ: run both with --insecure "
                    "or both with keys")
        if kind == "timeout":
            return ("no handshake within 30 s: a connection that stays silent (a port scan, a network path that "
                    "stopped carrying bytes) or a peer paused mid-handshake")
        if kind == "protocol":
            return ("the client's --server-key is not this relay's public key (after a relay key rotation: give "
                    "clients the new one), one side runs --insecure and the other CurveZMQ, or a malformed handshake")
        # a network probe: a worker that stopped, or gave up on a stalled path, mid-handshake was only ever called
        # "not a DEALER socket"
        code = errno.errorcode.get(value, str(value)) if isinstance(value, int) else "?"
        plain = (", runs --insecure (plain text) against this CurveZMQ relay" if self._secure else
                 ", speaks CurveZMQ to this --insecure relay")  # libzmq says `other` when the client closes first
        return (f"the peer closed the connection before the handshake ended (it stopped, or gave up on a stalled "
                f"path), is not a {_PEER_SOCKET_TYPES[link]} socket{plain}, or does not speak ZeroMQ's protocol; "
                f"{code}")

    def _on_disconnect(self, link: str, endpoint: bytes) -> None:
        """A connection ended. ZeroMQ does not say why: the peer closed or died, or it sent a frame over the socket's
        cap (:meth:`RelayConfig.socket_frame_cap`), which ZeroMQ drops unread together with the connection. Either way
        it is counted and logged here, so an oversized frame never goes unseen."""
        self.metrics.disconnects.labels(link=link).inc()
        if self._refused_not_closed.get(link, 0) > 0:  # the close of a connection refused (and logged) as it shook
            self._refused_not_closed[link] -= 1  # hands: the line below would only guess at causes for it
        else:  # INFO: a peer leaving is routine (a worker stopped, a trainer restarted); the oversized case too
            self._rate_log.log(logging.INFO, ("disconnect", link), "%s link: a connection on %s closed (the peer left; "
                               "or it stopped reading for %g s, the relay's transport.tcp_max_retransmit_ms: a "
                               "suspended or overloaded peer; or it sent a frame over the %d-byte cap, which ZeroMQ "
                               "drops unread; or it is not a %s socket, the only kind this port takes)", link,
                               endpoint.decode(errors="replace"), self.config.transport.tcp_max_retransmit_ms / 1000,
                               self._subscription_frame_cap if link == "weights" else self.config.socket_frame_cap(link),
                               _PEER_SOCKET_TYPES[link])
        holder = self.trainer.peer
        if link == "trainer" and holder is not None and self.trainer.holds_live():
            # the trainer that stopped cleanly, most often: say so now rather than "silent" peer_timeout_s later
            self._release_the_role_if_its_connection_is_gone(holder)

    def _housekeeping(self, now: float) -> None:
        self._rate_log.flush(now)
        self.metrics.connected_workers.set(self.workers.alive(self.config.peer_timeout_s, now))
        open_files = self.open_files.check(now)
        if open_files is not None:
            self.metrics.open_files.set(open_files)
        if self.trainer.is_silent(now):
            peer = self.trainer.peer
            assert peer is not None
            log.warning("trainer %s silent for %.1fs; holding sample batches until it is heard from again (another "
                        "trainer may take the role now)", peer.sender, now - peer.last_seen)
            self.trainer.mark_silent()
            self.metrics.trainer_connected.set(0)
        if self.allowlist is not None and self.allowlist.maybe_reload(now):
            self._drop_revoked_trainer()
            for table, keys in ((self.workers, self.allowlist.worker_keys), (self.trainers, self.allowlist.trainer_keys)):
                released = table.release_keys(keys)
                if released:  # a rotated trainer key was refused for the relay's lifetime (an outside probe)
                    log.info("%s id(s) %s: their key left the %s allow-list; they can be used with a new key",
                             table.role, ", ".join(sorted(released)), table.role)

    def _drop_revoked_trainer(self) -> None:
        """A trainer whose key left the trainer allow-list loses the role now, on its open connection too."""
        peer = self.trainer.peer
        if peer is None or self.allowlist is None or peer.user_id in self.allowlist.trainer_keys:
            return
        log.warning("trainer %s: its key was removed from the trainer allow-list; it no longer holds the role",
                    peer.sender)
        self.trainer.mark_gone()
        self.metrics.trainer_connected.set(0)
