"""The game's failures during a run: plugin killed and restarted, capture failing, a bug in the observation path,
the finish pop-up, a respawn that does not restart the race, the window behind others, reward settings from TOML.

Each case runs the real rtgym environment (its observation thread and lock) over the TrackMania interface, with the
fake plugin speaking the plugin protocol on loopback."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import tomllib

import numpy as np
import pytest
from test_tm20_interfaces import FakeWindow, corridor_frames, straight_reward
from tmrl_worker.envs import EnvInterrupted, make_env
from tmrl_worker.reward import TrajectoryReward, TrajectoryRewardConfig, save_points
from tmrl_worker.runtime import RolloutLoop, UniformPolicy
from tmrl_worker.tm20.capture import CaptureError, RecordedFrames
from tmrl_worker.tm20.control import RecordingController
from tmrl_worker.tm20.interfaces import (
    RaceRestartError,
    RewardPathMismatchError,
    TM20ConfigError,
    TM20GameLostError,
    TM20LidarInterface,
    make_tm20_env,
)
from tmrl_worker.tm20.openplanet import TelemetryClient
from tmrl_worker.tm20.replay_server import TelemetryReplayServer
from tmrl_worker.tm20.synthetic import StraightDrive

SERVER_HZ = 100.0
FAST_RECOVERY = {"first_retry_s": 0.2, "max_retry_s": 1.0, "probe_timeout_s": 0.5, "step_telemetry_timeout_s": 0.5}


class Game:
    """The fake plugin's car, kept across plugin restarts (like the game itself, which outlives the plugin)."""

    def __init__(self, finish_at: float | None = None, respawn_works: bool = True) -> None:
        self.drive = StraightDrive(10.0, SERVER_HZ, z=5.0, finish_at=finish_at, countdown_s=1.0)
        self.respawn_works = respawn_works
        self.popups_closed = 0

    def respawn(self) -> None:
        if self.respawn_works:
            self.drive.respawn()

    def close_popup(self) -> None:
        self.popups_closed += 1

    def controller(self) -> RecordingController:
        return RecordingController(on_respawn=self.respawn, on_close_popup=self.close_popup)

    def serve(self, port: int = 0) -> TelemetryReplayServer:
        return TelemetryReplayServer(self.drive.packet, rate_hz=SERVER_HZ, port=port)


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class RecordingEnv:
    """Wraps an EnvHandle's step to keep what each step returned (the rollout loop drops ``info``)."""

    def __init__(self, handle) -> None:
        self.steps: list[tuple[bool, bool, dict, float]] = []
        self._step = handle.step
        handle.step = self.step

    def step(self, action):
        observation, reward, terminated, truncated, info = self._step(action)
        self.steps.append((terminated, truncated, dict(info), time.monotonic()))
        return observation, reward, terminated, truncated, info


