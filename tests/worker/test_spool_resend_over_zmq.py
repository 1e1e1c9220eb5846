"""The sender thread over a real loopback socket: hello first, resend after the ack timeout and after a reconnection,
acks empty the spool. A bare ROUTER socket plays the relay (``tests/loopback_relay.py``)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from loopback_relay import FakeRelay, wait_for
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import layout_for_box
from tmrl_common.protocol import Hello, SampleBatch
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig
from tmrl_worker.relay_link import RelayLink
from tmrl_worker.spool import SequenceCounter, Spool

LAYOUT = layout_for_box(3, 1)


def filled_builder(rows: int) -> SampleBatchBuilder:
    builder = SampleBatchBuilder(LAYOUT)
    builder.add_reset((np.zeros(3, np.float32),))
    for i in range(rows - 1):
        builder.add_step(np.array([0.1], np.float32), (np.full(3, i, np.float32),), 1.0, False, False)
    return builder


def make_link(context, port: int, tmp_path, ack_timeout_s: float = 0.3, max_batches: int = 100,
              spool_directory=None) -> RelayLink:
    transport = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, heartbeat_ivl_ms=200,
                                heartbeat_timeout_ms=1000, linger_ms=0)
    return RelayLink(
        worker_id="w-test", layout=LAYOUT,
        endpoint=RelayEndpoint("127.0.0.1", port, transport, SecurityConfig(insecure=True)),
        sequence=SequenceCounter(tmp_path, "w-test", block=100, first_seq=0),
        spool=Spool(max_batches, 10_000_000, owner="w-test", directory=spool_directory),
        ack_timeout_s=ack_timeout_s, heartbeat_interval_s=0.2, context=context,
    )


def test_hello_first_then_resend_until_acked(context, tmp_path):
    relay = FakeRelay(context)
    link = make_link(context, relay.port, tmp_path)
    link.start()
    try:
        routing_id, envelope, hello = relay.receive_type(Hello)
        assert envelope.sender == "w-test" and hello.role == "worker" and hello.layout == LAYOUT and hello.next_seq == 0
        link.submit(filled_builder(5), weights_version=3)
        _, _, batch = relay.receive_type(SampleBatch)
        assert batch.seq == 0 and batch.steps == 5 and batch.weights_version == 3
        _, _, again = relay.receive_type(SampleBatch, timeout_s=3.0)  # no ack: resent after the 0.3 s timeout
        assert again.seq == 0
        relay.ack(routing_id, "w-test", [0])
        assert link.flush(timeout=3.0)
        snapshot = link.snapshot()
        assert snapshot["spool_acked"] == 1 and snapshot["spool_resent"] >= 1 and snapshot["spool_batches"] == 0
    finally:
        link.stop()
        relay.close()


def test_unacknowledged_batches_are_resent_after_a_reconnection(context, tmp_path, caplog):
    caplog.set_level("INFO", logger="tmrl_common.relay_client")
    relay = FakeRelay(context)
    port = relay.port
    link = make_link(context, port, tmp_path, ack_timeout_s=60.0)  # only the reconnection can trigger the resend
    link.start()
    try:
        relay.receive_type(Hello)
        link.submit(filled_builder(4), weights_version=1)
        link.submit(filled_builder(2), weights_version=1)
        seqs = {relay.receive_type(SampleBatch)[2].seq for _ in range(2)}
        assert seqs == {0, 1}
        relay.close()  # the relay goes away...
        wait_for(lambda: not link.connected)
        link.submit(filled_builder(3), weights_version=1)  # built while it is away: never sent before
        relay = FakeRelay(context, port)  # ...and comes back on the same port
        routing_id, _, hello = relay.receive_type(Hello, timeout_s=10.0)
        assert hello.next_seq == 0  # the oldest unacknowledged batch is what it sends next
        resent = [relay.receive_type(SampleBatch)[2].seq for _ in range(3)]
        assert resent == [0, 1, 2]
        assert "unacknowledged batches: 2 to resend, 1 not sent yet" in caplog.text
        relay.ack(routing_id, "w-test", [0, 1, 2])
        assert link.flush(timeout=3.0)
        assert link.snapshot()["connections"] == 2
    finally:
        link.stop()
        relay.close()


def test_full_spool_drops_the_oldest_while_the_relay_is_away(context, tmp_path):
    with zmq.Context() as probe:  # a port nobody listens on
        socket = probe.socket(zmq.ROUTER)
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        socket.close(linger=0)
    link = make_link(context, port, tmp_path, max_batches=3)
    link.start()
    try:
        for made in range(1, 6):  # one at a time: more than max_batches waiting for the thread is dropped before
            link.submit(filled_builder(3), weights_version=0)
            wait_for(lambda made=made: link.snapshot()["batches_built"] == made, timeout_s=5.0)
        assert not link.flush(timeout=0.5)
        snapshot = link.snapshot()
        assert snapshot["batches_built"] == 5 and snapshot["spool_batches"] == 3 and snapshot["spool_dropped"] == 2
        assert [b.seq for b in link.spool.pending()] == [2, 3, 4]
    finally:
        link.stop()


def test_batches_waiting_for_a_stalled_sender_thread_are_bounded_by_the_spool_keeping_the_newest(context, tmp_path,
                                                                                                  caplog):
    """Left undone from a worker-persistence probe: the builders waiting for the sender thread (stuck writing a
    durable spool on a hung disk, say) piled up in memory without bound. A link not started plays the stalled thread."""
    link = make_link(context, 1, tmp_path, max_batches=3)
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):
        for rows in (3, 4, 5, 6, 7):
            link.submit(filled_builder(rows), weights_version=0)
    snapshot = link.snapshot()
    assert snapshot["waiting_dropped"] == 2 and snapshot["waiting_dropped_steps"] == 3 + 4
    assert snapshot["not_numbered"] == 3  # the three newest still wait
    assert "w-test: 3 batches wait for the sender thread, which has fallen behind: dropped the oldest" in caplog.text
    assert len([r for r in caplog.records if "fallen behind" in r.getMessage()]) == 1  # one line per interval
    link.start()
    try:
        wait_for(lambda: link.snapshot()["batches_built"] == 3, timeout_s=5.0)
        snapshot = link.snapshot()
        assert snapshot["steps_submitted"] == 5 + 6 + 7 and snapshot["not_numbered"] == 0
    finally:
        link.stop()


def test_a_worker_restarted_with_a_durable_spool_sends_what_its_previous_run_left_unacknowledged(context, tmp_path):
    relay = FakeRelay(context)
    spool_directory = tmp_path / "w-test.spool"
    first = make_link(context, relay.port, tmp_path, ack_timeout_s=60.0, spool_directory=spool_directory)
    first.start()
    try:
        relay.receive_type(Hello)
        first.submit(filled_builder(4), weights_version=1)
        first.submit(filled_builder(3), weights_version=1)
        assert {relay.receive_type(SampleBatch)[2].seq for _ in range(2)} == {0, 1}
    finally:
        first.stop()  # dies with both batches unacknowledged (as a SIGKILL would leave them: on disk)
    assert len(list(spool_directory.glob("*.batch"))) == 2

    second = make_link(context, relay.port, tmp_path, ack_timeout_s=60.0, spool_directory=spool_directory)
    second.start()
    try:
        routing_id, _, hello = relay.receive_type(Hello, timeout_s=10.0)
        assert hello.next_seq == 0  # the restored batches come first
        resent = [relay.receive_type(SampleBatch)[2] for _ in range(2)]
        assert [(b.seq, b.steps) for b in resent] == [(0, 4), (1, 3)]
        second.submit(filled_builder(2), weights_version=2)
        new = relay.receive_type(SampleBatch)[2]
        assert new.seq >= 100  # past the previous run's reservation (block 100): no seq reused
        relay.ack(routing_id, "w-test", [0, 1, new.seq])
        assert second.flush(timeout=3.0)
        assert list(spool_directory.glob("*.batch")) == []
        assert second.snapshot()["spool_restored"] == 2
    finally:
        second.stop()
        relay.close()


def test_malformed_and_misaddressed_messages_are_counted_as_rejected_and_the_link_goes_on(context, tmp_path):
    relay = FakeRelay(context)
    link = make_link(context, relay.port, tmp_path, ack_timeout_s=60.0)
    link.start()
    try:
        routing_id, _, _ = relay.receive_type(Hello)
        link.submit(filled_builder(3), weights_version=0)
        assert relay.receive_type(SampleBatch)[2].seq == 0
        relay.socket.send_multipart([routing_id, b"not an envelope", b"\xc1"])
        relay.socket.send_multipart([routing_id, b"one frame only"])
        relay.ack(routing_id, "someone-else", [0])
        relay.ack(routing_id, "w-test", [0])  # the good ack after them still lands
        assert link.flush(timeout=3.0)
        snapshot = link.snapshot()
        assert snapshot["rejected_messages"] == 3 and snapshot["acks_received"] == 1
        assert link.connected and link.failure is None
    finally:
        link.stop()
        relay.close()


def test_a_batch_the_trainer_rejects_is_dropped_counted_by_reason_and_never_resent(context, tmp_path):
    relay = FakeRelay(context)
    link = make_link(context, relay.port, tmp_path, ack_timeout_s=0.2)
    link.start()
    try:
        routing_id, _, _ = relay.receive_type(Hello)
        link.submit(filled_builder(3), weights_version=0)
        link.submit(filled_builder(3), weights_version=0)
        _, _, first = relay.receive_type(SampleBatch)
        _, _, second = relay.receive_type(SampleBatch)
        relay.ack(routing_id, "w-test", [first.seq], outcome="rejected", reason="reward_out_of_bounds")
        relay.ack(routing_id, "w-test", [second.seq], outcome="duplicate")
        assert link.flush(timeout=3.0)
        resent, until = [], time.monotonic() + 1.2  # six ack timeouts: no batch comes back (heartbeats do)
        while time.monotonic() < until:
            message = relay.receive(timeout_s=1.0)[2]
            if isinstance(message, SampleBatch):
                resent.append(message.seq)
        snapshot = link.snapshot()
        assert resent == []
        assert snapshot["batches_rejected"] == 1 and snapshot["rejected.reward_out_of_bounds"] == 1
        assert snapshot["batches_stored"] == 1 and snapshot["spool_acked"] == 1 and snapshot["spool_refused"] == 1
    finally:
        link.stop()
        relay.close()


@pytest.fixture
def linked(context, tmp_path):
    """``linked(ack_timeout_s)``: a fake relay and a started link to it, both closed after the test."""
    made = []

    def make(ack_timeout_s: float = 60.0) -> tuple[FakeRelay, RelayLink]:
        relay = FakeRelay(context)
        link = make_link(context, relay.port, tmp_path, ack_timeout_s=ack_timeout_s)
        link.start()
        made.append((relay, link))
        return relay, link

    yield make
    for relay, link in made:
        link.stop()
        relay.close()


def test_batches_resent_for_lack_of_acks_cost_one_log_line_per_interval_not_one_per_batch(linked, caplog):
    """An outside probe: a worker logged 3,627 'resending batch' lines in six minutes of trainer restarts."""
    relay, link = linked(ack_timeout_s=0.1)
    with caplog.at_level("INFO", logger="tmrl_worker.relay_link"):
        relay.receive_type(Hello)
        for _ in range(6):
            link.submit(filled_builder(3), weights_version=1)
        wait_for(lambda: link.snapshot()["spool_resent"] >= 18, timeout_s=8.0)  # every batch resent 3 times or so
    lines = [r.getMessage() for r in caplog.records if "resending" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("w-test: resending ") and "batch(es) with no ack yet (seq " in lines[0]


def test_a_link_that_never_reached_the_relay_does_not_wait_out_its_flush_timeout(context, tmp_path):
    """An outside probe: a worker stopped without ever connecting (no relay there, or its key refused) still waited
    the whole flush_timeout_s (10 s) for acknowledgements that could not come."""
    from tmrl_stack import free_ports

    [port] = free_ports(1)  # nothing listens there
    link = make_link(context, port, tmp_path, ack_timeout_s=60.0)
    link.start()
    try:
        link.submit(filled_builder(3), weights_version=1)
        started = time.monotonic()
        assert link.flush(timeout=5.0) is False
        assert time.monotonic() - started < 1.0
        assert link.snapshot()["spool_batches"] == 1  # still spooled, not dropped
    finally:
        link.stop()


def test_a_new_batch_answered_duplicate_on_its_only_send_is_counted_lost_and_the_numbering_moves_on(linked, caplog):
    """Worker persistence probe: a state file restored from an older copy made the worker reuse seqs; the trainer
    answered 70 of 72 batches 'duplicate' (rows never stored) and the worker counted them acknowledged, silently."""
    relay, link = linked()
    with caplog.at_level("ERROR", logger="tmrl_worker.relay_link"):
        routing_id, _, _ = relay.receive_type(Hello)
        link.submit(filled_builder(3), weights_version=1)
        _, _, first = relay.receive_type(SampleBatch)
        relay.ack(routing_id, "w-test", [first.seq], outcome="duplicate")  # the trainer had seq 0 from before
        wait_for(lambda: link.snapshot()["seqs_reused"] == 1)
        link.submit(filled_builder(3), weights_version=1)
        _, _, second = relay.receive_type(SampleBatch)
    assert second.seq >= time.time_ns() // 1000 - 60_000_000  # moved to the clock's microseconds
    [line] = [r.getMessage() for r in caplog.records if "NOT stored" in r.getMessage()]
    assert "batch seq 0, which this run built and sent once" in line and "w-test.state.json" in line
    relay.ack(routing_id, "w-test", [second.seq])
    assert link.flush(timeout=3.0) and link.snapshot()["seqs_reused"] == 1


def test_a_resend_answered_duplicate_is_not_taken_for_a_reused_number(linked):
    relay, link = linked(ack_timeout_s=0.2)
    routing_id, _, _ = relay.receive_type(Hello)
    link.submit(filled_builder(3), weights_version=1)
    relay.receive_type(SampleBatch)
    _, _, again = relay.receive_type(SampleBatch, timeout_s=3.0)  # its ack was lost: resent
    relay.ack(routing_id, "w-test", [again.seq], outcome="duplicate")
    assert link.flush(timeout=3.0) and link.snapshot()["seqs_reused"] == 0


def test_the_relays_repeated_errors_cost_one_line_per_reason_and_interval(linked, caplog):
    """Worker persistence probe: a connection displaced by a second process under its id was refused at every
    resend, each refusal a warning line, for as long as it ran."""
    from tmrl_common.protocol import Error, encode

    relay, link = linked()
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):
        routing_id, _, _ = relay.receive_type(Hello)
        relay.heartbeat(routing_id)  # the hello was taken: refusals from here on are news
        wait_for(lambda: link._client.answered_since_connect)
        for seq in range(20):
            refusal = Error(reason="unknown_sender", message="'w-test' said hello on another connection since "
                            "this one did (two processes under one id?)", ref_type="sample_batch", ref_seq=seq)
            relay.socket.send_multipart([routing_id, *encode(refusal, "relay")])
        wait_for(lambda: link.snapshot()["errors_received"] == 20)
    lines = [r.getMessage() for r in caplog.records if "relay rejected our" in r.getMessage()]
    assert len(lines) == 1 and "[unknown_sender]" in lines[0]


def test_a_worker_whose_id_another_connection_took_says_hello_again_and_resends(linked, caplog):
    """An operator's-first-hour probe: a second process under the same worker id (another state_dir) took the id at
    the relay; after it stopped, the first got `unknown_sender` for every batch for 5 minutes and never said hello
    again, so training stalled with nothing above INFO in the worker's or the trainer's log."""
    from tmrl_common.protocol import Error, encode

    relay, link = linked(ack_timeout_s=60.0)
    routing_id = relay.receive_type(Hello)[0]
    relay.heartbeat(routing_id)  # the relay took this connection's hello before the other process took the id
    wait_for(lambda: link._client.answered_since_connect)
    link.submit(filled_builder(3), weights_version=1)
    _, _, batch = relay.receive_type(SampleBatch)
    taken = Error(reason="unknown_sender", ref_type="sample_batch", ref_seq=batch.seq,
                  message="'w-test' said hello on another connection since this one did (two processes under one id?)")
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):
        relay.socket.send_multipart([routing_id, *encode(taken, "relay")])
        relay.socket.send_multipart([routing_id, *encode(taken, "relay")])  # one hello scheduled, not two
        started = time.monotonic()
        _, _, hello = relay.receive_type(Hello, timeout_s=5.0)
        waited = time.monotonic() - started
    assert hello.next_seq == batch.seq and 0.8 <= waited < 3.0  # HELLO_AGAIN_FIRST_S, then the batch again
    _, _, resent = relay.receive_type(SampleBatch)
    assert resent.seq == batch.seq
    relay.ack(routing_id, "w-test", [batch.seq])
    wait_for(lambda: link.snapshot()["spool_acked"] == 1)
    assert link.snapshot()["ids_lost"] == 2
    lines = [r.getMessage() for r in caplog.records if "saying hello again in" in r.getMessage()]
    assert len(lines) == 1 and "said hello on another connection" in lines[0] and "stop one" in lines[0]


def test_batches_refused_ahead_of_a_new_connections_hello_start_no_second_hello(linked, caplog):
    """A chaos probe: after a relay restart the batches libzmq had queued went out ahead of the worker's new hello;
    each refusal logged "the relay does not take this connection's messages ... saying hello again", though that
    hello was already on its way."""
    from tmrl_common.protocol import Error, encode

    relay, link = linked(ack_timeout_s=60.0)
    routing_id = relay.receive_type(Hello)[0]
    stale = Error(reason="unknown_sender", ref_type="sample_batch", ref_seq=7,
                  message="'w-test' sent before saying hello on this connection")
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):
        for _ in range(3):
            relay.socket.send_multipart([routing_id, *encode(stale, "relay")])
        wait_for(lambda: link.snapshot()["stale_batches_refused"] == 3)
        with pytest.raises(AssertionError, match="nothing received"):
            relay.receive_type(Hello, timeout_s=1.5)  # past HELLO_AGAIN_FIRST_S: the first hello stands
    assert link.snapshot()["ids_lost"] == 0
    assert not [r for r in caplog.records if "saying hello again" in r.getMessage() or "rejected our" in r.getMessage()]
    relay.heartbeat(routing_id)
    wait_for(lambda: link._client.answered_since_connect)
    relay.socket.send_multipart([routing_id, *encode(stale, "relay")])  # from the id's holder: the id was taken
    relay.receive_type(Hello, timeout_s=5.0)
    assert link.snapshot()["ids_lost"] == 1


def test_a_connected_link_whose_batches_get_no_answer_says_so_for_the_progress_line(linked, monkeypatch):
    """An outside probe started a worker before the trainer: its progress lines said "14 batches handed over" and
    nothing else for as long as no trainer came (the relay holds the batches and answers none)."""
    import tmrl_worker.relay_link as relay_link_module

    monkeypatch.setattr(relay_link_module, "NO_ACK_WARNING_S", 0.5)
    relay, link = linked(ack_timeout_s=5.0)
    routing_id, _, _ = relay.receive_type(Hello)
    wait_for(lambda: link._client.connected)
    link.submit(filled_builder(3), weights_version=0)
    relay.receive_type(SampleBatch)
    assert link.delivery_problem() is None  # just sent: no answer is due yet
    time.sleep(0.6)
    problem = link.delivery_problem()
    assert problem is not None and problem.startswith("connected to the relay, but no answer from the trainer for ")
    assert "1 batch(es) waiting to be acknowledged (is the trainer running and connected to this relay?" in problem
    relay.ack(routing_id, "w-test", [0])
    wait_for(lambda: link.snapshot()["spool_batches"] == 0)
    assert link.delivery_problem() is None


def test_a_link_whose_id_the_relay_refuses_says_so_for_the_progress_line(linked):
    """The networking probe restarted a worker with a new key pair: the relay refused its id (bound to the old key)
    for 33 s, while its progress lines stayed plain INFO lines: `weights version 0, 33 batches handed over`."""
    from tmrl_common.protocol import Error, encode

    relay, link = linked(ack_timeout_s=60.0)
    routing_id = relay.receive_type(Hello)[0]
    relay.heartbeat(routing_id)
    wait_for(lambda: link._client.answered_since_connect)
    refusal = Error(reason="unknown_sender", ref_type="hello", message="worker id 'w-test' is bound to another "
                    "CurveZMQ key (a new key pair for this worker? ...)")
    relay.socket.send_multipart([routing_id, *encode(refusal, "relay")])
    wait_for(lambda: link.snapshot()["ids_lost"] == 1)
    heartbeat_refused = Error(reason="unknown_sender", ref_type="heartbeat", message="'w-test' sent before saying hello "
                              "on this connection")  # what follows a refused hello: its reason must stay the one shown
    relay.socket.send_multipart([routing_id, *encode(heartbeat_refused, "relay")])
    wait_for(lambda: link.snapshot()["ids_lost"] == 2)
    link.submit(filled_builder(3), weights_version=0)
    problem = link.delivery_problem()
    assert problem is not None and problem.startswith("connected to the relay, but it does not take this connection's "
                                                      "messages as w-test's (")
    assert "is bound to another CurveZMQ key" in problem and "batch(es) waiting to be delivered" in problem
    routing_id = relay.receive_type(Hello, timeout_s=5.0)[0]  # said again after HELLO_AGAIN_FIRST_S
    relay.heartbeat(routing_id)  # taken this time: the batches held since the refusal go out
    batch = relay.receive_type(SampleBatch, timeout_s=5.0)[2]
    relay.ack(routing_id, "w-test", [batch.seq])
    wait_for(lambda: link.snapshot()["spool_batches"] == 0)
    assert link.delivery_problem() is None


def test_a_state_file_that_cannot_be_written_holds_batches_unnumbered_instead_of_killing_the_sender(context, tmp_path,
                                                                                                      caplog,
                                                                                                      monkeypatch,
                                                                                                      refusing_disk):
    """An outside probe filled (then made read-only) the worker's state_dir: at the next block of sequence numbers
    the sender thread died with a traceback, and the batches it held only in memory were lost without a word."""
    import tmrl_worker.relay_link as relay_link_module

    monkeypatch.setattr(relay_link_module, "RESERVE_RETRY_S", 0.05)
    refusing_disk.error = OSError(30, "Read-only file system")
    relay = FakeRelay(context)
    transport = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0)
    link = RelayLink(worker_id="w-test", layout=LAYOUT,
                     endpoint=RelayEndpoint("127.0.0.1", relay.port, transport, SecurityConfig(insecure=True)),
                     sequence=SequenceCounter(tmp_path, "w-test", block=2, first_seq=0),
                     spool=Spool(100, 10_000_000, owner="w-test"), ack_timeout_s=30.0, heartbeat_interval_s=0.2,
                     context=context)
    link.start()
    try:
        routing_id, _, _ = relay.receive_type(Hello)
        refusing_disk.full = True
        with caplog.at_level("ERROR", logger="tmrl_worker.relay_link"):
            for _ in range(4):
                link.submit(filled_builder(3), weights_version=0)
            assert sorted(relay.receive_type(SampleBatch)[2].seq for _ in range(2)) == [0, 1]  # the reserved block
            wait_for(lambda: link.snapshot()["reservations_failed"] >= 3)
        snapshot = link.snapshot()
        assert link._client.is_alive() and snapshot["not_numbered"] == 2 and snapshot["batches_built"] == 2
        errors = [r.getMessage() for r in caplog.records if "could not reserve sequence numbers" in r.getMessage()]
        assert len(errors) == 1 and "Read-only file system; 2 batch(es) wait unnumbered in memory" in errors[0]
        refusing_disk.full = False  # space back: numbering goes on where the reservation on disk ends
        assert sorted(relay.receive_type(SampleBatch, timeout_s=3.0)[2].seq for _ in range(2)) == [2, 3]
        relay.ack(routing_id, "w-test", [0, 1, 2, 3])
        assert link.flush(timeout=3.0) and link.snapshot()["not_numbered"] == 0
    finally:
        link.stop()
        relay.close()


def test_the_run_summary_names_the_state_dir_for_unnumbered_drops_and_counts_the_spools_file_errors():
    from tmrl_worker.cli import run_summary
    from tmrl_worker.runtime import RolloutStats

    delivery = {"steps_submitted": 100, "batches_built": 10, "spool_acked": 10, "spool_resent": 0, "spool_dropped": 0,
                "spool_batches": 0, "batches_rejected": 0, "connections": 1, "waiting_dropped": 3,
                "waiting_dropped_steps": 30}
    slow_disk = run_summary("w", RolloutStats(steps=130, delivery=delivery))
    assert "dropped before they were numbered: the sender thread fell a whole spool behind" in slow_disk
    full_disk = run_summary("w", RolloutStats(steps=130, delivery={**delivery, "reservations_failed": 7,
                                                                    "spool_write_errors": 4,
                                                                    "spool_unreadable_files": 2}))
    assert ("3 batch(es) (30 rows) dropped before they were numbered: no sequence numbers could be reserved in the "
            "state file (state_dir full or read-only) 7 time(s)") in full_disk
    # counted until now only in heartbeats, which nothing exports (an outside probe)
    assert "; 4 batch(es) could not be written to the durable spool (kept in memory only" in full_disk
    assert "; 2 spool file(s) of an earlier run could not be read (renamed *.unreadable, not sent)" in full_disk


def test_a_revoked_or_impersonated_worker_is_told_why_and_its_summary_says_it(context, tmp_path, caplog):
    """An outside probe: a worker whose key was revoked, or whose id is bound to another key, ended with "10
    unacknowledged" and no cause, and its log advised stopping a second process under its id that did not exist."""
    from tmrl_worker.cli import run_summary
    from tmrl_worker.relay_link import HELLO_AGAIN_FIRST_S, HELLO_AGAIN_MAX_S, HelloBackoff
    from tmrl_worker.runtime import RolloutStats

    link = make_link(context, 1, tmp_path)  # not started: only its bookkeeping is used
    revoked = ("this connection's key was removed from the relay's worker allow-list; nothing it sends is accepted "
               "(allow the key again, or stop this worker)")
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):
        link._id_lost(revoked)
    assert revoked in caplog.text and "another process runs under this worker_id" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):
        link._hello_again = HelloBackoff(HELLO_AGAIN_FIRST_S, HELLO_AGAIN_MAX_S)  # as a fresh link's: it says so
        link._id_lost("worker id 'w-test' said hello on another connection")
    assert "another process runs under this worker_id" in caplog.text
    caplog.clear()
    full = ("the relay already registers 3 workers ([relay] max_workers), all heard from within 10 s: 'w-test' is not "
            "registered; it may say hello again when one stops, or raise [relay] max_workers")
    with caplog.at_level("WARNING", logger="tmrl_worker.relay_link"):  # a scaling probe's worker blamed a twin
        link._hello_again = HelloBackoff(HELLO_AGAIN_FIRST_S, HELLO_AGAIN_MAX_S)
        link._id_lost(full, from_hello=True)
    assert full in caplog.text and "another process runs under this worker_id" not in caplog.text
    delivery = {"steps_submitted": 100, "batches_built": 10, "spool_acked": 3, "spool_resent": 0, "spool_dropped": 0,
                "spool_batches": 7, "batches_rejected": 0, "connections": 1, "ids_lost": 3}
    summary = run_summary("w-test", RolloutStats(steps=100, delivery=delivery, id_refusal=link.id_refusal))
    assert summary.endswith(f"; the relay refused this connection's messages as w-test's 3 time(s), last: {full}")


