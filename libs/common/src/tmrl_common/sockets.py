"""ZeroMQ socket settings shared by relay, workers and trainer: transport options, CurveZMQ, endpoints.

Every tmrl socket is configured the same way (see ``docs/architecture.md``):

* :class:`TransportConfig` holds high-water marks, ``LINGER``, TCP keepalive and reconnection intervals;
  :func:`apply_transport` sets them on a socket before it binds or connects.
* :class:`SecurityConfig` says where the CurveZMQ key files are; :func:`secure_server_socket` (relay side) and
  :func:`secure_client_socket` (worker/trainer side) set the CURVE options, or nothing at all when
  ``insecure=True``. Key files are ZeroMQ certificates written by :mod:`tmrl_common.curve`.
* :func:`tcp_endpoint` builds ``tcp://host:port`` strings (IPv6 hosts are bracketed).

Typical client::

    socket = context.socket(zmq.DEALER)
    apply_transport(socket, transport)
    secure_client_socket(socket, security)  # before connect()
    socket.connect(tcp_endpoint(host, port))
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from socket import SOCK_STREAM, getaddrinfo

import zmq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tmrl_common.config import refuse_empty_path
from tmrl_common.curve import load_secret_key, load_server_public_key

log = logging.getLogger(__name__)

ZMQ_INT_MAX = 2**31 - 1
"""The largest value of ZeroMQ's ``int`` socket options (all of :class:`TransportConfig`'s but ``max_frame_bytes``):
a larger one makes ``setsockopt`` raise, so the config refuses it instead."""
ZMQ_INT64_MAX = 2**63 - 1


class TransportConfig(BaseModel):
    """Socket options applied to every tmrl socket (relay and clients alike). Times are milliseconds."""

    model_config = ConfigDict(extra="forbid")

    send_hwm: int = Field(default=1000, ge=0, le=ZMQ_INT_MAX)
    """Messages queued for sending per peer before sends block or fail with EAGAIN (0 = unlimited)."""
    recv_hwm: int = Field(default=1000, ge=0, le=ZMQ_INT_MAX)
    """Messages queued on receipt per peer before ZeroMQ stops reading from that peer (0 = unlimited)."""
    linger_ms: int = Field(default=500, ge=-1, le=ZMQ_INT_MAX)
    """How long ``close()`` waits to flush pending messages (-1 = forever; never use that in services)."""
    heartbeat_ivl_ms: int = Field(default=0, ge=0, le=ZMQ_INT_MAX)
    """ZMTP PING interval; 0 (the default) sends none. Not recommended: libzmq 4.3.5 aborts the whole process
    (``Assertion failed: !_io_error``, zeromq/libzmq#4767) when a connection whose received messages wait unread,
    because the process is not reading that peer for a while, fails and a PING is due. TCP keepalive (below) finds
    dead connections without that risk."""
    heartbeat_timeout_ms: int = Field(default=5000, ge=0, le=ZMQ_INT_MAX)
    """With ZMTP heartbeats on: a connection with no traffic for this long after a PING is closed."""
    heartbeat_ttl_ms: int = Field(default=5000, ge=0, le=6_553_500)
    """With ZMTP heartbeats on: asks the remote peer to drop the connection after this long without traffic."""
    tcp_keepalive_idle_s: int = Field(default=5, ge=1, le=ZMQ_INT_MAX)
    """TCP keepalive: an idle connection is probed after this many seconds..."""
    tcp_keepalive_interval_s: int = Field(default=1, ge=1, le=ZMQ_INT_MAX)
    """...then every this many seconds..."""
    tcp_keepalive_count: int = Field(default=5, ge=1, le=ZMQ_INT_MAX)
    """...and closed after this many unanswered probes (a dead host or a cut network: about 10 s by default; the
    kernel does it, so it cannot stop a process). Clients then reconnect."""
    tcp_max_retransmit_ms: int = Field(default=10_000, ge=0, le=ZMQ_INT_MAX)
    """``ZMQ_TCP_MAXRT``: a connection whose sent data stays unacknowledged this long is closed (where keepalive
    does not probe: a peer gone while data was on its way); 0 keeps the system's (minutes)."""
    reconnect_ivl_ms: int = Field(default=200, ge=0, le=ZMQ_INT_MAX)
    """First reconnection delay of a connecting socket."""
    reconnect_ivl_max_ms: int = Field(default=5000, ge=0, le=ZMQ_INT_MAX)
    """Reconnection delay cap (exponential back-off up to it); 0 keeps ``reconnect_ivl_ms``."""
    connect_timeout_ms: int = Field(default=5000, ge=0, le=ZMQ_INT_MAX)
    """``ZMQ_CONNECT_TIMEOUT``: a connection attempt with no answer this long is given up and tried again after the
    reconnection delay; 0 keeps the system's, whose SYN retries back off to 15-30 s, so a trainer whose path dropped
    every packet for a minute reconnected 21 s after it healed (a network probe). Several round trips of the slowest
    link fit in it."""
    max_frame_bytes: int = Field(default=-1, ge=-1, le=ZMQ_INT64_MAX)
    """``ZMQ_MAXMSGSIZE``: a peer sending a larger frame is disconnected by ZeroMQ (-1 = no limit)."""

    @model_validator(mode="after")
    def _reconnect_cap(self) -> TransportConfig:
        if self.reconnect_ivl_max_ms and self.reconnect_ivl_max_ms < self.reconnect_ivl_ms:
            raise ValueError(
                f"reconnect_ivl_max_ms ({self.reconnect_ivl_max_ms}) must be 0 or >= reconnect_ivl_ms ({self.reconnect_ivl_ms})"
            )
        return self


_warned_heartbeats = False


def apply_transport(socket: zmq.Socket, transport: TransportConfig) -> None:
    """Set HWMs, LINGER, TCP keepalive, ZMTP heartbeats (off unless asked for), reconnection and max frame size on
    ``socket`` (call before bind/connect)."""
    global _warned_heartbeats
    if transport.heartbeat_ivl_ms and not _warned_heartbeats:
        _warned_heartbeats = True
        log.warning("transport.heartbeat_ivl_ms = %d turns ZMTP heartbeats on: libzmq %s can then abort this process "
                    "(\"Assertion failed: !_io_error\", zeromq/libzmq#4767) when a peer's connection fails while its "
                    "messages wait unread. Set heartbeat_ivl_ms = 0: TCP keepalive (transport.tcp_keepalive_*) finds "
                    "dead connections without that risk", transport.heartbeat_ivl_ms, zmq.zmq_version())
    socket.setsockopt(zmq.SNDHWM, transport.send_hwm)
    socket.setsockopt(zmq.RCVHWM, transport.recv_hwm)
    socket.setsockopt(zmq.LINGER, transport.linger_ms)
    socket.setsockopt(zmq.HEARTBEAT_IVL, transport.heartbeat_ivl_ms)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, transport.heartbeat_timeout_ms)
    socket.setsockopt(zmq.HEARTBEAT_TTL, transport.heartbeat_ttl_ms)
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, transport.tcp_keepalive_idle_s)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, transport.tcp_keepalive_interval_s)
    socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, transport.tcp_keepalive_count)
    socket.setsockopt(zmq.TCP_MAXRT, transport.tcp_max_retransmit_ms)
    socket.setsockopt(zmq.RECONNECT_IVL, transport.reconnect_ivl_ms)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, transport.reconnect_ivl_max_ms)
    socket.setsockopt(zmq.CONNECT_TIMEOUT, transport.connect_timeout_ms)
    socket.setsockopt(zmq.MAXMSGSIZE, transport.max_frame_bytes)