@pytest.mark.slow
def test_plugin_killed_mid_episode_and_back_10_s_later_the_rollout_resumes_without_a_restart(caplog):
    game = Game()
    server = game.serve().start()
    port = server.port
    telemetry = TelemetryClient(port, timeout=2.0, reconnect_delay=0.1)
    handle = make_env("tm20-lidar", max_episode_steps=10_000, options={
        "allow_non_windows": True, "capture": RecordedFrames(corridor_frames()), "telemetry": telemetry,
        "controller": game.controller(), "reward": straight_reward(), "sleep_time_at_reset": 0.0,
        "recovery": FAST_RECOVERY})
    record = RecordingEnv(handle)
    interface = handle.env.unwrapped.interface
    restarted: list[TelemetryReplayServer] = []
    killed_at: list[float] = []

    def kill_then_restart() -> None:
        time.sleep(1.0)
        server.close()  # the plugin dies mid-episode: its socket closes, no more packets
        killed_at.append(time.monotonic())
        time.sleep(10.0)
        restarted.append(game.serve(port).start())  # same port, a new listener, as a reloaded plugin would

    chaos = threading.Thread(target=kill_then_restart, daemon=True)
    loop = RolloutLoop(handle, None, None, UniformPolicy(3, seed=0), batch_steps=1000, compress=False,
                       deterministic=False, seed=0, worker_id="tm20-test")
    chaos.start()
    caplog.set_level(logging.INFO, logger="tmrl_worker.tm20.interfaces")
    try:
        stats = loop.run(max_steps=100)
    finally:
        chaos.join(timeout=15)
        handle.close()
        for extra in restarted:
            extra.close()
    assert stats.steps == 100  # the loop ran to its end: no hang, no crash, no restart
    truncations = [i for i, (term, trunc, info, _) in enumerate(record.steps) if trunc]
    assert len(truncations) == 1 and not record.steps[truncations[0]][0]
    cut = record.steps[truncations[0]]
    assert cut[2]["truncated_reason"].startswith("telemetry:") and "9000" not in cut[2]["truncated_reason"][:10]
    assert cut[3] - killed_at[0] < 2.0  # noticed within the step timeout, not after minutes
    resumed = record.steps[truncations[0] + 1]
    assert resumed[3] - killed_at[0] >= 10.0  # the reset waited for the plugin to come back
    assert len(record.steps) - truncations[0] - 1 >= 40  # and the rollout went on after it
    assert telemetry.stats.connects >= 2 and interface.faults["telemetry"] >= 1
    status_lines = [r.getMessage() for r in caplog.records if "waiting for the game (attempt" in r.getMessage()]
    assert len(status_lines) >= 3 and "no telemetry" in status_lines[0]
    assert any("the game is back" in r.getMessage() for r in caplog.records)


class FlakyCapture(RecordedFrames):
    """Recorded frames whose grabs ``fail_from`` .. ``fail_from + failures - 1`` raise CaptureError."""

    def __init__(self, fail_from: int, failures: int) -> None:
        super().__init__(corridor_frames())
        self.fail_from, self.failures, self.calls = fail_from, failures, 0

    def grab(self) -> np.ndarray:
        self.calls += 1
        if self.fail_from <= self.calls < self.fail_from + self.failures:
            raise CaptureError("dxcam could not capture (the window was minimised)")
        return super().grab()


def test_capture_failure_during_a_step_truncates_the_episode_and_reset_waits_for_frames():
    game = Game()
    with game.serve() as server:
        capture = FlakyCapture(fail_from=5, failures=3)
        env = make_tm20_env("lidar", ep_max_length=1000, capture=capture, telemetry=TelemetryClient(server.port),
                            controller=game.controller(), reward=straight_reward(), sleep_time_at_reset=0.0,
                            recovery=FAST_RECOVERY)
        interface = env.unwrapped.interface
        try:
            env.reset()  # grab 1
            outcomes = []
            for _ in range(6):
                _, _, terminated, truncated, info = env.step(np.zeros(3, np.float32))
                outcomes.append((terminated, truncated, info))
                if terminated:
                    break
            assert len(outcomes) == 4 and outcomes[-1][0]  # grabs 2-4 fine, grab 5 fails: episode ends there
            assert outcomes[-1][2]["truncated_reason"].startswith("capture: dxcam could not capture")
            started = time.monotonic()
            obs, _ = env.reset()  # grabs 6 and 7 fail in the probes, 8 works
            assert time.monotonic() - started >= 0.2 + 0.4  # two backoff waits
            assert env.observation_space.contains(obs) and interface.faults["capture"] == 1
            _, _, terminated, _, _ = env.step(np.zeros(3, np.float32))
            assert not terminated and interface.status == "running"
        finally:
            interface.close()
            env.close()


