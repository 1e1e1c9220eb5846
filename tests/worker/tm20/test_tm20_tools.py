"""record-reward, check-env and benchmark against the fake plugin, recorded frames and the worker CLI."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from tmrl_worker.cli import app
from tmrl_worker.reward import TrajectoryReward, load_points, save_points
from tmrl_worker.tm20.benchmark import benchmark_rows
from tmrl_worker.tm20.capture import RecordedFrames
from tmrl_worker.tm20.check_env import describe, readings
from tmrl_worker.tm20.lidar import Lidar
from tmrl_worker.tm20.openplanet import TelemetryClient, encode_packet
from tmrl_worker.tm20.recording import load_packets, record_demonstration, save_demonstration
from tmrl_worker.tm20.replay_server import TelemetryReplayServer
from tmrl_worker.tm20.synthetic import winding_road_frames
from typer.testing import CliRunner


def lap_with_a_respawn(first_seq: int = 0) -> list[bytes]:
    """A false start (respawned after 5 m), then an L-shaped run: 20 m along x, 10 m along z, finish."""
    packets, seq = [], first_seq
    for i in range(11):  # false start
        packets.append(encode_packet(seq, speed=5.0, distance=0.5 * i, position=(0.5 * i, 7.0, 0.0)))
        seq += 1
    for _ in range(5):  # waiting at the start after the respawn
        packets.append(encode_packet(seq, distance=0.0, position=(0.0, 0.0, 0.0)))
        seq += 1
    for i in range(1, 41):
        packets.append(encode_packet(seq, speed=10.0, distance=0.5 * i, position=(0.5 * i, 0.0, 0.0)))
        seq += 1
    for i in range(1, 21):
        packets.append(encode_packet(seq, speed=10.0, distance=20 + 0.5 * i, position=(20.0, 0.0, 0.5 * i),
                                     finished=(i == 20)))
        seq += 1
    return packets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_record_demonstration_restarts_on_respawn_and_stops_at_the_finish(tmp_path):
    with TelemetryReplayServer(lap_with_a_respawn(), rate_hz=400, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        demonstration = record_demonstration(client, max_seconds=10)
    assert demonstration.finished and demonstration.restarts == 1
    assert np.all(demonstration.positions[:, 1] == 0.0)  # nothing from the false start
    assert demonstration.length == pytest.approx(30.0, abs=0.6)
    points = save_demonstration(demonstration, tmp_path / "points.safetensors", spacing=1.0,
                                raw_telemetry=tmp_path / "lap.tmtelemetry")
    loaded = load_points(tmp_path / "points.safetensors")
    np.testing.assert_array_equal(loaded, points)
    gaps = np.linalg.norm(np.diff(loaded, axis=0), axis=1)
    assert np.allclose(gaps[:19], 1.0, atol=1e-4)  # equally spaced along the first leg
    assert len(load_packets(tmp_path / "lap.tmtelemetry")) == len(demonstration.packets)


def test_record_demonstration_joined_mid_run_waits_for_a_run_from_the_start():
    # Found by hand: docs/trackmania.md's `emulate-game --autodrive --speedup 10 &` then `record-reward` joined a lap
    # at its finish packet and failed ("the car did not move"); joined earlier, it would save a partial path.
    tail = [encode_packet(i, speed=10.0, distance=25 + 0.5 * i, position=(20.0, 3.0, 5 + 0.5 * i), finished=(i == 10))
            for i in range(11)]
    with TelemetryReplayServer(tail + lap_with_a_respawn(first_seq=11), rate_hz=400, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        demonstration = record_demonstration(client, max_seconds=10)
    assert demonstration.finished
    assert np.all(demonstration.positions[:, 1] == 0.0)  # nothing from the run it joined, nor the false start
    assert demonstration.length == pytest.approx(30.0, abs=0.6)


def test_record_demonstration_ignores_a_respawn_at_a_checkpoint_and_a_finish_flag_left_from_the_last_run():
    seq = 0

    def packet(**fields) -> bytes:
        nonlocal seq
        seq += 1
        return encode_packet(seq, **fields)

    checkpoint = [packet(speed=10.0, distance=0.5 * i, position=(0.5 * i, 5.0, 0.0)) for i in range(1, 400)]
    checkpoint += [packet(speed=10.0, distance=150.0 + 0.5 * i, position=(150.0 + 0.5 * i, 9.0, 0.0))
                   for i in range(10)]  # respawned at the 150 m checkpoint: not a start
    lingering = [packet(distance=0.0, position=(0.0, 0.0, 0.0), finished=True) for _ in range(5)]
    with TelemetryReplayServer(checkpoint + lingering + lap_with_a_respawn(first_seq=seq + 1), rate_hz=800,
                               loop=False) as server, TelemetryClient(server.port, timeout=2.0) as client:
        demonstration = record_demonstration(client, max_seconds=10)
    assert demonstration.finished
    assert np.all(demonstration.positions[:, 1] == 0.0)  # nothing from the checkpoint run or the false start
    assert demonstration.positions[0].tolist() == [0.0, 0.0, 0.0]  # the path starts at the start line
    assert demonstration.length == pytest.approx(30.0, abs=0.6)
    finish_from_checkpoint = checkpoint + [packet(speed=10.0, distance=160.0, position=(160.0, 9.0, 0.0), finished=True)]
    with TelemetryReplayServer(finish_from_checkpoint, rate_hz=800, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        seen: list = []
        partial = record_demonstration(client, max_seconds=10, on_packet=lambda packet, kept: seen.append(packet),
                                       should_stop=lambda: bool(seen) and seen[-1].finished)
    assert not partial.finished and len(partial.positions) == 0  # a lap from a checkpoint is no demonstration


def lap_with_a_teleport(jump: float = 500.0) -> list[bytes]:
    """The first 10 m of a run, then the position (not the distance driven) jumps ``jump`` m on for the rest."""
    return [encode_packet(seq, speed=10.0, distance=0.5 * seq, position=(0.5 * seq + (jump if seq > 20 else 0.0),
                                                                           0.0, 0.0), finished=(seq == 60))
            for seq in range(61)]


def test_record_demonstration_starts_over_after_a_position_jump_instead_of_saving_track_that_is_not_there():
    """The TrackMania probe: a +500 m teleport on a 50 m lap was saved as 550 m of track, exit 0, without a word."""
    tail = len(lap_with_a_teleport())
    with TelemetryReplayServer(lap_with_a_teleport() + lap_with_a_respawn(first_seq=tail), rate_hz=400,
                               loop=False) as server, TelemetryClient(server.port, timeout=2.0) as client:
        said: list[str] = []
        demonstration = record_demonstration(client, max_seconds=10, on_jump=said.append)
    assert demonstration.finished and demonstration.jumps == 1 and demonstration.restarts == 3  # + two respawns
    assert len(said) == 1 and said[0].startswith("the car's position jumped 500 m between two packets")
    assert demonstration.length == pytest.approx(30.0, abs=0.6)  # the clean lap after the respawn, nothing else
    assert np.all(demonstration.positions[:, 1] == 0.0) and demonstration.positions[:, 0].max() <= 20.0


def test_record_reward_says_when_no_run_from_the_start_came_rather_than_a_finish_not_reached(tmp_path):
    """The TrackMania probe: joined 10 m into a run that then finished, record-reward ended with `the finish line was
    not reached` (it was), and the `--save-unfinished` it suggested would have kept nothing."""
    under_way = [encode_packet(seq, speed=10.0, distance=10.0 + 0.5 * seq, position=(10.0 + 0.5 * seq, 0.0, 0.0),
                               finished=(seq == 80)) for seq in range(81)]
    teleport = tmp_path / "teleport.safetensors"
    with TelemetryReplayServer(under_way, rate_hz=400, loop=False) as server:
        joined = CliRunner().invoke(app, ["record-reward", "-o", str(tmp_path / "t.safetensors"), "--telemetry-port",
                                          str(server.port), "--max-seconds", "1", "--timeout", "5"])
    with TelemetryReplayServer(lap_with_a_teleport(), rate_hz=400, loop=False) as server:
        jumped = CliRunner().invoke(app, ["record-reward", "-o", str(teleport), "--telemetry-port", str(server.port),
                                          "--max-seconds", "1", "--timeout", "5"])
    for result in (joined, jumped):
        assert result.exit_code == 1, result.output
        assert "no run from the start line in 1 s: nothing saved" in " ".join(result.output.split())
    assert "jumped 500 m between two packets" in " ".join(jumped.output.split())
    assert not (tmp_path / "t.safetensors").exists() and not teleport.exists()


def interrupt_after(monkeypatch, packets: int) -> None:
    """Ctrl-C while the driver is on the track: ``newer_than`` raises KeyboardInterrupt at its ``packets``-th call."""
    calls = [0]
    newer_than = TelemetryClient.newer_than

    def interrupting(self, sequence, timeout=None):
        calls[0] += 1
        if calls[0] >= packets:
            raise KeyboardInterrupt
        return newer_than(self, sequence, timeout)
    monkeypatch.setattr(TelemetryClient, "newer_than", interrupting)


@pytest.mark.parametrize("save_unfinished", [False, True])
def test_ctrl_c_with_save_unfinished_keeps_the_path_driven_so_far(tmp_path, monkeypatch, save_unfinished):
    """The TrackMania probe: Ctrl-C, how a driver ends a partial recording, printed `interrupted: nothing saved` even
    with --save-unfinished."""
    interrupt_after(monkeypatch, 40)  # the false start, the respawn and 12 m of the run
    output = tmp_path / "track.safetensors"
    with TelemetryReplayServer(lap_with_a_respawn(), rate_hz=100, loop=False) as server:
        result = CliRunner().invoke(app, ["record-reward", "-o", str(output), "--telemetry-port", str(server.port),
                                          "--spacing", "0.5"] + (["--save-unfinished"] if save_unfinished else []))
    said = " ".join(result.output.split())
    assert "interrupted" in said and "Traceback" not in said
    if save_unfinished:
        assert result.exit_code == 0, result.output
        assert "saving the" in said and "positions recorded before Ctrl-C" in said
        points = load_points(output)
        assert points[0].tolist() == [0.0, 0.0, 0.0] and 5 <= len(points) <= 40
    else:
        assert result.exit_code == 1, result.output
        assert "nothing saved (--save-unfinished keeps a partial path)" in said and not output.exists()


def test_record_reward_command_writes_points_from_the_plugin(tmp_path):
    output = tmp_path / "track.safetensors"
    with TelemetryReplayServer(lap_with_a_respawn(), rate_hz=400, loop=False) as server:
        result = CliRunner().invoke(app, ["record-reward", "--output", str(output), "--telemetry-port", str(server.port),
                                          "--spacing", "0.5"])
    assert result.exit_code == 0, result.output
    assert len(load_points(output)) == 61  # 30 m every 0.5 m, both ends
    assert TrajectoryReward.from_file(output).points.shape[1] == 3


@pytest.mark.parametrize("where", ["output", "raw-telemetry"])
def test_record_reward_refuses_an_output_it_cannot_write_before_the_drive(tmp_path, where):
    """A config probe: an --output in a folder under a file was found at the save, after the whole lap, with a
    traceback; --spacing 0 too (now refused as the options are read, as record-demo's)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "sub" / "track.safetensors"
    output = bad if where == "output" else tmp_path / "track.safetensors"
    with TelemetryReplayServer(lap_with_a_respawn(), rate_hz=400, loop=False) as server:
        arguments = ["record-reward", "-o", str(output), "--telemetry-port", str(server.port)]
        result = CliRunner().invoke(app, arguments + (["--raw-telemetry", str(bad)] if where != "output" else []))
        assert result.exit_code == 2, result.output
        assert f"{str(blocker)!r} is a file, not a folder" in " ".join(result.output.split())
        assert "Recording from" not in result.output and "Traceback" not in result.output
        spacing = CliRunner().invoke(app, ["record-reward", "-o", str(tmp_path / "t.safetensors"), "--telemetry-port",
                                           str(server.port), "--spacing", "0"])
    assert spacing.exit_code == 2 and "--spacing" in spacing.output and "Recording from" not in spacing.output
    assert blocker.read_text() == "not a folder" and not (tmp_path / "track.safetensors").exists()


def test_record_reward_without_the_game_names_the_plugin_and_saves_nothing(tmp_path):
    port = free_port()
    output = tmp_path / "track.safetensors"
    result = CliRunner().invoke(app, ["record-reward", "-o", str(output), "--telemetry-port", str(port), "--timeout", "0.3"])
    assert result.exit_code == 2
    assert f"TMRL OpenPlanet plugin enabled, on port {port}" in " ".join(result.output.split())
    assert not output.exists()


def test_record_reward_save_unfinished_keeps_the_path_driven_before_the_telemetry_stopped(tmp_path):
    """TrackMania probe: with --save-unfinished, a plugin that stopped sending mid-run lost the whole recording."""
    half_lap = lap_with_a_respawn()[:40]  # the false start, the respawn and 12 m of the run: no finish
    for save_unfinished, exit_code in ((False, 2), (True, 0)):
        output = tmp_path / f"track-{save_unfinished}.safetensors"
        with TelemetryReplayServer(half_lap, rate_hz=400, loop=False) as server:
            result = CliRunner().invoke(app, ["record-reward", "-o", str(output), "--telemetry-port", str(server.port),
                                              "--timeout", "0.5", "--spacing", "0.5"]
                                        + (["--save-unfinished"] if save_unfinished else []))
        assert result.exit_code == exit_code, result.output
        assert "the plugin stopped sending" in " ".join(result.output.split())
        assert output.exists() == save_unfinished
    points = load_points(tmp_path / "track-True.safetensors")
    assert len(points) == 25 and points[0].tolist() == [0.0, 0.0, 0.0]  # 12 m from the start line, every 0.5 m


def test_record_reward_max_seconds_bounds_the_wait_for_a_plugin_that_sends_nothing(tmp_path):
    """TrackMania probe: `--max-seconds 2` against a port that never greeted returned after 31 s (the 30 s
    telemetry timeout)."""
    with socket.socket() as silent:  # takes connections (the backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        result = CliRunner().invoke(app, ["record-reward", "-o", str(tmp_path / "t.safetensors"), "--telemetry-port",
                                          str(silent.getsockname()[1]), "--max-seconds", "1"])
        took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert took < 10.0, took  # the default --timeout is 30 s
    assert "no telemetry from" in result.output
    assert not (tmp_path / "t.safetensors").exists()


