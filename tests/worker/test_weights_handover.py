"""A worker that joins late starts from the latest weights at once: the relay hands them over the worker's samples
link after its hello, and the link passes them to the weights feed (nothing is re-published to other workers)."""

from __future__ import annotations

import pytest
import torch
from loopback_relay import wait_for
from relay.relay_harness import Peer, connected_trainer, insecure_config, relay_in_thread
from tmrl_common.layout import layout_for_box
from tmrl_common.networks import PolicyArchitecture, build_actor, weights_update_from_actor
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig
from tmrl_worker.relay_link import RelayLink
from tmrl_worker.spool import SequenceCounter, Spool
from tmrl_worker.weights_feed import WeightsFeed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = layout_for_box(3, 1)
FAST = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0)


def endpoint(port: int) -> RelayEndpoint:
    return RelayEndpoint("127.0.0.1", port, FAST, SecurityConfig(insecure=True))


def test_a_late_worker_gets_the_latest_weights_over_its_link_and_prepares_them(context, tmp_path):
    torch.manual_seed(0)
    update = weights_update_from_actor(build_actor(PolicyArchitecture.for_layout(LAYOUT, hidden_sizes=[8])), version=4)
    with relay_in_thread(insecure_config()) as relay:
        trainer: Peer = connected_trainer(context, relay)
        trainer.send(update)
        wait_for(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_weights_version") == 4)
        feed = WeightsFeed("w-late", endpoint(relay.ports.weights_port), context=context)
        link = RelayLink("w-late", LAYOUT, endpoint(relay.ports.worker_port), SequenceCounter(tmp_path, "w-late"),
                         Spool(10, 1_000_000, owner="w-late"), context=context, on_weights=feed.hand_over)
        feed.start()
        link.start()
        try:
            wait_for(lambda: feed.counters.prepared == 1)
            prepared = feed.take_latest()
            assert prepared is not None and prepared.version == 4
            assert link.counters.weights_received == 1 and link.counters.rejected_messages == 0
            assert relay.metrics.registry.get_sample_value("tmrl_relay_weights_published_total") == 1
        finally:
            link.stop()
            feed.stop()


def test_weights_on_the_link_without_a_feed_are_counted_not_fatal(context, tmp_path):
    torch.manual_seed(0)
    update = weights_update_from_actor(build_actor(PolicyArchitecture.for_layout(LAYOUT, hidden_sizes=[8])), version=2)
    with relay_in_thread(insecure_config()) as relay:
        connected_trainer(context, relay).send(update)
        wait_for(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_weights_version") == 2)
        link = RelayLink("w-expert", LAYOUT, endpoint(relay.ports.worker_port), SequenceCounter(tmp_path, "w-expert"), Spool(10, 1_000_000, owner="w-expert"), context=context)
        link.start()
        try:
            wait_for(lambda: link.counters.weights_received == 1)
            assert link.failure is None and link.counters.rejected_messages == 0
        finally:
            link.stop()


def test_a_test_mode_worker_joining_late_acts_with_the_latest_weights_and_sends_no_samples(context, tmp_path):
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.envs import make_env
    from tmrl_worker.runtime import run_worker

    probe = make_env("sim-fast")
    layout = probe.layout
    probe.close()
    torch.manual_seed(0)
    update = weights_update_from_actor(build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[8])), version=7)
    with relay_in_thread(insecure_config()) as relay:
        connected_trainer(context, relay).send(update)
        value = relay.metrics.registry.get_sample_value
        wait_for(lambda: value("tmrl_relay_weights_version") == 7)
        config = WorkerConfig(worker_id="w-test", env="sim-fast", mode="test", max_steps=300, max_steps_per_second=100,
                              worker_port=relay.ports.worker_port, weights_port=relay.ports.weights_port,
                              state_dir=tmp_path, transport=FAST, security=SecurityConfig(insecure=True))
        stats = run_worker(config)
        assert stats.weights_version == 7  # handed over after hello; the trainer published nothing new
        assert value("tmrl_relay_weights_published_total") == 1
        assert value("tmrl_relay_weights_handovers_total", {"result": "sent"}) == 1
        assert (value("tmrl_relay_batches_forwarded_total") or 0) == 0 and relay.pending.nbytes == 0


def test_a_silent_samples_link_makes_the_weights_feed_connect_again(context, tmp_path):
    """A network probe black-holed a worker's path to the relay: its SUB socket, which sends nothing, never noticed,
    and sat on the dead connection for 114 s while the weights moved on. When the samples link replaces a silent
    connection, the feed connects a new socket too, and publications reach it on that one."""
    torch.manual_seed(0)
    actor = build_actor(PolicyArchitecture.for_layout(LAYOUT, hidden_sizes=[8]))
    with relay_in_thread(insecure_config()) as relay:
        trainer: Peer = connected_trainer(context, relay)
        feed = WeightsFeed("w-feed", endpoint(relay.ports.weights_port), context=context)
        link = RelayLink("w-feed", LAYOUT, endpoint(relay.ports.worker_port), SequenceCounter(tmp_path, "w-feed"),
                         Spool(10, 1_000_000, owner="w-feed"), heartbeat_interval_s=0.05, context=context,
                         on_weights=feed.hand_over, on_silent_link=feed.reconnect)
        feed.start()
        link.start()
        try:
            def subscriptions() -> float:
                return relay.metrics.registry.get_sample_value("tmrl_relay_weights_subscriptions_total") or 0.0

            wait_for(lambda: link.counters.connections == 1 and link._client.answered_since_connect
                     and subscriptions() == 1)
            link._client.silence_s = 0.0  # the next turn takes the answered connection as silent
            wait_for(lambda: link._client.silent_links >= 1)
            link._client.silence_s = 60.0
            wait_for(lambda: feed.reconnections == 1 and subscriptions() == 2)  # the new socket subscribed
            trainer.send(weights_update_from_actor(actor, version=7))
            wait_for(lambda: (latest := feed.take_latest()) is not None and latest.version == 7, 10)
        finally:
            link.stop()
            feed.stop()
