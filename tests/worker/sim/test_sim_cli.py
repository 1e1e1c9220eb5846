"""``tmrl-worker sim`` commands: list tracks, render a driven track to PNG/GIF, drive the scripted expert."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tmrl_worker.sim.cli import sim_app
from typer.testing import CliRunner

runner = CliRunner()


def test_tracks_lists_every_builtin_track():
    result = runner.invoke(sim_app, ["tracks"])
    assert result.exit_code == 0
    for name in ("oval", "hairpins", "circuit", "random:SEED"):
        assert name in result.output


def test_render_track_writes_png_and_gif_of_a_driven_lap(tmp_path):
    png, gif = tmp_path / "lap.png", tmp_path / "lap.gif"
    result = runner.invoke(sim_app, ["render-track", "-t", "oval", "-o", str(png), "--gif", str(gif), "--max-steps", "80"])
    assert result.exit_code == 0, result.output
    assert "did not finish in 80 steps" in result.output
    with Image.open(png) as image:
        assert image.format == "PNG"
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames > 10


def test_render_and_record_refuse_an_output_they_cannot_write_in_one_line_before_the_drive(tmp_path):
    """A config probe: a folder under a file ended render-track and record-demo in tracebacks (after the drive), a
    negative --seed in numpy's, and ``-o t.txt`` wrote a PNG under that name."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [(["render-track", "-o", str(blocker / "t.png"), "--no-drive"], "is a file, not a folder"),
             (["render-track", "-o", str(tmp_path / "t.png"), "--gif", str(blocker / "x.gif")], "is a file, not a folder"),
             (["render-track", "-o", str(tmp_path / "t.txt"), "--no-drive"], "its name must end in .png"),
             (["record-demo", "-o", str(blocker / "d.safetensors"), "-t", "oval"], "is a file, not a folder"),
             (["render-track", "-o", str(tmp_path / "t.png"), "--seed", "-1"], "--seed")]
    for arguments, says in cases:
        result = runner.invoke(sim_app, arguments)
        assert result.exit_code == 2 and says in " ".join(result.output.split()), (arguments, result.output)
        assert isinstance(result.exception, SystemExit) and "finished" not in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_drive_reports_the_lap_and_unknown_tracks_exit_with_code_2():
    result = runner.invoke(sim_app, ["drive", "-t", "oval"])
    assert result.exit_code == 0 and "finished" in result.output and "0 crash" in result.output
    result = runner.invoke(sim_app, ["drive", "-t", "monza"])
    assert result.exit_code == 2 and "unknown track" in result.output
    result = runner.invoke(sim_app, ["drive", "-t", "random:²"])
    assert result.exit_code == 2 and "digits 0-9" in result.output


def test_record_demo_saves_reward_points_the_env_can_follow(tmp_path):
    from tmrl_worker.reward import load_points
    from tmrl_worker.sim import PurePursuitDriver, RaceTrackEnv

    demo = tmp_path / "demo.safetensors"
    result = runner.invoke(sim_app, ["record-demo", "-t", "oval", "-o", str(demo)])
    assert result.exit_code == 0, result.output
    points = load_points(demo)
    assert points.shape[1] == 2 and len(points) > 500
    env = RaceTrackEnv(track="oval", demo_path=str(demo), start_jitter=0.0)
    np.testing.assert_array_equal(env.episode.reward.points, points)
    driver = PurePursuitDriver(env.track, env.config.car)
    env.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, terminated, truncated, info = env.step(driver.act(env.car.pose()))
        done = terminated or truncated
    assert info["finished"]
