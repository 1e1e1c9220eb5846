"""The worker's TrackMania settings read from its config: an unknown option, a bad settings table or a bad capture
backend is refused when the config is read, and ``tmrl-worker layout`` prints a TrackMania layout from the config
alone, on any OS."""

from __future__ import annotations

import numpy as np
import pytest
from tmrl_common.layout import (
    ObservationLayout,
    tm20_full_layout,
    tm20_pixel_lidar_layout,
    tm20_pixel_lidar_progress_layout,
)
from tmrl_worker.cli import app
from tmrl_worker.reward import TrajectoryReward
from tmrl_worker.tm20.capture import RecordedFrames
from tmrl_worker.tm20.control import RecordingController
from tmrl_worker.tm20.interfaces import interface_class
from tmrl_worker.tm20.openplanet import TelemetryClient
from typer.testing import CliRunner


@pytest.fixture
def no_devices(monkeypatch):
    """Any attempt to reach the game (plugin, controller, window, capture, emulated game, rtgym) fails the test."""
    import tmrl_worker.envs
    import tmrl_worker.tm20.emulated_game
    import tmrl_worker.tm20.interfaces

    def refuse(*args, **kwargs):
        raise AssertionError("a device or an environment was started")

    for name in ("TelemetryClient", "make_controller", "make_capture", "find_game_window"):
        monkeypatch.setattr(tmrl_worker.tm20.interfaces, name, refuse)
    monkeypatch.setattr(tmrl_worker.tm20.emulated_game.EmulatedGame, "start", refuse)
    monkeypatch.setattr(tmrl_worker.envs, "make_env", refuse)


def write_config(tmp_path, body: str):
    path = tmp_path / "tmrl.toml"
    path.write_text(body)
    return path


# device names: capture backend and controller -----------------------------------------------------------------
DEVICE_SETTINGS = [("capture_backend", ("auto", "dxcam", "mss")), ("controller_kind", ("auto", "gamepad", "keyboard", "none"))]


@pytest.mark.parametrize(("setting", "accepted"), DEVICE_SETTINGS)
@pytest.mark.parametrize("command", [["run", "--insecure"], ["layout"]])
def test_an_unknown_device_name_in_env_options_is_refused_when_the_config_is_read(command, setting, accepted,
                                                                                  no_devices, tmp_path, monkeypatch):
    line = refusal_when_read(command, f'[worker]\nenv = "tm20-lidar"\n[worker.env_options]\n{setting} = "bogus"\n',
                             tmp_path, monkeypatch)
    assert setting in line and "'bogus'" in line and all(name in line for name in accepted), line


def refusal_when_read(command: list[str], config_text: str, tmp_path, monkeypatch) -> str:
    """The one line ``tmrl-worker <command>`` prints when it refuses this config with status 2 (the worker is not
    started: the test fails if it is)."""
    import tmrl_worker.runtime

    monkeypatch.setattr(tmrl_worker.runtime, "run_worker", lambda *a, **k: pytest.fail("the worker was started"))
    result = CliRunner().invoke(app, [*command, "--config", str(write_config(tmp_path, config_text))])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(("setting", "message"), [
    ("capture_backend", r"unknown capture backend 'bogus' \(env_options\.capture_backend\): use one of auto, dxcam, mss"),
    ("controller_kind", r"unknown controller 'bogus' \(env_options\.controller_kind\): use one of auto, gamepad, "
                        r"keyboard, none"),
])
def test_make_env_refuses_an_unknown_device_name_before_starting_the_emulated_game(setting, message, no_devices):
    from tmrl_worker.envs import EnvSpecError, _make_tm20

    with pytest.raises(EnvSpecError, match=message):
        _make_tm20("tm20-lidar", 0.05, 100, {setting: "bogus", "emulated_game": {}})


