"""TrackMania rtgym interfaces end to end on this machine: recorded frames, a fake OpenPlanet plugin on loopback,
a recording controller, and a short real rtgym run at 20 Hz."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from loopback_relay import wait_for
from tmrl_common.layout import tm20_full_layout, tm20_pixel_lidar_layout, tm20_pixel_lidar_progress_layout
from tmrl_common.protocol import observation_bounds
from tmrl_trainer.ingest import ValueBounds
from tmrl_worker.reward import TrajectoryReward, TrajectoryRewardConfig
from tmrl_worker.tm20.capture import RecordedFrames
from tmrl_worker.tm20.control import RecordingController
from tmrl_worker.tm20.interfaces import (
    GEAR_BOUNDS,
    RPM_BOUNDS,
    TM20ConfigError,
    TM20FullInterface,
    TM20LidarInterface,
    TM20LidarProgressInterface,
    make_tm20_env,
    tm20_rtgym_config,
)
from tmrl_worker.tm20.lidar import Lidar
from tmrl_worker.tm20.openplanet import TelemetryClient
from tmrl_worker.tm20.replay_server import TelemetryReplayServer
from tmrl_worker.tm20.synthetic import StraightDrive
from tmrl_worker.tm20.window import ClientArea

H, W = 120, 160
SERVER_HZ = 100.0
SPEED = 10.0  # m/s along x: 0.5 m per 50 ms step


def corridor_frames() -> np.ndarray:
    """Road between black walls that narrows frame after frame (so the LIDAR history changes)."""
    frames = np.full((6, H, W, 3), 180, np.uint8)
    for i in range(6):
        frames[i, :, : 30 + 4 * i] = 0
        frames[i, :, W - 30 - 4 * i:] = 0
    return frames


def telemetry_source(finish_at: float | None = None) -> StraightDrive:
    """The car drives along x at SPEED m/s; a respawn puts it back at x = 0 (finish flag from ``finish_at`` m)."""
    return StraightDrive(SPEED, SERVER_HZ, z=5.0, finish_at=finish_at)


def straight_reward(**config) -> TrajectoryReward:
    return TrajectoryReward.from_path([[0.0, 0.0, 5.0], [2000.0, 0.0, 5.0]], 0.5,
                                      TrajectoryRewardConfig(grace_steps=1000, **config))


class FakeWindow:
    """A game window that records focus requests; ``in_front`` says whether focusing it works."""

    title = "Trackmania"

    def __init__(self, in_front: bool = True) -> None:
        self.in_front = in_front
        self.focus_calls = 0
        self.placed: list[tuple[int, int, int, int]] = []

    def client_area(self) -> ClientArea:
        return ClientArea(0, 0, W, H)

    def place(self, x: int, y: int, width: int, height: int) -> None:
        self.placed.append((x, y, width, height))

    def focus(self) -> None:
        self.focus_calls += 1

    def is_foreground(self) -> bool:
        return self.in_front


@pytest.fixture
def plugin():
    drive = telemetry_source()
    with TelemetryReplayServer(drive.packet, rate_hz=SERVER_HZ) as server:
        server.drive = drive
        yield server


def devices(server, **extra):
    return dict(capture=RecordedFrames(corridor_frames()), telemetry=TelemetryClient(server.port, timeout=2.0),
                controller=RecordingController(on_respawn=server.drive.respawn), reward=straight_reward(),
                sleep_time_at_reset=0.0, **extra)


@pytest.mark.parametrize(("cls", "layout"), [
    (TM20LidarInterface, tm20_pixel_lidar_layout()),
    (TM20LidarProgressInterface, tm20_pixel_lidar_progress_layout()),
    (TM20FullInterface, tm20_full_layout()),
])
def test_observation_spaces_match_the_common_layouts_exactly(plugin, cls, layout):
    interface = cls(**devices(plugin))
    try:
        assert interface.layout == layout
        space = interface.get_observation_space()
        n = len(layout.components)
        assert [s.shape for s in space.spaces] == layout.observation_shapes()[:n]
        assert [s.dtype.name for s in space.spaces] == [c.dtype for c in layout.components]
        obs, info = interface.reset()
        assert space.contains(tuple(obs)) and info == {}
        obs, reward, terminated, info = interface.get_obs_rew_terminated_info()
        assert space.contains(tuple(obs)) and not terminated
    finally:
        interface.close()


def test_lidar_observation_holds_the_scan_history_and_the_telemetry_speed(plugin):
    interface = TM20LidarInterface(**devices(plugin))
    try:
        frames = corridor_frames()
        lidar = Lidar()
        obs, _ = interface.reset()
        assert obs[0].tolist() == [SPEED]
        np.testing.assert_array_equal(obs[1], np.stack([lidar.measure(frames[0])] * 4))  # first scan repeated
        for _ in range(3):
            obs, _, _, _ = interface.get_obs_rew_terminated_info()
        np.testing.assert_array_equal(obs[1], np.stack([lidar.measure(f) for f in frames[:4]]))  # oldest first
        assert obs[1][-1, 0] < obs[1][0, 0]  # walls closing in: the right beam shortens
        assert interface.controller.respawns == 1
    finally:
        interface.close()


def test_reset_respawns_and_wait_releases_then_respawns(plugin):
    interface = TM20LidarInterface(**devices(plugin))
    try:
        interface.reset()
        interface.wait()
        names = [name for name, _ in interface.controller.calls]
        assert names == ["apply", "respawn", "release", "respawn"]
        np.testing.assert_array_equal(interface.controller.actions[0], [0, 0, 0])
    finally:
        interface.close()


def test_game_finish_terminates_and_pays_the_finish_bonus_once():
    drive = telemetry_source(finish_at=2.0)
    with TelemetryReplayServer(drive.packet, rate_hz=SERVER_HZ) as server:
        server.drive = drive
        interface = TM20LidarInterface(**devices(server))
        try:
            interface.reset()
            deadline = time.monotonic() + 5.0  # 0.2 s drives 2 m, to the finish; a loaded machine may take longer
            while not interface.telemetry.latest().finished and time.monotonic() < deadline:
                time.sleep(0.01)
            _, reward, terminated, info = interface.get_obs_rew_terminated_info()
            assert terminated and info["finished_by_game"]
            assert reward >= interface.reward.config.finish_bonus
            _, again, _, _ = interface.get_obs_rew_terminated_info()
            assert again < interface.reward.config.finish_bonus
        finally:
            interface.close()


def test_a_finish_flag_within_the_restart_distance_of_the_start_pays_no_finish_bonus():
    """TrackMania probe: a plugin raising the finish flag 0.1 m into a run (the last run's flag, not yet cleared)
    got the episode terminated and paid the finish bonus, where record-reward ignores such a flag."""
    drive = StraightDrive(speed=0.5, rate_hz=SERVER_HZ, z=5.0, finish_at=0.05)  # finished from 5 cm on
    with TelemetryReplayServer(drive.packet, rate_hz=SERVER_HZ) as server:
        server.drive = drive
        interface = TM20LidarInterface(**devices(server))
        try:
            interface.reset()
            wait_for(lambda: interface.telemetry.latest().finished)
            _, reward, terminated, info = interface.get_obs_rew_terminated_info()
            assert interface.last_telemetry.finished and interface.last_telemetry.distance <= 1.0
            assert not terminated and not info["finished_by_game"] and reward < interface.reward.config.finish_bonus
            wait_for(lambda: interface.telemetry.latest().distance > 1.0, timeout_s=10.0)  # 2 s at 0.5 m/s
            _, reward, terminated, info = interface.get_obs_rew_terminated_info()
            assert terminated and info["finished_by_game"] and reward >= interface.reward.config.finish_bonus
        finally:
            interface.close()


def test_full_interface_stacks_64x64_gray_frames_with_speed_gear_and_rpm_unclipped(plugin):
    interface = TM20FullInterface(**devices(plugin))
    try:
        obs, _ = interface.reset()
        assert [o.shape for o in obs] == [(1,), (1,), (1,), (4, 64, 64)] and obs[3].dtype == np.uint8
        assert (obs[1][0], obs[2][0]) == (3.0, 6000.0)  # gear and rpm of the telemetry packet, like upstream
        assert not interface.clipped  # in range: passed unchanged, nothing counted
        assert obs[3][0, 32, 0] == 0 and obs[3][0, 32, 32] > 100  # black wall at the left edge, road in the middle
    finally:
        interface.close()


@pytest.mark.parametrize(("size", "warned"), [((128, 256), False), ((300, 500), True)])
def test_full_interface_images_larger_than_the_captured_window_are_warned_about(plugin, caplog, size, warned):
    """A TrackMania probe: image_height 300, image_width 500 gave images enlarged from the 256 x 128 client area with
    no word."""
    with caplog.at_level("WARNING", logger="tmrl_worker.tm20.interfaces"):
        interface = TM20FullInterface(**devices(plugin), image_height=size[0], image_width=size[1])
    interface.close()
    lines = [r.getMessage() for r in caplog.records if "larger than" in r.getMessage()]
    assert lines == ([f"tm20-full: image_height x image_width = {size[0]} x {size[1]} is larger than the 128 x 256 "
                      "pixels captured from the game window: frames are enlarged, which adds no detail and costs the "
                      "networks memory and time (at most 128 x 256 keeps every captured pixel)"] if warned else [])


@pytest.mark.parametrize(("gear", "rpm", "clipped"), [
    (1e30, 1e9, (GEAR_BOUNDS[1], RPM_BOUNDS[1])),  # finite, far above what a car reports
    (-5.0, -300.0, (GEAR_BOUNDS[0], RPM_BOUNDS[0])),  # below: no gear or rpm is negative
])
def test_full_interface_clips_gear_and_rpm_out_of_range_into_its_bounds_counting_them_and_warning_once(
        gear, rpm, clipped, caplog):
    drive = StraightDrive(SPEED, SERVER_HZ, z=5.0, gear=gear, rpm=rpm)
    with TelemetryReplayServer(drive.packet, rate_hz=SERVER_HZ) as server:
        server.drive = drive
        interface = TM20FullInterface(**devices(server))
        try:
            with caplog.at_level(logging.WARNING, logger="tmrl_worker.tm20.interfaces"):
                observations = [interface.reset()[0]] + [interface.get_obs_rew_terminated_info()[0] for _ in range(3)]
            space = interface.get_observation_space()
            limits = observation_bounds(interface.layout, ValueBounds().max_abs_observation)  # what the trainer holds
            for obs in observations:
                assert (obs[1][0], obs[2][0]) == clipped
                assert space.contains(tuple(obs))
                for name, part in zip(("speed", "gear", "rpm"), obs, strict=False):
                    assert limits[name][0] <= part[0] <= limits[name][1]
            assert interface.clipped["gear"] == interface.clipped["rpm"] == len(observations)
            warnings = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
            assert len(warnings) == 2 and any("gear" in w for w in warnings) and any("rpm" in w for w in warnings)
        finally:
            interface.close()


def test_missing_reward_points_say_how_to_record_them_and_how_to_give_them(plugin):
    """A TrackMania-docs probe: the message named Python arguments (reward_path, reward=) to a `benchmark` user."""
    with pytest.raises(TM20ConfigError, match=r"record-reward.*reward_path in \[worker.env_options\], --reward FILE "
                                              r"for benchmark"):
        TM20LidarInterface(capture=RecordedFrames(corridor_frames()), controller=RecordingController(),
                           telemetry=TelemetryClient(plugin.port, start=False))


def test_rtgym_config_carries_the_brief_timings():
    config = tm20_rtgym_config("tm20-lidar-progress", reward_path="points.safetensors")
    assert config["interface"] is TM20LidarProgressInterface
    assert (config["time_step_duration"], config["start_obs_capture"], config["time_step_timeout_factor"]) == (0.05, 0.04, 1.0)
    assert config["act_buf_len"] == 2 and config["wait_on_done"] and not config["benchmark"]
    assert config["interface_kwargs"] == {"reward_path": "points.safetensors", "act_buf_len": 2}
    with pytest.raises(TM20ConfigError, match="unknown TrackMania variant"):
        tm20_rtgym_config("tm20-camera")


def test_short_rtgym_run_at_20hz_pays_progress_and_applies_the_actions(plugin):
    env = make_tm20_env("lidar-progress", ep_max_length=12, benchmark=True, **devices(plugin))
    interface = env.unwrapped.interface
    try:
        obs, _ = env.reset()
        assert [np.shape(o) for o in obs] == interface.layout.observation_shapes()
        assert env.observation_space.contains(obs)
        rewards, truncated, step = [], False, 0
        while not truncated:
            action = np.array([1.0, 0.0, 0.1 * (step % 3)], dtype=np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            assert env.observation_space.contains(obs) and not terminated
            np.testing.assert_array_equal(obs[-1], action)  # rtgym appends the action buffer
            rewards.append(reward)
            step += 1
        assert step == 12
        assert sum(rewards) > 5  # ~1 point (0.5 m) per 50 ms step at 10 m/s
        assert obs[1][0] > 0  # progress along the path
        sent = interface.controller.actions
        np.testing.assert_array_equal(sent[:2], np.zeros((2, 3)))  # default action: interface reset, rtgym reset
        np.testing.assert_array_equal(sent[2], [1.0, 0.0, 0.0])  # then the policy's, in order
        assert any(a[2] == pytest.approx(0.2) for a in sent)
        bench = env.unwrapped.benchmarks()
        assert bench["time_step_duration"][0] == pytest.approx(0.05, rel=0.5)
    finally:
        interface.close()
        env.close()


def test_a_failing_device_closes_the_ones_already_built(plugin, monkeypatch):
    import threading

    from tmrl_worker.tm20 import interfaces
    from tmrl_worker.tm20.capture import CaptureError

    def no_screen(*args, **kwargs):
        raise CaptureError("no screen here")

    monkeypatch.setattr(interfaces, "make_capture", no_screen)
    with pytest.raises(CaptureError, match="no screen"):
        TM20LidarInterface(reward=straight_reward(), controller=RecordingController(), telemetry_port=plugin.port,
                           window=FakeWindow())
    names = [t.name for t in threading.enumerate() if t.is_alive()]
    assert f"tm20-telemetry-{plugin.port}" not in names


def test_lidar_settings_from_a_config_table_are_validated_and_used(plugin):
    interface = TM20LidarInterface(**devices(plugin, lidar={"beams": 9, "threshold": 40}))
    try:
        assert interface.lidar.beams == 9 and interface.layout.components[1].frame_shape == [9]
        obs, _ = interface.reset()
        assert obs[1].shape == (4, 9)
    finally:
        interface.close()
    rejected = devices(plugin, lidar={"beams": 0})
    try:
        with pytest.raises(ValueError, match="beams"):
            TM20LidarInterface(**rejected)
    finally:
        rejected["telemetry"].close()
