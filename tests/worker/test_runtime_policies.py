"""Policies the worker can start with: uniform random, the env's scripted expert, or a safetensors policy file
(the format the trainer exports as ``policy.safetensors``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tmrl_common.layout import layout_for_box
from tmrl_common.networks import PolicyArchitecture, build_actor, weights_update_from_actor
from tmrl_trainer.service import export_policy
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import (
    PolicyFileError,
    RolloutLoop,
    ScriptedPolicy,
    UniformPolicy,
    initial_policy,
    load_policy_file,
    save_policy_file,
)

LAYOUT = layout_for_box(3, 1, -8.0, 8.0)  # Pendulum-v1's, bounds included


def actor(seed: int = 0, layout=LAYOUT):
    torch.manual_seed(seed)
    return build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[8]))


def test_policy_file_round_trip_acts_like_the_saved_actor(tmp_path):
    original = actor()
    path = save_policy_file(original, tmp_path / "p.safetensors", version=7)
    loaded = load_policy_file(path, LAYOUT)
    observation = (np.array([0.1, -0.2, 0.3], np.float32),)
    assert loaded.version == 7
    np.testing.assert_allclose(loaded.act(observation), original.act(observation, deterministic=True), rtol=1e-6)


def test_the_trainers_exported_policy_loads_in_the_worker(tmp_path):
    original = actor(3)
    path = export_policy(weights_update_from_actor(original, version=12), tmp_path / "policy.safetensors")
    loaded = load_policy_file(path, LAYOUT)
    observation = (np.array([1.0, 0.0, -1.0], np.float32),)
    assert loaded.version == 12
    np.testing.assert_allclose(loaded.act(observation), original.act(observation, deterministic=True), rtol=1e-6)


def test_bad_policy_files_are_refused_with_a_reason(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PolicyFileError, match="not a safetensors file"):
        load_policy_file(junk, LAYOUT)
    with pytest.raises(PolicyFileError, match="cannot be read"):
        load_policy_file(tmp_path / "missing.safetensors", LAYOUT)
    other = save_policy_file(actor(layout=layout_for_box(5, 1)), tmp_path / "other.safetensors")
    with pytest.raises(PolicyFileError, match="another observation layout"):
        load_policy_file(other, LAYOUT)


def test_expert_mode_uses_the_envs_driver_or_demands_a_policy_file(tmp_path):
    sim = make_env("sim-fast", max_episode_steps=100)
    try:
        expert = initial_policy("expert", sim, None, seed=0)
        assert isinstance(expert, ScriptedPolicy) and expert.version == 0
        stats = RolloutLoop(sim, None, None, expert).run(max_steps=100)
        assert stats.episode_return > 50 or max(stats.recent_returns, default=0) > 50
    finally:
        sim.close()
    pendulum = make_env("gym:Pendulum-v1")
    try:
        with pytest.raises(PolicyFileError, match="no scripted expert"):
            initial_policy("expert", pendulum, None, seed=0)
        path = save_policy_file(actor(), tmp_path / "p.safetensors", version=3)
        assert initial_policy("expert", pendulum, path, seed=0).version == 3
        assert isinstance(initial_policy("train", pendulum, None, seed=0), UniformPolicy)
    finally:
        pendulum.close()


def test_a_policy_file_outside_expert_mode_is_said_to_be_unused(tmp_path, caplog):
    pendulum = make_env("gym:Pendulum-v1")
    try:
        path = save_policy_file(actor(), tmp_path / "p.safetensors")
        with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
            assert isinstance(initial_policy("train", pendulum, path, seed=0), UniformPolicy)
    finally:
        pendulum.close()
    assert (f"policy_file {path} is not used: only an expert worker (--expert) acts with a policy file; this train "
            "worker acts with the trainer's weights") in caplog.text


def _exploring_actions(seed: int | None, global_seed: int, steps: int = 40) -> list[list[float]]:
    """Actions a train-mode rollout loop takes with weights version 1 (sampled, not the mean), with torch's global RNG
    seeded ``global_seed`` just before: only the loop's ``seed`` may decide the noise."""
    from tmrl_worker.weights_feed import WeightsFeed

    env = make_env("gym:Pendulum-v1")
    try:
        taken = []
        step = env.step

        def recording_step(action):
            taken.append(np.asarray(action).tolist())
            return step(action)

        env.step = recording_step
        feed = WeightsFeed("worker-noise")
        assert feed.offer(weights_update_from_actor(actor(seed=5), version=1))
        loop = RolloutLoop(env, None, feed, UniformPolicy(1, seed=0), deterministic=False, seed=seed)
        torch.manual_seed(global_seed)
        loop.run(max_steps=steps)
        assert loop.stats.weights_version == 1
        return taken
    finally:
        env.close()


def test_exploration_noise_follows_the_workers_seed_and_nothing_else():
    same = _exploring_actions(seed=3, global_seed=1), _exploring_actions(seed=3, global_seed=2)
    assert same[0] == same[1]
    other = _exploring_actions(seed=4, global_seed=1)
    assert other != same[0]


class Expert:
    def __init__(self, action):
        self.action = action

    def expert_action(self, observation):
        return self.action


@pytest.mark.parametrize(("returned", "message"), [
    (np.array([np.nan], np.float32), r"^Expert.expert_action returned a non-finite action \[nan\]: it was not applied$"),
    (np.zeros(3, np.float32), r"^Expert.expert_action returned 3 value\(s\) \(shape \(3,\)\); the action space has 1$"),
    ("full throttle", r"^Expert.expert_action returned a str, not an action of 1 numbers"),
])
def test_an_expert_action_that_is_not_finite_or_of_the_wrong_size_stops_the_worker_naming_the_expert(returned,
                                                                                                      message):
    """An outside probe: a NaN from an interface's ``expert_action`` reached the robot, then the worker died with a
    pydantic traceback; three values for a 1-D action space ended in a reshape traceback."""
    from tmrl_worker.envs import EnvFailure

    policy = ScriptedPolicy(Expert(returned).expert_action, action_dim=1)
    with pytest.raises(EnvFailure, match=message):
        policy.act(())
    assert ScriptedPolicy(Expert(np.array([0.5])).expert_action, action_dim=1).act(()).tolist() == [0.5]


def test_a_time_limit_set_for_a_gymnasium_env_that_keeps_its_own_is_warned_about(tmp_path, caplog):
    """An outside probe: ``max_episode_steps = 50`` gave MountainCar's 1000-step episodes without a word."""
    from tmrl_common.config import load_config
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.runtime import warn_if_time_limit_unused

    def warnings_for(worker_table: str) -> list[str]:
        path = tmp_path / "tmrl.toml"
        path.write_text("[worker]\n" + worker_table)
        caplog.clear()
        with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
            warn_if_time_limit_unused(load_config(WorkerConfig, "worker", path, environ={}))
        return [r.getMessage() for r in caplog.records]

    (message,) = warnings_for('env = "gym:MountainCarContinuous-v0"\nmax_episode_steps = 50\n')
    assert message.startswith("max_episode_steps = 50 is not applied to gym:MountainCarContinuous-v0")
    assert "[worker.env_options] (max_episode_steps = 50)" in message
    assert warnings_for('env = "gym:Pendulum-v1"\n') == []  # the default: nothing was asked
    assert warnings_for('env = "sim-fast"\nmax_episode_steps = 50\n') == []  # applied
    assert warnings_for('env = "gym:Pendulum-v1"\nmax_episode_steps = 50\n'
                        '[worker.env_options]\nmax_episode_steps = 50\n') == []