# every other option ---------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    ("tm20-lidar", "recovry = {give_up_after_s = 30}",
     "env_options.recovry: unknown option for env tm20-lidar (did you mean recovery?)"),
    ("tm20-lidar", "recovery = {give_up_after = 30}",
     "env_options.recovery.give_up_after: unknown field (did you mean give_up_after_s?)"),
    ("tm20-lidar", "recovery = {first_retry_s = -1}", "env_options.recovery.first_retry_s = -1: Input should be greater"),
    ("tm20-lidar", "stale_frames = 3", "env_options.stale_frames must be a table of StaleFrameConfig settings, not int 3"),
    ("tm20-lidar-progress", "lidar = {beams = 0}", "env_options.lidar.beams = 0: Input should be greater than or equal"),
    ("tm20-lidar", 'emulated_game = {trak = "oval"}', "env_options.emulated_game.trak: unknown field (did you mean track?)"),
    ("tm20-full", "reward_config = {finish_bonuss = 1.0}", "env_options.reward_config.finish_bonuss: unknown field"),
    ("tm20-lidar", "image_height = 32", "env_options.image_height: unknown option for env tm20-lidar"),
    ("tm20-full", "time_step_duration = 0.1",
     "env_options.time_step_duration is not an env option: set worker.time_step_duration"),
    # a TrackMania-docs probe: these were accepted, then waited for ever or raised a traceback at the first reset
    ("tm20-lidar", "telemetry_port = 70000", "env_options.telemetry_port = 70000: Input should be less than or equal"),
    ("tm20-lidar", 'sleep_time_at_reset = "long"', "env_options.sleep_time_at_reset = 'long': Input should be a valid"),
    ("tm20-lidar", "window_position = [0]", "env_options.window_position = [0]: two integers, [x, y]"),
    ("tm20-full", "img_hist_len = 0", "env_options.img_hist_len = 0: Input should be greater than or equal to 1"),
    ("tm20-lidar", "start_obs_capture = 0.08",
     "env_options.start_obs_capture = 0.08 is after the end of the step (worker.time_step_duration = 0.05)"),
]


@pytest.mark.parametrize(("env", "option", "message"), BAD_OPTIONS,
                         ids=["unknown-option", "unknown-recovery-field", "recovery-value", "table-not-a-table",
                              "lidar-beams", "emulated-game-field", "reward-config-field", "option-of-another-variant",
                              "option-the-worker-sets", "port-range", "sleep-type", "window-position", "history",
                              "capture-after-the-step"])
@pytest.mark.parametrize("command", [["run", "--insecure"], ["layout"]])
def test_a_bad_tm20_env_option_is_refused_in_one_line_when_the_config_is_read(command, env, option, message,
                                                                              no_devices, tmp_path, monkeypatch):
    line = refusal_when_read(command, f'[worker]\nenv = "{env}"\n[worker.env_options]\n{option}\n', tmp_path,
                             monkeypatch)
    assert message in line, line


def test_every_documented_kind_of_tm20_env_option_is_accepted_when_the_config_is_read(tmp_path):
    from tmrl_common.config import load_config
    from tmrl_worker.config import WorkerConfig

    config = write_config(tmp_path, '[worker]\nenv = "tm20-full"\n[worker.env_options]\n'
                          'reward_path = "points.safetensors"\nimg_hist_len = 2\nact_buf_len = 3\nimage_height = 32\n'
                          'image_width = 48\ntelemetry_port = 9001\ntelemetry_timeout = 2.0\nwindow_title = "TM"\n'
                          'window_position = [10, 20]\ncapture_backend = "mss"\ncapture_output = 1\n'
                          'controller_kind = "keyboard"\nsleep_time_at_reset = 1.0\nstart_obs_capture = 0.03\n'
                          'time_step_timeout_factor = 2.0\nwait_on_done = true\nbenchmark = false\n'
                          'allow_non_windows = true\n'
                          '[worker.env_options.recovery]\ngive_up_after_s = 30\n'
                          '[worker.env_options.stale_frames]\n[worker.env_options.reward_config]\n')
    loaded = load_config(WorkerConfig, "worker", config)
    assert loaded.env_options["recovery"] == {"give_up_after_s": 30} and loaded.env_options["image_height"] == 32
    # the emulated game brings its own devices: beside it, the game's options above are refused (their own test)
    emulated = write_config(tmp_path, '[worker]\nenv = "tm20-full"\n[worker.env_options]\nimg_hist_len = 2\n'
                            'telemetry_timeout = 2.0\n[worker.env_options.emulated_game]\ntrack = "oval"\nport = 9001\n')
    assert load_config(WorkerConfig, "worker", emulated).env_options["emulated_game"] == {"track": "oval", "port": 9001}


