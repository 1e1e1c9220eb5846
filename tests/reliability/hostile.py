"""Hostile input against a real relay process (over loopback sockets) and the trainer's ingest path, shared by
``test_hostile_input.py`` and ``benchmarks/reliability_report.py``. Each function raises :class:`AssertionError` when
something crashed, went uncounted, or good traffic stopped flowing, and returns what it measured.

What is compared ("every reject is counted"):

* relay: ``tmrl_relay_received_messages_total{link}`` equals the messages sent on that link (each one was read and
  judged); ``tmrl_relay_rejects_total`` by reason; ``tmrl_relay_batches_forwarded_total`` equals the batches a
  trainer peer received; no ``internal`` reject; afterwards a good batch still goes through.
* trainer ingest: every message ends in exactly one bucket: stored, duplicate, rejected (per reason), or a valid
  control message (``hello``/``heartbeat``), and the buckets add up to the messages tried.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import zmq
from faults import metric_sum, scrape
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.curve import generate_key_pair
from tmrl_common.layout import tm20_lidar_layout
from tmrl_common.protocol import (
    Heartbeat,
    Hello,
    SampleAck,
    SampleBatch,
    WeightsUpdate,
    decode,
    encode,
)
from tmrl_common.sockets import SecurityConfig, TransportConfig, apply_transport, secure_client_socket, tcp_endpoint
from tmrl_common.weights import tensors_to_bytes
from tmrl_stack import LocalStack, wait_until
from tmrl_trainer.ingest import Ingestor
from tmrl_trainer.memory import ReplayMemory

LAYOUT = tm20_lidar_layout()
MAX_BODY_BYTES = 64 * 1024
MAX_WEIGHTS_BYTES = 1024 * 1024
FRAME_CAP = 2 * MAX_WEIGHTS_BYTES
"""Frames above this make ZeroMQ drop the connection (``ZMQ_MAXMSGSIZE``) before the relay sees a message."""
CLIENT_TRANSPORT = TransportConfig(linger_ms=0, reconnect_ivl_ms=50, reconnect_ivl_max_ms=500)
RELAY_CONFIG = f"""
[relay]
bind_host = "127.0.0.1"
max_body_bytes = {MAX_BODY_BYTES}
max_control_bytes = 4096
max_weights_bytes = {MAX_WEIGHTS_BYTES}
"""


# ----------------------------------------------------------------------------------------------- messages


def sample_batch(seq: int, steps: int = 4, seed: int = 0) -> SampleBatch:
    """A valid batch in the simulator's (TrackMania LIDAR) layout."""
    rng = np.random.default_rng(seed * 100_003 + seq)

    def observation():
        return (rng.uniform(0, 300, (1,)).astype(np.float32),
                rng.uniform(0, 1, LAYOUT.components[1].observation_shape).astype(np.float32),
                *[np.zeros(LAYOUT.action_dim, np.float32) for _ in range(LAYOUT.action_history)])

    builder = SampleBatchBuilder(LAYOUT)
    builder.add_reset(observation())
    for _ in range(steps - 1):
        builder.add_step(rng.uniform(-1, 1, (LAYOUT.action_dim,)).astype(np.float32), observation(), 1.0, False, False)
    return builder.build(seq=seq, weights_version=0)


def with_nan_rewards(frames: list[bytes]) -> list[bytes]:
    """The same batch with NaN rewards (a well-formed message whose numbers are poison)."""
    body = msgpack.unpackb(frames[1])
    rewards = body["rewards"]
    rewards["data"] = np.full(rewards["shape"], np.nan, np.float32).tobytes()
    return [frames[0], msgpack.packb(body)]


def with_envelope(frames: list[bytes], **fields) -> list[bytes]:
    envelope = msgpack.unpackb(frames[0])
    envelope.update(fields)
    return [msgpack.packb(envelope), *frames[1:]]


