"""Weights from the trainer reach every subscribed worker; a worker gets the latest over its own link after hello
(no re-publication to every subscriber); subscriptions never make the relay publish; bad weights never go out."""

from __future__ import annotations

import time

import zmq
from tmrl_common.protocol import encode
from tmrl_relay import subscriptions
from tmrl_relay.subscriptions import SubscriptionLedger

from .relay_harness import (
    Peer,
    connected_trainer,
    connected_worker,
    insecure_config,
    make_weights,
    relay_in_thread,
    wait_until,
)


def _subscribers(context, relay, count):
    subscribers = [Peer(context, relay.ports.weights_port, f"sub-{i}", zmq.SUB) for i in range(count)]
    value = relay.metrics.registry.get_sample_value
    wait_until(lambda: (value("tmrl_relay_weights_subscriptions_total") or 0) >= count, what="subscriptions")
    return subscribers


def _published(context, relay, version: int) -> tuple[Peer, Peer]:
    """A trainer and one subscriber that has received the trainer's weights ``version``."""
    trainer = connected_trainer(context, relay)
    (subscriber,) = _subscribers(context, relay, 1)
    trainer.send(make_weights(version))
    assert subscriber.recv_type("weights_update")[1].version == version
    return trainer, subscriber


def _raw_xsub(context, relay) -> zmq.Socket:
    """An XSUB on the weights socket: it sends whatever frames it likes (subscriptions or not)."""
    hostile = context.socket(zmq.XSUB)
    hostile.linger = 0
    hostile.setsockopt(zmq.SNDHWM, 0)  # queue everything, drop nothing
    hostile.connect(f"tcp://127.0.0.1:{relay.ports.weights_port}")
    return hostile


def test_weights_fan_out_to_every_subscriber_unchanged(context):
    with relay_in_thread(insecure_config(weights_min_interval_s=0)) as relay:
        trainer = connected_trainer(context, relay)
        subscribers = _subscribers(context, relay, 3)
        for version in (1, 2):
            frames = encode(make_weights(version), "trainer-1")
            trainer.send_frames(frames)
            for subscriber in subscribers:
                assert subscriber.socket.poll(5000)
                assert subscriber.socket.recv_multipart() == frames  # forwarded unchanged
        assert relay.metrics.registry.get_sample_value("tmrl_relay_weights_version") == 2


def test_a_late_worker_gets_the_latest_weights_over_its_link_at_once_and_once_per_version(context):
    with relay_in_thread(insecure_config()) as relay:
        _, subscriber = _published(context, relay, 2)
        started = time.monotonic()
        late = Peer(context, relay.ports.worker_port, "worker-late")
        late.hello("worker")
        envelope, update = late.recv_type("weights_update", timeout_ms=2000)
        assert update.version == 2 and envelope.sender == "trainer-1"
        assert time.monotonic() - started < 2.0  # without waiting for the trainer's next publication
        late.hello("worker")  # the same connection again: it has this version already
        assert "weights_update" not in late.types_within(300)
        assert subscriber.nothing_within(100)  # nobody else got a copy
        value = relay.metrics.registry.get_sample_value
        assert value("tmrl_relay_weights_handovers_total", {"result": "sent"}) == 1
        assert value("tmrl_relay_weights_published_total") == 1


def test_a_flood_of_subscriptions_gives_a_good_subscriber_no_extra_copies(context):
    """Issue 14: 2,000 subscribes from one XSUB once gave a good subscriber 116 copies in 2 s."""
    with relay_in_thread(insecure_config()) as relay:
        _, good = _published(context, relay, 1)
        hostile = _raw_xsub(context, relay)
        for _ in range(300):
            hostile.send(b"\x01")  # subscribe to everything, again and again (XPUB_VERBOSER shows each)
        value = relay.metrics.registry.get_sample_value
        # read a bounded number per housekeeping turn: the flood takes a few turns
        wait_until(lambda: value("tmrl_relay_weights_subscriptions_total") >= 301, timeout_s=20,
                   what="the flood to be read")
        copies = len([t for t in good.types_within(2000) if t == "weights_update"])
        assert copies == 0
        assert value("tmrl_relay_weights_published_total") == 1


def test_weights_faster_than_the_interval_are_coalesced_to_the_latest(context):
    with relay_in_thread(insecure_config(weights_min_interval_s=0.5)) as relay:
        trainer = connected_trainer(context, relay)
        (subscriber,) = _subscribers(context, relay, 1)
        for version in range(1, 11):
            trainer.send(make_weights(version))
        versions = [subscriber.recv_type("weights_update")[1].version]
        versions.append(subscriber.recv_type("weights_update", timeout_ms=2000)[1].version)
        assert versions[0] == 1 and versions[-1] == 10  # the first at once, then only the latest
        assert subscriber.nothing_within(700)
        assert relay.metrics.registry.get_sample_value("tmrl_relay_weights_published_total") == 2


def test_weights_with_a_wrong_sha256_are_rejected_and_not_cached(context):
    with relay_in_thread(insecure_config()) as relay:
        trainer, subscriber = _published(context, relay, 1)
        poisoned = make_weights(2).model_copy(update={"sha256": "0" * 64})  # model_copy skips validation
        trainer.send_frames(encode(poisoned, "trainer-1"))
        error = trainer.recv_type("error")[1]
        assert error.reason == "schema" and "sha256" in error.message and error.ref_type == "weights_update"
        assert subscriber.nothing_within(300)
        assert relay.metrics.reject_count("schema", "trainer") == 1
        late = connected_worker(context, relay, "worker-late")
        assert late.recv_type("weights_update")[1].version == 1  # the cache still holds the good one


