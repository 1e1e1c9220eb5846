"""``tmrl-worker eval``: a saved policy evaluated deterministically on the simulator (a ``random:SEED`` track, run
synchronously), a gymnasium env and a ``module:Class`` rtgym interface; the JSON summary, the GIF, and the one-line
error for a policy whose layout is not the env's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image
from tmrl_common.layout import tm20_lidar_layout
from tmrl_common.networks import PolicyArchitecture, build_actor
from tmrl_worker.cli import app
from tmrl_worker.envs import make_env
from tmrl_worker.evaluate import episode_line, episode_result
from tmrl_worker.runtime import save_policy_file
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def policy_file(path: Path, layout, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_policy_file(build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[16, 16])), path, version=4)


def pendulum_layout():
    """The layout the worker builds for gym:Pendulum-v1 (one component ``obs``, bounds from its space)."""
    env = make_env("gym:Pendulum-v1")
    env.close()
    return env.layout


def run_eval(*args: str) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["eval", *args, "--json"])
    document = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, document, result.stderr


def test_sim_on_a_random_track_reports_each_episode_and_writes_a_readable_gif(tmp_path):
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    gif = tmp_path / "best.gif"
    code, summary, stderr = run_eval("--policy", str(policy), "--env", "sim", "--track", "random:7", "--episodes", "3",
                                     "--seed", "5", "--max-episode-steps", "60", "--gif", str(gif))
    assert code == 0, stderr
    assert (summary["evaluated_as"], summary["track"], summary["realtime"]) == ("sim-fast", "random:7", False)
    assert summary["policy_version"] == 4 and summary["step_seconds"] == pytest.approx(0.05)
    episodes = summary["episodes"]
    assert [e["seed"] for e in episodes] == [5, 6, 7]
    for episode in episodes:
        assert set(episode) == {"episode", "seed", "return", "steps", "ended", "finished", "seconds", "lap_time_s",
                                "wall_contacts", "progress", "track"}
        assert episode["track"] == "random:7" and 0.0 <= episode["progress"] <= 1.0
        assert 1 <= episode["steps"] <= 60 and episode["seconds"] == pytest.approx(episode["steps"] * 0.05)
        assert isinstance(episode["finished"], bool) and isinstance(episode["wall_contacts"], int)
        assert episode["lap_time_s"] == (episode["seconds"] if episode["finished"] else None)
    returns = [e["return"] for e in episodes]
    assert summary["mean_return"] == pytest.approx(statistics.fmean(returns))
    assert summary["std_return"] == pytest.approx(statistics.pstdev(returns))
    assert summary["best_episode"] == max(range(3), key=lambda i: (returns[i], -episodes[i]["steps"]))
    assert summary["finished"] == sum(e["finished"] for e in episodes)
    assert stderr.count("episode ") >= 3 and "mean return" in stderr
    with Image.open(summary["gif"]) as image:
        assert image.format == "GIF" and image.n_frames >= 2
    # the deterministic policy driven by hand on the same synchronous track gives the reported return
    env = make_env("sim-fast", max_episode_steps=60, options={"track": "random:7"})
    from tmrl_worker.runtime import load_policy_file

    actor = load_policy_file(policy, env.layout)
    observation, total, done = env.reset(seed=6), 0.0, False
    while not done:
        observation, reward, terminated, truncated, _ = env.step(actor.act(observation))
        total, done = total + reward, terminated or truncated
    assert total == pytest.approx(episodes[1]["return"])


def test_gym_pendulum_reports_returns_without_finish_or_walls(tmp_path):
    policy = policy_file(tmp_path / "pendulum.safetensors", pendulum_layout())
    code, summary, stderr = run_eval("--policy", str(policy), "--env", "gym:Pendulum-v1", "--episodes", "2", "--seed", "1")
    assert code == 0, stderr
    assert [(e["steps"], e["ended"], e["finished"], e["wall_contacts"]) for e in summary["episodes"]] == \
        [(200, "truncated", None, None)] * 2
    assert summary["episodes"][0]["seconds"] == pytest.approx(10.0)  # Pendulum's dt is 0.05 s
    assert summary["finished"] is None and summary["mean_lap_time_s"] is None
    assert all(-200 * 16.3 <= e["return"] <= 0 for e in summary["episodes"])  # Pendulum's reward bounds per step


def test_a_gif_of_a_gym_env_is_written_or_refused_in_one_line(tmp_path):
    policy = policy_file(tmp_path / "pendulum.safetensors", pendulum_layout())
    gif = tmp_path / "pendulum.gif"
    code, summary, stderr = run_eval("--policy", str(policy), "--env", "gym:Pendulum-v1", "--episodes", "1",
                                     "--gif", str(gif))
    try:
        import pygame  # noqa: F401 - Pendulum draws its frames with pygame
    except ImportError:
        assert code == 2 and "cannot draw frames for --gif" in stderr and "pygame" in stderr
        assert stderr.strip().count("\n") == 0 and not gif.exists()
    else:
        assert code == 0, stderr
        with Image.open(summary["gif"]) as image:
            assert image.format == "GIF" and image.n_frames >= 2


def test_a_module_interface_runs_in_real_time_from_the_worker_config(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # the tutorial's PYTHONPATH=$PWD
    from examples.byo_robot.robot import LAYOUT

    policy = policy_file(tmp_path / "robot.safetensors", LAYOUT)
    config = tmp_path / "robot.toml"
    config.write_text('[worker]\nenv = "examples.byo_robot.robot:MyRobotInterface"\ntime_step_duration = 0.02\n'
                      'max_episode_steps = 5\n[worker.env_options]\nseed = 3\n')
    code, summary, stderr = run_eval("--policy", str(policy), "--config", str(config), "--episodes", "2")
    assert code == 0, stderr
    assert summary["realtime"] is True and summary["step_seconds"] == pytest.approx(0.02)
    assert [e["steps"] for e in summary["episodes"]] == [5, 5]
    assert all(e["finished"] is None and e["wall_contacts"] is None for e in summary["episodes"])


SLOW_READING = '''
    import time


    class SlowReading(ZeroReadingInterface):
        """Its observation takes three times the default time step (0.05 s): every step runs late."""

        def get_obs_rew_terminated_info(self):
            time.sleep(0.15)
            return super().get_obs_rew_terminated_info()
'''


def slow_reading_robot(tmp_path: Path, plug_interface, module_name: str) -> tuple[str, Path]:
    """The module of :data:`SLOW_READING` plugged in as ``module_name``, and a policy file for its layout."""
    module = plug_interface(module_name, SLOW_READING)
    handle = make_env(f"{module}:SlowReading")
    try:
        layout = handle.layout
    finally:
        handle.close()
    return module, policy_file(tmp_path / "slow.safetensors", layout)


@pytest.mark.filterwarnings("always:Time-step timed out:UserWarning")  # pyproject ignores them in tests
def test_late_time_steps_are_counted_in_the_summary_not_printed_between_the_episode_lines(tmp_path, plug_interface):
    """The emulated-game probe: eval printed rtgym's `UserWarning: Time-step timed out. Elapsed since last time-step:
    0.24...` eight times between its episode lines; run summarises late steps in one line."""
    module, policy = slow_reading_robot(tmp_path, plug_interface, "slow_reading_robot")
    code, summary, stderr = run_eval("--policy", str(policy), "--env", f"{module}:SlowReading", "--episodes", "2",
                                     "--max-episode-steps", "4")
    assert code == 0, stderr
    assert "Time-step timed out" not in stderr and "UserWarning" not in stderr
    assert [e["steps"] for e in summary["episodes"]] == [4, 4]
    [last] = stderr.strip().splitlines()[-1:]
    assert last.startswith("2 episodes: mean return") and "time step(s) ran late (rtgym's time-step time-out)" in last


@pytest.mark.filterwarnings("ignore:Time-step timed out:UserWarning")
def test_late_time_steps_are_counted_where_warnings_are_ignored_and_the_filters_come_back(tmp_path, plug_interface):
    """A count read from the warnings shown said "no late step" under `-W ignore` (or pyproject's filter here);
    eval counts every late step whatever the filters, and leaves them as they were."""
    import warnings

    module, policy = slow_reading_robot(tmp_path, plug_interface, "slow_reading_robot_ignored")
    filters_before, show_before = list(warnings.filters), warnings.showwarning
    code, summary, stderr = run_eval("--policy", str(policy), "--env", f"{module}:SlowReading", "--episodes", "1",
                                     "--max-episode-steps", "4")
    assert code == 0, stderr
    assert "UserWarning" not in stderr
    last = stderr.strip().splitlines()[-1]
    late = int(last.split("; ")[-1].split(" ")[0])
    assert late >= 3 and "time step(s) ran late" in last  # the 4 steps' last three at least (0.15 s of a 0.05 s step)
    assert warnings.filters == filters_before and warnings.showwarning is show_before


def test_a_policy_for_another_layout_is_a_one_line_error(tmp_path):
    policy = policy_file(tmp_path / "pendulum.safetensors", pendulum_layout())
    code, _, stderr = run_eval("--policy", str(policy), "--env", "sim", "--episodes", "1")
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert "another observation layout" in stderr and "(3,) -> 1 action" in stderr and "(4, 19)" in stderr


def test_a_policy_from_before_layouts_declared_bounds_is_evaluated_with_a_warning(tmp_path, caplog):
    """An outside probe: a policy trained by a build whose layouts declared no bounds (2026-11-27) was refused by eval
    ("component names, dtypes or value bounds differ"), though its networks are the env's; `export` of its checkpoint
    carries the same layout, so there was no way to evaluate it. Bounds alone now give a warning; another scale, which
    changes what the networks see, is still refused."""
    from tmrl_common.layout import tm20_lidar_layout

    unbounded = policy_file(tmp_path / "old.safetensors", tm20_lidar_layout().without_bounds())
    with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
        code, summary, stderr = run_eval("--policy", str(unbounded), "--env", "sim-fast", "--episodes", "1",
                                         "--max-episode-steps", "20")
    assert code == 0, stderr
    assert summary["episodes"][0]["steps"] == 20
    [warning] = [r.getMessage() for r in caplog.records if "other observation bounds" in r.getMessage()]
    assert "speed [None, None] -> [-1000.0, 1000.0]" in warning and "lidar [None, None] -> [0.0, 10000.0]" in warning

    scaled = policy_file(tmp_path / "scaled.safetensors", tm20_lidar_layout(lidar_scale=0.01))
    code, _, stderr = run_eval("--policy", str(scaled), "--env", "sim-fast", "--episodes", "1")
    assert code == 2 and "another observation layout" in stderr and "names, dtypes or scales differ" in stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--env", "gym:Pendulum-v1", "--track", "oval"], "--track applies to the simulator"),
    (["--env", "sim", "--track", "nowhere"], "unknown track"),
    (["--env", "no.such.module:Interface"], "cannot import module"),
    (["--env", "examples.byo_robot.robot:MyRobotInterface", "--gif", "robot.gif"], "draws no frames"),
])
def test_bad_env_choices_are_one_line_errors(tmp_path, args, message):
    policy = policy_file(tmp_path / "pendulum.safetensors", pendulum_layout())
    code, _, stderr = run_eval("--policy", str(policy), *args)
    assert code == 2 and message in stderr and stderr.strip().count("\n") == 0


def test_a_finished_episode_has_a_lap_time_at_the_envs_step_rate():
    result = episode_result(2, 9, (512.5, 640, True, {"finished": True, "wall_hits": 3, "progress": 1.0}),
                            step_seconds=0.05)
    assert (result.finished, result.lap_time_s, result.seconds, result.wall_contacts) == (True, 32.0, 32.0, 3)
    assert episode_line(result) == ("episode 2 (seed 9): return    512.50, finished       640 steps, lap 32.00 s, "
                                    "3 wall-contact ticks")
    crashed = episode_result(0, 0, (-3.0, 40, True, {"finished": False}), step_seconds=0.05)
    assert (crashed.finished, crashed.lap_time_s, crashed.ended) == (False, None, "terminated")


def test_an_unfinished_episode_says_how_much_of_the_lap_it_covered():
    """An outside probe read a mean return of 1,110 on random:3, over the 1030 of a lap of hairpins, with no lap
    finished, as a reward paid for scraping walls: a lap of random:3 returns 1366, and nothing said how far the
    episodes got (they covered about 81 %)."""
    result = episode_result(1, 3, (1110.0, 1000, False, {"finished": False, "wall_hits": 1300, "progress": 0.8123}),
                            step_seconds=0.05, track="random:3")
    assert (result.progress, result.track) == (0.8123, "random:3")
    assert episode_line(result) == ("episode 1 (seed 3, random:3): return   1110.00, not finished  1000 steps (81.2 % "
                                    "of the lap), 50.00 s, 1300 wall-contact ticks")  # the tracks probe: no track named
    unreported = episode_result(0, 0, (1.0, 5, False, {"progress": float("nan")}), step_seconds=None)
    assert unreported.progress is None and episode_line(unreported) == \
        "episode 0 (seed 0): return      1.00, truncated        5 steps"


def test_eval_track_wins_over_the_configs_new_track_per_episode(monkeypatch, tmp_path):
    """An outside probe: with ``episode_tracks`` in the worker's config (a training set-up), ``eval --track
    random:3`` drove random training tracks, and the summary named the last of them."""
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    monkeypatch.setenv("TMRL_WORKER__ENV_OPTIONS__EPISODE_TRACKS", "random:1000-100000")
    code, summary, stderr = run_eval("--policy", str(policy), "--env", "sim", "--track", "random:3", "--episodes", "3",
                                     "--max-episode-steps", "20")
    assert code == 0, stderr
    assert summary["track"] == "random:3" and [e["track"] for e in summary["episodes"]] == ["random:3"] * 3
    code, summary, stderr = run_eval("--policy", str(policy), "--env", "sim", "--episodes", "3",
                                     "--max-episode-steps", "20")  # no --track: the config's pool, each one named
    assert code == 0, stderr
    tracks = [e["track"] for e in summary["episodes"]]
    assert all(t.startswith("random:") and 1000 <= int(t.split(":")[1]) <= 100000 for t in tracks), tracks
    assert summary["track"] == (tracks[0] if len(set(tracks)) == 1 else None)


def onnx_export(policy: Path) -> Path:
    """``policy`` exported as ONNX beside it (what ``tmrl-trainer export --onnx`` writes)."""
    from tmrl_common.networks import read_policy_file
    from tmrl_trainer.policy_export import export_onnx

    actor, version = read_policy_file(policy)
    return export_onnx(actor, policy.with_suffix(".onnx"), version=version)


def test_an_onnx_export_drives_the_same_episodes_as_its_policy_file(tmp_path):
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout(), seed=3)
    exported = onnx_export(policy)
    args = ("--env", "sim", "--track", "random:11", "--episodes", "2", "--seed", "4", "--max-episode-steps", "80")
    code, from_torch, stderr = run_eval("--policy", str(policy), *args)
    assert code == 0, stderr
    code, from_onnx, stderr = run_eval("--policy", str(exported), *args)
    assert code == 0, stderr
    assert from_onnx["policy"] == str(exported) and from_onnx["policy_version"] == 4
    for ours, theirs in zip(from_onnx["episodes"], from_torch["episodes"], strict=True):
        assert (ours["seed"], ours["steps"], ours["ended"], ours["finished"]) == \
            (theirs["seed"], theirs["steps"], theirs["ended"], theirs["finished"])
        assert ours["return"] == pytest.approx(theirs["return"], rel=1e-4, abs=1e-3)


def test_the_onnx_policy_acts_as_the_torch_actor_on_the_envs_observations(tmp_path):
    from tmrl_worker.runtime import load_onnx_policy, load_policy_file

    layout = tm20_lidar_layout()
    policy = policy_file(tmp_path / "sim.safetensors", layout, seed=5)
    torch_policy, onnx_policy = load_policy_file(policy, layout), load_onnx_policy(onnx_export(policy), layout)
    env = make_env("sim-fast", options={"track": "hairpins"})
    try:
        observation = env.reset(seed=0)
        for _ in range(40):
            action = torch_policy.act(observation)
            assert onnx_policy.act(observation) == pytest.approx(action, abs=1e-5)
            observation, *_ = env.step(action)
    finally:
        env.close()


def test_an_onnx_file_for_another_layout_or_not_from_tmrl_is_a_one_line_error(tmp_path):
    exported = onnx_export(policy_file(tmp_path / "pendulum.safetensors", pendulum_layout()))
    code, _, stderr = run_eval("--policy", str(exported), "--env", "sim", "--episodes", "1")
    assert code == 2 and "another observation layout" in stderr and "(3,) -> 1 action" in stderr
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    code, _, stderr = run_eval("--policy", str(garbage), "--env", "sim", "--episodes", "1")
    assert code == 2 and "not a readable ONNX model" in stderr and stderr.strip().count("\n") == 0

    import onnx

    model = onnx.load(str(exported))
    del model.metadata_props[:]
    onnx.save_model(model, str(tmp_path / "foreign.onnx"))
    code, _, stderr = run_eval("--policy", str(tmp_path / "foreign.onnx"), "--env", "gym:Pendulum-v1", "--episodes", "1")
    assert code == 2 and "without tmrl's metadata" in stderr and stderr.strip().count("\n") == 0


SHORT_SIM = ("--env", "sim", "--track", "random:7", "--episodes", "2", "--max-episode-steps", "60")


def test_a_gif_in_a_missing_folder_is_written_there(tmp_path):
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    gif = tmp_path / "not" / "yet" / "best.gif"
    code, summary, stderr = run_eval("--policy", str(policy), *SHORT_SIM, "--gif", str(gif))
    assert code == 0, stderr
    assert summary["gif"] == str(gif)
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames >= 2


@pytest.mark.parametrize("name", ["best.png", "best", "best.gif.txt"])
def test_a_gif_name_not_ending_in_gif_is_refused_before_any_episode(tmp_path, name):
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    code, _, stderr = run_eval("--policy", str(policy), *SHORT_SIM, "--gif", str(tmp_path / name))
    assert code == 2 and "its name must end in .gif" in stderr
    assert stderr.strip().count("\n") == 0 and "episode 0" not in stderr  # one line, no episode run
    assert not (tmp_path / name).exists()


def test_a_gif_folder_that_cannot_be_created_fails_before_any_episode(tmp_path):
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, stderr = run_eval("--policy", str(policy), *SHORT_SIM, "--gif", str(blocker / "sub" / "best.gif"))
    assert code == 2 and f"{str(blocker)!r} is a file, not a folder" in stderr  # was "cannot write ...: File exists"
    assert stderr.strip().count("\n") == 0 and "episode 0" not in stderr and "Traceback" not in stderr
    assert blocker.read_text() == "not a folder"


def test_the_gif_path_check_leaves_no_empty_file_behind(tmp_path):
    from tmrl_worker.evaluate import prepare_gif_path

    gif = tmp_path / "new" / "best.gif"
    assert prepare_gif_path(gif) == gif
    assert gif.parent.is_dir() and not gif.exists()
    kept = tmp_path / "old.gif"
    kept.write_bytes(b"GIF89a earlier")
    prepare_gif_path(kept)
    assert kept.read_bytes() == b"GIF89a earlier"


def test_a_gif_write_that_fails_after_the_episodes_is_one_line(tmp_path, monkeypatch):
    import tmrl_worker.sim.render

    def disk_full(frames, path, fps=20.0):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(tmrl_worker.sim.render, "write_gif", disk_full)
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    code, _, stderr = run_eval("--policy", str(policy), *SHORT_SIM, "--gif", str(tmp_path / "best.gif"))
    lines = stderr.strip().splitlines()
    assert code == 2 and [line.split(":")[0] for line in lines[:2]] == ["episode 0 (seed 0, random", "episode 1 (seed 1, random"]
    assert lines[2:] == [f"tmrl-worker eval: --gif '{tmp_path / 'best.gif'}': writing the GIF failed after the "
                         "episodes: No space left on device"]


def test_an_env_that_does_not_replay_its_best_episode_keeps_the_results_writes_no_gif_and_exits_1(tmp_path,
                                                                                                monkeypatch):
    import tmrl_worker.evaluate

    real_run_episode = tmrl_worker.evaluate.run_episode

    def replay_differs(env, policy, seed, on_frame=None):  # as an env whose episodes do not follow from their seed
        total, steps, *rest = real_run_episode(env, policy, seed, on_frame=on_frame)
        return (total + (1.0 if on_frame is not None else 0.0), steps, *rest)

    monkeypatch.setattr(tmrl_worker.evaluate, "run_episode", replay_differs)
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    gif = tmp_path / "best.gif"
    result = runner.invoke(app, ["eval", "--policy", str(policy), *SHORT_SIM, "--gif", str(gif), "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)  # the episodes' results are printed all the same
    assert len(summary["episodes"]) == 2 and summary["gif"] is None and not gif.exists()
    assert "is not reproducible from its seed" in summary["gif_error"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tmrl-worker eval: no GIF written: replaying episode ") and last.endswith(
        "is not reproducible from its seed")


@pytest.mark.parametrize(("args", "option"), [
    (["--seed", "-1"], "'--seed'"),
    (["--episodes", "0"], "'--episodes'"),
    (["--episodes", "10001"], "'--episodes'"),
    (["--max-episode-steps", "0"], "'--max-episode-steps'"),
])
def test_out_of_range_options_are_refused_by_the_command_line(tmp_path, args, option):
    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    code, _, stderr = run_eval("--policy", str(policy), "--env", "sim", *args)
    assert code == 2 and f"Invalid value for {option}" in stderr and "Traceback" not in stderr


def test_the_command_lines_episode_bound_is_the_evaluations():
    from tmrl_worker import eval_cli, evaluate

    assert eval_cli.MAX_EPISODES == evaluate.MAX_EPISODES
    assert evaluate.EvalConfig.model_fields["episodes"].metadata[-1].le == evaluate.MAX_EPISODES


def test_settings_the_evaluation_refuses_are_one_line_errors(tmp_path, capsys):
    """Values that pass the command line's own checks (here: called without typer) but not :class:`EvalConfig`."""
    import typer
    from tmrl_worker.eval_cli import eval_command

    policy = policy_file(tmp_path / "sim.safetensors", tm20_lidar_layout())
    with pytest.raises(typer.Exit) as exit_info:
        eval_command(policy=policy, env="sim", track=None, episodes=5, seed=-1, gif=None, json_output=False,
                     max_episode_steps=None, config=None)
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == "tmrl-worker eval: invalid settings: seed: Input should be greater than or " \
                                      "equal to 0\n"


def test_a_gif_or_onnx_write_that_fails_leaves_the_earlier_file_as_it_was(tmp_path, monkeypatch):
    """Full-disk probe: `eval --gif` and `export --onnx` wrote straight into their target, so a full disk (or a
    file-size limit) turned a good GIF into a truncated one and a good model into a corrupt one."""
    import os

    import numpy as np
    import onnx
    from PIL import Image
    from tmrl_common import atomic_file
    from tmrl_worker.sim.render import write_gif

    frames = [np.full((8, 8), value, dtype=np.uint8) for value in (0, 128, 255)]
    gif = write_gif(frames, tmp_path / "best.gif")
    model = onnx_export(policy_file(tmp_path / "policy.safetensors", tm20_lidar_layout()))
    before = {path: path.read_bytes() for path in (gif, model)}

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_file.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_gif(frames[::-1], gif)
    with pytest.raises(OSError, match="No space left"):
        onnx_export(policy_file(tmp_path / "policy.safetensors", tm20_lidar_layout(), seed=1))
    monkeypatch.setattr(atomic_file.os, "fsync", os.fsync)
    assert {path: path.read_bytes() for path in (gif, model)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.gif", "policy.onnx", "policy.safetensors"]
    assert Image.open(gif).n_frames == 3
    onnx.checker.check_model(onnx.load(str(model)))
