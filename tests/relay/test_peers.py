"""Peer registration: ids bound to connections and keys, bounded tables; internal errors never stop the relay."""

from __future__ import annotations

import pytest
import zmq
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import Heartbeat, Hello, encode
from tmrl_relay.peers import MAX_IDS_PER_KEY, DisplacedConnection, PeerTable

from .relay_harness import (
    Peer,
    connected_trainer,
    connected_worker,
    insecure_config,
    make_batch,
    relay_in_thread,
    wait_until,
)


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


def test_a_displaced_connection_tells_its_late_bytes_from_a_second_process_by_the_senders_clock():
    table = PeerTable("worker", max_peers=10)
    table.register(b"conn-1", "worker-1", None, sent_at=1000.0)
    table.register(b"conn-2", "worker-1", None, sent_at=1030.0)  # the peer took conn-1 as dead and connected again
    with pytest.raises(DisplacedConnection) as displaced:
        table.check(b"conn-1", "worker-1", None)
    assert displaced.value.reason == "unknown_sender"
    assert displaced.value.sent_before_replacement(1012.5) == 17.5  # sent on conn-1 before the new hello: late bytes
    assert displaced.value.sent_before_replacement(1030.0) is None  # sent after it: another process under the id
    assert displaced.value.sent_before_replacement(1031.0) is None
    table.register(b"conn-3", "worker-1", None)  # a hello whose time is not known: never taken for late bytes
    with pytest.raises(DisplacedConnection) as unknown:
        table.check(b"conn-2", "worker-1", None)
    assert unknown.value.sent_before_replacement(0.0) is None


def test_late_bytes_of_a_replaced_connection_are_an_info_line_and_a_second_process_a_warning(caplog):
    """Network probe: a worker that took a black-holed connection as dead connected again; when the path came back,
    the relay got the heartbeats it had sent on the old connection, and warned "two processes under one id?" about
    one process."""
    caplog.set_level("INFO", logger="tmrl_relay.broker")
    context = zmq.Context()
    hello_at = 1_800_000_000.0

    def lines_about(text: str) -> list:
        return [record for record in caplog.records if text in record.getMessage()]

    try:
        with relay_in_thread(insecure_config()) as relay:
            old = Peer(context, relay.ports.worker_port, "worker-1")
            new = Peer(context, relay.ports.worker_port, "worker-1")
            old.send_frames(encode(Hello(role="worker", software="test"), "worker-1", sent_at=hello_at - 40))
            wait_until(lambda: "worker-1" in relay.workers.by_sender, what="the first hello")
            first = relay.workers.by_sender["worker-1"].routing_id
            new.send_frames(encode(Hello(role="worker", software="test"), "worker-1", sent_at=hello_at))
            wait_until(lambda: relay.workers.by_sender["worker-1"].routing_id != first, what="the second hello")
            old.send_frames(encode(Heartbeat(role="worker", uptime_s=1.0), "worker-1", sent_at=hello_at - 12.5))
            wait_until(lambda: lines_about("ignored heartbeat from worker-1"), what="the late heartbeat's line")
            late = lines_about("ignored heartbeat from worker-1")
            assert [record.levelname for record in late] == ["INFO"]
            assert "sent 12.5 s before it said hello on a new connection" in late[0].getMessage()
            assert not lines_about("two processes")
            assert relay.metrics.reject_count("unknown_sender", "workers") == 1  # rejected and counted all the same
            old.send_frames(encode(Heartbeat(role="worker", uptime_s=2.0), "worker-1", sent_at=hello_at + 3))
            wait_until(lambda: lines_about("two processes under one id?"), what="the second process's warning")
            assert [record.levelname for record in lines_about("two processes")] == ["WARNING"]
            assert relay.metrics.reject_count("unknown_sender", "workers") == 2
    finally:
        context.destroy(linger=0)


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