def mutate(rng: random.Random, frames: list[bytes], senders: list[str]) -> list[bytes]:
    """One hostile variant of a valid message: random frames, wrong frame counts, envelope field swaps (version,
    type, sender, timestamp), msgpack of the wrong shape, or byte flips / truncations / insertions."""
    kind = rng.random()
    if kind < 0.08:
        return [rng.randbytes(rng.randint(0, 96)) for _ in range(rng.randint(1, 4))]
    if kind < 0.14:
        return frames[:1] if rng.random() < 0.5 else [*frames, rng.randbytes(rng.randint(0, 16))]
    if kind < 0.30:
        field, value = rng.choice([
            ("v", rng.choice([0, 2, 255, -1, "1", 1.0, None, True])),
            ("type", rng.choice(["sample_batch", "hello", "heartbeat", "sample_ack", "weights_update", "error", "x", 7])),
            ("sender", rng.choice([*senders, "", "a" * 65, "bad id!", 3])),
            ("sent_at", rng.choice([float("nan"), float("inf"), -1.0, "now", None])),
        ])
        return with_envelope(frames, **{field: value})
    if kind < 0.40:
        junk = rng.choice([{}, [], 1, "x", None, 2.5, {"seq": -1}, {"role": "worker"}, {"seqs": [-1]},
                           {"worker": "w", "seqs": list(range(5000))}, {"first": {"dtype": "bool", "shape": [-3]}}])
        return [frames[0], msgpack.packb(junk)]
    mutated = [bytearray(frame) for frame in frames]
    for _ in range(rng.randint(1, 6)):
        frame = mutated[rng.randrange(len(mutated))]
        action = rng.random()
        if frame and action < 0.6:
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        elif frame and action < 0.8:
            del frame[rng.randrange(len(frame)):]
        else:
            position = rng.randrange(len(frame) + 1)
            frame[position:position] = rng.randbytes(rng.randint(1, 8))
    return [bytes(frame) for frame in mutated]


# ------------------------------------------------------------------------------------------------- relay


