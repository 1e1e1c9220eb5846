"""Hostile or broken input is rejected, counted per reason, answered with an error, and the relay keeps working."""

from __future__ import annotations

import re
import time

import msgpack
import pytest
import zmq
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import Heartbeat, Hello, SampleAck, batch_seq_of, decode, encode, encode_envelope

from .relay_harness import (
    Peer,
    batch_body_with,
    connected_trainer,
    connected_worker,
    insecure_config,
    make_batch,
    relay_in_thread,
    wait_until,
)


def _envelope(**fields) -> bytes:
    envelope = {"v": 1, "type": "sample_batch", "sender": "worker-1", "sent_at": 1.0}
    envelope.update(fields)
    return msgpack.packb(envelope)


def _batch_body(seq: int = 1) -> bytes:
    return encode(make_batch(seq), "worker-1")[1]


HOSTILE = {
    "bad_version": ([_envelope(v=2), _batch_body()], "bad_version"),
    "version_as_bool": ([_envelope(v=True), _batch_body()], "bad_version"),
    "unknown_type": ([_envelope(type="launch_missiles"), b"\x80"], "unknown_type"),
    "type_not_allowed_from_workers": ([_envelope(type="sample_ack"), b"\x80"], "unknown_type"),
    "oversized_body": ([encode_envelope("sample_batch", "worker-1"), b"\x00" * 70_000], "oversized"),
    "oversized_envelope": ([_envelope(padding="x" * 2000), _batch_body()], "oversized"),
    "garbage_envelope": ([b"\xc1\xff\x00garbage", b"x"], "malformed"),
    "envelope_not_a_map": ([msgpack.packb([1, 2, 3]), b"x"], "malformed"),
    "one_frame": ([b"lonely"], "malformed"),
    "three_frames": ([encode_envelope("sample_batch", "worker-1"), _batch_body(), b"extra"], "malformed"),
    "many_frames": ([b"x"] * 50, "malformed"),
    "empty_frames": ([b"", b""], "malformed"),
    "body_not_msgpack": ([encode_envelope("sample_batch", "worker-1"), b"\xc1" * 32], "malformed"),
    "body_not_a_map": ([encode_envelope("sample_batch", "worker-1"), msgpack.packb([1, {"seq": 1}])], "malformed"),
    "body_without_seq": ([encode_envelope("sample_batch", "worker-1"), msgpack.packb({"first": {"shape": [1]}})], "schema"),
    "negative_seq": ([encode_envelope("sample_batch", "worker-1"),
                      msgpack.packb({"seq": -1, "first": {"shape": [1]}})], "schema"),
    "nan_timestamp": ([_envelope(sent_at=float("nan")), _batch_body()], "non_finite"),
    "bad_sender_id": ([_envelope(sender="../../etc"), _batch_body()], "schema"),
    "extra_envelope_field": ([_envelope(admin=True), _batch_body()], "schema"),
    "other_workers_id": ([encode_envelope("sample_batch", "worker-2"), _batch_body()], "unknown_sender"),
    "hello_claiming_trainer_role": (encode(Hello(role="trainer", software="x"), "worker-1"), "schema"),
    "heartbeat_claiming_trainer_role": (encode(Heartbeat(role="trainer", uptime_s=1.0), "worker-1"), "schema"),
    "garbage_hello_body": ([encode_envelope("hello", "worker-1"), b"\x93\x01\x02\x03"], "malformed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_worker_message_is_rejected_counted_and_answered(context, case):
    frames, reason = HOSTILE[case]
    with relay_in_thread(insecure_config(max_body_bytes=65_536)) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        worker.send_frames(frames)
        error = worker.recv_type("error")[1]
        assert error.reason == reason, error.message
        assert relay.metrics.reject_count(reason, "workers") == 1
        # the relay still works for the same connection
        worker.send(make_batch(42))
        assert trainer.recv_type("sample_batch")[1].seq == 42
        wait_until(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_batches_forwarded_total") == 1)


BROKEN_AFTER_SEQ = {  # the relay cannot read these bodies' heads, but they name their batch: the error does too
    "not_msgpack_after_seq": b"\x83\xa3seq\x0b\xafweights_version\xc1\xc1\xc1",
    "ext_type_key_after_seq": b"\x83\xa3seq\x0b" + msgpack.packb(msgpack.ExtType(1, b"x")) + b"\x01",
    "truncated_inside_first": msgpack.packb({"seq": 11, "first": {"dtype": "bool", "shape": [1]}})[:-4],
    "truncated_before_first": msgpack.packb({"seq": 11, "observations": {"x": b"\x00" * 600}, "first": {}})[:-300],
}


@pytest.mark.parametrize("case", sorted(BROKEN_AFTER_SEQ))
def test_a_batch_that_breaks_after_its_seq_is_answered_malformed_naming_the_seq(context, case):
    """§5.3.1: the relay's malformed error about a batch is final, so it must name the batch (the worker drops it)."""
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        worker.send_frames([encode_envelope("sample_batch", "worker-1"), BROKEN_AFTER_SEQ[case]])
        error = worker.recv_type("error")[1]
        assert (error.reason, error.ref_type, error.ref_seq) == ("malformed", "sample_batch", 11), error.message
        assert trainer.types_within(200) == ["hello"]  # the worker's hello, passed on; not the batch


@pytest.mark.parametrize("seq", [None, 5.0, -1, 2**63, True, "5"])
def test_a_batch_without_a_valid_seq_is_answered_schema_with_no_seq(context, seq):
    """§2, §9: a missing, wrong-type or out-of-range seq is ``schema``; there is no batch to name."""
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        worker.send_frames([encode_envelope("sample_batch", "worker-1"), batch_body_with(seq=seq)])
        error = worker.recv_type("error")[1]
        assert (error.reason, error.ref_type, error.ref_seq) == ("schema", "sample_batch", None), error.message
        assert relay.metrics.reject_count("schema", "workers") == 1
        assert trainer.types_within(200) == ["hello"]  # the worker's hello, passed on; not the batch


WRONG_FIRST = {
    "missing": None,
    "a_str": "nope",
    "two_dimensional": {"dtype": "bool", "shape": [5, 1], "codec": "raw", "data": b"\x00" * 5},
    "no_rows": {"dtype": "bool", "shape": [0], "codec": "raw", "data": b""},
    "too_many_rows": {"dtype": "bool", "shape": [100_001], "codec": "raw", "data": b"\x00" * 100_001},
}


def _forwarded_by_the_relay(context, relay, frames):
    """A trainer and worker-1 connected to ``relay``; worker-1 sends ``frames``, which must reach the trainer unchanged.
    Returns (trainer, worker, the frames the trainer received)."""
    trainer = connected_trainer(context, relay)
    worker = connected_worker(context, relay, "worker-1")
    trainer.recv_type("hello")  # the worker's, passed on
    worker.send_frames(frames)
    assert trainer.socket.poll(5000)
    forwarded = trainer.socket.recv_multipart()
    assert forwarded == frames
    return trainer, worker, forwarded


@pytest.mark.parametrize("case", sorted(WRONG_FIRST))
def test_a_batch_with_a_valid_seq_and_a_wrong_first_goes_to_the_trainer_which_refuses_it_by_seq(context, case):
    """The relay judges only seq; the trainer refuses the batch (``schema``) in a sample_ack naming seq 5, which the
    worker takes as final. The relay sends no error: one that is not final would have the worker resend forever."""
    frames = [encode_envelope("sample_batch", "worker-1"), batch_body_with(first=WRONG_FIRST[case])]
    with relay_in_thread(insecure_config()) as relay:
        _, worker, forwarded = _forwarded_by_the_relay(context, relay, frames)
        assert worker.types_within(300) == []
    with pytest.raises(ProtocolError) as info:  # what the trainer's ingest does with it (tmrl_trainer.ingest)
        decode(forwarded)
    assert (info.value.reason, batch_seq_of(forwarded[1])) == ("schema", 5)


def test_a_batch_with_seq_twice_gets_one_rejected_answer_naming_its_first_seq(context):
    """§2: the relay forwards the batch under its first seq (no error of its own); the trainer's decoder refuses it
    ``malformed`` and answers by batch_seq_of, which names that first seq: the worker gets exactly one answer."""
    entries = list(msgpack.unpackb(_batch_body(seq=5)).items())
    body = msgpack.Packer().pack_map_pairs([entries[0], ("seq", 6), *entries[1:]])
    frames = [encode_envelope("sample_batch", "worker-1"), body]
    with relay_in_thread(insecure_config()) as relay:
        trainer, worker, forwarded = _forwarded_by_the_relay(context, relay, frames)
        with pytest.raises(ProtocolError) as info:  # what the trainer's ingest does with it (tmrl_trainer.ingest)
            decode(forwarded)
        trainer.send(SampleAck(worker="worker-1", seqs=[batch_seq_of(forwarded[1])], outcome="rejected",
                               reason=info.value.reason, detail=info.value.detail))
        answer = worker.recv_type("sample_ack")[1]
        assert (answer.seqs, answer.outcome, answer.reason) == ([5], "rejected", "malformed")
        assert worker.types_within(300) == []


def test_a_sample_batch_before_hello_is_rejected_as_unknown_sender(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        from .relay_harness import Peer

        stranger = Peer(context, relay.ports.worker_port, "worker-1")
        stranger.send(make_batch(3))
        error = stranger.recv_type("error")[1]
        assert (error.reason, error.ref_type, error.ref_seq) == ("unknown_sender", "sample_batch", 3)
        assert relay.metrics.reject_count("unknown_sender", "workers") == 1
        assert trainer.nothing_within(200)
        stranger.hello("worker")
        stranger.send(make_batch(4))
        assert trainer.recv_type("sample_batch")[1].seq == 4


def test_trainer_link_rejects_samples_and_messages_before_hello(context):
    with relay_in_thread(insecure_config()) as relay:
        from .relay_harness import Peer

        impostor = Peer(context, relay.ports.trainer_port, "trainer-1")
        impostor.send(make_batch(1), sender="trainer-1")
        assert impostor.recv_type("error")[1].reason == "unknown_type"
        from tmrl_common.protocol import SampleAck

        impostor.send(SampleAck(worker="worker-1", seqs=[1]))
        assert impostor.recv_type("error")[1].reason == "unknown_sender"
        assert relay.metrics.reject_count("unknown_type", "trainer") == 1
        assert relay.metrics.reject_count("unknown_sender", "trainer") == 1


def test_a_burst_of_random_frames_does_not_stop_the_relay(context):
    import random

    rng = random.Random(5)
    with relay_in_thread(insecure_config(max_body_bytes=65_536)) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        valid = encode(make_batch(1), "worker-1")
        for _ in range(500):
            frames = [bytearray(f) for f in valid][: rng.choice((1, 2, 2, 2, 3))]
            for frame in frames:
                for _ in range(rng.randint(0, 4)):
                    if frame:
                        frame[rng.randrange(len(frame))] = rng.randrange(256)
            worker.send_frames([bytes(f) for f in frames])
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_received_messages_total", {"link": "workers"}) >= 501, timeout_s=20)
        final = encode(make_batch(999), "worker-1")
        worker.send_frames(final)
        # mutated bodies with an intact head are forwarded (the trainer validates bodies); the final batch arrives
        for _ in range(600):
            assert trainer.socket.poll(5000)
            if trainer.socket.recv_multipart() == final:
                break
        else:
            raise AssertionError("the valid batch sent after the burst never reached the trainer")
        assert value("tmrl_relay_rejects_total", {"reason": "internal", "link": "workers"}) is None
        assert sum(relay.metrics.reject_count(reason, "workers") for reason in
                   ("malformed", "bad_version", "unknown_type", "schema", "unknown_sender", "oversized", "non_finite")) > 100


def test_a_frame_over_the_socket_cap_drops_the_connection_and_is_counted_as_a_disconnect(context):
    limits = dict(max_body_bytes=65_536, max_weights_bytes=65_536, max_control_bytes=65_536)
    with relay_in_thread(insecure_config(**limits)) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        assert relay.config.socket_frame_cap("workers") == 131_072
        worker.send_frames([encode_envelope("sample_batch", "worker-1"), b"\x00" * 1_000_000])  # ZeroMQ reads none of it

        def disconnects() -> float:
            return relay.metrics.registry.get_sample_value("tmrl_relay_disconnects_total", {"link": "workers"}) or 0.0

        wait_until(lambda: disconnects() >= 1, what="the dropped connection to be counted")
        assert relay.metrics.reject_count("oversized", "workers") == 0  # never read, so not a reject: a disconnect
        other = connected_worker(context, relay, "worker-2")  # the relay goes on serving
        other.send(make_batch(7))
        assert trainer.recv_type("sample_batch")[1].seq == 7


@pytest.mark.parametrize(("link", "port", "socket_type", "takes"), [
    ("weights", "weights_port", zmq.DEALER, "SUB or XSUB"),
    ("workers", "worker_port", zmq.SUB, "DEALER"),
    ("trainer", "trainer_port", zmq.PUSH, "DEALER"),
])
def test_a_wrong_socket_type_is_counted_and_the_log_names_the_kind_the_port_takes(context, caplog, link, port,
                                                                                  socket_type, takes):
    caplog.set_level("INFO", logger="tmrl_relay.broker")
    with relay_in_thread(insecure_config()) as relay:
        wrong = context.socket(socket_type)  # ZeroMQ closes it during the handshake, and says little more
        wrong.connect(f"tcp://127.0.0.1:{getattr(relay.ports, port)}")
        try:
            wait_until(lambda: (relay.metrics.registry.get_sample_value("tmrl_relay_disconnects_total",
                                                                        {"link": link}) or 0.0) >= 1,
                       what="the refused connection to be counted")
        finally:
            wrong.close(0)
        # libzmq reports the refusal as a failed handshake (that line names the kind), or only as the close (then
        # that line does)
        wait_until(lambda: any(f"{link} link: " in r.getMessage() and f"not a {takes} socket" in r.getMessage()
                               for r in caplog.records), what="the log line naming the kind the port takes")
        assert "Traceback" not in caplog.text


def test_rejects_under_ever_new_envelope_sender_ids_do_not_flood_the_log_and_the_burst_is_reported(context, caplog):
    """The log is limited per connection (the id it said hello with), not per envelope sender, which a peer chooses
    freely; the count of a burst that ends is still logged once its interval is over."""
    caplog.set_level("WARNING", logger="tmrl_relay.broker")
    with relay_in_thread(insecure_config()) as relay:
        relay._rate_log.interval_s = 60.0  # the whole burst inside one interval, however slow this machine is
        connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        for index in range(200):
            worker.send_frames([encode_envelope("sample_batch", f"spoof-{index}"), _batch_body(index)])
        wait_until(lambda: relay.metrics.reject_count("unknown_sender", "workers") == 200)
        lines = [record.getMessage() for record in caplog.records if "rejected" in record.getMessage()]
        assert len(lines) == 1 and "spoof-0 " in lines[0] and "said hello as worker-1" in lines[0], lines
        relay._rate_log.interval_s = 0.1  # the interval is over: housekeeping reports the rest
        wait_until(lambda: any("like it in" in record.getMessage() for record in caplog.records), timeout_s=5)
        (summary,) = [record.getMessage() for record in caplog.records if "like it in" in record.getMessage()]
        assert "spoof-199 " in summary and "the last of 199 like it" in summary, summary


def test_an_error_message_carries_the_reason_once_in_its_own_field_not_again_in_the_text(context):
    """An outside probe's worker log read 'relay rejected our heartbeat: [unknown_sender] [unknown_sender] ...': the
    relay put the tagged exception text into ``message`` beside ``reason``."""
    with relay_in_thread(insecure_config()) as relay:
        stranger = Peer(context, relay.ports.worker_port, "worker-7")
        try:
            stranger.send(Heartbeat(role="worker", uptime_s=1.0))  # no hello first
            _, error = stranger.recv_type("error")
        finally:
            stranger.close()
    assert error.reason == "unknown_sender" and not error.message.startswith("[")


def test_acks_for_many_unknown_worker_ids_cost_one_log_line_not_one_per_id(context, caplog):
    """An outside probe: one connection cycling through 5,000 worker ids made the relay log 4,988 'not delivered'
    lines, limited per worker id (the peers' choice)."""
    with caplog.at_level("WARNING", logger="tmrl_relay.broker"), relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        try:
            for index in range(300):
                trainer.send(SampleAck(worker=f"gone-{index}", seqs=[1]))
            wait_until(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_acks_undeliverable_total") == 300,
                       what="300 undeliverable acks")
        finally:
            trainer.close()
    lines = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and "worker not connected" in lines[0]


def test_a_connection_silent_through_the_handshake_time_limit_is_counted_as_a_timeout(context, caplog, monkeypatch):
    """A network probe: connections whose path stopped carrying bytes mid-handshake were logged "not a DEALER socket,
    or does not speak ZeroMQ's protocol". libzmq ends them at its handshake time limit with EAGAIN: kind ``timeout``."""
    import socket
    import threading

    import tmrl_relay.broker
    from tmrl_relay.broker import Relay
    from tmrl_relay.metrics import RelayMetrics

    def with_a_short_handshake_limit(socket, transport):  # libzmq's 30 s; set before bind, which copies the options
        applied(socket, transport)
        socket.setsockopt(zmq.HANDSHAKE_IVL, 300)

    applied = tmrl_relay.broker.apply_transport
    monkeypatch.setattr(tmrl_relay.broker, "apply_transport", with_a_short_handshake_limit)
    caplog.set_level("INFO", logger="tmrl_relay.broker")
    relay = Relay(insecure_config(), RelayMetrics())
    relay.bind()
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", relay.ports.worker_port)):  # connects, never speaks
            wait_until(lambda: relay.metrics.registry.get_sample_value(
                "tmrl_relay_handshake_failures_total", {"link": "workers", "kind": "timeout"}) == 1,
                what="the handshake time-out to be counted")
    finally:
        relay.stop()
        thread.join(10)
    lines = [r.getMessage() for r in caplog.records if "during the handshake" in r.getMessage()]
    assert len(lines) == 1 and "(timeout: no handshake within 30 s" in lines[0], lines


def test_a_peer_that_closes_mid_handshake_is_not_only_called_the_wrong_socket_type(context, caplog):
    """A network probe: a worker that stopped (or gave up on a stalled path) mid-handshake was logged as "a peer that
    is not a DEALER socket, or does not speak ZeroMQ's protocol". The line now names the close first, and the errno."""
    import socket

    caplog.set_level("INFO", logger="tmrl_relay.broker")
    with relay_in_thread(insecure_config()) as relay:
        with socket.create_connection(("127.0.0.1", relay.ports.worker_port)) as peer:
            peer.sendall(b"\xff" + b"\x00" * 8 + b"\x7f")  # ZMTP's signature, then gone
            time.sleep(0.1)
        wait_until(lambda: (relay.metrics.registry.get_sample_value(
            "tmrl_relay_handshake_failures_total", {"link": "workers", "kind": "other"}) or 0) >= 1,
            what="the failed handshake to be counted")
    [line] = [r.getMessage() for r in caplog.records if "during the handshake" in r.getMessage()]
    assert "the peer closed the connection before the handshake ended" in line and "not a DEALER socket" in line
    assert re.search(r"; E[A-Z]+\)$", line), line


def _million_empty_lists_heartbeat(nbytes: int) -> bytes:
    """A heartbeat body of ``nbytes`` whose ``uptime_s`` is a list of empty lists: a recheck probe's 1 MiB one took
    the decoder 0.24 s (a body's cost grows with its bytes, not its fields)."""
    n = nbytes - 64
    return (b"\x83\xa4role\xa6worker\xa8uptime_s\xdd" + n.to_bytes(4, "big") + b"\x90" * n + b"\xa8counters\x80")


def test_a_hello_or_heartbeat_over_64_kib_is_oversized_on_either_link_and_a_large_ack_still_passes(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay, "trainer-1")
        worker = connected_worker(context, relay, "worker-1")
        worker.send_frames([encode_envelope("heartbeat", "worker-1"), _million_empty_lists_heartbeat(2**20)])
        error = worker.recv_type("error")[1]
        assert error.reason == "oversized" and "heartbeat body is 10485" in error.message and "limit 65536" in error.message
        worker.send_frames([encode_envelope("hello", "worker-1"), b"\x82" + b"\x00" * 70_000])
        assert worker.recv_type("error")[1].reason == "oversized"
        other = Peer(context, relay.ports.trainer_port, "trainer-2")
        other.send_frames([encode_envelope("hello", "trainer-2"), b"\x82" + b"\x00" * 70_000])
        assert other.recv_type("error")[1].reason == "oversized"
        trainer.send(SampleAck(worker="worker-1", seqs=list(range(2**62, 2**62 + 65_536))))  # about 590 KB
        assert len(worker.recv_type("sample_ack")[1].seqs) == 65_536
        assert relay.metrics.reject_count("oversized", "workers") == 2


def test_a_drain_gives_the_loop_back_once_its_time_is_up(context, monkeypatch):
    """A recheck probe's flood of slow-to-decode messages kept one drain of the workers' socket going for seconds: a
    SIGTERM took 37 s to be seen, and the trainer's socket waited as long. A drain now ends when its time is up."""
    from tmrl_relay import broker
    from tmrl_relay.broker import Relay

    relay = Relay(insecure_config())
    relay.bind()
    try:
        flood = Peer(context, relay.ports.worker_port, "flood")
        for _ in range(50):
            flood.send(Heartbeat(role="worker", uptime_s=1.0))  # refused (no hello): cheap, but each is read
        wait_until(lambda: relay.workers_socket.poll(0), what="the heartbeats arriving")
        time.sleep(0.2)
        monkeypatch.setattr(broker, "_DRAIN_TIME_S", 0.0)
        relay._drain(relay.workers_socket, relay._on_worker_message, "workers")
        assert relay.metrics.traffic.received_messages["workers"] == 1
        monkeypatch.setattr(broker, "_DRAIN_TIME_S", 60.0)
        relay._drain(relay.workers_socket, relay._on_worker_message, "workers")
        assert relay.metrics.traffic.received_messages["workers"] == 50
        flood.close()
    finally:
        relay.stop()
        relay.run()