def test_oversized_weights_are_rejected(context):
    with relay_in_thread(insecure_config(max_weights_bytes=8192)) as relay:
        trainer = connected_trainer(context, relay)
        trainer.send(make_weights(1, nbytes=20_000))
        assert trainer.recv_type("error")[1].reason == "oversized"
        assert relay.metrics.registry.get_sample_value("tmrl_relay_weights_version") == -1


def test_workers_cannot_publish_weights(context):
    with relay_in_thread(insecure_config()) as relay:
        (subscriber,) = _subscribers(context, relay, 1)
        worker = connected_worker(context, relay, "worker-1")
        worker.send(make_weights(7))
        assert worker.recv_type("error")[1].reason == "unknown_type"
        assert subscriber.nothing_within(300)
        assert relay.metrics.reject_count("unknown_type", "workers") == 1


def test_non_subscription_messages_on_the_weights_socket_are_counted(context):
    with relay_in_thread(insecure_config()) as relay:
        hostile = _raw_xsub(context, relay)
        hostile.send(b"\x05not a subscription")
        wait_until(lambda: relay.metrics.reject_count("malformed", "weights") == 1, what="weights reject")
        trainer = connected_trainer(context, relay)
        (subscriber,) = _subscribers(context, relay, 1)
        trainer.send(make_weights(3))
        assert subscriber.recv_type("weights_update")[1].version == 3


def test_subscriptions_to_topics_no_worker_uses_past_the_bound_reopen_the_weights_socket(context, monkeypatch, caplog):
    """libzmq keeps every topic a connected peer subscribes to: past the bound the relay frees them by re-opening
    the socket, says who sent them, and a worker's SUB reconnects on its own and gets the next weights."""
    monkeypatch.setattr(subscriptions, "FOREIGN_TOPICS_MAX", 50)
    with relay_in_thread(insecure_config(weights_min_interval_s=0)) as relay:
        trainer, good = _published(context, relay, 1)
        hostile = _raw_xsub(context, relay)
        for i in range(200):
            hostile.send(b"\x01" + f"fresh-topic-{i}".encode())
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: (value("tmrl_relay_weights_socket_reopened_total") or 0) >= 1, timeout_s=20,
                   what="the weights socket to be re-opened")
        assert value("tmrl_relay_weights_foreign_subscriptions_total") >= 51
        lines = [r.getMessage() for r in caplog.records if "re-opening the socket" in r.getMessage()]
        assert lines and "most from 127.0.0.1" in lines[0] and "topics no worker uses" in lines[0]
        version, received = 2, None
        deadline = time.monotonic() + 10
        while received is None and time.monotonic() < deadline:  # until the good SUB has reconnected
            trainer.send(make_weights(version))
            for kind in good.types_within(200):
                if kind == "weights_update":
                    received = version
            version += 1
        assert received is not None, "the good subscriber got no weights after the re-opening (same port)"


def test_a_peer_that_leaves_takes_its_topics_out_of_the_ledger(context):
    with relay_in_thread(insecure_config()) as relay:
        hostile = _raw_xsub(context, relay)
        for i in range(10):
            hostile.send(b"\x01" + f"topic-{i}".encode())
        wait_until(lambda: relay.subscriptions.topics == 10, timeout_s=10, what="ten live topics")
        hostile.close()
        wait_until(lambda: relay.subscriptions.topics == 0, timeout_s=10, what="the topics to be cancelled")
        assert relay.subscriptions.topic_bytes == 0


def test_the_ledger_counts_a_topic_until_its_last_subscription_is_cancelled():
    ledger = SubscriptionLedger(max_topics=2, max_bytes=1000)
    ledger.subscribed(b"a", "peer-1")
    ledger.subscribed(b"a", "peer-2")  # the same topic from another connection
    ledger.cancelled(b"a")
    assert ledger.topics == 1 and ledger.topic_bytes == 1  # still held for peer-1
    ledger.cancelled(b"a")
    assert ledger.topics == 0 and ledger.topic_bytes == 0


def test_cancels_of_topics_never_subscribed_do_not_hide_live_ones():
    ledger = SubscriptionLedger(max_topics=2, max_bytes=1000)
    for topic in (b"x1", b"x2", b"x3"):
        ledger.subscribed(topic, "peer")
    for topic in (b"y1", b"y2", b"y3"):
        ledger.cancelled(topic)  # libzmq shows these too (XPUB_VERBOSER); they free nothing
    assert ledger.topics == 3 and ledger.over_limit()


def test_subscribe_and_cancel_pairs_leave_nothing_live_and_the_busiest_peer_is_named():
    ledger = SubscriptionLedger(max_topics=10, max_bytes=100)
    for i in range(1000):
        ledger.subscribed(b"t%d" % i, "10.0.0.9")
        ledger.cancelled(b"t%d" % i)
    ledger.subscribed(b"big" * 40, "10.0.0.7")  # 120 bytes: over the byte bound alone
    assert ledger.topics == 1 and ledger.over_limit()
    assert ledger.busiest_peer() == ("10.0.0.9", 1000)
    ledger.reset()
    assert ledger.topics == 0 and not ledger.over_limit() and ledger.busiest_peer() == ("?", 0)