def test_check_env_readings_show_lidar_speed_and_reward(tmp_path):
    frames = winding_road_frames(count=4, height=120, width=200)
    packets = [encode_packet(i, speed=3.0, position=(0.5 * i, 0.0, 0.0)) for i in range(1000)]
    reward = TrajectoryReward.from_path([[0.0, 0.0, 0.0], [1000.0, 0.0, 0.0]], 0.5)
    with TelemetryReplayServer(packets, rate_hz=200) as server, TelemetryClient(server.port, timeout=2.0) as client:
        got = list(readings(RecordedFrames(frames), client, Lidar(), reward, period=0.02, steps=6,
                            save_frames=tmp_path / "frames", save_every=5))
    lidar = Lidar()
    for reading in got:
        np.testing.assert_array_equal(reading.lidar, lidar.measure(frames[reading.step % 4]))
        assert reading.speed == 3.0
    assert got[-1].total_reward > 0 and got[-1].progress > 0
    assert [r.frame_file.name for r in got if r.frame_file] == ["lidar_000000.png", "lidar_000005.png"]


def test_check_env_readings_warn_while_the_game_window_is_not_in_front():
    from test_tm20_interfaces import FakeWindow

    window = FakeWindow(in_front=False)
    packets = [encode_packet(i, speed=3.0) for i in range(100)]
    with TelemetryReplayServer(packets, rate_hz=200) as server, TelemetryClient(server.port, timeout=2.0) as client:
        frames = RecordedFrames(winding_road_frames(count=2, height=120, width=200))
        behind = next(readings(frames, client, Lidar(), period=0.0, steps=1, window=window))
        window.in_front = True
        in_front = next(readings(frames, client, Lidar(), period=0.0, steps=1, window=window))
    assert behind.window_in_front is False and "game window not in front" in describe(behind)
    assert in_front.window_in_front is True and "not in front" not in describe(in_front)


