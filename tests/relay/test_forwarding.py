"""Samples flow worker → relay → trainer unchanged; acks flow back to the right worker; heartbeats are answered."""

from __future__ import annotations

from tmrl_common.protocol import Heartbeat, SampleAck, decode_envelope, encode

from .relay_harness import connected_trainer, connected_worker, insecure_config, make_batch, relay_in_thread, wait_until


def test_batches_reach_the_trainer_byte_for_byte_with_the_worker_as_sender(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        sent = [encode(make_batch(seq), "worker-1") for seq in range(5)]
        for frames in sent:
            worker.send_frames(frames)
        received = []
        while len(received) < len(sent):
            assert trainer.socket.poll(5000)
            frames = trainer.socket.recv_multipart()
            if decode_envelope(frames[0]).type == "sample_batch":  # the worker's hello is passed on too
                received.append(frames)
        assert received == sent
        steps = sum(make_batch(seq).steps for seq in range(5))
        value = relay.metrics.registry.get_sample_value
        nbytes = sum(len(f[0]) + len(f[1]) for f in sent)
        wait_until(lambda: (value("tmrl_relay_batches_forwarded_total"), value("tmrl_relay_steps_forwarded_total"),
                            value("tmrl_relay_batch_bytes_forwarded_total")) == (5, steps, nbytes), what="counters")


def test_acks_are_routed_to_the_worker_they_name(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        first = connected_worker(context, relay, "worker-1")
        second = connected_worker(context, relay, "worker-2")
        first.send(make_batch(10))
        second.send(make_batch(20))
        received = {trainer.recv_type("sample_batch")[0].sender for _ in range(2)}
        assert received == {"worker-1", "worker-2"}
        trainer.send(SampleAck(worker="worker-2", seqs=[20]))
        trainer.send(SampleAck(worker="worker-1", seqs=[10]))
        assert second.recv_type("sample_ack")[1] == SampleAck(worker="worker-2", seqs=[20])
        assert first.recv_type("sample_ack")[1] == SampleAck(worker="worker-1", seqs=[10])
        # the relay thread counts an ack after sending it: wait for the count rather than race it
        wait_until(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_acks_forwarded_total") == 2,
                   what="two acks counted")


def test_ack_for_an_unknown_worker_is_counted_not_fatal(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        trainer.send(SampleAck(worker="worker-9", seqs=[1]))
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_acks_undeliverable_total") == 1)
        worker = connected_worker(context, relay, "worker-1")
        worker.send(make_batch(0))
        assert trainer.recv_type("sample_batch")[1].seq == 0


def test_heartbeats_are_answered_by_the_relay(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        worker.send(Heartbeat(role="worker", uptime_s=1.0, counters={"batches": 0}))
        envelope, message = worker.recv_type("heartbeat")
        assert envelope.sender == "relay" and message.role == "relay"
        trainer.send(Heartbeat(role="trainer", uptime_s=1.0))
        assert trainer.recv_type("heartbeat")[1].role == "relay"


def test_a_reconnected_worker_gets_its_acks_on_the_new_connection(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        old = connected_worker(context, relay, "worker-1")
        old_routing_id = relay.workers.by_sender["worker-1"].routing_id
        old.close()
        new = connected_worker(context, relay, "worker-1")
        wait_until(lambda: relay.workers.by_sender["worker-1"].routing_id != old_routing_id, what="re-registration")
        new.send(make_batch(5))
        assert trainer.recv_type("sample_batch")[1].seq == 5
        trainer.send(SampleAck(worker="worker-1", seqs=[5]))
        assert new.recv_type("sample_ack")[1].seqs == [5]


def test_worker_hellos_are_passed_on_to_a_connected_trainer(context):
    """connected_worker's own hello may be the first one seen; the explicit one carries the layout."""
    from tmrl_common.layout import tm20_lidar_layout
    from tmrl_common.protocol import Hello

    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        worker.send(Hello(role="worker", software="w", layout=tm20_lidar_layout(), next_seq=12))
        envelope, hello = trainer.recv_type("hello")
        assert envelope.sender == "worker-1" and hello.role == "worker"


def test_a_trainer_that_comes_after_the_workers_gets_their_latest_hellos_before_the_held_batches(context):
    """A TrackMania probe: a worker of another history length started 1 s before its trainer; its hello reached no
    trainer, so the trainer never warned about its layout and stored its 418 samples without a word."""
    from tmrl_common.layout import tm20_lidar_layout
    from tmrl_common.protocol import Hello, decode

    with relay_in_thread(insecure_config()) as relay:
        first = connected_worker(context, relay, "worker-1")
        first.send(Hello(role="worker", software="w", layout=tm20_lidar_layout(img_hist_len=8), next_seq=12))
        second = connected_worker(context, relay, "worker-2")
        wait_until(lambda: relay.workers.by_sender["worker-1"].hello is not None)
        first.send(make_batch(12))
        wait_until(lambda: len(relay.pending) == 1, what="the batch held for the trainer")
        trainer = connected_trainer(context, relay)
        received = []
        while len(received) < 3:
            assert trainer.socket.poll(5000), received
            envelope, message = decode(trainer.socket.recv_multipart())
            if envelope.type != "heartbeat":
                received.append((envelope.type, envelope.sender, getattr(message, "layout", None)))
        assert sorted(received[:2], key=lambda item: item[1]) == [
            ("hello", "worker-1", tm20_lidar_layout(img_hist_len=8)), ("hello", "worker-2", None)]
        assert received[2][:2] == ("sample_batch", "worker-1")  # the hellos came first
        second.close()


def test_a_new_trainer_gets_the_hellos_of_live_workers_only(context):
    """A probe restarted the trainer beside a relay that had seen 20 short-lived workers: it was handed all their
    hellos, listed them in status.json as seen at its restart and warned of the layouts of workers long gone."""
    import time

    from tmrl_common.protocol import decode

    with relay_in_thread(insecure_config()) as relay:
        live = connected_worker(context, relay, "worker-live")
        gone = connected_worker(context, relay, "worker-gone")
        wait_until(lambda: all(relay.workers.by_sender[w].hello is not None for w in ("worker-live", "worker-gone")))
        gone.close()
        relay.workers.by_sender["worker-gone"].last_seen -= relay.config.peer_timeout_s + 1  # silent that long
        trainer = connected_trainer(context, relay)
        live.send(make_batch(3))
        received = []
        while not received or received[-1][0] != "sample_batch":
            assert trainer.socket.poll(5000), received
            envelope, _ = decode(trainer.socket.recv_multipart())
            if envelope.type != "heartbeat":
                received.append((envelope.type, envelope.sender))
        assert received == [("hello", "worker-live"), ("sample_batch", "worker-live")]
        time.sleep(0.1)
        live.close()


def test_a_connection_claiming_another_connections_routing_id_gets_nothing_of_it(context):
    import zmq
    from tmrl_common.protocol import Hello
    from tmrl_common.sockets import tcp_endpoint

    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        victim = connected_worker(context, relay, "worker-1")
        thief = context.socket(zmq.DEALER)
        thief.setsockopt(zmq.LINGER, 0)
        thief.setsockopt(zmq.ROUTING_ID, relay.workers.by_sender["worker-1"].routing_id)  # the relay-made id
        thief.connect(tcp_endpoint("127.0.0.1", relay.ports.worker_port))
        thief.send_multipart(encode(Hello(role="worker", software="thief"), "worker-9"))
        trainer.send(SampleAck(worker="worker-1", seqs=[1]))
        assert victim.recv_type("sample_ack")[1] == SampleAck(worker="worker-1", seqs=[1])
        assert not thief.poll(500)  # neither the ack nor anything else reaches the thief
        assert "worker-9" not in relay.workers.by_sender
        thief.close()


def test_a_peer_leaving_is_logged_at_info_not_warning(context, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="tmrl_relay")
    with relay_in_thread(insecure_config()) as relay:
        worker = connected_worker(context, relay, "worker-1")
        worker.close()
        wait_until(lambda: any("a connection on" in r.getMessage() for r in caplog.records), what="the disconnect line")
    [line] = [r for r in caplog.records if "a connection on" in r.getMessage()]
    assert line.levelno == logging.INFO


def test_a_churn_of_worker_hellos_costs_a_bounded_number_of_log_lines(context, caplog):
    """An overload probe: 300 connections coming and going, each saying hello, logged 'worker ... said hello' 13,202
    times in 40 s. Each hello is logged until 20 in 10 s; past that, one line per interval with the count."""
    from .relay_harness import Peer

    with caplog.at_level("INFO", logger="tmrl_relay.broker"), relay_in_thread(insecure_config()) as relay:
        peers = [Peer(context, relay.ports.worker_port, f"churn-{index}") for index in range(60)]
        for peer in peers:
            peer.hello("worker")
        wait_until(lambda: len(relay.workers.by_sender) == 60, what="60 hellos")
        for peer in peers:
            peer.close()
    lines = [r.getMessage() for r in caplog.records if "said hello" in r.getMessage()]
    assert len(lines) == 21 and "more than 20 hellos in 10 s: one line per interval" in lines[-1]


def test_each_live_workers_own_heartbeat_counters_are_exported_by_name(context):
    """A worker's spool drops and write errors reached its own log only (its heartbeats carried them to a relay that
    read the role and nothing else). Only the schema's names are exported: a worker adds no labels of its choosing."""
    with relay_in_thread(insecure_config(peer_timeout_s=0.5)) as relay:
        value = relay.metrics.registry.get_sample_value
        worker = connected_worker(context, relay, "worker-1")
        worker.send(Heartbeat(role="worker", uptime_s=3.0, counters={
            "spool_write_errors": 3, "dropped": 1, "batches": 40, "rejected.schema": 2, "made_up": 9}))
        wait_until(lambda: value("tmrl_relay_worker_reported", {"worker": "worker-1", "counter": "batches"}) == 40,
                   what="the heartbeat's counters")
        assert value("tmrl_relay_worker_reported", {"worker": "worker-1", "counter": "spool_write_errors"}) == 3
        assert value("tmrl_relay_worker_reported", {"worker": "worker-1", "counter": "dropped"}) == 1
        samples = [s for metric in relay.metrics.registry.collect() if metric.name == "tmrl_relay_worker_reported"
                   for s in metric.samples]
        assert sorted(s.labels["counter"] for s in samples) == ["batches", "dropped", "spool_write_errors"]
        # a worker silent past peer_timeout_s is no longer exported
        wait_until(lambda: value("tmrl_relay_worker_reported", {"worker": "worker-1", "counter": "batches"}) is None,
                   what="the silent worker's counters to go")



def test_what_a_peer_sent_on_a_connection_it_replaced_is_ignored_and_counted_apart_not_rejected(context):
    """A pause re-check: a relay SIGSTOPped past the workers' silence limit read, after their new hellos, the batches
    they had sent on the connections they left: 106 unknown_sender rejects (an alert on rejects fired for a pause),
    each answered with an error to a connection no one reads."""
    import time

    from tmrl_common.protocol import encode

    with relay_in_thread(insecure_config()) as relay:
        connected_trainer(context, relay)
        old = connected_worker(context, relay, "worker-1")
        old_routing_id = relay.workers.by_sender["worker-1"].routing_id
        late = encode(make_batch(7), "worker-1")  # written (sent_at) before the new connection's hello
        time.sleep(0.05)
        new = connected_worker(context, relay, "worker-1")  # took the old connection as dead: hello on a new one
        wait_until(lambda: relay.workers.by_sender["worker-1"].routing_id != old_routing_id, what="the new hello")
        old.send_frames(late)
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: value("tmrl_relay_late_messages_total", {"link": "workers"}) == 1, what="late message")
        assert (value("tmrl_relay_rejects_total", {"reason": "unknown_sender", "link": "workers"}) or 0) == 0
        assert not old.socket.poll(300)  # no error sent back on the connection the worker left
        new.close()
        old.close()
