"""The rollout loop swaps in new weights between two steps, mid-episode, and tags batches with the version used."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from tmrl_common.networks import PolicyArchitecture, build_actor, weights_update_from_actor
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import RolloutLoop, UniformPolicy
from tmrl_worker.weights_feed import WeightsFeed


class RecordingSink:
    """Collects what the loop hands to the sender thread (builders are built here with made-up seqs)."""

    def __init__(self) -> None:
        self.batches = []

    def submit(self, builder, weights_version: int) -> None:
        self.batches.append(builder.build(seq=len(self.batches), weights_version=weights_version))


class StepHook:
    """Wraps an EnvHandle; calls ``hook(step_index)`` right after the env finished that step."""

    def __init__(self, handle, hook) -> None:
        self._handle = handle
        self._hook = hook
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def step(self, action):
        result = self._handle.step(action)
        self._hook(self.steps)
        self.steps += 1
        return result


def small_actor(layout, seed: int):
    torch.manual_seed(seed)
    return build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[16]))


@pytest.fixture
def pendulum():
    handle = make_env("gym:Pendulum-v1")  # 200-step episodes
    yield handle
    handle.close()


def test_weights_arriving_mid_episode_are_used_from_the_next_step(pendulum):
    feed = WeightsFeed("worker-t")
    new_actor = small_actor(pendulum.layout, seed=3)
    update = weights_update_from_actor(new_actor, version=1)
    arrive_after = 50
    env = StepHook(pendulum, lambda step: feed.offer(update) if step == arrive_after - 1 else None)
    sink = RecordingSink()
    loop = RolloutLoop(env, sink, feed, UniformPolicy(1, seed=0), batch_steps=30, deterministic=True, seed=7)
    loop.record_versions = True
    observations = []
    original_act = loop.env.step

    def remember(action):
        result = original_act(action)
        observations.append(result[0])
        return result

    loop.env.step = remember
    stats = loop.run(max_steps=80)

    assert stats.episodes == 0, "the update must land mid-episode for this test to mean anything"
    assert loop.action_versions == [0] * arrive_after + [1] * 30
    assert stats.swaps == 1 and stats.weights_version == 1
    # the action right after the arrival is exactly what the received actor outputs for that observation
    actions = np.concatenate([b.actions.array for b in sink.batches])[1:]  # actions[i]: action of step i (0-based)
    expected = new_actor.act(observations[arrive_after - 1], deterministic=True)
    np.testing.assert_allclose(actions[arrive_after], expected, rtol=1e-5, atol=1e-6)
    before = new_actor.act(observations[arrive_after - 2], deterministic=True)
    assert not np.allclose(actions[arrive_after - 1], before), "the step before the arrival still used the old policy"
    # batches carry the version in use when they were handed over
    assert [b.weights_version for b in sink.batches] == [0, 1, 1]
    assert sum(b.steps for b in sink.batches) == 81  # 80 steps + the reset row


def test_weights_offered_from_another_thread_are_picked_up_while_running(pendulum):
    feed = WeightsFeed("worker-t")
    updates = [weights_update_from_actor(small_actor(pendulum.layout, seed=s), version=v) for s, v in ((1, 1), (2, 2))]
    stop = threading.Event()
    loop = RolloutLoop(pendulum, RecordingSink(), feed, UniformPolicy(1, seed=0), batch_steps=50)

    def deliver():
        for update in updates:
            feed.offer(update)
            while feed.counters.swapped < update.version and not stop.is_set():
                stop.wait(0.001)
        stop.set()

    thread = threading.Thread(target=deliver)
    thread.start()
    stats = loop.run(max_steps=100_000, stop=stop)
    thread.join()
    assert stats.weights_version == 2 and stats.swaps == 2
    assert stats.steps < 100_000


def test_stale_or_invalid_updates_are_counted_and_skipped(pendulum):
    feed = WeightsFeed("worker-t")
    assert feed.offer(weights_update_from_actor(small_actor(pendulum.layout, 1), version=5))
    assert not feed.offer(weights_update_from_actor(small_actor(pendulum.layout, 2), version=4))
    assert feed.counters.stale == 1
    assert feed.take_latest().version == 5
    assert feed.take_latest() is None  # handed over once


def test_test_mode_sends_nothing_and_expert_mode_ignores_weights(pendulum):
    feed = WeightsFeed("worker-t")
    feed.offer(weights_update_from_actor(small_actor(pendulum.layout, 1), version=1))
    silent = RolloutLoop(pendulum, None, feed, UniformPolicy(1, seed=0))
    stats = silent.run(max_steps=20)
    assert stats.batches_submitted == 0 and stats.weights_version == 1

    sink = RecordingSink()
    feed.offer(weights_update_from_actor(small_actor(pendulum.layout, 2), version=2))
    expert = RolloutLoop(pendulum, sink, None, UniformPolicy(1, seed=0), batch_steps=10)
    stats = expert.run(max_steps=20)
    assert stats.weights_version == 0 and {b.weights_version for b in sink.batches} == {0}
    assert sum(b.steps for b in sink.batches) == 21


@pytest.fixture
def published_feed():
    """``(publish, feed)``: a started :class:`WeightsFeed` subscribed to a PUB socket standing in for the relay's
    weights port; ``publish(update)`` sends one update (the first is resent until the subscription is up)."""
    import time

    import zmq
    from tmrl_common.protocol import encode
    from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    feed = WeightsFeed("worker-t", RelayEndpoint("127.0.0.1", port, TransportConfig(linger_ms=0),
                                                 SecurityConfig(insecure=True)), context=context)
    feed.start()

    def publish(update) -> None:
        if feed.counters.received == 0:  # PUB drops messages until the subscription has arrived
            deadline = time.monotonic() + 10
            while feed.counters.received == 0:
                assert time.monotonic() < deadline, "the feed never received the first update"
                publisher.send_multipart(encode(update, "relay"))
                time.sleep(0.05)
            return
        publisher.send_multipart(encode(update, "relay"))

    publish.raw = publisher.send_multipart  # type: ignore[attr-defined]
    try:
        yield publish, feed
    finally:
        feed.stop()
        publisher.close(linger=0)
        context.destroy(linger=0)


def latest_reaching(feed: WeightsFeed, version: int):
    """Wait for the feed's newest prepared policy to be ``version`` (AssertionError after 10 s)."""
    import time

    deadline = time.monotonic() + 10
    while (prepared := feed.take_latest()) is None or prepared.version != version:
        assert time.monotonic() < deadline, f"version {version} never became the latest"
        time.sleep(0.01)
    return prepared