def test_check_env_and_benchmark_commands_run_on_a_synthetic_session():
    runner = CliRunner()
    checked = runner.invoke(app, ["check-env", "--synthetic", "--steps", "3"])
    assert checked.exit_code == 0, checked.output
    assert "lidar" in checked.output and "reward" in checked.output
    benched = runner.invoke(app, ["benchmark", "--synthetic", "--steps", "10", "--env", "tm20-lidar-progress"])
    assert benched.exit_code == 0, benched.output
    for name in ("time_step_duration", "get_obs_duration", "send_control_duration"):
        assert name in benched.output


@pytest.mark.parametrize("command, option", [(["check-env"], ["--capture", "dxcam"]),
                                             (["check-env"], ["--telemetry-port", "9100"]),
                                             (["benchmark"], ["--window-title", "Trackmania (2)"]),
                                             (["benchmark"], ["--controller", "keyboard"]),
                                             # given, at its default value: ignored all the same (a recheck probe)
                                             (["check-env"], ["--telemetry-port", "9000"])])
def test_a_game_option_beside_synthetic_is_refused_not_ignored(command, option):
    result = CliRunner().invoke(app, [*command, "--synthetic", "--steps", "3", *option])
    assert result.exit_code == 2, result.output
    assert f"{option[0]} {option[1]} cannot be used with --synthetic" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_benchmark_without_reward_points_says_how_to_record_them():
    result = CliRunner().invoke(app, ["benchmark", "--telemetry-port", str(free_port()), "--controller", "none",
                                      "--capture", "mss"])
    assert result.exit_code == 2
    assert "record-reward" in result.output
    # rich read `[worker.env_options]` as a markup tag and dropped it (`reward_path in , --reward FILE`, a probe)
    assert "[worker.env_options]," in " ".join(result.output.split()), result.output


