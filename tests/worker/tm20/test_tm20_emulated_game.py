"""The emulated game: the real TrackMania interfaces (LIDAR from rendered pixels, telemetry client over TCP, analog
controls, resets) against a simulated car, and the game's failures injected into it."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import RolloutLoop, UniformPolicy
from tmrl_worker.tm20.emulated_game import EmulatedGame
from tmrl_worker.tm20.lidar import Lidar, LidarConfig
from tmrl_worker.tm20.openplanet import TelemetryClient

FAST_RECOVERY = {"first_retry_s": 0.2, "max_retry_s": 1.0, "probe_timeout_s": 0.5, "step_telemetry_timeout_s": 0.5}
GAS = np.array([1.0, 0.0, 0.0], np.float32)


def emulated_env(spec: str = "tm20-lidar", **game):
    options = {"emulated_game": {"port": 0, "countdown_s": 0.3, **game}, "sleep_time_at_reset": 0.0,
               "recovery": FAST_RECOVERY}
    handle = make_env(spec, max_episode_steps=10_000, options=options)
    return handle, handle.env.unwrapped.interface


def game_of(interface) -> EmulatedGame:
    return interface.controller.game


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_rendered_cockpit_frames_have_the_window_size_and_the_lidar_sees_the_borders():
    with EmulatedGame({"port": 0}) as game:
        frame = game.render(488, 958)
        assert frame.shape == (488, 958, 3) and frame.dtype == np.uint8
        assert tuple(frame[0, 0]) == (90, 140, 200)  # sky
        reading = Lidar().measure(frame)
        assert reading[9] > 200  # straight down a 110 m straight: the beam reaches the far road
        # the car starts on the centre line of a 10 m road: the borders are about as far on both sides
        assert reading[4] == pytest.approx(reading[14], rel=0.05)
        assert Lidar(LidarConfig(mode="radial")).measure(frame)[9] == 0  # the bonnet: why upstream starts 20 px out
        assert game.render(128, 256).shape == (128, 256, 3)


def test_the_tm20_env_drives_the_emulated_car_through_the_real_interface_and_pays_progress():
    handle, interface = emulated_env()
    game = game_of(interface)
    try:
        handle.reset()
        assert interface.telemetry.stats.connects == 1 and game.respawns >= 1
        total = 0.0
        for _ in range(60):
            observation, reward, terminated, truncated, _ = handle.step(GAS)
            total += reward
            assert not (terminated or truncated)
        assert observation[0][0] > 5.0  # speed from the plugin packets, in m/s
        assert total > 20  # about 2 per metre driven
        assert game.distance > 10 and abs(game.car.y - game.track.centre[0, 1]) < 1.0  # straight ahead, on the road
    finally:
        handle.close()


def test_the_finish_popup_is_closed_and_the_race_restarted_before_the_next_episode():
    handle, interface = emulated_env()
    game = game_of(interface)
    try:
        handle.reset()
        end = game.track.centre[-1]
        heading = math.atan2(*(game.track.centre[-1] - game.track.centre[-2])[::-1])
        with game.lock:  # put the car 5 m before the finish line (the reward path's end), as if it drove there
            game.car.place(end[0] - 7 * math.cos(heading), end[1] - 7 * math.sin(heading), heading, speed=10.0)
            game._lap_progress = game.distance = game.track.length - 7.0
        interface.last_telemetry = None  # not a jump (faster than any car: it would end the episode)
        interface.reward.index = interface.reward.last_index - 14
        for _ in range(40):
            _, reward, terminated, _, info = handle.step(GAS)
            if terminated:
                break
        assert terminated and info["finished_by_game"] and reward >= 100 and game.popup_open
        handle.reset()
        assert not game.popup_open and not game.finished and game.distance < 1.0
        _, reward, terminated, _, info = handle.step(GAS)
        assert not info["finished_by_game"] and reward < 100 and not terminated
    finally:
        handle.close()


@pytest.mark.parametrize("failure", ["plugin", "window", "freeze"])
def test_a_game_failure_mid_episode_truncates_and_the_rollout_resumes_when_the_game_is_back(failure):
    handle, interface = emulated_env()
    game = game_of(interface)
    break_game, repair = {
        "plugin": (game.kill_plugin, game.start_plugin),  # plugin unloaded, reloaded on the same port
        "window": (game.close_window, game.open_window),  # window gone: capture fails
        "freeze": (game.freeze, lambda: game.freeze(False)),  # hung game: no packets, the same picture
    }[failure]
    steps = []

    def step(action):
        result = original(action)
        steps.append((result[2], result[3], dict(result[4])))
        return result

    original, handle.step = handle.step, step

    def chaos() -> None:
        time.sleep(0.5)
        break_game()
        time.sleep(1.5)
        repair()

    loop = RolloutLoop(handle, None, None, UniformPolicy(3, seed=1), batch_steps=1000, compress=False,
                       deterministic=False, seed=1, worker_id="emulated")
    threading.Thread(target=chaos, daemon=True).start()
    try:
        stats = loop.run(max_steps=60)
    finally:
        handle.close()
    assert stats.steps == 60
    truncated = [info["truncated_reason"] for _, trunc, info in steps if trunc]
    kind = {"plugin": "telemetry", "window": "capture", "freeze": "telemetry"}[failure]
    assert truncated and truncated[0].startswith(kind) and interface.faults[kind] >= 1
    assert interface.status == "running"


def test_two_emulated_games_side_by_side_each_worker_drives_its_own_car():
    first, first_interface = emulated_env(window_title="Trackmania")
    second, second_interface = emulated_env(window_title="Trackmania (2)", track="oval")
    games = game_of(first_interface), game_of(second_interface)
    try:
        assert games[0].port != games[1].port
        assert first_interface.window.title != second_interface.window.title
        first.reset()
        second.reset()
        for _ in range(40):
            first.step(GAS)  # one worker drives, the other leaves the pedals alone
            second.step(np.zeros(3, np.float32))
        assert games[0].distance > 5.0 and games[1].distance < 1.0
        assert first_interface.telemetry.latest().speed > 5.0 and second_interface.telemetry.latest().speed < 1.0
    finally:
        first.close()
        second.close()


def test_the_emulated_plugin_speaks_the_plugin_protocol_to_a_plain_client():
    with EmulatedGame({"port": 0, "countdown_s": 0.0}) as game, TelemetryClient(game.port, timeout=2.0) as client:
        game.set_inputs(1.0, 0.0, 0.0)
        wait_for(lambda: client.latest().speed > 2.0)
        packet = client.latest()
        assert packet.position[1] == game.config.height_m and packet.gas == 1.0 and packet.gear >= 1
        assert packet.distance > 0 and not packet.finished


def test_tm20_full_against_the_emulated_game_sees_64x64_frames_and_the_engine_state():
    handle, interface = emulated_env("tm20-full")
    try:
        assert interface.window.area.width == 256 and interface.window.area.height == 128  # tm20-full's window
        handle.reset()
        for _ in range(30):
            observation, *_ = handle.step(GAS)
        speed, gear, rpm, images = observation[:4]
        assert images.shape == (4, 64, 64) and images.dtype == np.uint8
        assert speed[0] > 3.0 and gear[0] >= 1.0 and rpm[0] >= 2000.0
        assert images[-1, 5, 32] > images[-1, 40, 2]  # bright sky at the top, dark scenery at the side
    finally:
        handle.close()


@pytest.mark.slow
def test_record_reward_records_the_emulated_track_driven_by_the_scripted_driver(tmp_path):
    from tmrl_worker.cli import app
    from tmrl_worker.reward import load_points
    from typer.testing import CliRunner

    with EmulatedGame({"port": 0, "speedup": 10, "countdown_s": 0.2}) as game:
        threading.Timer(1.0, game.start_autodrive).start()  # the recorder is listening: drive from the start line
        result = CliRunner().invoke(app, ["record-reward", "--output", str(tmp_path / "track.safetensors"),
                                          "--telemetry-port", str(game.port), "--max-seconds", "60"])
    assert result.exit_code == 0, result.output
    points = load_points(tmp_path / "track.safetensors")
    length = float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())
    assert length == pytest.approx(game.track.length, rel=0.1)
    start = game.position(*game.track.centre[0])
    assert np.linalg.norm(points[0] - np.array(start)) < 2.0


def test_emulate_game_command_serves_the_plugin_and_autodrives():
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["emulate-game", "--telemetry-port", "0", "--autodrive", "--seconds", "0.5",
                                      "--track", "oval"])
    assert result.exit_code == 0, result.output
    assert "emulated TrackMania: track oval" in result.output and "plugin on 127.0.0.1:" in result.output


def test_emulate_game_command_reports_a_bad_track_or_a_port_in_use_in_one_line():
    import socket

    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["emulate-game", "--track", "nope", "--seconds", "0.1"])
    # pydantic's "Value error, " prefix is not the validator's words (a config probe found it in four messages)
    assert result.exit_code == 2 and result.output.startswith("tmrl-worker emulate-game: track: unknown track 'nope'")
    assert result.output.strip().count("\n") == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["emulate-game", "--telemetry-port", str(port), "--seconds", "0.1"])
    assert result.exit_code == 2 and "Address already in use" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # typer.Exit(2), no error


def test_an_emulated_games_unknown_track_is_refused_when_its_config_is_read():
    from pydantic import ValidationError
    from tmrl_worker.tm20.emulated_game import EmulatedGameConfig

    with pytest.raises(ValidationError, match=r"unknown track 'nope'"):
        EmulatedGameConfig(track="nope")
    assert EmulatedGameConfig(track="random:5").track == "random:5"


@pytest.mark.parametrize("option, value", [("telemetry_port", 9123), ("window_title", "Trackmania (2)"),
                                           ("window_pid", 4242), ("window_position", [10, 20]),
                                           ("capture_backend", "dxcam"), ("capture_output", 1),
                                           ("controller_kind", "keyboard")])
def test_a_real_game_device_option_beside_the_emulated_game_is_refused_before_anything_starts(option, value):
    """Each of these was ignored beside ``emulated_game``; ``telemetry_port`` worse: the worker connected to that
    port while the emulated plugin listened on its own, and waited for the game for ever."""
    from tmrl_worker.envs import EnvSpecError

    options = {"emulated_game": {"port": 0}, option: value}
    started = time.monotonic()
    with pytest.raises(EnvSpecError, match=rf"env_options\.{option} has no use with env_options\.emulated_game"):
        make_env("tm20-lidar", options=options)
    assert time.monotonic() - started < 5.0
    expected_hint = {"telemetry_port": "emulated_game.port", "window_title": "emulated_game.window_title"}
    if option in expected_hint:
        with pytest.raises(EnvSpecError, match=expected_hint[option]):
            make_env("tm20-lidar", options=options)
