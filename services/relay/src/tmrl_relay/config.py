"""Relay configuration (table ``[relay]`` of the TOML config; env ``TMRL_RELAY__<FIELD>``, nested with ``__``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from tmrl_common.config import MAX_DURATION_S, refuse_empty_path
from tmrl_common.protocol import DecodeLimits
from tmrl_common.sockets import ZMQ_INT_MAX, SecurityConfig, TransportConfig, check_host

TRAINER_ALLOWLIST_SUBDIR = "trainers"
"""Trainer keys live in ``<allowlist_dir>/trainers`` unless ``trainer_allowlist_dir`` says otherwise."""


def _relay_transport() -> TransportConfig:
    # Per-peer queues are bounded in messages; with 1 MiB batches 100 messages is 100 MiB per worker at worst.
    return TransportConfig(send_hwm=100, recv_hwm=100, linger_ms=500)


MAX_LIMIT_BYTES = 2**40
"""The largest byte limit the relay takes (1 TiB): twice it must still fit ZeroMQ's 64-bit ``ZMQ_MAXMSGSIZE``."""


class RelayConfig(BaseModel):
    """Where the relay listens, what it accepts and how much it holds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite interval or timeout is a typo

    bind_host: str = "127.0.0.1"
    """Interface the three sockets bind to (``*`` for every interface, IPv6 and IPv4 alike; ``127.0.0.1`` for loopback
    only; an IPv6 address such as ``::1`` for that one)."""
    worker_port: int = Field(default=5555, ge=0, le=65535)
    """Workers connect here (ROUTER): hello/samples/heartbeats in, acks/errors/heartbeats out. 0 picks a free port."""
    trainer_port: int = Field(default=5556, ge=0, le=65535)
    """The trainer connects here (ROUTER): samples out; hello, acks, weights, heartbeats in. 0 picks a free port."""
    weights_port: int = Field(default=5557, ge=0, le=65535)
    """Workers subscribe here (XPUB) for new weights; a worker gets the latest ones over its own link after hello."""
    metrics_host: str = "127.0.0.1"
    """Interface of the Prometheus HTTP endpoint."""
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    """Prometheus metrics over HTTP (``/metrics``); 0 disables."""

    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=MAX_LIMIT_BYTES)
    """Largest ``sample_batch`` body accepted (larger: rejected, reason ``oversized``)."""
    max_weights_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, le=MAX_LIMIT_BYTES)
    """Largest ``weights_update`` body accepted from the trainer."""
    max_control_bytes: int = Field(default=1024 * 1024, ge=1024, le=MAX_LIMIT_BYTES)
    """Largest ``sample_ack`` body (65,536 seqs take about 590 KB), and the largest ``hello`` or ``heartbeat`` body
    when it is smaller than ``max_hello_heartbeat_bytes``."""
    max_hello_heartbeat_bytes: int = Field(default=64 * 1024, ge=1024, le=MAX_LIMIT_BYTES)
    """Largest ``hello`` or ``heartbeat`` body, on either link (a hello with 16 layout components takes about 4 KB, a
    heartbeat with 64 counters about 5 KB). Any peer may send these before its id is known, and a body's cost to
    decode grows with its bytes, not its fields: a recheck probe's 1 MiB heartbeats of a million empty lists took
    0.2 s each, and 10 s of them from 4 connections held the relay for minutes."""
    max_pending_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Sample batches held while no trainer is connected; past it the oldest are dropped (counted, logged).
    Workers keep their own spool and resend unacknowledged batches, so this is a cache, not the only copy."""
    max_workers: int = Field(default=1024, ge=1)
    """Registered worker ids kept at once; beyond it the longest-silent one is forgotten (it must say hello again) if
    it has been silent for more than ``peer_timeout_s``; while every one is live, a new id's hello is refused, naming
    this limit (the worker says hello again later)."""
    peer_timeout_s: float = Field(default=10.0, gt=0, le=MAX_DURATION_S)
    """A worker or trainer silent (no message, heartbeat included) for this long counts as disconnected."""
    weights_send_hwm: int = Field(default=4, ge=1, le=ZMQ_INT_MAX)
    """Weights messages queued per subscriber; a slow subscriber skips to newer weights instead of piling them up."""
    weights_min_interval_s: float = Field(default=0.05, ge=0, le=MAX_DURATION_S)
    """Weights are published at most once per this interval; a newer update arriving sooner waits for its end (only
    the latest is kept). Subscriptions never cause a publication, so this bounds everything the weights socket sends."""
    allowlist_reload_s: float = Field(default=2.0, gt=0, le=MAX_DURATION_S)
    """How often the allow-list directories are checked for changes (``keys add`` needs no restart)."""

    transport: TransportConfig = Field(default_factory=_relay_transport)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    """``secret_key_file`` (the relay's pair) and ``allowlist_dir`` (clients' public keys), or ``insecure = true``."""
    trainer_allowlist_dir: Path | None = None
    """Keys that may be the trainer (the only keys the trainer socket admits; the trainer publishes weights to every
    worker). Unset: ``<security.allowlist_dir>/trainers``, where ``keys add --role trainer`` and ``keys init`` put them.
    Under CurveZMQ the relay refuses to start with no key there, so a worker key can never act as the trainer."""

    _paths_given = field_validator("trainer_allowlist_dir", mode="before")(refuse_empty_path)

    @field_validator("bind_host", "metrics_host")
    @classmethod
    def _host_given(cls, value: str, info: ValidationInfo) -> str:
        return check_host(value, info.field_name, bind=True)

    @model_validator(mode="after")
    def _distinct_ports(self) -> RelayConfig:
        fixed = [p for p in (self.worker_port, self.trainer_port, self.weights_port) if p]
        if len(set(fixed)) != len(fixed):
            raise ValueError(f"worker_port, trainer_port and weights_port must differ, got {fixed}")
        return self

    def trainer_allowlist(self) -> Path:
        """The trainer allow-list directory (``trainer_allowlist_dir``, else ``<allowlist_dir>/trainers``)."""
        if self.trainer_allowlist_dir is not None:
            return Path(self.trainer_allowlist_dir)
        if self.security.allowlist_dir is None:
            raise ValueError("no trainer allow-list: set security.allowlist_dir or trainer_allowlist_dir")
        return Path(self.security.allowlist_dir) / TRAINER_ALLOWLIST_SUBDIR

    def decode_limits(self) -> DecodeLimits:
        """Limits for bodies the relay decodes fully (control messages and weights)."""
        return DecodeLimits(max_body_bytes=max(self.max_weights_bytes, self.max_control_bytes),
                            max_array_bytes=self.max_weights_bytes, max_decoded_bytes=self.max_weights_bytes)

    def socket_frame_cap(self, link: str = "workers") -> int:
        """``ZMQ_MAXMSGSIZE`` for the ``link``'s ROUTER socket (``workers`` or ``trainer``): frames up to twice the
        largest body that link takes (batches on the workers link, weights on the trainer's; control messages on
        both) are read and counted as ``oversized``; anything larger makes ZeroMQ drop the connection without
        buffering it. Per link: a worker's connection may not pin the weights' cap of memory with a frame it never
        finishes."""
        largest = self.max_weights_bytes if link == "trainer" else self.max_body_bytes
        return 2 * max(largest, self.max_control_bytes)