class SecurityError(ValueError):
    """The CurveZMQ settings cannot secure a socket (missing key file, insecure mode not requested...)."""


class SecurityConfig(BaseModel):
    """Where the CurveZMQ key files are. Plain text needs an explicit ``insecure = true``.

    * relay: ``secret_key_file`` (its own pair) and ``allowlist_dir`` (public keys of allowed workers/trainer);
    * worker/trainer: ``secret_key_file`` (its own pair) and ``server_public_key_file`` (the relay's public key).
    """

    model_config = ConfigDict(extra="forbid")

    insecure: bool = False
    """Plain text, no authentication: for a trusted loopback or tests only."""
    secret_key_file: Path | None = None
    """This process's key pair: the ``<name>.key_secret`` certificate from ``tmrl-relay keys generate``."""
    server_public_key_file: Path | None = None
    """Clients only: the relay's public certificate (``<name>.key``)."""
    allowlist_dir: Path | None = None
    """Relay only: directory of allowed clients' public certificates (``*.key``), managed by ``tmrl-relay keys add``."""

    _paths_given = field_validator("secret_key_file", "server_public_key_file", "allowlist_dir", mode="before")(
        refuse_empty_path)

    def unused_key_settings(self) -> str:
        """With ``insecure``, the key settings given all the same (``"secret_key_file, allowlist_dir"``; empty when
        none): they are not used, which a config probe's relay run with --insecure and its keys never said."""
        if not self.insecure:
            return ""
        return ", ".join(name for name in ("secret_key_file", "server_public_key_file", "allowlist_dir")
                         if getattr(self, name) is not None)