def test_weights_feed_thread_receives_over_a_sub_socket_and_keeps_only_the_newest(pendulum, published_feed):
    publish, feed = published_feed
    updates = [weights_update_from_actor(small_actor(pendulum.layout, seed=v), version=v) for v in range(1, 6)]
    publish(updates[0])
    assert latest_reaching(feed, 1).version == 1
    publish.raw([b"\x81\xa1v\x01", b"not msgpack"])
    for update in updates[1:]:
        publish(update)
    latest = latest_reaching(feed, 5)
    assert feed.counters.rejected >= 1
    observation = pendulum.reset(seed=0)
    np.testing.assert_allclose(latest.actor.act(observation, deterministic=True),
                               small_actor(pendulum.layout, seed=5).act(observation, deterministic=True), rtol=1e-6)


def test_a_restarted_trainers_lower_versions_on_the_sub_socket_are_followed_and_swapped_in(pendulum, published_feed):
    import time

    publish, feed = published_feed
    publish(weights_update_from_actor(small_actor(pendulum.layout, seed=143), version=143))
    before = latest_reaching(feed, 143)
    stale = feed.counters.stale
    feed.hand_over(weights_update_from_actor(small_actor(pendulum.layout, seed=7), version=142))  # hello's, late
    deadline = time.monotonic() + 10
    while feed.counters.stale == stale:
        assert time.monotonic() < deadline, "the late hand-over was never looked at"
        time.sleep(0.01)
    publish(weights_update_from_actor(small_actor(pendulum.layout, seed=5), version=5))  # the trainer restarted
    after = latest_reaching(feed, 5)
    assert (before.generation, after.generation) == (0, 1) and feed.counters.trainer_restarts == 1
    assert feed.take_latest() is None  # nothing after 5: the old run's 142 stayed skipped

    class Replayed:  # the two prepared policies again, one per call, as the loop takes them
        def __init__(self, prepared) -> None:
            self.prepared = list(prepared)

        def take_latest(self):
            return self.prepared.pop(0) if self.prepared else None

    loop = RolloutLoop(pendulum, None, Replayed([before, after]), UniformPolicy(pendulum.action_dim, seed=0))
    loop._swap_policy()
    assert loop.policy.version == 143
    loop._swap_policy()  # version 5 of the restarted trainer replaces 143
    assert loop.policy.version == 5 and loop.stats.weights_version == 5