@pytest.fixture
def window_search(monkeypatch):
    """Records every search for the game window (none must happen before a bad option is refused)."""
    import tmrl_worker.tm20.capture
    import tmrl_worker.tm20.interfaces
    import tmrl_worker.tm20.window

    searches: list[str] = []

    def find_game_window(title="Trackmania", *args, **kwargs):
        searches.append(title)
        raise tmrl_worker.tm20.window.WindowNotFoundError(title)

    for module in (tmrl_worker.tm20.window, tmrl_worker.tm20.capture, tmrl_worker.tm20.interfaces):
        monkeypatch.setattr(module, "find_game_window", find_game_window)
    return searches


def _one_line_naming_the_backends(output: str) -> bool:
    lines = [line for line in output.splitlines() if line.strip()]
    return len(lines) == 1 and "'bogus'" in lines[0] and all(name in lines[0] for name in ("auto", "dxcam", "mss"))


@pytest.mark.parametrize("command", [["check-env", "--steps", "1"],
                                     ["benchmark", "--controller", "none", "--steps", "1"]])
def test_an_unknown_capture_backend_is_refused_in_one_line_before_any_window_search(command, window_search, tmp_path):
    points = tmp_path / "points.safetensors"
    save_points(points, [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], 0.5)
    result = CliRunner().invoke(app, [*command, "--capture", "bogus", "--reward", str(points),
                                      "--telemetry-port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert _one_line_naming_the_backends(result.output), result.output
    assert window_search == []


def test_make_capture_refuses_an_unknown_backend_before_looking_for_the_window(window_search):
    from tmrl_worker.tm20.capture import CaptureError, make_capture

    with pytest.raises(CaptureError, match=r"unknown capture backend 'bogus'.*auto, dxcam, mss"):
        make_capture("bogus")  # type: ignore[arg-type]
    assert window_search == []


def test_benchmark_rows_report_each_figure_against_the_nominal_step():
    rows = benchmark_rows({"time_step_duration": (0.051, 0.001), "get_obs_duration": (None, 0.0)}, 0.05)
    assert rows[0] == ("time_step_duration", "51.00", "1.00", "1.020")
    assert rows[1] == ("get_obs_duration", "-", "-", "-")


def test_check_env_readings_warn_when_the_picture_freezes_while_the_car_drives():
    frame = winding_road_frames(count=1, height=120, width=200)[0]
    packets = [encode_packet(i, speed=3.0, position=(0.015 * i, 0.0, 0.0)) for i in range(1000)]
    with TelemetryReplayServer(packets, rate_hz=200) as server, TelemetryClient(server.port, timeout=2.0) as client:
        got = list(readings(RecordedFrames([frame]), client, Lidar(), period=0.05, steps=14))
    warned = [r.step for r in got if r.stale is not None]
    assert warned and 9 <= warned[0] <= 12  # 0.5 s of the same picture at 3 m/s
    assert "stale screen: the picture has not changed" in describe(got[warned[0]])
    assert all(r.stale is None for r in got[:9])
