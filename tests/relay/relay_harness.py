"""A real relay on loopback (in a thread or as a subprocess) and real ZeroMQ peers speaking the tmrl protocol."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import zmq
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import tm20_lidar_layout
from tmrl_common.protocol import Hello, Message, SampleBatch, WeightsUpdate, decode, encode
from tmrl_common.sockets import (
    SecurityConfig,
    TransportConfig,
    apply_transport,
    enable_ipv6_if_needed,
    secure_client_socket,
    tcp_endpoint,
)
from tmrl_common.weights import tensors_to_bytes
from tmrl_relay.broker import Relay
from tmrl_relay.config import RelayConfig
from tmrl_relay.metrics import RelayMetrics

TIMEOUT_MS = 5000
CLIENT_TRANSPORT = TransportConfig(linger_ms=0, reconnect_ivl_ms=50, reconnect_ivl_max_ms=500)


def insecure_config(**fields) -> RelayConfig:
    """Relay config on random loopback ports, plain text, no metrics server."""
    base = dict(bind_host="127.0.0.1", worker_port=0, trainer_port=0, weights_port=0, metrics_port=0,
                security=SecurityConfig(insecure=True))
    base.update(fields)
    return RelayConfig(**base)


@contextlib.contextmanager
def relay_in_thread(config: RelayConfig) -> Iterator[Relay]:
    relay = Relay(config, RelayMetrics())
    relay.bind()
    thread = threading.Thread(target=relay.run, name="relay", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(10)
        assert not thread.is_alive(), "relay thread did not stop"


@contextlib.contextmanager
def relay_subprocess(*args: str, env: dict[str, str] | None = None,
                     open_file_limit: int | None = None) -> Iterator[tuple[subprocess.Popen, dict[str, int]]]:
    """``tmrl-relay run ARGS`` as a child process; yields it and the ports from its ready line. ``open_file_limit``:
    its soft and hard ``RLIMIT_NOFILE`` (as under ``ulimit -Hn``), set before the relay starts."""
    prelude = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({open_file_limit}, {open_file_limit})); "
               if open_file_limit is not None else "")
    command = [sys.executable, "-c", f"{prelude}from tmrl_relay.cli import app; app()", "run", "--bind-host", "127.0.0.1",
               "--worker-port", "0", "--trainer-port", "0", "--weights-port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    try:
        line = process.stdout.readline()
        match = re.search(r"worker_port=(\d+) trainer_port=(\d+) weights_port=(\d+) metrics_port=(\d+)", line)
        if not match:
            process.kill()
            raise AssertionError(f"relay did not start: {line!r} {process.stderr.read()}")
        ports = dict(zip(("worker_port", "trainer_port", "weights_port", "metrics_port"), map(int, match.groups()), strict=True))
        yield process, ports
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def make_batch(seq: int, steps: int = 4, pad_bytes: int = 0, seed: int = 0) -> SampleBatch:
    """A valid lidar batch; ``pad_bytes`` makes it bigger (lidar rows of random floats)."""
    rng = np.random.default_rng(seed + seq)
    layout = tm20_lidar_layout()
    extra_rows = max(0, pad_bytes // (layout.components[1].frame_shape[0] * 4))
    steps = max(steps, 1 + extra_rows)

    def observe():
        speed = rng.uniform(0, 300, size=(1,)).astype(np.float32)
        lidar = rng.uniform(0, 1, size=layout.components[1].observation_shape).astype(np.float32)
        return (speed, lidar, *[np.zeros(layout.action_dim, np.float32) for _ in range(layout.action_history)])

    builder = SampleBatchBuilder(layout)
    builder.add_reset(observe())
    for _ in range(steps - 1):
        builder.add_step(rng.uniform(-1, 1, size=(3,)).astype(np.float32), observe(), 1.0, False, False)
    return builder.build(seq=seq, weights_version=0)


def batch_body_with(**fields) -> bytes:
    """The msgpack body of :func:`make_batch` ``(5)`` from ``worker-1`` with some fields replaced (``None``: left
    out; ``seq`` too), for bodies the relay must judge."""
    import msgpack

    body = msgpack.unpackb(encode(make_batch(5), "worker-1")[1])
    for name, value in fields.items():
        if value is None:
            del body[name]
        else:
            body[name] = value
    return msgpack.packb(body, use_bin_type=True)


def make_weights(version: int, nbytes: int = 4096) -> WeightsUpdate:
    tensors = {"w": np.random.default_rng(version).normal(size=(max(1, nbytes // 4),)).astype(np.float32)}
    return WeightsUpdate.build(version=version, architecture={"kind": "test"}, tensors=tensors_to_bytes(tensors))


class Peer:
    """A DEALER (or SUB) connected to one relay port."""

    def __init__(self, context: zmq.Context, port: int, sender: str, kind: int = zmq.DEALER,
                 security: SecurityConfig | None = None, transport: TransportConfig = CLIENT_TRANSPORT,
                 host: str = "127.0.0.1") -> None:
        self.sender = sender
        self.socket = context.socket(kind)
        apply_transport(self.socket, transport)
        secure_client_socket(self.socket, security or SecurityConfig(insecure=True))
        if kind == zmq.SUB:
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.SNDTIMEO, 10_000)  # a send with nowhere to go fails the test instead of hanging it
        enable_ipv6_if_needed(self.socket, host)
        self.socket.connect(tcp_endpoint(host, port))

    def send(self, message: Message, sender: str | None = None) -> None:
        self.socket.send_multipart(encode(message, sender or self.sender))

    def try_send(self, message: Message, sender: str | None = None) -> bool:
        """:meth:`send` without waiting: False when the socket has no connection to queue on (a client whose CURVE
        handshake was refused has none once the refusal arrives: libzmq ends the session)."""
        try:
            self.socket.send_multipart(encode(message, sender or self.sender), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def send_frames(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def hello(self, role: str) -> None:
        self.send(Hello(role=role, software="test"))

    def recv(self, timeout_ms: int = TIMEOUT_MS) -> tuple:
        """The next message, decoded (raises AssertionError on timeout)."""
        if not self.socket.poll(timeout_ms):
            raise AssertionError(f"{self.sender}: nothing received within {timeout_ms} ms")
        return decode(self.socket.recv_multipart())

    def recv_type(self, type_name: str, timeout_ms: int = TIMEOUT_MS):
        """Skip heartbeats until a message of ``type_name`` arrives."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0:
                raise AssertionError(f"{self.sender}: no {type_name} within {timeout_ms} ms")
            envelope, message = self.recv(remaining)
            if envelope.type == type_name:
                return envelope, message

    def nothing_within(self, timeout_ms: int) -> bool:
        return self.socket.poll(timeout_ms) == 0

    def types_within(self, timeout_ms: int) -> list[str]:
        """Envelope types of everything received within ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000
        types = []
        while (remaining := int((deadline - time.monotonic()) * 1000)) > 0 and self.socket.poll(remaining):
            types.append(decode(self.socket.recv_multipart())[0].type)
        return types

    def close(self) -> None:
        self.socket.close(linger=0)


def wait_until(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def hello_until_it_takes_the_trainer_role(relay: Relay, trainer: Peer, replaced: bytes, timeout_s: float = 5.0) -> None:
    """Say hello as the trainer every 0.2 s, as the trainer's link does after a refusal, until a connection other than
    ``replaced`` (the routing id of a holder that stopped) holds the role: the relay lets a closed connection go at
    its close, or at the next hello on another one."""
    deadline = time.monotonic() + timeout_s
    while not (relay.trainer.ready and relay.trainer.peer.routing_id != replaced):
        if time.monotonic() > deadline:
            raise AssertionError(f"{trainer.sender} never took the trainer role")
        trainer.hello("trainer")
        time.sleep(0.2)


def connected_trainer(context: zmq.Context, relay: Relay, name: str = "trainer-1", **peer_options) -> Peer:
    trainer = Peer(context, relay.ports.trainer_port, name, **peer_options)
    trainer.hello("trainer")
    wait_until(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_trainer_connected") == 1, what="trainer hello")
    return trainer


def connected_worker(context: zmq.Context, relay: Relay, name: str) -> Peer:
    worker = Peer(context, relay.ports.worker_port, name)
    worker.hello("worker")
    wait_until(lambda: name in relay.workers.by_sender, what=f"{name} hello")
    return worker


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