def test_weights_for_another_observation_layout_are_refused_and_the_current_policy_kept(pendulum, caplog):
    """A weights probe: one forged weights_update for another layout stopped every worker that got it (and a restarted
    worker again, from the relay's cache). Now one is refused and the policy kept; a trainer that publishes only such
    versions stops the worker after 3 (the next test)."""
    import functools

    from tmrl_common.layout import layout_for_box
    from tmrl_worker.runtime import weights_layout_problem

    feed = WeightsFeed("worker-t", layout_problem=functools.partial(weights_layout_problem, pendulum))
    assert feed.offer(weights_update_from_actor(small_actor(pendulum.layout, seed=1), version=2))
    assert feed.take_latest().version == 2
    with caplog.at_level("ERROR", logger="tmrl_worker.weights_feed"):
        assert not feed.offer(weights_update_from_actor(small_actor(layout_for_box(7, 1), seed=0), version=3))
    assert feed.take_latest() is None and (feed.counters.rejected, feed.counters.wrong_layout) == (1, 1)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("worker-t: weights version 3 refused: the trainer's weights are for another observation "
                           "layout than this worker's env: policy") and "same img_hist_len" in line
    assert "keeps acting with the policy it has, and stops after 3 such versions in a row" in line
    assert feed.wrong_layout_streak == 1 and "1 version(s) in a row for another" in feed.weights_problem()
    assert not feed.offer(weights_update_from_actor(small_actor(layout_for_box(7, 1), seed=0), version=3))  # again
    assert not feed.offer(weights_update_from_actor(small_actor(layout_for_box(7, 1), seed=0), version=4))
    assert feed.wrong_layout_streak == 2  # versions 3 and 4: the other link's copy of 3 counts once
    loop = RolloutLoop(pendulum, None, feed, UniformPolicy(pendulum.action_dim, seed=0))
    with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
        loop._report(10.0, 200)  # the progress line says so while it lasts
    [progress] = [r for r in caplog.records if "steps/s" in r.getMessage()]
    assert progress.levelname == "WARNING" and progress.getMessage().endswith(
        "weights version 0, 0 batches handed over; the trainer's weights are refused (2 version(s) in a row for "
        "another observation layout, see the error above)")
    assert feed.offer(weights_update_from_actor(small_actor(pendulum.layout, seed=1), version=3))  # 3 was not taken
    assert feed.take_latest().version == 3
    assert feed.wrong_layout_streak == 0 and feed.weights_problem() is None


