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
    # what the relay's reject lines say each connection said hello as (a scaling probe's read "said hello as ?")
    assert [table.said_hello_as(c) for c in (b"conn-2", b"conn-1", b"conn-9")] == [
        "worker-1", "worker-1, since taken by a newer connection", "nothing (no hello on it)"]
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
            # counted apart, not as a reject (a pause re-check: a paused relay's alert on rejects fired for these)
            assert relay.metrics.reject_count("unknown_sender", "workers") == 0
            late_total = relay.metrics.registry.get_sample_value("tmrl_relay_late_messages_total", {"link": "workers"})
            assert late_total == 1
            old.send_frames(encode(Heartbeat(role="worker", uptime_s=2.0), "worker-1", sent_at=hello_at + 3))
            wait_until(lambda: lines_about("two processes under one id?"), what="the second process's warning")
            assert [record.levelname for record in lines_about("two processes")] == ["WARNING"]
            assert relay.metrics.reject_count("unknown_sender", "workers") == 1
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
    assert sorted(table.by_sender) == ["w-b", "w-c"] and table.forgotten_silent == 1


def test_a_full_table_of_live_peers_refuses_a_new_one_and_forgets_only_one_silent_past_the_timeout():
    """A scaling probe: 5 workers against max_workers = 3 forgot a live worker at each hello, so they displaced each
    other in turn (4-6 hellos each in 90 s), each told it had "sent before saying hello"."""
    table = PeerTable("worker", max_peers=3, live_within_s=10.0, limit_name="[relay] max_workers")
    peers = [table.register(f"c{index}".encode(), f"w{index}", None)[0] for index in range(3)]
    with pytest.raises(ProtocolError, match=r"\[unknown_sender\] the relay already registers 3 workers \(\[relay\] "
                                            r"max_workers\), all heard from within 10 s: 'w3' is not registered; it may "
                                            r"say hello again when one stops, or raise \[relay\] max_workers"):
        table.register(b"c3", "w3", None)
    assert sorted(table.by_sender) == ["w0", "w1", "w2"] and b"c3" not in table.by_routing_id
    assert table.check(b"c1", "w1", None) is peers[1]  # the registered ones go on as before
    table.register(b"c1-new", "w1", None)  # a registered id reconnecting is not a new peer
    table.register(b"c2", "w2", None)  # nor a hello again on its connection
    assert sorted(table.by_sender) == ["w0", "w1", "w2"] and table.forgotten_silent == 0
    peers[0].last_seen -= 10.5  # w0 stopped: silent past the timeout
    table.register(b"c3", "w3", None)
    assert sorted(table.by_sender) == ["w1", "w2", "w3"] and table.forgotten_silent == 1


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


def test_a_relay_at_max_workers_refuses_a_new_worker_by_name_and_keeps_serving_the_registered_ones():
    context = zmq.Context()
    peers = []
    try:
        with relay_in_thread(insecure_config(max_workers=2)) as relay:
            trainer = connected_trainer(context, relay)
            first, second = connected_worker(context, relay, "w1"), connected_worker(context, relay, "w2")
            third = Peer(context, relay.ports.worker_port, "w3")
            peers = [trainer, first, second, third]
            third.hello("worker")
            _, error = third.recv_type("error")
            assert error.reason == "unknown_sender" and "registers 2 workers ([relay] max_workers)" in error.message
            assert "'w3' is not registered" in error.message
            for seq, worker in enumerate((first, second, first), start=1):
                worker.send(make_batch(seq))
                envelope, batch = trainer.recv_type("sample_batch")
                assert (envelope.sender, batch.seq) == (worker.sender, seq)
            assert sorted(relay.workers.by_sender) == ["w1", "w2"]
    finally:
        for peer in peers:
            peer.close()
        context.term()
