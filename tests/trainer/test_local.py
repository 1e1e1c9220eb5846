"""Synchronous local training: any gymnasium id, checkpoints, TensorBoard, and an actual learning check."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tmrl_common.layout import ObservationComponent, ObservationLayout
from tmrl_trainer.checkpoint import load_checkpoint
from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.local import LocalTrainingConfig, UnsupportedEnvironmentError, train_local
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TupleLidarEnv(gym.Env):
    """A tiny env with an rtgym-style tuple observation and an ``ObservationLayout`` attribute."""

    layout = ObservationLayout(
        components=[ObservationComponent(name="speed", frame_shape=[1]),
                    ObservationComponent(name="lidar", frame_shape=[5], history=4)],
        action_dim=2, action_history=1)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    observation_space = gym.spaces.Tuple((gym.spaces.Box(-np.inf, np.inf, (1,)), gym.spaces.Box(0, 1, (4, 5)),
                                          gym.spaces.Box(-1, 1, (2,))))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.lidar = np.repeat(self.np_random.random((1, 5), dtype=np.float32), 4, axis=0)
        self.speed = np.zeros(1, np.float32)
        return (self.speed, self.lidar.copy(), np.zeros(2, np.float32)), {}

    def step(self, action):
        self.speed = np.clip(self.speed + 0.1 * action[:1], -1, 1).astype(np.float32)
        self.lidar = np.concatenate([self.lidar[1:], self.np_random.random((1, 5), dtype=np.float32)])
        terminated = bool(self.np_random.random() < 0.05)
        return (self.speed, self.lidar.copy(), np.asarray(action, np.float32)), float(self.speed[0]), terminated, False, {}


gym.register(id="tmrl-test/TupleLidar-v0", entry_point=TupleLidarEnv, max_episode_steps=30)


def _small(**fields) -> LocalTrainingConfig:
    sac = SACConfig(hidden_sizes=[16, 16], batch_size=32, learning_starts=fields.pop("learning_starts", 100))
    return LocalTrainingConfig(sac=sac, device="cpu", **fields)


def test_short_pendulum_run_writes_tensorboard_scalars_and_a_loadable_checkpoint(tmp_path):
    config = _small(run_dir=tmp_path, eval_episodes=1, checkpoint_every=150, log_every=50, save_memory=True)
    result = train_local("Pendulum-v1", steps=300, seed=0, config=config)
    assert result.updates == 202  # one per step from step 99, when the memory holds 100 rows (the reset row included)
    assert result.episodes == 1 and len(result.final_returns) == 1 and np.isfinite(result.final_return)
    assert result.updates_rejected == 0  # Pendulum is sane: the guard lets every update through
    assert result.checkpoint is not None and result.checkpoint.exists()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"sac/critic_loss", "sac/alpha", "sac/q_mean", "episode/return", "eval/return",
            "speed/updates_per_s", "speed/samples_per_s"} <= tags

    learner = SACLearner(config.sac, config.sac.architecture(_pendulum_layout()), device="cpu")
    restored = load_checkpoint(result.checkpoint, learner)
    assert restored.counters["env_steps"] == 300 and learner.updates == 202


def _pendulum_layout() -> ObservationLayout:
    from tmrl_common.layout import layout_for_box

    return layout_for_box(3, 1, -8.0, 8.0)  # with the Box's bounds, as the worker and the trainer service build it


def test_an_env_exposing_a_layout_is_trained_on_its_tuple_observations():
    result = train_local("tmrl-test/TupleLidar-v0", steps=120, seed=1, config=_small(learning_starts=40, eval_episodes=2))
    assert 81 <= result.updates <= 120 and result.episodes >= 1
    assert len(result.final_returns) == 2


def test_same_seed_gives_the_same_local_run():
    first = train_local("Pendulum-v1", steps=150, seed=3, config=_small(eval_episodes=1))
    second = train_local("Pendulum-v1", steps=150, seed=3, config=_small(eval_episodes=1))
    assert first.final_returns == second.final_returns


def test_n_step_returns_reach_the_local_learner(monkeypatch):
    import tmrl_trainer.local as local

    memories = []
    made = local.ReplayMemory

    def recording(*args, **kwargs):
        memories.append(made(*args, **kwargs))
        return memories[-1]

    monkeypatch.setattr(local, "ReplayMemory", recording)
    one_step = train_local("Pendulum-v1", steps=150, seed=3, config=_small(eval_episodes=1))
    config = _small(eval_episodes=1)
    config.sac = SACConfig.model_validate({**config.sac.model_dump(), "n_step": 3, "gamma": 0.95})
    three_step = train_local("Pendulum-v1", steps=150, seed=3, config=config)
    assert [(m.n_step, m.gamma) for m in memories] == [(1, 0.99), (3, 0.95)]
    assert memories[1].sample(8).discount is not None
    assert three_step.updates == one_step.updates and three_step.final_returns != one_step.final_returns


def test_unsupported_environments_are_refused_with_a_reason():
    with pytest.raises(UnsupportedEnvironmentError, match="Box action space"):
        train_local("CartPole-v1", steps=10, config=_small())
    with pytest.raises(UnsupportedEnvironmentError, match="cannot make"):
        train_local("NoSuchEnv-v9", steps=10, config=_small())


@pytest.mark.slow
def test_sac_learns_pendulum_within_4000_steps():
    """Random and untrained policies score about -1200 to -1600 here; a learned swing-up scores above -250.

    At 4000 steps a seed may still miss the swing-up in one of the 5 evaluation episodes (about -1500 for that one),
    and which seed does shifts with rounding differences (the training is chaotic: changing the order of a sum moved
    seed 0 from -154 to -525), so the bar is a mean clearly away from untrained, not a solved task. The solved-task
    bar (every seed at least -200 after 10,000 steps) is ``benchmarks/sac_pendulum.py``."""
    config = LocalTrainingConfig(device="cpu", eval_episodes=5,
                                 sac=SACConfig(hidden_sizes=[64, 64], learning_starts=500))
    result = train_local("Pendulum-v1", steps=4000, seed=0, config=config)
    assert result.final_return > -600, result.evaluations


def test_train_local_command_trains_and_reports_the_final_return(tmp_path):
    from tmrl_trainer.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "60", "--seed", "1",
                                 "--eval-episodes", "1", "--run-dir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Pendulum-v1 seed 1: 60 steps" in result.output and "final deterministic return" in result.output
    assert (tmp_path / "checkpoints" / "latest.safetensors").exists()
    refused = runner.invoke(app, ["train-local", "--env", "CartPole-v1", "--steps", "5", "--run-dir",
                                  str(tmp_path / "cartpole")])
    assert refused.exit_code == 2 and "Box action space" in refused.output
    again = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "5", "--run-dir", str(tmp_path)])
    assert again.exit_code == 2 and "holds the checkpoint of an earlier run" in again.output and "--overwrite" in \
        again.output
    over = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "5", "--seed", "1", "--eval-episodes",
                               "0", "--run-dir", str(tmp_path), "--device", "cpu", "--overwrite"])
    assert over.exit_code == 0 and "Pendulum-v1 seed 1: 5 steps" in over.output, over.output


def test_a_stop_ends_local_training_after_its_step_with_a_checkpoint_and_no_final_evaluation(tmp_path):
    import threading

    stop = threading.Event()

    def stop_at_step_250(step: int, info: dict) -> None:
        if step == 250:
            stop.set()

    config = _small(run_dir=tmp_path, eval_episodes=3)
    result = train_local("Pendulum-v1", steps=10_000, seed=0, config=config, on_progress=stop_at_step_250, stop=stop)
    assert result.stopped and result.steps == 250 and result.updates == 152  # one per step from step 99
    assert result.final_returns == [] and np.isnan(result.final_return)  # the final evaluation was skipped
    learner = SACLearner(config.sac, config.sac.architecture(_pendulum_layout()), device="cpu")
    restored = load_checkpoint(result.checkpoint, learner)
    assert restored.counters["env_steps"] == 250 and learner.updates == 152


def test_train_local_command_stops_on_sigint_saves_its_checkpoint_and_exits_0(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    command = [str(Path(sys.executable).with_name("tmrl-trainer")), "train-local", "--env", "Pendulum-v1",
               "--steps", "1000000", "--run-dir", str(tmp_path), "--device", "cpu", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "tensorboard").exists():
            time.sleep(0.1)
        time.sleep(1.0)  # a few hundred steps
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "signal 2: stopping" in output and "stopped at step" in output and "of 1000000" in output, output
    assert (tmp_path / "checkpoints" / "latest.safetensors").exists()


def test_a_policy_trained_locally_on_a_bounded_box_env_is_evaluated_by_the_worker(tmp_path):
    """An outside probe: train-local built Pendulum's layout without the Box's bounds, the worker with them, so
    `tmrl-worker eval` refused every policy trained locally on a bounded env ("another observation layout")."""
    from tmrl_trainer.cli import app as trainer_app
    from tmrl_worker.cli import app as worker_app
    from typer.testing import CliRunner

    result = train_local("Pendulum-v1", steps=120, seed=0, config=_small(run_dir=tmp_path, eval_episodes=0))
    runner = CliRunner()
    exported = runner.invoke(trainer_app, ["export", str(result.checkpoint), "--policy-out",
                                           str(tmp_path / "policy.safetensors")])
    assert exported.exit_code == 0, exported.output
    evaluated = runner.invoke(worker_app, ["eval", "--policy", str(tmp_path / "policy.safetensors"), "--env",
                                           "gym:Pendulum-v1", "--episodes", "1"])
    assert evaluated.exit_code == 0, evaluated.output


def test_train_local_refuses_an_unusable_run_dir_or_env_module_before_training_in_one_line(tmp_path):
    from tmrl_trainer.cli import app
    from typer.testing import CliRunner

    (tmp_path / "a-file").write_text("not a folder")
    runner = CliRunner()
    blocked = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "1000000", "--run-dir",
                                  str(tmp_path / "a-file" / "run"), "--device", "cpu"])
    assert blocked.exit_code == 2 and "cannot write in" in blocked.output and "Traceback" not in blocked.output
    missing = runner.invoke(app, ["train-local", "--env", "gym:tmrl_worker.nosuch:X-v0", "--steps", "5", "--run-dir",
                                  str(tmp_path / "run"), "--device", "cpu"])
    assert missing.exit_code == 2 and "gymnasium cannot make 'tmrl_worker.nosuch:X-v0'" in missing.output


def test_train_local_checks_utd_and_a_memory_it_cannot_learn_from_before_it_starts(tmp_path):
    """A config probe: --utd went around the config's checks (-1, nan and 0 ran without an update, exit 0; inf and
    1e9 hung, deaf to Ctrl-C), and a memory smaller than learning_starts ran 600 steps with no update and no word."""
    from tmrl_trainer.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    small = tmp_path / "small.toml"
    small.write_text("[trainer]\nmemory_capacity = 100\n[trainer.sac]\nlearning_starts = 500\n")
    for arguments, says in ((["--utd", "inf"], "sac.utd = inf from the command line"),
                            (["--utd", "-1"], "sac.utd = -1.0 from the command line"),
                            (["--utd", "1e9"], "less than or equal to 1000"),
                            (["--config", str(small)], "sac.learning_starts (500) exceeds memory_capacity (100)")):
        result = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "50", "--run-dir",
                                     str(tmp_path / "run"), "--device", "cpu", *arguments])
        assert result.exit_code == 2 and says in " ".join(result.output.split()), (arguments, result.output)
        assert "Traceback" not in result.output and not (tmp_path / "run" / "checkpoints").exists()


def test_local_training_builds_the_configured_backend_and_another_resumes_its_checkpoint(tmp_path, monkeypatch):
    from tmrl_trainer import local
    from tmrl_trainer.reference import ReferenceLearner

    built = []
    make_learner = local.make_learner
    monkeypatch.setattr(local, "make_learner", lambda *args, **kwargs: built.append(make_learner(*args, **kwargs)) or built[-1])
    sac = SACConfig(hidden_sizes=[16, 16], batch_size=32, learning_starts=100, backend="reference")
    result = train_local("Pendulum-v1", steps=150, seed=0,
                         config=LocalTrainingConfig(sac=sac, device="cpu", run_dir=tmp_path, eval_episodes=0))
    (reference,) = built
    assert type(reference) is ReferenceLearner and result.updates == reference.updates == 52
    fast = SACLearner(sac, sac.architecture(_pendulum_layout()), device="cpu")
    load_checkpoint(result.checkpoint, fast)
    assert fast.updates == 52
    for name, tensor in reference.critics.state_dict().items():
        assert torch.equal(fast.critics.state_dict()[name], tensor), name