def test_a_worker_stops_after_three_weights_versions_in_a_row_it_cannot_use(tmp_path):
    """A TrackMania probe: a worker with img_hist_len 8 beside a trainer with 4 (whose batches the trainer stores)
    refused every weights version and drove at random for good, its progress lines saying nothing."""
    import time

    import zmq
    from tmrl_common.layout import layout_for_box
    from tmrl_common.protocol import encode
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.runtime import WeightsLayoutError, run_worker

    worker_port, weights_port = free_ports(2)
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.bind(f"tcp://127.0.0.1:{weights_port}")
    stop = threading.Event()

    def publish() -> None:  # the trainer of another layout: a new version every 0.2 s (PUB drops until subscribed)
        version = 1
        while not stop.wait(0.2):
            publisher.send_multipart(encode(weights_update_from_actor(small_actor(layout_for_box(7, 1), seed=0),
                                                                      version=version), "trainer"))
            version += 1

    config = WorkerConfig(worker_id="w-hist", env="gym:Pendulum-v1", max_steps_per_second=200.0, max_steps=100_000,
                          worker_port=worker_port, weights_port=weights_port, state_dir=tmp_path, flush_timeout_s=0.1,
                          transport=TransportConfig(linger_ms=0), security=SecurityConfig(insecure=True))
    publishing = threading.Thread(target=publish, daemon=True)
    publishing.start()
    started = time.monotonic()
    try:
        with pytest.raises(WeightsLayoutError, match=r"w-hist: the trainer published [3-9] weights versions in a row that "
                                                     r"this worker cannot use; the latest, weights version \d+: the "
                                                     r"trainer's weights are for another observation layout"):
            run_worker(config)
    finally:
        stop.set()
        publishing.join()
        publisher.close(linger=0)
        context.term()
    assert time.monotonic() - started < 30.0


def test_for_a_module_class_env_the_layout_problem_points_at_the_trainers_layout_file(pendulum, monkeypatch):
    """A robot author's usual cause (outside probe): an old layout_file the trainer still reads, not env options."""
    from tmrl_common.layout import layout_for_box
    from tmrl_worker.runtime import weights_layout_problem

    assert weights_layout_problem(pendulum, pendulum.layout) is None
    monkeypatch.setattr(pendulum, "spec", "my_robot:CartInterface")
    assert "the trainer's layout_file is not your interface's layout: write it again from the interface " \
           "(`tmrl-worker layout" in weights_layout_problem(pendulum, layout_for_box(7, 1))


def test_a_lower_version_sent_later_than_the_newest_is_a_restarted_trainer_on_either_link(pendulum):
    """A weights probe: a worker whose only weights came by hand-over (v1931, the old trainer's) took the new trainer's
    versions as stale and acted with the old run's policy for over a minute; only versions above 1931 would do."""
    feed = WeightsFeed("worker-t")

    def update(version: int):
        return weights_update_from_actor(small_actor(pendulum.layout, seed=version), version=version)

    assert feed.offer(update(1931), sent_at=1000.0)  # handed over after the hello: the old run's latest
    assert not feed.offer(update(1930), sent_at=990.0)  # sent before it (a SUB message behind the hand-over): stale
    assert not feed.offer(update(1931), sent_at=1010.0)  # the same version again: stale
    assert not feed.offer(update(5))  # no sent_at known: stale, as before
    assert feed.counters.stale == 3 and feed.take_latest().generation == 0
    broken = update(2).model_copy(update={"tensors": b"not safetensors"})
    assert not feed.offer(broken, sent_at=1050.0)  # lower, sent later, but refused: no restart taken from it
    assert feed.counters.trainer_restarts == 0
    assert feed.offer(update(1), sent_at=1100.0)  # the new trainer's first version, sent later: followed
    prepared = feed.take_latest()
    assert (prepared.version, prepared.generation, feed.counters.trainer_restarts) == (1, 1, 1)
    assert feed.offer(update(2), sent_at=1105.0) and feed.take_latest().generation == 1


def test_a_hand_over_then_a_restarted_trainers_publication_on_the_sub_socket_is_followed(pendulum, published_feed):
    import time

    from tmrl_common.protocol import encode

    publish, feed = published_feed
    feed.hand_over(weights_update_from_actor(small_actor(pendulum.layout, seed=9), version=1931), time.time() - 60)
    assert latest_reaching(feed, 1931).generation == 0
    first = weights_update_from_actor(small_actor(pendulum.layout, seed=1), version=1)
    deadline = time.monotonic() + 10
    while (prepared := feed.take_latest()) is None:  # PUB drops until the subscription is up: send until it lands
        assert time.monotonic() < deadline, "the new trainer's version 1 was never taken"
        publish.raw(encode(first, "trainer"))
        time.sleep(0.05)
    assert (prepared.version, prepared.generation) == (1, 1)