def test_a_game_that_does_not_come_back_is_given_up_at_give_up_after_s_not_a_backoff_wait_later():
    """TrackMania probe: with give_up_after_s = 4 and captures failing for good, the worker gave up after 7.8 s: the
    last backoff wait (up to max_retry_s) ran past the give-up time."""
    game = Game()
    with game.serve() as server:
        interface = TM20LidarInterface(capture=FlakyCapture(fail_from=1, failures=10**9),
                                       telemetry=TelemetryClient(server.port), controller=game.controller(),
                                       reward=straight_reward(), sleep_time_at_reset=0.0,
                                       recovery={**FAST_RECOVERY, "first_retry_s": 0.6, "max_retry_s": 8.0,
                                                 "give_up_after_s": 1.0})
        try:
            started = time.monotonic()
            with pytest.raises(TM20GameLostError, match=r"did not come back in 1 s: capture: dxcam could not"):
                interface.wait_for_game("capture failed")
            took = time.monotonic() - started  # tries at 0, 0.6 and 1.0 s; before: 0, 0.6 and 1.8 s
            assert 0.95 <= took < 1.6, took
        finally:
            interface.close()


def test_a_bug_in_the_observation_path_ends_the_episode_instead_of_hanging_rtgym(monkeypatch):
    game = Game()
    with game.serve() as server:
        env = make_tm20_env("lidar", capture=RecordedFrames(corridor_frames()), telemetry=TelemetryClient(server.port),
                            controller=game.controller(), reward=straight_reward(), sleep_time_at_reset=0.0)
        interface = env.unwrapped.interface
        try:
            env.reset()
            monkeypatch.setattr(interface.reward, "compute", lambda position: 1 / 0)
            done = threading.Event()
            result = {}

            def step() -> None:
                result["step"] = env.step(np.zeros(3, np.float32))
                done.set()

            threading.Thread(target=step, daemon=True).start()
            assert done.wait(5.0), "env.step hung"
            _, _, terminated, _, info = result["step"]
            assert terminated and info["truncated_reason"].startswith("unexpected: division by zero")
            assert interface.faults["unexpected"] == 1
        finally:
            interface.close()
            env.close()


def test_after_a_finish_reset_closes_the_popup_and_waits_for_the_race_to_restart():
    game = Game(finish_at=2.0)
    with game.serve() as server:
        interface = TM20LidarInterface(capture=RecordedFrames(corridor_frames()),
                                       telemetry=TelemetryClient(server.port), controller=game.controller(),
                                       reward=straight_reward(), sleep_time_at_reset=0.0, recovery=FAST_RECOVERY)
        try:
            interface.reset()
            wait_for(lambda: interface.telemetry.latest().finished)  # the countdown, then 2 m: the finish line
            _, reward, terminated, info = interface.get_obs_rew_terminated_info()
            assert terminated and info["finished_by_game"] and reward >= 100.0
            assert info["finished"]  # the game's finish, before the recorded path's end, is a finished lap
            interface.wait()
            interface.reset()
            names = [name for name, _ in interface.controller.calls]
            assert names[-3:] == ["apply", "respawn", "close_finish_popup"] and game.popups_closed == 1
            assert not interface.last_telemetry.finished and interface.last_telemetry.distance <= 1.0
            _, again, terminated, info = interface.get_obs_rew_terminated_info()
            assert not info["finished_by_game"] and again < 100.0 and not terminated  # no second bonus
        finally:
            interface.close()


@contextlib.contextmanager
def car_down_the_track_with_a_dead_respawn(**recovery):
    """``(game, interface)``: the car is 2 m down the track and the respawn does nothing (a game paused in its menu)
    until the test sets ``game.respawn_works``."""
    game = Game(respawn_works=False)
    with game.serve() as server:
        interface = TM20LidarInterface(capture=RecordedFrames(corridor_frames()),
                                       telemetry=TelemetryClient(server.port), controller=game.controller(),
                                       reward=straight_reward(), sleep_time_at_reset=0.0,
                                       recovery={**FAST_RECOVERY, **recovery})
        try:
            while interface.telemetry.latest().distance < 2.0:
                time.sleep(0.01)
            yield game, interface
        finally:
            interface.close()