def test_the_heartbeat_carries_the_counters_the_schema_names(context, tmp_path):
    """The worker's heartbeat and the relay's ``tmrl_relay_worker_reported`` share ``WORKER_HEARTBEAT_COUNTERS``: a
    counter renamed on one side only would vanish from the metrics without a word."""
    from tmrl_common.protocol import WORKER_HEARTBEAT_COUNTERS

    link = make_link(context, 1, tmp_path)  # never started: only its heartbeat is built
    counters = link._heartbeat().counters
    assert set(counters) == set(WORKER_HEARTBEAT_COUNTERS)


def test_after_a_refused_hello_batches_wait_until_a_hello_again_is_answered(context, tmp_path):
    """The re-check probe's worker refused at max_workers kept sending its batches, each refused again (86 in 5 s at
    the relay); they now wait in the spool until the relay answers a hello again as to a registered worker."""
    from tmrl_common.protocol import Error, encode

    relay = FakeRelay(context)
    link = make_link(context, relay.port, tmp_path)
    link.start()
    try:
        routing_id, _, _ = relay.receive_type(Hello)
        full = Error(reason="unknown_sender", ref_type="hello", message="the relay already registers 1 workers "
                     "([relay] max_workers), all heard from within 10 s: 'w-test' is not registered")
        relay.socket.send_multipart([routing_id, *encode(full, "relay")])
        wait_for(lambda: link.counters.ids_lost == 1)
        link.submit(filled_builder(5), weights_version=0)
        link.submit(filled_builder(5), weights_version=0)
        received = []
        deadline = time.monotonic() + 0.8  # before the hello again (1 s after the refusal); ack timeout 0.3 s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                received.append(type(relay.receive(remaining)[2]).__name__)
            except AssertionError:
                break
        assert "SampleBatch" not in received and link.snapshot()["spool_batches"] == 2
        routing_id, _, _ = relay.receive_type(Hello, timeout_s=3.0)  # the hello again, after its back-off
        relay.heartbeat(routing_id)  # taken: answered as a registered worker
        _, _, first = relay.receive_type(SampleBatch, timeout_s=3.0)
        _, _, second = relay.receive_type(SampleBatch, timeout_s=3.0)
        assert [first.seq, second.seq] == [0, 1]
        relay.ack(routing_id, "w-test", [0, 1])
        assert link.flush(timeout=3.0)
    finally:
        link.stop()
        relay.close()