class RelayProcess:
    """``tmrl-relay run`` alone (a :class:`~tmrl_stack.LocalStack` of one) on fresh loopback ports, with its
    Prometheus endpoint; CurveZMQ with keys for ``curve_clients`` (in ``root/keys``, allow-listed) when given."""

    def __init__(self, root: Path, name: str = "relay", curve_clients: tuple[str, ...] | None = None) -> None:
        config = root / f"{name}.toml"
        config.write_text(RELAY_CONFIG)
        self.stack = LocalStack(root, config=config, curve_clients=curve_clients, metrics=True)
        self.name = name
        self.worker_port, self.trainer_port, self.weights_port, self.metrics_port = self.stack.ports
        self.stack.start_relay(name=name)
        wait_until(self._serving, 30, self.stack, "the relay serving metrics", name)

    def _serving(self) -> bool:
        try:
            self.metrics()
        except OSError:
            return False
        return True

    @property
    def pid(self) -> int:
        return self.stack.processes[self.name].pid

    def alive(self) -> bool:
        return self.stack.processes[self.name].poll() is None

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def value(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def rejects(self) -> dict[str, int]:
        """``{"link/reason": count}`` of every reject so far."""
        out = {}
        for key, value in self.metrics().items():
            if key.startswith("tmrl_relay_rejects_total{") and value:
                labels = dict(part.split("=") for part in key[len("tmrl_relay_rejects_total{"):-1].split(","))
                out[f"{labels['link'].strip(chr(34))}/{labels['reason'].strip(chr(34))}"] = int(value)
        return out

    def stop(self) -> int:
        try:
            return self.stack.stop(self.name)
        finally:
            self.stack.kill_all()


class Client:
    """A DEALER connected to one relay port, speaking as ``sender``."""

    def __init__(self, context: zmq.Context, port: int, sender: str, security: SecurityConfig | None = None) -> None:
        self.sender = sender
        self.socket = context.socket(zmq.DEALER)
        apply_transport(self.socket, CLIENT_TRANSPORT)
        secure_client_socket(self.socket, security or SecurityConfig(insecure=True))
        self.socket.connect(tcp_endpoint("127.0.0.1", port))
        self.socket.setsockopt(zmq.SNDTIMEO, 10_000)  # a stuck relay fails the run instead of hanging it
        self.received: Counter[str] = Counter()
        self.batch_seqs: list[int | None] = []
        self.raw_batches: dict[int | None, list[bytes]] = {}
        self.forwarded: list[list[bytes]] = []

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def say(self, message, sender: str | None = None) -> None:
        self.send(encode(message, sender or self.sender))

    def try_say(self, message, sender: str | None = None) -> bool:
        """:meth:`say` without waiting: False when the socket has no connection to queue on. A client whose CURVE
        handshake the relay refused has none once the refusal arrives (libzmq ends the session), so what it says
        after that moment cannot leave the socket; before it, the message is queued and then dropped with the
        connection. Either way nothing may reach the relay, which is what the callers check."""
        try:
            self.socket.send_multipart(encode(message, sender or self.sender), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def drain(self, timeout_ms: int = 0) -> None:
        """Read everything queued (waiting up to ``timeout_ms`` for the first message), counting envelope types and
        keeping forwarded batches' raw frames by seq. Bodies are not decoded: the relay forwards batch bodies
        unchecked (the trainer's ingest judges them), so a mutated one may legitimately arrive here."""
        while self.socket.poll(timeout_ms):
            timeout_ms = 0
            frames = self.socket.recv_multipart()
            envelope = msgpack.unpackb(frames[0])
            self.received[envelope["type"]] += 1
            if envelope["type"] == "sample_batch":
                seq = _batch_seq(frames[1])
                self.batch_seqs.append(seq)
                self.raw_batches[seq] = frames
                self.forwarded.append(frames)

    def has_batch(self, seq: int) -> bool:
        self.drain(50)
        return seq in self.raw_batches

    def close(self) -> None:
        self.socket.close(linger=0)


def _batch_seq(body: bytes) -> int | None:
    try:
        head = msgpack.unpackb(body)
        return head.get("seq") if isinstance(head, dict) else None
    except Exception:  # a mutated body the relay forwarded unread: the trainer's ingest rejects it
        return None


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _weights(version: int) -> WeightsUpdate:
    tensors = {"w": np.random.default_rng(version).normal(size=(256,)).astype(np.float32)}
    return WeightsUpdate.build(version=version, architecture={"kind": "fuzz"}, tensors=tensors_to_bytes(tensors))


def relay_fuzz(root: Path, count: int = 10_000, seed: int = 20261125) -> dict:
    """``count`` random and mutated messages over real sockets into a relay process (about 60 % on the workers link,
    40 % on the trainer link), then a good batch that must still reach the trainer peer."""
    relay = RelayProcess(root, "relay-fuzz")
    context = zmq.Context()
    try:
        trainer = Client(context, relay.trainer_port, "fz-trainer")
        worker = Client(context, relay.worker_port, "fz-worker")
        trainer.say(Hello(role="trainer", software="fuzz"))
        worker.say(Hello(role="worker", software="fuzz"))
        sent = Counter({"trainer": 1, "workers": 1})
        _wait(lambda: relay.value("tmrl_relay_trainer_connected") == 1 and relay.value("tmrl_relay_connected_workers") == 1,
              10, "the fuzz peers registering")
        senders = ["fz-worker", "fz-trainer", "other-worker"]
        corpus = {
            "workers": [encode(sample_batch(seq), "fz-worker") for seq in range(1, 6)]
            + [encode(Hello(role="worker", software="fuzz", next_seq=3), "fz-worker"),
               encode(Heartbeat(role="worker", uptime_s=1.0, counters={"batches": 1}), "fz-worker")],
            "trainer": [encode(SampleAck(worker="fz-worker", seqs=[1, 2]), "fz-trainer"), encode(_weights(1), "fz-trainer"),
                        encode(Hello(role="trainer", software="fuzz"), "fz-trainer"),
                        encode(Heartbeat(role="trainer", uptime_s=1.0), "fz-trainer")],
        }
        hellos = {"workers": encode(Hello(role="worker", software="fuzz"), "fz-worker"),
                  "trainer": encode(Hello(role="trainer", software="fuzz"), "fz-trainer")}
        peers = {"workers": worker, "trainer": trainer}
        rng = random.Random(seed)
        started = time.perf_counter()
        for index in range(count):
            link = "workers" if rng.random() < 0.6 else "trainer"
            if index % 250 == 0:  # say hello again now and then, so later messages get past the sender check
                for name, frames in hellos.items():
                    peers[name].send(frames)
                    sent[name] += 1
            peers[link].send(mutate(rng, rng.choice(corpus[link]), senders))
            sent[link] += 1
            if index % 32 == 0:
                trainer.drain()
                worker.drain()
        fuzz_seconds = time.perf_counter() - started
        _wait(lambda: all(relay.value("tmrl_relay_received_messages_total", link=link) >= sent[link] for link in sent),
              30, "the relay reading every fuzz message")
        assert relay.alive(), "the relay died under fuzzing"
        # good traffic still flows: a fresh hello and batch reach the trainer peer
        good_seq = 10_000_000
        worker.say(Hello(role="worker", software="fuzz"))
        worker.say(sample_batch(good_seq))
        sent["workers"] += 2
        _wait(lambda: trainer.has_batch(good_seq), 10, "a good batch after the fuzz run")
        worker.drain(100)
        metrics = relay.metrics()
        received = {link: int(metric_sum(metrics, "tmrl_relay_received_messages_total", link=link)) for link in sent}
        assert received == dict(sent), f"the relay read {received} messages, {dict(sent)} were sent"
        rejects = relay.rejects()
        forwarded = int(metric_sum(metrics, "tmrl_relay_batches_forwarded_total"))
        assert forwarded == trainer.received["sample_batch"], (forwarded, trainer.received)
        assert not any(key.endswith("/internal") for key in rejects), rejects
        errors_sent = int(metric_sum(metrics, "tmrl_relay_errors_sent_total"))
        assert errors_sent <= sum(rejects.values())
        # what the relay let through (it reads only a batch's head) goes on into the trainer's ingest: counted there
        ingest, _ = trainer_ingestor()
        ingest_log = logging.getLogger("tmrl_trainer.ingest")
        level = ingest_log.level
        ingest_log.setLevel(logging.ERROR)
        try:
            for frames in trainer.forwarded:
                ingest.handle(frames)
        finally:
            ingest_log.setLevel(level)
        at_trainer = ingest.snapshot()
        trainer_buckets = {"stored": at_trainer["batches_stored"], "duplicate": at_trainer["duplicates"],
                           **{f"rejected/{k}": v for k, v in at_trainer["rejects"].items()}}
        assert sum(trainer_buckets.values()) == len(trainer.forwarded), (trainer_buckets, len(trainer.forwarded))
        assert relay.stop() == 0, "the relay did not stop cleanly after the fuzz run"
        return {"messages": count, "sent_per_link": dict(sent), "read_per_link": received, "rejects": rejects,
                "rejected": sum(rejects.values()), "forwarded_batches": forwarded, "errors_sent": errors_sent,
                "errors_received_by_worker": worker.received["error"], "forwarded_at_trainer_ingest": trainer_buckets,
                "seconds": round(fuzz_seconds, 2)}
    finally:
        context.destroy(linger=0)
        relay.stack.kill_all()


def relay_edge_cases(root: Path) -> dict:
    """Oversized frames (counted, and beyond the socket cap: connection dropped), a wrong protocol version, NaN
    samples (forwarded untouched by the relay, rejected by the trainer's ingest), over a real relay process."""
    relay = RelayProcess(root, "relay-edges")
    context = zmq.Context()
    try:
        trainer = Client(context, relay.trainer_port, "edge-trainer")
        worker = Client(context, relay.worker_port, "edge-worker")
        trainer.say(Hello(role="trainer", software="edge"))
        worker.say(Hello(role="worker", software="edge"))
        _wait(lambda: relay.value("tmrl_relay_connected_workers") == 1 and relay.value("tmrl_relay_trainer_connected") == 1,
              10, "edge peers registering")
        results = {}

        big = encode(sample_batch(1, steps=max(8, MAX_BODY_BYTES // (LAYOUT.components[1].frame_shape[0] * 4) + 64)),
                     "edge-worker")
        assert MAX_BODY_BYTES < len(big[1]) < FRAME_CAP, len(big[1])
        worker.send(big)
        _wait(lambda: relay.value("tmrl_relay_rejects_total", reason="oversized", link="workers") == 1, 10, "oversized")
        results["oversized body (counted)"] = relay.rejects().get("workers/oversized", 0)

        worker.send(with_envelope(encode(sample_batch(2), "edge-worker"), v=2))
        _wait(lambda: relay.value("tmrl_relay_rejects_total", reason="bad_version", link="workers") == 1, 10, "bad_version")
        results["protocol version 2"] = relay.rejects().get("workers/bad_version", 0)

        read_before = relay.value("tmrl_relay_received_messages_total", link="workers")
        dropped_before = relay.value("tmrl_relay_disconnects_total", link="workers")
        intruder = Client(context, relay.worker_port, "edge-huge")
        intruder.send([encode(Heartbeat(role="worker", uptime_s=0.0), "edge-huge")[0], bytes(FRAME_CAP + 1024)])
        _wait(lambda: relay.value("tmrl_relay_disconnects_total", link="workers") > dropped_before, 10,
              "the connection dropped for a frame over the cap to be counted")
        intruder.close()
        results["frame over the socket cap (connection dropped, not read)"] = int(
            relay.value("tmrl_relay_received_messages_total", link="workers") - read_before)
        assert results["frame over the socket cap (connection dropped, not read)"] == 0
        results["dropped connections counted (tmrl_relay_disconnects_total)"] = int(
            relay.value("tmrl_relay_disconnects_total", link="workers") - dropped_before)

        nan_frames = with_nan_rewards(encode(sample_batch(3), "edge-worker"))
        worker.send(nan_frames)
        _wait(lambda: trainer.has_batch(3), 10, "the NaN batch forwarded (the relay does not decode bodies)")
        ingest, memory = trainer_ingestor()
        ingest.handle(trainer.raw_batches[3])  # the frames exactly as the relay forwarded them
        assert ingest.snapshot()["rejects"] == {"non_finite": 1} and len(memory) == 0, ingest.snapshot()
        results["NaN rewards (rejected by trainer ingest)"] = ingest.snapshot()["rejects"]["non_finite"]

        worker.say(sample_batch(4))
        _wait(lambda: trainer.has_batch(4), 10, "a good batch after the edge cases")
        assert relay.alive()
        rejects = relay.rejects()
        assert relay.stop() == 0
        return {"cases": results, "rejects": rejects}
    finally:
        context.destroy(linger=0)
        relay.stack.kill_all()


def curve_cases(root: Path) -> dict:
    """CurveZMQ on: a client whose key is not allow-listed cannot get a message in; an allow-listed worker that
    claims another worker's id is rejected (``unknown_sender``); the real workers' batches still go through."""
    relay = RelayProcess(root, "relay-curve", curve_clients=("trainer", "worker-a", "worker-b"))
    keys, _ = relay.stack.keys
    generate_key_pair(keys, "intruder")  # a valid key pair, not in the allow-list

    def security(name: str) -> SecurityConfig:
        return SecurityConfig(secret_key_file=keys / f"{name}.key_secret", server_public_key_file=keys / "relay.key")

    context = zmq.Context()
    try:
        trainer = Client(context, relay.trainer_port, "trainer", security("trainer"))
        trainer.say(Hello(role="trainer", software="curve"))
        worker_a = Client(context, relay.worker_port, "worker-a", security("worker-a"))
        worker_a.say(Hello(role="worker", software="curve"))
        _wait(lambda: relay.value("tmrl_relay_connected_workers") == 1 and relay.value("tmrl_relay_trainer_connected") == 1,
              10, "allow-listed peers registering")
        read_before = relay.value("tmrl_relay_received_messages_total", link="workers")

        intruder = Client(context, relay.worker_port, "intruder", security("intruder"))
        intruder.try_say(Hello(role="worker", software="intruder"))
        intruder.try_say(sample_batch(1), sender="intruder")  # may find the session already ended: see try_say
        _wait(lambda: relay.value("tmrl_relay_handshake_failures_total", link="workers", kind="auth") >= 1, 10,
              "the intruder's handshake being refused")
        time.sleep(0.3)
        intruder_read = relay.value("tmrl_relay_received_messages_total", link="workers") - read_before
        assert intruder_read == 0, f"{intruder_read} messages of a client without an allow-listed key were read"
        intruder.close()

        impostor = Client(context, relay.worker_port, "worker-a", security("worker-b"))
        impostor.say(Hello(role="worker", software="impostor"))
        impostor.say(sample_batch(99))
        _wait(lambda: relay.value("tmrl_relay_rejects_total", reason="unknown_sender", link="workers") >= 2, 10,
              "the impostor's hello and batch being rejected")
        impostor.drain(200)
        worker_a.say(sample_batch(5))
        _wait(lambda: trainer.has_batch(5), 10, "worker-a's batch after the impostor")
        assert 99 not in trainer.batch_seqs, "the impostor's batch reached the trainer"
        rejects = relay.rejects()
        handshake = int(relay.value("tmrl_relay_handshake_failures_total", link="workers", kind="auth"))
        assert relay.stop() == 0
        return {"intruder_handshakes_refused": handshake, "intruder_messages_read": int(intruder_read),
                "impostor_rejects": rejects.get("workers/unknown_sender", 0),
                "impostor_errors_received": impostor.received["error"], "impostor_batches_forwarded": 0}
    finally:
        context.destroy(linger=0)
        relay.stack.kill_all()


# ------------------------------------------------------------------------------------------- trainer ingest


def trainer_ingestor() -> tuple[Ingestor, ReplayMemory]:
    """The trainer's ingest path (decode, validate, dedupe, store) on the simulator layout, with its replay memory."""
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    return Ingestor("trainer", LAYOUT, store=memory.add_batch), memory


def ingest_fuzz(count: int = 10_000, seed: int = 20261126) -> dict:
    """``count`` random and mutated messages through the trainer's ingest path (decode, validate, dedupe, store):
    each lands in exactly one bucket and the buckets add up."""
    ingest, _ = trainer_ingestor()
    senders = ["w1", "w2", "trainer"]
    corpus = [encode(sample_batch(seq, seed=1), "w1") for seq in range(8)]
    corpus += [with_nan_rewards(encode(sample_batch(100), "w1")),
               encode(Hello(role="worker", software="fuzz", layout=LAYOUT, next_seq=2), "w1"),
               encode(Heartbeat(role="worker", uptime_s=3.0), "w2"), encode(SampleAck(worker="w1", seqs=[1]), "w1")]
    rng = random.Random(seed)
    buckets: Counter[str] = Counter()
    started = time.perf_counter()
    ingest_log = logging.getLogger("tmrl_trainer.ingest")
    level = ingest_log.level
    ingest_log.setLevel(logging.ERROR)  # one warning per reject: thousands of lines; the counters are checked instead
    try:
        _fuzz_ingest(ingest, corpus, senders, rng, buckets, count)
    finally:
        ingest_log.setLevel(level)
    seconds = time.perf_counter() - started
    assert sum(buckets.values()) == count
    snapshot = ingest.snapshot()
    assert sum(snapshot["rejects"].values()) == sum(v for k, v in buckets.items() if k.startswith("rejected/"))
    return {"messages": count, "buckets": dict(sorted(buckets.items())), "seconds": round(seconds, 2)}


def _fuzz_ingest(ingest: Ingestor, corpus: list, senders: list[str], rng: random.Random, buckets: Counter,
                 count: int) -> None:
    for _ in range(count):
        frames = mutate(rng, rng.choice(corpus), senders) if rng.random() < 0.9 else rng.choice(corpus)
        before = ingest.snapshot()
        ingest.handle(frames)
        after = ingest.snapshot()
        changes = {"stored": after["batches_stored"] - before["batches_stored"],
                   "duplicate": after["duplicates"] - before["duplicates"],
                   **{f"rejected/{reason}": after["rejects"].get(reason, 0) - before["rejects"].get(reason, 0)
                      for reason in after["rejects"]}}
        landed = [name for name, delta in changes.items() if delta]
        if not landed:  # must be a valid message that needs no storing
            _, message = decode(frames)
            assert isinstance(message, Hello | Heartbeat), f"{type(message).__name__} left no trace"
            landed = ["control"]
        assert len(landed) == 1 and sum(changes.values()) <= 1, changes
        buckets[landed[0]] += 1
