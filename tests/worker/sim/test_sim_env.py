"""Fast mode: spaces like TM20, rtgym-style action buffer and delay, seeding, reward, termination, truncation."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from tmrl_common.layout import newest_frames, tm20_image_layout, tm20_lidar_layout, tm20_lidar_progress_layout
from tmrl_worker.sim import ENV_IDS, PurePursuitDriver, RaceTrackEnv

LAYOUTS = {"lidar": tm20_lidar_layout(), "lidar_progress": tm20_lidar_progress_layout(), "image": tm20_image_layout()}


@pytest.mark.parametrize("observation", list(LAYOUTS))
def test_observations_match_the_tm20_layouts(observation):
    env = RaceTrackEnv(observation=observation)
    assert env.layout == LAYOUTS[observation]
    obs, info = env.reset(seed=0)
    assert [part.shape for part in obs] == LAYOUTS[observation].observation_shapes()
    assert [part.dtype.name for part in obs] == [c.dtype for c in env.layout.components] + ["float32"] * 2
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    frames = newest_frames(env.layout, obs)
    assert set(frames) == {c.name for c in env.layout.components}


def test_lidar_observation_is_speed_lidar_and_two_actions_like_tm20():
    env = RaceTrackEnv()
    space = env.observation_space
    assert [s.shape for s in space.spaces] == [(1,), (4, 19), (3,), (3,)]
    assert all(s.dtype == np.float32 for s in space.spaces)
    assert env.action_space.shape == (3,) and env.action_space.low.min() == -1 and env.action_space.high.max() == 1


@pytest.mark.parametrize("env_id", list(ENV_IDS))
def test_gymnasium_ids_build_every_variant_and_pass_check_env(env_id):
    env = gymnasium.make(f"tmrl_worker.sim:{env_id}")
    assert env.unwrapped.config.observation == ENV_IDS[env_id]
    assert env.get_wrapper_attr("layout") == env.unwrapped.layout
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check_env warnings count as failures
        check_env(env.unwrapped)


def test_action_buffer_is_appended_oldest_first_like_rtgym():
    env = RaceTrackEnv()
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs[-2], np.zeros(3))
    np.testing.assert_array_equal(obs[-1], np.zeros(3))
    first, second = np.array([1.0, 0.0, 0.2], np.float32), np.array([0.0, 0.5, -0.3], np.float32)
    obs, *_ = env.step(first)
    np.testing.assert_array_equal(obs[-2], np.zeros(3))
    np.testing.assert_array_equal(obs[-1], first)
    obs, *_ = env.step(second)
    np.testing.assert_array_equal(obs[-2], first)
    np.testing.assert_array_equal(obs[-1], second)
    obs, *_ = env.step(np.array([2.0, -3.0, 0.0]))  # out of range: clipped to the action space
    np.testing.assert_array_equal(obs[-1], [1.0, -1.0, 0.0])


def test_an_action_takes_effect_one_step_later_as_in_rtgym():
    delayed, immediate = RaceTrackEnv(start_jitter=0.0), RaceTrackEnv(start_jitter=0.0, delayed_actions=False)
    gas = np.array([1.0, 0.0, 0.0], np.float32)
    for env in (delayed, immediate):
        env.reset(seed=0)
    assert delayed.step(gas)[0][0][0] == 0.0  # the default action (zeros) was applied during this step
    assert immediate.step(gas)[0][0][0] > 0.0
    assert delayed.step(gas)[0][0][0] > 0.0


def test_lidar_history_starts_with_the_first_scan_repeated_and_shifts_oldest_first():
    env = RaceTrackEnv(track="circuit", start_jitter=0.0)
    driver = PurePursuitDriver(env.track, env.config.car)
    obs, _ = env.reset(seed=0)
    lidar = obs[1]
    assert (lidar == lidar[0]).all()
    for _ in range(60):  # into the first bend
        obs, *_ = env.step(driver.act(env.car.pose()))
    previous = obs[1]
    obs, *_ = env.step(driver.act(env.car.pose()))
    np.testing.assert_array_equal(obs[1][:-1], previous[1:])
    assert not np.array_equal(obs[1][-1], previous[-1])


def test_same_seed_same_episode_and_other_seeds_start_elsewhere():
    def rollout(seed):
        env = RaceTrackEnv()
        rng = np.random.default_rng(123)
        obs, _ = env.reset(seed=seed)
        trace = [np.concatenate([np.ravel(p) for p in obs])]
        for _ in range(50):
            obs, reward, *_ = env.step(rng.uniform(-1, 1, 3).astype(np.float32))
            trace.append(np.concatenate([np.ravel(p) for p in obs] + [[reward]]))
        return np.concatenate(trace)

    np.testing.assert_array_equal(rollout(7), rollout(7))
    assert not np.array_equal(rollout(7), rollout(8))


def test_reward_pays_points_passed_and_a_finished_lap_collects_them_all_plus_the_bonus():
    env = RaceTrackEnv(track="oval", start_jitter=0.0)
    driver = PurePursuitDriver(env.track, env.config.car)
    env.reset(seed=0)
    rewards, infos = [], []
    terminated = truncated = False
    while not (terminated or truncated):
        _, reward, terminated, truncated, info = env.step(driver.act(env.car.pose()))
        rewards.append(reward)
        infos.append(info)
    points = len(env.episode.reward.points)
    assert terminated and not truncated and infos[-1]["finished"]
    assert sum(rewards) == pytest.approx(points - 1 + env.config.reward.finish_bonus)
    assert min(rewards) >= 0.0
    assert [i["progress"] for i in infos] == sorted(i["progress"] for i in infos)


def test_standing_still_terminates_after_the_grace_period_and_the_countdown():
    env = RaceTrackEnv()
    env.reset(seed=0)
    reward_config = env.config.reward
    idle = np.zeros(3, np.float32)
    for _ in range(reward_config.grace_steps + reward_config.no_progress_steps - 1):
        _, reward, terminated, truncated, _ = env.step(idle)
        assert reward == 0.0 and not terminated and not truncated
    _, _, terminated, truncated, _ = env.step(idle)
    assert terminated and not truncated
    with pytest.raises(RuntimeError, match="reset"):
        env.step(idle)


def test_episodes_are_truncated_at_the_maximum_length():
    env = RaceTrackEnv(track="oval", max_episode_steps=25)
    env.reset(seed=0)
    flags = [env.step(np.array([1.0, 0.0, 0.0], np.float32))[2:4] for _ in range(25)]
    assert flags[-1] == (False, True)
    assert all(f == (False, False) for f in flags[:-1])


def test_non_finite_actions_are_refused_with_a_clear_error():
    env = RaceTrackEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="3 numbers"):
        env.step([1.0, 0.0])
    env.step(np.zeros(3, np.float32))  # the env is still usable afterwards


def test_braking_before_sharp_turns_beats_full_throttle_on_the_hairpin_track():
    def drive(brake: bool) -> tuple[int, float, bool, int]:
        env = RaceTrackEnv(track="hairpins", start_jitter=0.0, max_episode_steps=2000)
        driver = PurePursuitDriver(env.track, env.config.car, brake=brake)
        env.reset(seed=0)
        steps, total, done, info = 0, 0.0, False, {}
        while not done:
            _, reward, terminated, truncated, info = env.step(driver.act(env.car.pose()))
            steps, total, done = steps + 1, total + reward, terminated or truncated
        return steps, total, info["finished"], env.car.crashes

    braking_steps, braking_return, braking_finished, braking_crashes = drive(brake=True)
    throttle_steps, throttle_return, throttle_finished, throttle_crashes = drive(brake=False)
    assert braking_finished and braking_crashes == 0
    assert throttle_crashes >= 3  # one per hairpin at least
    # the braking driver finishes sooner (a full-throttle car that never finishes loses outright)
    assert (not throttle_finished) or braking_steps < 0.95 * throttle_steps
    assert braking_return >= throttle_return


def test_rgb_render_shows_the_track():
    env = RaceTrackEnv(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.array([1.0, 0.0, 0.0], np.float32))
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) >= 4  # grass, road, walls, car


def test_an_explicit_observation_in_the_config_wins_over_the_id_variant():
    env = gymnasium.make("tmrl_worker.sim:tmrl/RaceTrack-v0", config={"observation": "image", "track": "oval"})
    assert env.unwrapped.config.observation == "image" and env.unwrapped.track.name == "oval"
    assert gymnasium.make("tmrl_worker.sim:tmrl/RaceTrackImage-v0").unwrapped.config.observation == "image"


def test_a_partial_reward_table_keeps_the_simulators_other_reward_settings():
    from tmrl_worker.envs import make_env
    from tmrl_worker.reward import TrajectoryRewardConfig
    from tmrl_worker.sim import SimConfig
    from tmrl_worker.sim.config import SIM_REWARD

    config = SimConfig(reward={"step_penalty": 0.5})
    assert config.reward == SIM_REWARD.model_copy(update={"step_penalty": 0.5})
    # not TrackMania's defaults, whose 10-step no-progress cut would end the simulator's episodes at the first hairpin
    assert config.reward.no_progress_steps == 40 != TrajectoryRewardConfig().no_progress_steps
    handle = make_env("sim-fast", options={"reward": {"step_penalty": 0.5}})
    try:
        reward = handle.env.unwrapped.config.reward
        assert (reward.step_penalty, reward.no_progress_steps, reward.grace_steps, reward.search_window) == (0.5, 40, 40, 60)
    finally:
        handle.env.close()


@pytest.mark.parametrize(("observation", "history_part", "frame_shape"),
                         [("lidar", 1, (19,)), ("lidar_progress", 2, (19,)), ("image", 1, (64, 64))])
def test_a_history_of_one_has_the_frame_shape_of_the_layout(observation, history_part, frame_shape):
    env = RaceTrackEnv(observation=observation, img_hist_len=1)
    assert env.layout.observation_shapes()[history_part] == frame_shape
    assert env.observation_space.spaces[history_part].shape == frame_shape
    obs, _ = env.reset(seed=0)
    assert [part.shape for part in obs] == env.layout.observation_shapes()
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert newest_frames(env.layout, obs)[env.layout.components[history_part].name].shape == frame_shape


def test_a_history_of_one_shows_the_newest_scan_and_keeps_earlier_observations_unchanged():
    env = RaceTrackEnv(track="circuit", start_jitter=0.0, img_hist_len=1)
    history_four = RaceTrackEnv(track="circuit", start_jitter=0.0)
    driver = PurePursuitDriver(env.track, env.config.car)
    obs, _ = env.reset(seed=0)
    history_four.reset(seed=0)
    earlier = []
    for _ in range(60):  # into the first bend
        action = driver.act(env.car.pose())
        obs, *_ = env.step(action)
        reference, *_ = history_four.step(action)
        earlier.append((obs[1], obs[1].copy()))
        np.testing.assert_array_equal(obs[1], reference[1][-1])  # the newest of the four-scan history
    assert all(np.array_equal(kept, copy) for kept, copy in earlier)
    assert not np.array_equal(earlier[0][1], earlier[-1][1])