def test_make_env_refuses_a_capture_time_past_a_slower_step_only_when_it_is_past_it(no_devices):
    from tmrl_worker.envs import EnvSpecError, _make_tm20
    from tmrl_worker.tm20.interfaces import check_options

    check_options("tm20-lidar", {"start_obs_capture": 0.08}, time_step_duration=0.1)  # within a 10 Hz step
    with pytest.raises(EnvSpecError, match=r"start_obs_capture = 0\.08 is after the end of the step"):
        _make_tm20("tm20-lidar", 0.05, 100, {"start_obs_capture": 0.08, "emulated_game": {}})


def test_make_env_refuses_an_unknown_option_before_starting_the_emulated_game(no_devices):
    from tmrl_worker.envs import EnvSpecError, _make_tm20

    with pytest.raises(EnvSpecError, match=r"env_options\.recovry: unknown option for env tm20-lidar \(did you mean "
                                           r"recovery\?\)"):
        _make_tm20("tm20-lidar", 0.05, 100, {"recovry": {}, "emulated_game": {}})


# layout ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "layout"), [("tm20-lidar", tm20_pixel_lidar_layout()),
                                             ("tm20-lidar-progress", tm20_pixel_lidar_progress_layout()),
                                             ("tm20-full", tm20_full_layout())])
def test_layout_command_prints_a_tm20_layout_on_any_os_without_starting_the_game(env, layout, no_devices):
    result = CliRunner().invoke(app, ["layout", "--env", env])
    assert result.exit_code == 0, result.output
    assert ObservationLayout.model_validate_json(result.stdout) == layout


@pytest.mark.parametrize(("env", "options"), [
    ("tm20-lidar", 'img_hist_len = 1\nact_buf_len = 1\nreward_path = "not-read.safetensors"\n[worker.env_options.lidar]\nbeams = 9\n'),
    ("tm20-lidar-progress", 'img_hist_len = 2\n[worker.env_options.lidar]\nbeams = 7\n'),
    ("tm20-full", 'img_hist_len = 3\nact_buf_len = 3\nimage_height = 32\nimage_width = 48\n'),
], ids=["lidar-1-scan-9-beams", "progress-2-scans-7-beams", "full-3-images-32x48"])
def test_layout_command_prints_the_layout_the_interface_builds_from_the_same_env_options(env, options, no_devices,
                                                                                        tmp_path):
    import tomllib

    config = write_config(tmp_path, f'[worker]\nenv = "{env}"\n[worker.env_options]\n{options}')
    result = CliRunner().invoke(app, ["layout", "--config", str(config)])
    assert result.exit_code == 0, result.output
    printed = ObservationLayout.model_validate_json(result.stdout)
    kwargs = tomllib.loads(config.read_text())["worker"]["env_options"]
    kwargs.pop("reward_path", None)
    interface = interface_class(env)(capture=RecordedFrames(np.zeros((2, 48, 64, 3), np.uint8)),
                                     telemetry=TelemetryClient(1, start=False), controller=RecordingController(),
                                     reward=TrajectoryReward.from_path([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]]), **kwargs)
    try:
        assert printed == interface.layout
    finally:
        interface.close()


def test_layout_command_refuses_tm20_env_options_that_give_no_layout_in_one_line(no_devices, tmp_path):
    config = write_config(tmp_path, '[worker]\nenv = "tm20-lidar"\n[worker.env_options]\nimg_hist_len = 0\n')
    result = CliRunner().invoke(app, ["layout", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "env_options.img_hist_len = 0: Input should be greater than or equal to 1" in lines[0]