_FLAGS = {"secret_key_file": "--secret-key", "server_public_key_file": "--server-key"}
"""The ``run`` flag of each key file setting (the Quick start passes flags, not the config's field names)."""


_CLIENT_TABLES = "[worker.security] or [trainer.security]"


def _require(path: Path | None, what: str, field: str, table: str) -> Path:
    if path is None:
        raise SecurityError(
            f"{what} is not set ({_FLAGS[field]} FILE, or {field} in the config's {table}); generate keys "
            "with `tmrl-relay keys init` (one machine) or `tmrl-relay keys generate --dir DIR --name NAME`, or pass "
            "--insecure for plain text on a trusted network"
        )
    return path


def secure_server_socket(socket: zmq.Socket, security: SecurityConfig) -> None:
    """Make ``socket`` a CURVE server with the key pair in ``security.secret_key_file`` (call before bind).

    Which clients may connect is decided by a ZAP authenticator on the socket's context
    (:func:`tmrl_common.curve.start_authenticator`). Does nothing when ``security.insecure``.
    """
    if security.insecure:
        return
    public, secret = load_secret_key(_require(security.secret_key_file, "the relay's secret key file", "secret_key_file",
                                              "[relay.security]"))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def secure_client_socket(socket: zmq.Socket, security: SecurityConfig) -> None:
    """Make ``socket`` a CURVE client of the relay (call before connect). Does nothing when ``security.insecure``."""
    if security.insecure:
        return
    public, secret = load_secret_key(_require(security.secret_key_file, "this client's secret key file", "secret_key_file",
                                              _CLIENT_TABLES))
    server_public = load_server_public_key(
        _require(security.server_public_key_file, "the relay's public key file", "server_public_key_file", _CLIENT_TABLES)
    )
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public


_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")


def check_host(value: str, setting: str, bind: bool = False) -> str:
    """``value`` if it is a host name, an IPv4 or IPv6 address (IPv6 optionally bracketed) or, to ``bind``, ``*``;
    else a ValueError naming ``setting`` (checked when the config is read: ZeroMQ would raise only when a thread
    connects, far from the setting)."""
    if bind and value == "*":
        return value
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(value):
        what = "a host name or IP address" + (", or * for every interface" if bind else "")
        raise ValueError(f"{setting} {value!r} is not {what}")
    return value


