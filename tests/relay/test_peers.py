"""Peer registration: ids bound to connections and keys, bounded tables; internal errors never stop the relay."""

from __future__ import annotations

import pytest
import zmq
from tmrl_common.errors import ProtocolError
from tmrl_relay.peers import MAX_IDS_PER_KEY, PeerTable

from .relay_harness import connected_trainer, connected_worker, insecure_config, make_batch, relay_in_thread, wait_until


def test_an_id_stays_bound_to_its_first_key_across_reconnections():
    table = PeerTable("worker", max_peers=10)
    table.register(b"conn-1", "worker-1", "KEY-A")
    peer, previous = table.register(b"conn-2", "worker-1", "KEY-A")  # same key, new connection: fine
    assert previous is not None and previous.routing_id == b"conn-1"
    assert table.check(b"conn-2", "worker-1", "KEY-A") is peer
    with pytest.raises(ProtocolError, match="said hello on another connection since this one did"):
        table.check(b"conn-1", "worker-1", "KEY-A")  # the old connection is forgotten, and told why
    with pytest.raises(ProtocolError, match="sent before saying hello"):
        table.check(b"conn-9", "worker-9", "KEY-A")  # an id never registered
    with pytest.raises(ProtocolError, match="sent before saying hello on this connection"):
        table.check(b"conn-4", "worker-1", "KEY-A")  # a new connection (a reconnection) under a bound id, no hello yet
    with pytest.raises(ProtocolError, match="bound to another"):
        table.register(b"conn-3", "worker-1", "KEY-B")
    with pytest.raises(ProtocolError, match="sent before saying hello on this connection"):
        table.check(b"conn-3", "worker-1", "KEY-B")  # its hello was refused: it never said one
    table.register(b"conn-1", "worker-1", "KEY-A")  # the displaced connection takes its id back
    assert table.check(b"conn-1", "worker-1", "KEY-A").routing_id == b"conn-1"
    with pytest.raises(ProtocolError, match="said hello on another connection since this one did"):
        table.check(b"conn-2", "worker-1", "KEY-A")  # and now the other one is the displaced one


def test_one_key_may_bind_a_bounded_number_of_ids():
    table = PeerTable("worker", max_peers=100)
    for index in range(MAX_IDS_PER_KEY):
        table.register(f"c{index}".encode(), f"worker-{index}", "KEY-A")
    with pytest.raises(ProtocolError, match="its own key"):
        table.register(b"c-extra", "worker-extra", "KEY-A")


def test_the_longest_silent_peer_is_forgotten_past_max_peers():
    table = PeerTable("worker", max_peers=2)
    first, _ = table.register(b"a", "w-a", None)
    first.last_seen -= 100
    table.register(b"b", "w-b", None)
    table.register(b"c", "w-c", None)
    assert sorted(table.by_sender) == ["w-b", "w-c"]


def test_a_failing_handler_is_counted_and_the_relay_keeps_serving():
    context = zmq.Context()
    try:
        with relay_in_thread(insecure_config()) as relay:
            trainer = connected_trainer(context, relay)
            worker = connected_worker(context, relay, "worker-1")
            original = relay._on_worker_message
            calls = []

            def flaky(frames):
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("simulated bug")
                return original(frames)

            relay._on_worker_message = flaky
            worker.send(make_batch(1))  # hits the simulated bug
            worker.send(make_batch(2))
            assert trainer.recv_type("sample_batch")[1].seq == 2
            wait_until(lambda: relay.metrics.reject_count("internal", "workers") == 1, what="internal error counted")
    finally:
        context.destroy(linger=0)
