"""10,000+ random and mutated frames through the relay's message handlers: only counted rejects, never a crash."""

from __future__ import annotations

import random

import msgpack
import zmq
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import Heartbeat, Hello, SampleAck, encode
from tmrl_relay.broker import Relay
from tmrl_relay.metrics import RelayMetrics

from .relay_harness import insecure_config, make_batch, make_weights

WORKER, TRAINER = b"\x00fuzz-worker", b"\x00fuzz-trainer"


def _valid_messages() -> dict[str, list[list[bytes]]]:
    return {
        "workers": [encode(make_batch(3), "worker-1"), encode(Hello(role="worker", software="w"), "worker-1"),
                    encode(Heartbeat(role="worker", uptime_s=1.0, counters={"a": 1}), "worker-1")],
        "trainer": [encode(SampleAck(worker="worker-1", seqs=[1, 2]), "trainer-1"), encode(make_weights(2, 512), "trainer-1"),
                    encode(Hello(role="trainer", software="t"), "trainer-1"),
                    encode(Heartbeat(role="trainer", uptime_s=2.0), "trainer-1")],
    }


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    choice = rng.random()
    if choice < 0.1:
        return [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(0, 4))]
    if choice < 0.2:  # valid msgpack, wrong shapes
        junk = rng.choice([{}, [], 1, "x", {"v": 1}, {"seq": -1, "first": {"shape": [rng.randint(-2, 3)]}}, None, 2.5])
        return [frames[0], msgpack.packb(junk)] if rng.random() < 0.5 else [msgpack.packb(junk), frames[1]]
    mutated = [bytearray(frame) for frame in frames]
    for _ in range(rng.randint(1, 6)):
        frame = mutated[rng.randrange(len(mutated))]
        action = rng.random()
        if frame and action < 0.6:
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        elif frame and action < 0.8:
            del frame[rng.randrange(len(frame)):]
        else:
            frame[rng.randrange(len(frame) + 1):0] = rng.randbytes(rng.randint(1, 8))
    return [bytes(frame) for frame in mutated]


def test_ten_thousand_hostile_messages_are_only_ever_counted_rejects():
    relay = Relay(insecure_config(max_weights_bytes=64 * 1024), RelayMetrics())
    relay.bind()
    try:
        handlers = {"workers": (relay._on_worker_message, WORKER), "trainer": (relay._on_trainer_message, TRAINER)}
        register = {"workers": encode(Hello(role="worker", software="w"), "worker-1"),
                    "trainer": encode(Hello(role="trainer", software="t"), "trainer-1")}
        rng = random.Random(20261125)
        valid = _valid_messages()
        tried = rejected = 0
        for index in range(10_000):
            link = "workers" if index % 2 else "trainer"
            handle, routing_id = handlers[link]
            if index % 500 < 2:  # re-register now and then so the later checks (not only "unknown_sender") are reached
                handle([zmq.Frame(routing_id)] + [zmq.Frame(f) for f in register[link]])
            frames = [zmq.Frame(routing_id)] + [zmq.Frame(f) for f in _mutate(rng, rng.choice(valid[link]))]
            tried += 1
            try:
                handle(frames)
            except ProtocolError as exc:
                rejected += 1
                relay._reject(relay.workers_socket if link == "workers" else relay.trainer_socket, link, frames, exc)
        counted = sum(
            relay.metrics.registry.get_sample_value("tmrl_relay_rejects_total", {"reason": reason, "link": link}) or 0
            for link in handlers for reason in
            ("malformed", "bad_version", "unknown_type", "schema", "non_finite", "unknown_sender", "oversized", "duplicate")
        )
        assert tried == 10_000
        assert counted == rejected
        assert rejected > 8_000  # almost every mutation is caught at the relay
        assert relay.metrics.registry.get_sample_value("tmrl_relay_rejects_total", {"reason": "internal", "link": "workers"}) is None
    finally:
        relay.stop()
        relay.run()  # closes the sockets
