"""The trainer's ingest thread over a real loopback socket (a bare ROUTER plays the relay, ``tests/loopback_relay.py``):
hello on every connection, batches acknowledged, bad messages counted by the ingestor without stopping the thread,
published weights sent and re-published to a relay that came back."""

from __future__ import annotations

import numpy as np
from loopback_relay import FakeRelay, wait_for
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import layout_for_box
from tmrl_common.protocol import Hello, SampleAck, WeightsUpdate, encode
from tmrl_common.sockets import SecurityConfig, TransportConfig
from tmrl_common.weights import tensors_to_bytes
from tmrl_trainer.ingest import Ingestor
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.relay_link import TrainerLink

LAYOUT = layout_for_box(3, 1)
FAST = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0)


def batch(worker: str, seq: int, rows: int = 4) -> list[bytes]:
    builder = SampleBatchBuilder(LAYOUT)
    builder.add_reset((np.zeros(3, np.float32),))
    for i in range(rows - 1):
        builder.add_step(np.array([0.2], np.float32), (np.full(3, i, np.float32),), 1.0, False, False)
    return encode(builder.build(seq=seq, weights_version=0), worker)


def weights(version: int) -> WeightsUpdate:
    return WeightsUpdate.build(version, {"kind": "test"}, tensors_to_bytes({"w": np.arange(4, dtype=np.float32)}))


def make_link(context, port: int, ingestor: Ingestor) -> TrainerLink:
    return TrainerLink("trainer-t", "127.0.0.1", port, FAST, SecurityConfig(insecure=True), ingestor, context=context)


def test_batches_are_acked_bad_messages_counted_and_weights_republished_after_a_relay_restart(context):
    memory = ReplayMemory(LAYOUT, capacity=100)
    ingestor = Ingestor("trainer-t", LAYOUT, store=memory.add_batch)
    relay = FakeRelay(context)
    port = relay.port
    link = make_link(context, port, ingestor)
    link.start()
    try:
        routing_id, _, hello = relay.receive_type(Hello)
        assert hello.role == "trainer" and hello.layout == LAYOUT
        relay.socket.send_multipart([routing_id, b"garbage", b"\x00"])
        relay.socket.send_multipart([routing_id, *batch("w1", 0)])
        _, _, ack = relay.receive_type(SampleAck)
        assert (ack.worker, ack.seqs) == ("w1", [0]) and len(memory) == 4
        assert ingestor.snapshot()["rejects"] == {"malformed": 1}
        wait_for(lambda: link.counters.acks_sent == 1)
        assert link.counters.received == 2

        link.publish(weights(1))
        assert relay.receive_type(WeightsUpdate)[2].version == 1
        relay.close()  # the relay restarts with an empty cache: the last weights go to it again, after a hello
        relay = FakeRelay(context, port)
        relay.receive_type(Hello, timeout_s=10.0)
        assert relay.receive_type(WeightsUpdate)[2].version == 1
        wait_for(lambda: link.counters.weights_sent == 2)
        assert link.counters.connections == 2
        assert link.counters.disconnections == 1 and link.connected and link.failure is None
    finally:
        link.stop()
        relay.close()


def test_an_error_inside_the_ingestor_is_counted_and_ingestion_goes_on(context):
    memory = ReplayMemory(LAYOUT, capacity=100)
    stored = []

    def store(worker, message):
        if message.seq == 0:
            raise RuntimeError("a bug while storing")
        stored.append(message.seq)
        return memory.add_batch(worker, message)

    relay = FakeRelay(context)
    link = make_link(context, relay.port, Ingestor("trainer-t", LAYOUT, store=store))
    link.start()
    try:
        routing_id, _, _ = relay.receive_type(Hello)
        relay.socket.send_multipart([routing_id, *batch("w1", 0)])
        relay.socket.send_multipart([routing_id, *batch("w1", 1)])
        _, _, ack = relay.receive_type(SampleAck)
        assert ack.seqs == [1] and stored == [1]
        assert link.counters.internal_errors == 1 and link.failure is None
    finally:
        link.stop()
        relay.close()
