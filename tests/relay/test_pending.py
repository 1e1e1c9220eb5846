"""Without a trainer the relay holds batches up to max_pending_bytes, drops the oldest (counted), delivers the rest."""

from __future__ import annotations

import pytest
from tmrl_common.protocol import decode_envelope, encode
from tmrl_relay.pending import PendingBatch, PendingBatches

from .relay_harness import connected_trainer, connected_worker, insecure_config, make_batch, relay_in_thread, wait_until


def _item(seq: int, nbytes: int) -> PendingBatch:
    return PendingBatch("worker-1", seq, 1, b"e", b"b", nbytes)


def test_pending_batches_drop_the_oldest_past_the_byte_bound():
    pending = PendingBatches(max_bytes=250)
    assert pending.append(_item(0, 100)) == []
    assert pending.append(_item(1, 100)) == []
    dropped = pending.append(_item(2, 100))
    assert [b.seq for b in dropped] == [0]
    assert (len(pending), pending.nbytes) == (2, 200)
    assert [pending.pop().seq, pending.pop().seq] == [1, 2]
    assert pending.nbytes == 0


def test_a_batch_larger_than_the_bound_is_kept_alone():
    pending = PendingBatches(max_bytes=50)
    pending.append(_item(0, 10))
    assert [b.seq for b in pending.append(_item(1, 100))] == [0]
    assert pending.peek().seq == 1


def test_a_resend_of_a_held_batch_is_not_held_twice_and_the_seq_is_held_again_once_delivered():
    pending = PendingBatches(max_bytes=250)
    assert pending.append(_item(0, 100)) == [] and pending.append(_item(0, 100)) == []
    assert (len(pending), pending.nbytes, pending.resends_not_held) == (1, 100, 1)
    assert pending.append(PendingBatch("worker-2", 0, 1, b"e", b"b", 100)) == []  # another worker's seq 0
    assert pending.pop().seq == 0 and len(pending) == 1
    assert pending.append(_item(0, 100)) == [] and len(pending) == 2  # delivered: a later resend is held again


def test_resends_while_the_trainer_is_away_take_no_room_from_distinct_batches(context):
    """A network probe cut a trainer off for 90 s: the workers resent every unacknowledged batch each ack timeout,
    and the relay held 308 copies of about 118 batches, each copy taking room the oldest distinct ones were dropped
    for (max_pending_bytes)."""
    one_batch = sum(len(f) for f in encode(make_batch(0, pad_bytes=4000), "worker-1"))
    with relay_in_thread(insecure_config(max_pending_bytes=3 * one_batch + 10)) as relay:
        worker = connected_worker(context, relay, "worker-1")
        for _ in range(4):  # three batches, resent three times over
            for seq in range(3):
                worker.send(make_batch(seq, pad_bytes=4000))
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_held_resends_total") == 9, what="9 resends not held")
        assert value("tmrl_relay_pending_batches") == 3 and value("tmrl_relay_dropped_batches_total") == 0
        trainer = connected_trainer(context, relay)
        assert [trainer.recv_type("sample_batch")[1].seq for _ in range(3)] == [0, 1, 2]
        assert trainer.nothing_within(300)


def test_batches_sent_before_the_trainer_connects_are_delivered_in_order_when_it_does(context):
    with relay_in_thread(insecure_config()) as relay:
        worker = connected_worker(context, relay, "worker-1")
        sent = [encode(make_batch(seq), "worker-1") for seq in range(4)]
        for frames in sent:
            worker.send_frames(frames)
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_pending_batches") == 4, what="4 held batches")
        assert value("tmrl_relay_trainer_connected") == 0
        trainer = connected_trainer(context, relay)
        assert trainer.socket.poll(5000)
        envelope = decode_envelope(trainer.socket.recv_multipart()[0])
        assert (envelope.type, envelope.sender) == ("hello", "worker-1")  # the worker's hello, passed on first
        for frames in sent:
            assert trainer.socket.poll(5000)
            assert trainer.socket.recv_multipart() == frames
        wait_until(lambda: value("tmrl_relay_pending_bytes") == 0, what="pending drained")
        assert value("tmrl_relay_dropped_batches_total") == 0


def test_without_a_trainer_the_oldest_batches_are_dropped_and_counted(context):
    one_batch = sum(len(f) for f in encode(make_batch(0, pad_bytes=4000), "worker-1"))
    with relay_in_thread(insecure_config(max_pending_bytes=3 * one_batch + 10)) as relay:
        worker = connected_worker(context, relay, "worker-1")
        for seq in range(10):
            worker.send(make_batch(seq, pad_bytes=4000))
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_dropped_batches_total") == 7, what="7 drops")
        assert value("tmrl_relay_pending_batches") == 3
        assert value("tmrl_relay_pending_bytes") <= 3 * one_batch + 10
        assert value("tmrl_relay_dropped_bytes_total") == pytest.approx(7 * one_batch, rel=0.01)
        trainer = connected_trainer(context, relay)
        assert [trainer.recv_type("sample_batch")[1].seq for _ in range(3)] == [7, 8, 9]


def test_a_trainer_that_goes_silent_is_marked_disconnected_and_batches_are_held(context):
    with relay_in_thread(insecure_config(peer_timeout_s=0.3)) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_trainer_connected") == 0, what="trainer timeout")
        worker.send(make_batch(1))
        wait_until(lambda: value("tmrl_relay_pending_batches") == 1, what="held batch")
        from tmrl_common.protocol import Heartbeat

        trainer.send(Heartbeat(role="trainer", uptime_s=1.0))  # heard from again: the held batch goes out
        assert trainer.recv_type("sample_batch")[1].seq == 1
        assert value("tmrl_relay_trainer_connected") == 1


def test_a_closed_trainer_connection_is_noticed_when_sending(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        trainer.close()
        worker = connected_worker(context, relay, "worker-1")
        value = relay.metrics.registry.get_sample_value
        # the relay sees EHOSTUNREACH once ZeroMQ has noticed the closed connection
        for seq in range(50):
            worker.send(make_batch(seq))
            if value("tmrl_relay_trainer_connected") == 0:
                break
            import time

            time.sleep(0.05)
        wait_until(lambda: value("tmrl_relay_trainer_connected") == 0, what="trainer gone")
        wait_until(lambda: value("tmrl_relay_pending_batches") >= 1, what="held batches")
        fresh = connected_trainer(context, relay, "trainer-2")
        assert fresh.recv_type("sample_batch")[0].sender == "worker-1"


def test_a_slow_trainer_back_pressures_workers_without_dropping(context):
    from tmrl_common.sockets import TransportConfig

    transport = TransportConfig(send_hwm=2, recv_hwm=2, linger_ms=0)
    with relay_in_thread(insecure_config(transport=transport)) as relay:
        trainer = connected_trainer(context, relay, transport=transport)
        worker = connected_worker(context, relay, "worker-1")
        count = 150
        big = make_batch(0, pad_bytes=64 * 1024)
        for seq in range(count):
            worker.send(big.model_copy(update={"seq": seq}))
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_pending_batches") >= 1, what="the trainer's queue to fill up")
        from tmrl_common.protocol import decode_envelope
        from tmrl_relay.envelope import read_batch_head

        seqs = []
        while len(seqs) < count:
            assert trainer.socket.poll(5000)
            frames = trainer.socket.recv_multipart()
            if decode_envelope(frames[0]).type == "sample_batch":  # skip the worker's hello, passed on too
                seqs.append(read_batch_head(frames[1]).seq)
        assert seqs == list(range(count))
        assert value("tmrl_relay_dropped_batches_total") == 0
