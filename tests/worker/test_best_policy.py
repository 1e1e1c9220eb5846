"""A test worker with ``keep_best`` keeps the policy of the best whole episode it drove (in a loop, and behind a real
relay): swaps wait for episode starts, a finished lap beats an unfinished one and then the fewer steps win, and the
kept file is the actor that drove that episode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from loopback_relay import wait_for
from relay.relay_harness import connected_trainer, insecure_config, relay_in_thread
from tmrl_common.layout import tm20_lidar_layout
from tmrl_common.networks import PolicyArchitecture, build_actor, read_policy_file, weights_update_from_actor
from tmrl_common.sockets import SecurityConfig, TransportConfig
from tmrl_worker.config import WorkerConfig
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import BestPolicyKeeper, EpisodeOutcome, RolloutLoop, UniformPolicy, run_worker
from tmrl_worker.weights_feed import WeightsFeed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_actor(layout, seed: int):
    torch.manual_seed(seed)
    return build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[16]))


class OfferAt:
    """Wraps an EnvHandle and offers ``updates[step]`` to the feed right after that (global) step."""

    def __init__(self, handle, feed: WeightsFeed, updates: dict) -> None:
        self._handle, self._feed, self._updates, self.steps = handle, feed, updates, 0

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def step(self, action):
        result = self._handle.step(action)
        if self.steps in self._updates:
            self._feed.offer(self._updates[self.steps])
        self.steps += 1
        return result


def test_a_finished_lap_beats_any_unfinished_episode_then_the_fewer_steps_win():
    slow_lap, fast_lap = EpisodeOutcome(1030.0, 640, True), EpisodeOutcome(1030.0, 520, True)
    crash_far = EpisodeOutcome(900.0, 300, False)
    assert fast_lap.rank() > slow_lap.rank() > crash_far.rank()
    assert EpisodeOutcome(-120.0, 200, None).rank() > EpisodeOutcome(-400.0, 200, None).rank()  # no finish: return


def test_weights_wait_for_the_next_episode_and_the_best_whole_episode_is_kept(tmp_path, caplog):
    pendulum = make_env("gym:Pendulum-v1")  # 200-step episodes, no finish line: ranked by return
    try:
        feed = WeightsFeed("tester")
        actors = {version: small_actor(pendulum.layout, seed=version) for version in (1, 2, 3)}
        updates = {step: weights_update_from_actor(actors[version], version)
                   for step, version in ((9, 1), (250, 2), (450, 3))}  # each arrives mid-episode
        keeper = BestPolicyKeeper(tmp_path, "tester")
        loop = RolloutLoop(OfferAt(pendulum, feed, updates), None, feed, UniformPolicy(1, seed=0), deterministic=True,
                           seed=5, worker_id="tester", best=keeper)
        loop.record_versions = True
        with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
            stats = loop.run(max_steps=1000)
    finally:
        pendulum.close()
    # an operator's probe: the first, mixed episode was passed over without a word
    [passed_over] = [r.getMessage() for r in caplog.records if "not a candidate" in r.getMessage()]
    assert passed_over.startswith("tester: episode 1 (return ") and "weights versions [0, 1]" in passed_over

    versions = [loop.action_versions[start:start + 200] for start in range(0, 1000, 200)]
    # the random warm-up policy gives way at once; later weights wait for the next episode start
    assert versions[0] == [0] * 10 + [1] * 190
    assert [set(episode) for episode in versions[1:]] == [{1}, {2}, {3}, {3}]
    returns = list(stats.recent_returns)
    whole = {episode: (returns[episode], versions[episode][0]) for episode in range(1, 5)}  # episode 0 is mixed
    best_return, best_version = max(whole.values())
    summary = json.loads((tmp_path / "tester.best-policy.json").read_text())
    assert (summary["version"], summary["steps"], summary["finished"]) == (best_version, 200, None)
    assert summary["return"] == pytest.approx(best_return)
    kept, version = read_policy_file(tmp_path / "tester.best-policy.safetensors")
    assert version == best_version
    for name, tensor in actors[best_version].state_dict().items():
        assert torch.equal(kept.state_dict()[name], tensor)


def test_a_restarted_test_worker_competes_against_the_best_its_earlier_run_kept(tmp_path, caplog):
    """An upgrade probe: the keeper started from nothing at every start, so the first whole episode after a restart
    (or an upgrade) replaced the best so far, however much worse."""
    from tmrl_worker.runtime import ActorPolicy

    layout = tm20_lidar_layout()
    earlier, worse, better = (ActorPolicy(small_actor(layout, seed), version) for seed, version in
                              ((1, 70), (2, 80), (3, 90)))
    assert BestPolicyKeeper(tmp_path, "viewer").consider(earlier, EpisodeOutcome(626.0, 1000, False))
    with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
        restarted = BestPolicyKeeper(tmp_path, "viewer")
    assert "an earlier run kept its best episode in" in caplog.text and "(weights version 70, return 626.00, " \
        "1000 steps, not finished): an episode replaces it only by beating it" in caplog.text
    assert not restarted.consider(worse, EpisodeOutcome(300.0, 1000, False))
    assert read_policy_file(tmp_path / "viewer.best-policy.safetensors")[1] == 70  # still the earlier run's
    assert restarted.consider(better, EpisodeOutcome(1030.0, 611, True))
    assert json.loads((tmp_path / "viewer.best-policy.json").read_text())["version"] == 90


def test_keep_best_outside_test_mode_is_refused():
    with pytest.raises(ValueError, match="keep_best needs test mode"):
        WorkerConfig(keep_best=True)
    assert WorkerConfig(keep_best=True, mode="test").keep_best


def test_a_test_worker_behind_a_real_relay_keeps_the_published_weights_it_drove(context, tmp_path):
    published = small_actor(tm20_lidar_layout(), seed=2)
    update = weights_update_from_actor(published, version=7)
    with relay_in_thread(insecure_config()) as relay:
        connected_trainer(context, relay).send(update)
        wait_for(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_weights_version") == 7)
        config = WorkerConfig(worker_id="viewer", env="sim-fast", mode="test", keep_best=True, max_steps=300,
                              max_episode_steps=60, max_steps_per_second=200, worker_port=relay.ports.worker_port,
                              weights_port=relay.ports.weights_port, state_dir=tmp_path,
                              transport=TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0),
                              security=SecurityConfig(insecure=True))
        stats = run_worker(config)
    assert stats.weights_version == 7 and stats.episodes >= 3
    summary = json.loads((tmp_path / "viewer.best-policy.json").read_text())
    assert summary["version"] == 7 and 1 <= summary["steps"] <= 60 and isinstance(summary["finished"], bool)
    kept, version = read_policy_file(tmp_path / "viewer.best-policy.safetensors")
    assert version == 7
    for name, tensor in published.state_dict().items():
        assert torch.equal(kept.state_dict()[name], tensor)


@pytest.mark.parametrize(("value", "read"), [(True, True), (False, False), (1, True), (0, False),
                                             (np.bool_(True), True), ("no", None), ("yes", None),
                                             (2, None), (1.0, None), (None, None)])
def test_only_true_or_false_in_info_finished_say_whether_an_episode_finished(value, read, caplog):
    """A BYO probe's interface set info["finished"] = "no": read as true, its unfinished episodes outranked every
    other as the best policy."""
    from tmrl_worker import envs
    from tmrl_worker.evaluate import episode_result

    envs._odd_finished_flags.clear()
    with caplog.at_level("WARNING", logger="tmrl_worker.envs"):
        assert envs.finished_flag({"finished": value}) is read
        assert episode_result(0, 0, (1.0, 10, True, {"finished": value}), 0.05).finished is read
    warnings = [r.getMessage() for r in caplog.records if "info[\"finished\"]" in r.getMessage()]
    assert len(warnings) == (0 if read is not None else 1), warnings  # once per type, not at every episode
    assert envs.finished_flag({}) is None
