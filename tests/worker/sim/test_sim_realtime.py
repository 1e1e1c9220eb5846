"""Real-time mode: rtgym interface contract, 20 Hz elastic clock, physics that never waits for the agent."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from rtgym import RealTimeGymInterface
from tmrl_worker.sim import RaceTrackEnv, RaceTrackInterface, close_realtime_env, make_realtime_env, realtime_config


def test_realtime_config_copies_rtgym_defaults_with_the_interface_and_action_buffer():
    config = realtime_config(track="oval", max_episode_steps=123)
    assert config["interface"] is RaceTrackInterface
    assert issubclass(config["interface"], RealTimeGymInterface)
    assert config["interface_kwargs"]["config"]["track"] == "oval"
    assert config["time_step_duration"] == pytest.approx(0.05)
    assert config["start_obs_capture"] == pytest.approx(0.05)
    assert config["act_buf_len"] == 2 and config["act_in_obs"] and config["reset_act_buf"]
    assert config["ep_max_length"] == 123


def test_interface_spaces_plus_action_buffer_equal_the_fast_env_spaces():
    for observation in ("lidar", "lidar_progress", "image"):
        interface = RaceTrackInterface({"observation": observation})
        fast = RaceTrackEnv(observation=observation)
        spaces = interface.get_observation_space().spaces + (interface.get_action_space(),) * 2
        assert spaces == fast.observation_space.spaces
        assert interface.layout == fast.layout
        np.testing.assert_array_equal(interface.get_default_action(), np.zeros(3, np.float32))


def test_physics_keeps_running_on_the_wall_clock_while_the_agent_is_away():
    interface = RaceTrackInterface({"track": "oval", "start_jitter": 0.0})
    try:
        interface.reset(seed=0)
        interface.send_control(np.array([1.0, 0.0, 0.0], np.float32))
        start_ticks, start = interface.loop.ticks, time.perf_counter()
        time.sleep(0.3)  # the agent "thinks"; the car must not wait
        elapsed = time.perf_counter() - start
        ticks = interface.loop.ticks - start_ticks
        assert ticks + interface.loop.dropped_ticks >= 0.9 * elapsed * 100  # 100 Hz of wall-clock physics
        assert ticks >= 0.3 * elapsed * 100  # tolerant of a loaded machine
        assert interface.loop.pose().speed > 1.0
    finally:
        interface.close()
    assert not interface.loop.running


def test_bounded_realtime_run_steps_at_about_20_hz():
    env = make_realtime_env(track="oval", benchmark=True, max_episode_steps=30, start_jitter=0.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rtgym shares its default action between reset and step observations
            obs, _ = env.reset(seed=0)
            assert env.observation_space.contains(obs)
            start = time.perf_counter()
            steps, truncated = 0, False
            while not truncated:
                obs, reward, terminated, truncated, info = env.step(np.array([1.0, 0.0, 0.0], np.float32))
                steps += 1
                assert not terminated
            elapsed = time.perf_counter() - start
        assert steps == 30
        assert 30 * 0.05 * 0.8 < elapsed < 30 * 0.05 * 3.0  # rtgym's elastic 20 Hz clock; tolerant of a loaded machine
        assert env.unwrapped.benchmarks()["time_step_duration"][0] == pytest.approx(0.05, rel=0.5)
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs[-1], [1.0, 0.0, 0.0])
        assert info["progress"] > 0.01 and obs[0][0] > 20.0  # the car drove off at > 20 km/h
        assert env.unwrapped.layout.observation_shapes() == [o.shape for o in obs]
    finally:
        close_realtime_env(env)


def test_malformed_controls_are_counted_and_replaced_by_the_default_action():
    interface = RaceTrackInterface({"track": "oval"})
    interface.send_control(np.array([1.0, 0.0, 0.5], np.float32))
    assert interface.car.gas == 1.0
    interface.send_control(np.array([np.nan, 0.0, 0.0]))
    interface.send_control([1.0, 2.0])
    assert interface.rejected_controls == 2
    assert (interface.car.gas, interface.car.brake, interface.car.steer) == (0.0, 0.0, 0.0)
    interface.send_control(None)  # rtgym's "do nothing"
    assert interface.controls_sent == 3


@pytest.mark.parametrize("observation", ["lidar", "lidar_progress", "image"])
def test_a_history_of_one_gives_the_interface_observations_the_layout_shapes(observation):
    interface = RaceTrackInterface({"observation": observation, "img_hist_len": 1, "track": "oval"})
    try:
        space = interface.get_observation_space()
        layout_shapes = interface.layout.observation_shapes()[:len(space.spaces)]  # the action buffer is rtgym's
        assert [s.shape for s in space.spaces] == layout_shapes
        parts, _ = interface.reset(seed=0)
        assert [p.shape for p in parts] == layout_shapes and space.contains(tuple(parts))
        parts, *_ = interface.get_obs_rew_terminated_info()
        assert [p.shape for p in parts] == layout_shapes and space.contains(tuple(parts))
    finally:
        interface.close()


def test_a_starved_physics_thread_drops_its_ticks_and_says_so_once_per_interval(caplog):
    """A soak on a loaded 2-core machine logged a warning per starvation (9 in 30 minutes): now a line per 30 s,
    the later ones counted with the next."""
    import logging

    from tmrl_worker.sim import Car, PhysicsLoop
    from tmrl_worker.sim.track import load_track

    loop = PhysicsLoop(Car(load_track("oval")), hz=100.0)
    caplog.set_level(logging.WARNING, logger="tmrl_worker.sim.realtime")
    loop.start()
    try:
        for _ in range(3):  # the thread cannot tick while another holds the car: starved for 0.4 s each time
            with loop.lock:
                time.sleep(0.4)
            time.sleep(0.1)
    finally:
        loop.stop()
    assert loop.dropped_ticks >= 3  # some of each 0.4 s at 100 Hz, past the 0.25 s caught up
    lines = [record.getMessage() for record in caplog.records if "starved" in record.getMessage()]
    assert len(lines) == 1 and "dropping" in lines[0], lines
