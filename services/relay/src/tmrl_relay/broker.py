"""The relay: one poll loop over three sockets (see ``docs/architecture.md``).

* ``workers`` (ROUTER, ``worker_port``): workers' ``hello``, ``sample_batch`` and ``heartbeat`` come in;
  ``sample_ack``, ``error`` and ``heartbeat`` go back to the worker's routing id.
* ``trainer`` (ROUTER, ``trainer_port``): sample batches go out, frames unchanged (zero-copy); the trainer's
  ``hello``, ``sample_ack``, ``weights_update`` and ``heartbeat`` come in.
* ``weights`` (XPUB, ``weights_port``): every validated ``weights_update`` is published and cached; each new
  subscription (``XPUB_VERBOSE``) re-publishes the cached one, so a late joiner gets the latest weights at once.

Every message's envelope is checked (version, type allowed on that link, registered sender, size) before anything
else; a reject is counted per reason, logged (rate-limited) and answered with an ``error`` message. Sample batches
are forwarded without decoding their arrays; weights are decoded and verified in full (size, sha256) because a bad
one would reach every worker. Nothing a peer sends stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from tmrl_common.curve import KeyFileError, reload_authenticator, start_authenticator
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import (
    Error,
    Heartbeat,
    Hello,
    SampleAck,
    WeightsUpdate,
    decode_body,
    decode_envelope,
    encode,
)
from tmrl_common.sockets import apply_transport, enable_ipv6_if_needed, secure_server_socket, tcp_endpoint
from zmq.utils.monitor import parse_monitor_message

from tmrl_relay import __version__
from tmrl_relay.config import RelayConfig
from tmrl_relay.envelope import EnvelopeChecker, check_envelope, read_batch_head
from tmrl_relay.keys import role_dir
from tmrl_relay.metrics import RelayMetrics
from tmrl_relay.peers import Peer, PeerTable
from tmrl_relay.pending import PendingBatch, PendingBatches

log = logging.getLogger(__name__)

RELAY_SENDER = "relay"
SOFTWARE = f"tmrl-relay/{__version__}"
WORKER_LINK_TYPES = frozenset({"hello", "sample_batch", "heartbeat"})
TRAINER_LINK_TYPES = frozenset({"hello", "sample_ack", "weights_update", "heartbeat"})
ZAP_DOMAINS = {"workers": "tmrl-workers", "trainer": "tmrl-trainer", "weights": "tmrl-weights"}
_DRAIN_BUDGET = 512  # messages read from one socket before the loop looks at the others
_MAX_FRAMES = 4  # routing id + envelope + body, and one more to tell "too many frames"
_IDLE_POLL_MS = 100
_BACKPRESSURE_POLL_MS = 1
_HOUSEKEEPING_S = 0.25
_LOG_EVERY_S = 5.0
_SUBSCRIBE, _UNSUBSCRIBE = 1, 0
_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE
_SUBSCRIPTION_FRAME_CAP = 4096
"""``ZMQ_MAXMSGSIZE`` of the weights socket: subscriptions are tiny, anything big is hostile."""

_HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other",
}


def _frame_count(frames: list) -> str:
    return f"{len(frames) - 1}+" if len(frames) >= _MAX_FRAMES else str(len(frames) - 1)


class RelaySetupError(RuntimeError):
    """The relay cannot start (ports in use, keys missing...). The message says what to fix."""


@dataclass(frozen=True)
class RelayPorts:
    """The ports the three sockets are bound to (useful when the config asked for port 0)."""

    worker_port: int
    trainer_port: int
    weights_port: int


class _RateLimitedLog:
    """Logs the first occurrence of each key, then at most one line per interval with the count in between."""

    def __init__(self, interval_s: float = _LOG_EVERY_S) -> None:
        self.interval_s = interval_s
        self._last: dict[Any, tuple[float, int]] = {}

    def warning(self, key: Any, message: str, *args: Any) -> None:
        self.log(logging.WARNING, key, message, *args)

    def log(self, level: int, key: Any, message: str, *args: Any) -> None:
        now = time.monotonic()
        if len(self._last) > 4096:  # keys may carry peer-chosen ids: stay bounded
            self._last.clear()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last >= self.interval_s:
            suffix = f" (+{suppressed} similar in the last {self.interval_s:.0f}s)" if suppressed else ""
            log.log(level, message + suffix, *args)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, suppressed + 1)


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
        self._authenticator = None
        self._allowlist_signature: tuple = ()
        self._sockets_open = False
        self.ports: RelayPorts | None = None
        self.workers = PeerTable("worker", config.max_workers)
        self.trainers = PeerTable("trainer", 8)
        self.trainer: Peer | None = None
        self._trainer_alive = False
        self.pending = PendingBatches(config.max_pending_bytes)
        self._backpressured = False
        self._weights: tuple[Any, Any] | None = None
        self._weights_version = -1
        self._started = time.monotonic()
        self._rate_log = _RateLimitedLog()
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
            link: socket.get_monitor_socket(sum(_HANDSHAKE_EVENTS) | zmq.EVENT_DISCONNECTED)
            for link, socket in (("workers", self.workers_socket), ("trainer", self.trainer_socket),
                                 ("weights", self.weights_socket))
        }
        self._sockets_open = True
        self.ports = RelayPorts(self._port_of(self.workers_socket), self._port_of(self.trainer_socket),
                                self._port_of(self.weights_socket))
        log.info("relay listening on %s: workers %d, trainer %d, weights %d (%s)", config.bind_host,
                 self.ports.worker_port, self.ports.trainer_port, self.ports.weights_port,
                 "CurveZMQ" if self._secure else "PLAIN TEXT, --insecure")
        return self.ports

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
        security = self.config.security
        missing = [name for name, value in (("security.secret_key_file", security.secret_key_file),
                                            ("security.allowlist_dir", security.allowlist_dir)) if value is None]
        if missing:
            raise RelaySetupError(
                f"CurveZMQ is on but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. "
                "Generate the relay's key pair with `tmrl-relay keys generate --dir KEYS --name relay` (then "
                "--secret-key KEYS/relay.key_secret), allow each client with `tmrl-relay keys add --allow-dir ALLOW "
                "CLIENT.key` (then --allow-dir ALLOW), or run with --insecure on a trusted network"
            )
        try:
            self._authenticator = start_authenticator(self._context, self._allowlist_domains())
        except KeyFileError as exc:
            raise RelaySetupError(str(exc)) from exc
        self._allowlist_signature = self._allowlist_state()
        self._count_allowed_keys()

    def _allowlist_domains(self) -> dict[str, Path]:
        shared = self.config.security.allowlist_dir
        assert shared is not None
        trainer = self.config.trainer_allowlist_dir
        if trainer is None:  # <allow-dir>/trainers (what `keys init` writes); an allow-dir without one serves both
            trainer = role_dir(shared, "trainer")
            trainer = trainer if trainer.is_dir() else shared
        return {ZAP_DOMAINS["workers"]: shared, ZAP_DOMAINS["weights"]: shared, ZAP_DOMAINS["trainer"]: trainer}

    def _router(self, link: str, port: int) -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        apply_transport(socket, self.config.transport)
        socket.setsockopt(zmq.MAXMSGSIZE, self.config.socket_frame_cap())
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises instead of dropping silently
        # no ROUTER_HANDOVER: clients never set a routing id (the relay makes one per connection; a reconnect is a new
        # connection that says hello again), so a connection claiming one already in use is refused, never given it
        self._secure_and_bind(socket, link, port)
        return socket

    def _xpub(self, port: int) -> zmq.Socket:
        socket = self._context.socket(zmq.XPUB)
        apply_transport(socket, self.config.transport)
        socket.setsockopt(zmq.SNDHWM, self.config.weights_send_hwm)
        socket.setsockopt(zmq.MAXMSGSIZE, _SUBSCRIPTION_FRAME_CAP)
        socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription, not only the first per topic
        self._secure_and_bind(socket, "weights", port)
        return socket

    def _secure_and_bind(self, socket: zmq.Socket, link: str, port: int) -> None:
        host = self.config.bind_host
        try:
            if self._secure:
                socket.zap_domain = ZAP_DOMAINS[link].encode()
                secure_server_socket(socket, self.config.security)
            enable_ipv6_if_needed(socket, host)
            if port == 0:
                socket.bind_to_random_port(f"tcp://{'[' + host + ']' if ':' in host else host}")
            else:
                socket.bind(tcp_endpoint(host, port))
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise RelaySetupError(f"cannot bind the {link} socket on {host}:{port}: {exc}") from exc
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
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self._sockets_open = False
        self._context.term()

    # ------------------------------------------------------------------------------------------------- poll loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.workers_socket, zmq.POLLIN)
        poller.register(self.trainer_socket, zmq.POLLIN)
        poller.register(self.weights_socket, zmq.POLLIN)
        monitors = {monitor: link for link, monitor in self._monitors.items()}
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        reading_workers = True
        next_housekeeping = 0.0
        while not self._stop.is_set():
            try:
                reading_workers, next_housekeeping = self._serve_once(poller, monitors, reading_workers, next_housekeeping)
            except zmq.ContextTerminated:
                return
            except Exception:  # never let one bad turn stop the relay: count, log, go on
                self.metrics.reject("internal", "relay")
                log.exception("relay loop: unexpected error; continuing")
                time.sleep(0.01)

    def _serve_once(self, poller: zmq.Poller, monitors: dict, reading_workers: bool,
                    next_housekeeping: float) -> tuple[bool, float]:
        """One turn of the poll loop; returns the loop state (are workers polled, next housekeeping time)."""
        events = dict(poller.poll(_BACKPRESSURE_POLL_MS if self._backpressured else _IDLE_POLL_MS))
        if self.trainer_socket in events:
            self._drain(self.trainer_socket, self._on_trainer_message, "trainer")
        if self.pending:
            self._flush_pending()
        if self.workers_socket in events and not self._backpressured:
            self._drain(self.workers_socket, self._on_worker_message, "workers")
        if self.weights_socket in events:
            self._drain_subscriptions()
        for monitor, link in monitors.items():
            if monitor in events:
                self._on_monitor_events(monitor, link)
        if self._backpressured == reading_workers:  # stop polling the workers while the trainer is full
            reading_workers = not self._backpressured
            poller.modify(self.workers_socket, zmq.POLLIN if reading_workers else 0)
        now = time.monotonic()
        if now >= next_housekeeping:
            self._housekeeping(now)
            next_housekeeping = now + _HOUSEKEEPING_S
        return reading_workers, next_housekeeping

    def _drain(self, socket: zmq.Socket, handle, link: str) -> None:
        traffic = self.metrics.traffic
        recv = socket.recv
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
            if self._backpressured and link == "workers":
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
        if fields.type == "sample_batch":
            if len(body) > self.config.max_body_bytes:
                raise ProtocolError("oversized", f"sample_batch body is {len(body)} bytes, limit {self.config.max_body_bytes}")
            peer = self.workers.check(routing_id, fields.sender, user_id)
            seq, steps = read_batch_head(body.buffer)
            peer.last_seen = time.monotonic()
            nbytes = len(envelope) + len(body)
            if self.pending or not self._trainer_alive or not self._send_batch(envelope, body, steps, nbytes):
                self._hold(PendingBatch(fields.sender, seq, steps, envelope, body, nbytes))
                self._flush_pending()
        elif fields.type == "hello":
            hello = self._decode_control(envelope, body)
            assert isinstance(hello, Hello)
            if hello.role != "worker":
                raise ProtocolError("schema", f"hello on the workers socket must have role 'worker', got {hello.role!r}")
            peer, previous = self.workers.register(routing_id, fields.sender, user_id)
            log.info("worker %s said hello (next_seq=%d, %s)%s", fields.sender, hello.next_seq, hello.software,
                     " again on a new connection" if previous is not None and previous.routing_id != routing_id else "")
            self.metrics.connected_workers.set(self.workers.alive(self.config.peer_timeout_s))
            self._pass_hello_to_trainer(envelope, body)
        else:  # heartbeat
            peer = self.workers.check(routing_id, fields.sender, user_id)
            self._decode_control(envelope, body)
            peer.last_seen = time.monotonic()
            self._send_heartbeat(self.workers_socket, routing_id)

    def _pass_hello_to_trainer(self, envelope: zmq.Frame, body: zmq.Frame) -> None:
        """Workers' hellos go on to the trainer (best effort) so it can check their observation layout early."""
        if self.trainer is None or not self._trainer_alive:
            return
        try:
            self.trainer_socket.send_multipart([self.trainer.routing_id, envelope, body], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass

    def _user_id(self, frame: zmq.Frame) -> str | None:
        if not self._secure:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError as exc:
            raise ProtocolError("unknown_sender", "message carries no authenticated CurveZMQ key") from exc

    def _decode_control(self, envelope: zmq.Frame, body: zmq.Frame):
        if len(body) > self.config.max_control_bytes:
            raise ProtocolError("oversized", f"control message body is {len(body)} bytes, limit {self.config.max_control_bytes}")
        return decode_body(decode_envelope(envelope.bytes, self.limits), body.buffer, self.limits)

    # ------------------------------------------------------------------------------------------- samples → trainer

    def _send_batch(self, envelope: zmq.Frame, body: zmq.Frame, steps: int, nbytes: int) -> bool:
        """Try to hand a batch to the trainer's socket (zero-copy); False when it cannot take it now."""
        trainer = self.trainer
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
            self._backpressured = True
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("trainer %s disconnected; holding sample batches (up to %d bytes) until a trainer says hello",
                        trainer.sender, self.config.max_pending_bytes)
            self._set_trainer(None)
            return False
        traffic = self.metrics.traffic
        traffic.batches += 1
        traffic.steps += steps
        traffic.batch_bytes += nbytes
        return True

    def _hold(self, batch: PendingBatch) -> None:
        for dropped in self.pending.append(batch):
            self.metrics.dropped_batches.inc()
            self.metrics.dropped_bytes.inc(dropped.nbytes)
            self._rate_log.warning(
                "drop", "no trainer: dropped the oldest held batch (worker %s seq %d, %d bytes) to stay under "
                "max_pending_bytes=%d; the worker resends it if still unacknowledged",
                dropped.sender, dropped.seq, dropped.nbytes, self.config.max_pending_bytes)
        self._update_pending_gauges()

    def _flush_pending(self) -> None:
        if not self._trainer_alive:
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
            self._backpressured = False

    # ------------------------------------------------------------------------------------------------ trainer

    def _on_trainer_message(self, frames: list) -> None:
        routing_id, envelope, body, fields, user_id = self._open(frames, TRAINER_LINK_TYPES, "the trainer")
        if fields.type == "hello":
            hello = self._decode_control(envelope, body)
            assert isinstance(hello, Hello)
            if hello.role != "trainer":
                raise ProtocolError("schema", f"hello on the trainer socket must have role 'trainer', got {hello.role!r}")
            peer, _ = self.trainers.register(routing_id, fields.sender, user_id)
            if self.trainer is not None and self.trainer.routing_id != routing_id:
                log.warning("trainer %s replaces trainer %s (latest hello wins)", fields.sender, self.trainer.sender)
            log.info("trainer %s said hello (%s); %d held batch(es) to deliver", fields.sender, hello.software, len(self.pending))
            self._set_trainer(peer)
            self._flush_pending()
            return
        peer = self.trainers.check(routing_id, fields.sender, user_id)
        peer.last_seen = time.monotonic()
        if peer is not self.trainer:
            raise ProtocolError("unknown_sender", f"trainer {fields.sender!r} was replaced by a newer trainer's hello")
        if not self._trainer_alive:
            log.info("trainer %s is back; %d held batch(es) to deliver", peer.sender, len(self.pending))
            self._set_trainer(peer)
        if fields.type == "sample_ack":
            ack = self._decode_control(envelope, body)
            assert isinstance(ack, SampleAck)
            self._route_ack(ack, envelope, body)
        elif fields.type == "weights_update":
            self._on_weights(envelope, body)
        else:  # heartbeat
            self._decode_control(envelope, body)
            self._send_heartbeat(self.trainer_socket, routing_id)

    def _set_trainer(self, peer: Peer | None) -> None:
        self.trainer = peer
        self._trainer_alive = peer is not None
        if peer is None:
            self._backpressured = False
        self.metrics.trainer_connected.set(1 if self._trainer_alive else 0)

    def _route_ack(self, ack: SampleAck, envelope: zmq.Frame, body: zmq.Frame) -> None:
        worker = self.workers.by_sender.get(ack.worker)
        if worker is not None:
            try:
                self.workers_socket.send_multipart([worker.routing_id, envelope, body], zmq.NOBLOCK, copy=False)
                self.metrics.acks.inc()
                return
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
        self.metrics.acks_undeliverable.inc()
        self._rate_log.warning(("ack", ack.worker), "ack for worker %s (seqs %d..%d) not delivered: worker not connected; "
                               "it resends and the trainer acks again", ack.worker, min(ack.seqs), max(ack.seqs))

    def _on_weights(self, envelope: zmq.Frame, body: zmq.Frame) -> None:
        if len(body) > self.config.max_weights_bytes:
            raise ProtocolError("oversized", f"weights_update body is {len(body)} bytes, limit {self.config.max_weights_bytes}")
        update = decode_body(decode_envelope(envelope.bytes, self.limits), body.buffer, self.limits)
        assert isinstance(update, WeightsUpdate)  # sha256 of the tensors checked by the model
        if update.version < self._weights_version:
            log.warning("weights version went back from %d to %d (trainer restarted?); publishing it",
                        self._weights_version, update.version)
        self._weights = (envelope, body)
        self._weights_version = update.version
        self.metrics.weights_version.set(update.version)
        self.metrics.cached_weights_bytes.set(len(envelope) + len(body))
        log.info("weights version %d (%d bytes) published", update.version, len(body))
        self._publish_weights()

    def _publish_weights(self) -> None:
        if self._weights is None:
            return
        self.weights_socket.send_multipart(list(self._weights), zmq.NOBLOCK, copy=False)  # XPUB drops at HWM, never blocks
        self.metrics.weights_published.inc()

    # ------------------------------------------------------------------------------------------------ weights

    def _drain_subscriptions(self) -> None:
        socket = self.weights_socket
        for _ in range(_DRAIN_BUDGET):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.metrics.traffic.received_messages["weights"] += 1
            self.metrics.traffic.received_bytes["weights"] += sum(len(f) for f in frames)
            if len(frames) == 1 and frames[0][:1] == bytes([_SUBSCRIBE]):
                self.metrics.subscriptions.inc()
                self._publish_weights()  # last-value cache: the new subscriber gets the latest weights now
            elif len(frames) == 1 and frames[0][:1] == bytes([_UNSUBSCRIBE]):
                continue
            else:
                self.metrics.reject("malformed", "weights")
                self._rate_log.warning(("weights", "malformed"), "weights socket: ignored a %d-frame message that is "
                                       "not a subscription", len(frames))

    # ------------------------------------------------------------------------------------------------ replies

    def _reject(self, socket: zmq.Socket, link: str, frames: list, exc: ProtocolError) -> None:
        self.metrics.reject(exc.reason, link)
        routing_id = frames[0].bytes if frames else b""
        ref_type, ref_seq, sender = "", None, "?"
        if len(frames) >= 2:
            try:
                fields = check_envelope(frames[1].buffer, self.limits)
                ref_type, sender = fields.type, fields.sender
                if fields.type == "sample_batch" and len(frames) == 3:
                    ref_seq = read_batch_head(frames[2].buffer).seq
            except ProtocolError:
                pass
        self._rate_log.warning((link, exc.reason, sender), "%s link: rejected %s%s from %s (routing id %s): %s",
                               link, ref_type or "a message", f" seq {ref_seq}" if ref_seq is not None else "", sender,
                               routing_id.hex()[:16], exc)
        error = Error(reason=exc.reason, message=str(exc)[:1024], ref_type=ref_type[:32], ref_seq=ref_seq)
        try:
            socket.send_multipart([routing_id, *encode(error, RELAY_SENDER)], zmq.NOBLOCK)
            self.metrics.errors_sent.inc()
        except zmq.ZMQError:  # peer gone or its queue full: the count and the log are what is left
            pass

    def _send_heartbeat(self, socket: zmq.Socket, routing_id: bytes) -> None:
        now = time.monotonic()
        if self._heartbeat_frames is None or now - self._heartbeat_built > 1.0:
            heartbeat = Heartbeat(role="relay", uptime_s=now - self._started, counters={
                "workers": len(self.workers.by_sender), "pending_batches": len(self.pending),
                "weights_version": max(self._weights_version, 0),
            })
            self._heartbeat_frames = encode(heartbeat, RELAY_SENDER)
            self._heartbeat_built = now
        try:
            socket.send_multipart([routing_id, *self._heartbeat_frames], zmq.NOBLOCK)
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
            self.metrics.handshake_failures.labels(link=link, kind=kind).inc()
            self._rate_log.warning(("handshake", link, kind), "%s link: refused a connection from %s during the "
                                   "handshake (%s%s)", link, event.get("endpoint", b"?"), kind,
                                   ": public key not in the allow-list" if kind == "auth" else "")

    def _on_disconnect(self, link: str, endpoint: bytes) -> None:
        """A connection ended. ZeroMQ does not say why: the peer closed or died, or it sent a frame over the socket's
        cap (:meth:`RelayConfig.socket_frame_cap`), which ZeroMQ drops unread together with the connection. Either way
        it is counted and logged here, so an oversized frame never goes unseen."""
        self.metrics.disconnects.labels(link=link).inc()
        # INFO: a peer leaving is routine (a worker stopped, a trainer restarted); the oversized case is counted too
        self._rate_log.log(logging.INFO, ("disconnect", link), "%s link: connection from %s closed (the peer left, or sent a "
                               "frame over the %d-byte cap, which ZeroMQ drops unread)", link,
                               endpoint.decode(errors="replace"),
                               _SUBSCRIPTION_FRAME_CAP if link == "weights" else self.config.socket_frame_cap())

    def _housekeeping(self, now: float) -> None:
        timeout = self.config.peer_timeout_s
        self.metrics.connected_workers.set(self.workers.alive(timeout, now))
        trainer = self.trainer
        if trainer is not None and self._trainer_alive and now - trainer.last_seen > timeout:
            log.warning("trainer %s silent for %.1fs; holding sample batches until it is heard from again",
                        trainer.sender, now - trainer.last_seen)
            self._trainer_alive = False
            self._backpressured = False
            self.metrics.trainer_connected.set(0)
        if self._authenticator is not None:
            self._maybe_reload_allowlist()

    def _allowlist_state(self) -> tuple:
        state = []
        for directory in sorted(set(self._allowlist_domains().values())):
            try:
                state.extend((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(directory).glob("*.key")))
            except OSError:
                state.append((str(directory), "missing"))
        return tuple(state)

    def _maybe_reload_allowlist(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_allowlist_checked", 0.0) < self.config.allowlist_reload_s:
            return
        self._allowlist_checked = now
        state = self._allowlist_state()
        if state == self._allowlist_signature:
            return
        self._allowlist_signature = state
        try:
            counts = reload_authenticator(self._authenticator, self._allowlist_domains())
        except KeyFileError as exc:
            log.error("allow-list changed but cannot be loaded, keeping the previous one: %s", exc)
            return
        log.info("allow-list reloaded: %s", counts)
        self._count_allowed_keys()

    def _count_allowed_keys(self) -> None:
        from tmrl_common.curve import list_allowed_keys

        for link, domain in ZAP_DOMAINS.items():
            try:
                self.metrics.allowed_keys.labels(link=link).set(len(list_allowed_keys(self._allowlist_domains()[domain])))
            except KeyFileError:
                pass