def test_a_respawn_that_does_not_restart_the_race_is_retried_until_the_game_restarts_it(caplog):
    """A game paused in its menu ignores the respawn: the reset logs what to check once, then a short line per
    respawn, and the race restarts once the game is back (an outside probe: the worker exited after 10 s, needing a
    manual restart; its re-check: each failure was followed by 'the game is back', which it was not)."""
    with car_down_the_track_with_a_dead_respawn(restart_timeout_s=0.3) as (game, interface), \
            caplog.at_level("INFO", logger="tmrl_worker.tm20.interfaces"):
        threading.Timer(1.5, lambda: setattr(game, "respawn_works", True)).start()  # the player unpauses
        started = time.monotonic()
        interface.reset()
        assert 1.5 <= time.monotonic() - started < 6.0
        assert interface.faults["restart"] >= 2 and interface.last_telemetry.distance <= 1.0
    assert caplog.text.count("check that the respawn control") == 1 and "(2 respawns)" in caplog.text
    assert "the game is back" not in caplog.text


def test_restarts_failing_for_give_up_after_s_stop_the_env_with_what_to_check():
    with car_down_the_track_with_a_dead_respawn(restart_timeout_s=0.3, give_up_after_s=1.0) as (_, interface):
        started = time.monotonic()
        with pytest.raises(RaceRestartError, match=r"did not restart.*game paused.*gamepad B, keyboard Delete.*gave "
                                                   r"up after 1 s of respawns, recovery.give_up_after_s = 1"):
            interface.reset()
        assert 0.9 <= time.monotonic() - started < 4.0  # counted from the first failing respawn, not its failure


def test_a_give_up_shorter_than_the_restart_timeout_gives_up_on_time():
    """A TrackMania-docs probe: give_up_after_s = 5 gave up after 10 s, at the end of the first attempt's
    restart_timeout_s."""
    with car_down_the_track_with_a_dead_respawn(restart_timeout_s=5.0, give_up_after_s=0.6) as (_, interface):
        started = time.monotonic()
        with pytest.raises(RaceRestartError, match=r"gave up after 1 s of respawns, recovery.give_up_after_s = 0.6"):
            interface.reset()
        assert 0.5 <= time.monotonic() - started < 2.5


def test_a_stop_request_ends_the_wait_for_the_race_to_restart_at_once():
    with car_down_the_track_with_a_dead_respawn(restart_timeout_s=30.0) as (_, interface):
        interface.stop_event = threading.Event()
        threading.Timer(0.5, interface.stop_event.set).start()
        started = time.monotonic()
        with pytest.raises(EnvInterrupted, match="waiting for the race to restart"):
            interface.reset()
        assert time.monotonic() - started < 2.0


def test_reward_points_of_another_map_stop_the_env_at_the_restart_instead_of_paying_a_car_that_stands():
    game = Game()  # the car starts at (0, 0, 5)
    elsewhere = TrajectoryReward.from_path([[500.0, 300.0, 5.0], [2500.0, 300.0, 5.0]], 0.5)
    with game.serve() as server:
        for tolerance in (20.0, None):
            interface = TM20LidarInterface(capture=RecordedFrames(corridor_frames()),
                                           telemetry=TelemetryClient(server.port), controller=game.controller(),
                                           reward=elsewhere, sleep_time_at_reset=0.0,
                                           recovery={**FAST_RECOVERY, "start_tolerance_m": tolerance})
            try:
                if tolerance is not None:
                    with pytest.raises(RewardPathMismatchError, match=r"starts 583 m from the reward path's first "
                                                                      r"point.*record-reward"):
                        interface.reset()
                else:  # unchecked, as asked
                    interface.reset()
                    assert interface.last_telemetry.distance <= 1.0
            finally:
                interface.close()