def tcp_endpoint(host: str, port: int) -> str:
    """``tcp://host:port`` for bind or connect; IPv6 literals are bracketed. ``*`` binds every interface."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")
    return f"{tcp_address(host)}:{port}"


def tcp_address(host: str) -> str:
    """``tcp://host`` without a port (what ``bind_to_random_port`` takes); an IPv6 literal is bracketed once, given
    with brackets or without."""
    if not host:
        raise ValueError("host is empty; use 127.0.0.1 for loopback or * for every interface")
    try:
        if isinstance(ipaddress.ip_address(host.strip("[]")), ipaddress.IPv6Address):
            host = f"[{host.strip('[]')}]"
    except ValueError:
        pass  # a host name or "*"
    return f"tcp://{host}"


def enable_ipv6_if_needed(socket: zmq.Socket, host: str) -> None:
    """Turn on ``ZMQ_IPV6`` when ``host`` is an IPv6 literal, or ``*`` (every interface: the socket then takes IPv6
    and IPv4 clients alike; libzmq falls back to IPv4 where the machine has no IPv6). ZeroMQ is IPv4-only otherwise:
    a relay bound on ``*`` refused clients given ``[::1]`` (an outside probe)."""
    if host == "*":
        socket.setsockopt(zmq.IPV6, 1)
        return
    try:
        if isinstance(ipaddress.ip_address(host.strip("[]")), ipaddress.IPv6Address):
            socket.setsockopt(zmq.IPV6, 1)
    except ValueError:
        pass


@dataclass(frozen=True)
class RelayEndpoint:
    """One relay socket to connect to, with the transport options and CurveZMQ settings every tmrl client uses."""

    host: str
    port: int
    transport: TransportConfig
    security: SecurityConfig

    def describe(self) -> str:
        return f"{tcp_endpoint(self.host, self.port)} {'plain text' if self.security.insecure else 'CurveZMQ'}"

    def frame_cap_hint(self) -> str:
        """For a line about a connection that closed: nothing without a frame cap on this side, else that a frame
        from the relay over ``transport.max_frame_bytes`` ends the connection (ZeroMQ drops both, saying nothing)."""
        cap = self.transport.max_frame_bytes
        if cap < 0:
            return ""
        return (f"; or the relay sent a frame over this side's transport.max_frame_bytes ({cap} bytes), which ZeroMQ "
                "drops together with the connection (weights updates are the largest frames): raise it, or -1")

    def stop_retrying(self, socket: zmq.Socket) -> None:
        """End libzmq's reconnection attempts of ``socket`` to this endpoint (a socket connected by :meth:`connect`);
        its owner closes it and connects a new one later."""
        try:
            socket.disconnect(tcp_endpoint(self.host, self.port))
        except zmq.ZMQError:  # already gone: nothing is being retried
            pass

    def warn_if_unresolvable(self) -> bool:
        """Log a warning when :attr:`host` is a name that does not resolve now (a typo, or DNS not up yet): ZeroMQ
        would only retry it silently, and the client would say it is not connected. False in that case."""
        try:
            ipaddress.ip_address(self.host.strip("[]"))
            return True  # an address: nothing to resolve
        except ValueError:
            pass
        try:
            getaddrinfo(self.host, self.port, type=SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.warning("relay_host %r does not resolve (%s): check the name; the connection is retried, so a name "
                        "that resolves later (DNS still coming up) is used then", self.host,
                        getattr(exc, "strerror", None) or exc)
            return False
        return True

    def check_security(self) -> None:
        """Load the CurveZMQ key files now (raises :class:`~tmrl_common.sockets.SecurityError` or
        :class:`~tmrl_common.curve.KeyFileError`), so a misconfiguration stops the worker before it starts."""
        with zmq.Context() as context, context.socket(zmq.DEALER) as probe:
            secure_client_socket(probe, self.security)
        unused = self.security.unused_key_settings()
        if unused:
            log.warning("--insecure: plain text to the relay; the key settings given (%s) are not used", unused)

    def connect(self, context: zmq.Context, socket_type: int, monitor_events: int = 0,
                before_connect: Callable[[zmq.Socket], None] | None = None) -> tuple[zmq.Socket, zmq.Socket | None]:
        """A configured socket connected to the relay, and its monitor socket when ``monitor_events`` are asked for
        (attached before connecting, so the first connection's events are not missed).
        Raises :class:`~tmrl_common.sockets.SecurityError` when key files are missing."""
        socket = context.socket(socket_type)
        monitor = None
        try:
            apply_transport(socket, self.transport)
            enable_ipv6_if_needed(socket, self.host)
            secure_client_socket(socket, self.security)
            if before_connect is not None:
                before_connect(socket)
            if monitor_events:
                monitor = socket.get_monitor_socket(monitor_events)
            socket.connect(tcp_endpoint(self.host, self.port))
        except BaseException:
            if monitor is not None:
                monitor.close(linger=0)
            socket.close(linger=0)
            raise
        return socket, monitor
