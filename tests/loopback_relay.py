"""A bare ROUTER socket on loopback standing in for the relay, for tests of the links that connect to it, and
:func:`wait_for` to poll a condition that another thread makes true (importable from any test folder)."""

from __future__ import annotations

import time

import zmq
from tmrl_common.protocol import Heartbeat, SampleAck, decode, encode


def bind_router(context: zmq.Context, port: int = 0) -> tuple[zmq.Socket, int]:
    """A ROUTER (``LINGER`` 0) bound on 127.0.0.1: on a random free port, or on ``port`` again after a stand-in
    there was closed (ZeroMQ releases a port asynchronously, so binding is retried for up to 5 s)."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    if not port:
        return router, router.bind_to_random_port("tcp://127.0.0.1")
    deadline = time.monotonic() + 5.0
    while True:
        try:
            router.bind(f"tcp://127.0.0.1:{port}")
            return router, port
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                router.close(linger=0)
                raise
            time.sleep(0.05)


def wait_for(condition, timeout_s: float = 5.0) -> None:
    """Poll ``condition()`` until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.01)


class FakeRelay:
    """The relay's side of one link: receives decoded messages from its peers and sends them acks."""

    def __init__(self, context: zmq.Context, port: int = 0) -> None:
        self.socket, self.port = bind_router(context, port)

    def receive(self, timeout_s: float = 5.0):
        """``(routing_id, envelope, message)`` of the next message."""
        if not self.socket.poll(int(timeout_s * 1000)):
            raise AssertionError(f"nothing received within {timeout_s}s")
        routing_id, *frames = self.socket.recv_multipart()
        envelope, message = decode(frames)
        return routing_id, envelope, message

    def receive_type(self, cls, timeout_s: float = 5.0):
        """Like :meth:`receive`, skipping messages of other types (heartbeats...) for up to ``timeout_s`` in all."""
        deadline = time.monotonic() + timeout_s
        while True:
            routing_id, envelope, message = self.receive(max(0.001, deadline - time.monotonic()))
            if isinstance(message, cls):
                return routing_id, envelope, message

    def ack(self, routing_id: bytes, worker: str, seqs: list[int], outcome: str = "stored", reason: str = "") -> None:
        ack = SampleAck(worker=worker, seqs=seqs, outcome=outcome, reason=reason)
        self.socket.send_multipart([routing_id, *encode(ack, "relay")])

    def heartbeat(self, routing_id: bytes) -> None:
        """Answer as the relay answers a registered peer's heartbeat: the link then knows its hello was taken."""
        self.socket.send_multipart([routing_id, *encode(Heartbeat(role="relay", uptime_s=1.0), "relay")])

    def close(self) -> None:
        self.socket.close(linger=0)