def test_two_dimensional_reward_points_are_refused_when_the_env_is_built():
    flat = TrajectoryReward.from_path([[0.0, 0.0], [100.0, 0.0]], 0.5)
    with pytest.raises(TM20ConfigError, match=r"2-D; TrackMania positions are \(x, y, z\)"):
        TM20LidarInterface(capture=RecordedFrames(corridor_frames()), telemetry=TelemetryClient(1, start=False),
                           controller=RecordingController(), reward=flat)


def test_the_window_is_brought_to_front_at_start_and_each_reset_and_a_window_left_behind_is_logged(caplog):
    caplog.set_level(logging.WARNING, logger="tmrl_worker.tm20.interfaces")
    game = Game()
    window = FakeWindow(in_front=False)
    with game.serve() as server:
        interface = TM20LidarInterface(capture=RecordedFrames(corridor_frames()), window=window,
                                       telemetry=TelemetryClient(server.port), controller=game.controller(),
                                       reward=straight_reward(), sleep_time_at_reset=0.0)
        try:
            def warnings() -> int:
                return sum("is not in front" in r.getMessage() for r in caplog.records)

            assert window.focus_calls == 1 and warnings() == 1
            interface.reset()
            interface.reset()
            assert window.focus_calls == 3 and warnings() == 3  # one more per reset
            window.in_front = True
            interface.reset()
            assert window.focus_calls == 4 and warnings() == 3
        finally:
            interface.close()


def test_reward_config_from_a_toml_table_is_validated_and_used(tmp_path):
    points = tmp_path / "track.safetensors"
    save_points(points, TrajectoryReward.from_path([[0.0, 0.0, 5.0], [100.0, 0.0, 5.0]], 0.5).points)
    table = tomllib.loads(f'''
        [worker.env_options]
        reward_path = "{points.as_posix()}"
        reward_config = {{ patience = 5, max_stray = 30.0, grace_steps = 1000 }}
    ''')["worker"]["env_options"]
    game = Game()
    with game.serve() as server:
        interface = TM20LidarInterface(capture=RecordedFrames(corridor_frames()), telemetry=TelemetryClient(server.port),
                                       controller=game.controller(), sleep_time_at_reset=0.0, **table)
        try:
            assert interface.reward.config == TrajectoryRewardConfig(patience=5, max_stray=30.0, grace_steps=1000)
            interface.reset()
            wait_for(lambda: interface.telemetry.latest().distance > 1.0)  # the countdown, then 1 m
            _, reward, terminated, info = interface.get_obs_rew_terminated_info()  # crashed here before
            assert reward > 0 and not terminated and info["points_passed"] >= 1
        finally:
            interface.close()
        with pytest.raises(TM20ConfigError, match=r"(?s)env_options.reward_config.*patience"):
            TM20LidarInterface(capture=RecordedFrames(corridor_frames()), telemetry=TelemetryClient(server.port, start=False),
                               controller=game.controller(), reward_path=points, reward_config={"patience": 0})


def test_a_stop_request_ends_the_wait_for_a_lost_game_and_the_rollout_cleanly():
    game = Game()
    server = game.serve().start()
    handle = make_env("tm20-lidar", options={
        "allow_non_windows": True, "capture": RecordedFrames(corridor_frames()),
        "telemetry": TelemetryClient(server.port, reconnect_delay=0.1), "controller": game.controller(),
        "reward": straight_reward(), "sleep_time_at_reset": 0.0, "recovery": FAST_RECOVERY})
    stop = threading.Event()
    handle.attach_stop(stop)
    loop = RolloutLoop(handle, None, None, UniformPolicy(3, seed=0), batch_steps=1000, compress=False,
                       deterministic=False, seed=0, worker_id="tm20-test")
    threading.Timer(0.5, server.close).start()  # the game goes away for good
    threading.Timer(3.0, stop.set).start()  # then the operator presses Ctrl-C (the CLI sets this event)
    started = time.monotonic()
    try:
        stats = loop.run(max_steps=10_000, stop=stop)
    finally:
        handle.close()
    assert 3.0 <= time.monotonic() - started < 5.0 and stats.episodes == 1 and stats.steps < 10_000
