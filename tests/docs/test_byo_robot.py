"""The bring-your-own-robot example (examples/byo_robot, docs/byo-robot.md) runs the way the tutorial says.

* the worker's env factory builds it from its ``module:Class`` spec and rtgym steps it in real time;
* the committed ``layout.json`` (the trainer's ``layout_file``) is the interface's layout;
* rows a worker would send rebuild, in the trainer's replay memory, exactly the observations the env returned;
* the whole pipeline (relay + trainer + worker processes, started with the tutorial's commands) trains it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationLayout
from tmrl_stack import LocalStack, wait_until
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.service import layout_for_env
from tmrl_worker.envs import make_env

REPO = Path(__file__).resolve().parents[2]
SPEC = "examples.byo_robot.robot:MyRobotInterface"
LAYOUT_FILE = REPO / "examples" / "byo_robot" / "layout.json"
BIN = Path(sys.executable).parent


@pytest.fixture
def robot_env(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # what PYTHONPATH=$PWD does for tmrl-worker in the tutorial
    handle = make_env(SPEC, time_step_duration=0.02, max_episode_steps=25, options={"seed": 3})
    try:
        yield handle
    finally:
        handle.env.unwrapped.interface.close()  # stops the robot's physics thread
        handle.close()


def test_worker_env_factory_builds_the_robot_as_a_real_time_env(robot_env) -> None:
    from examples.byo_robot.robot import LAYOUT

    assert robot_env.realtime and robot_env.expert is not None
    assert robot_env.layout == LAYOUT
    observation = robot_env.reset(seed=3)
    assert [np.shape(part) for part in observation] == LAYOUT.observation_shapes()
    assert np.array_equal(observation[0][0], observation[0][1]), "an episode starts with its first reading repeated"


def test_robot_steps_are_paced_by_the_wall_clock_and_the_robot_moves_meanwhile(robot_env) -> None:
    robot = robot_env.env.unwrapped.interface.robot
    robot_env.reset(seed=3)
    ticks_before = robot.ticks
    started = time.perf_counter()
    for _ in range(10):
        observation, reward, terminated, truncated, _ = robot_env.step(np.array([1.0], dtype=np.float32))
        assert np.isfinite(reward) and not terminated and not truncated
    elapsed = time.perf_counter() - started
    assert elapsed >= 0.9 * 10 * 0.02, f"10 real-time steps of 20 ms took only {elapsed:.3f} s"
    assert robot.ticks > ticks_before, "the physics thread did not run while the agent was stepping"
    assert observation[0][-1][1] > 0.0, "full forward force for 0.2 s should give a positive velocity"


def test_scripted_expert_earns_more_than_standing_still(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    handle = make_env(SPEC, time_step_duration=0.02, max_episode_steps=60, options={"seed": 0})
    try:
        seed = next(s for s in range(100) if abs(handle.reset(seed=s)[0][-1][0]) > 1.0)  # start far from the target

        def episode_return(policy) -> float:
            observation, total = handle.reset(seed=seed), 0.0
            while True:
                observation, reward, terminated, truncated, _ = handle.step(policy(observation))
                total += reward
                if terminated or truncated:
                    return total

        idle = episode_return(lambda _obs: np.zeros(1, dtype=np.float32))
        expert = episode_return(handle.expert)
    finally:
        handle.env.unwrapped.interface.close()
        handle.close()
    assert expert > idle + 5.0, (expert, idle)


def test_committed_layout_file_is_the_interface_layout_and_the_trainer_reads_it() -> None:
    from examples.byo_robot.robot import LAYOUT

    assert ObservationLayout.model_validate_json(LAYOUT_FILE.read_text()) == LAYOUT
    assert layout_for_env(SPEC, LAYOUT_FILE) == LAYOUT
    # byte for byte what byo-robot.md's command writes (an outside probe ran it and got a diff against the file)
    assert LAYOUT_FILE.read_text() == LAYOUT.model_dump_json(indent=2) + "\n"


def test_rows_rebuild_the_env_observations_in_the_trainer_replay_memory(robot_env) -> None:
    builder = SampleBatchBuilder(robot_env.layout, codec="zlib")
    rng = np.random.default_rng(0)
    observations = [robot_env.reset(seed=5)]
    builder.add_reset(observations[0], robot_env.default_action)
    for _ in range(12):
        action = rng.uniform(-1, 1, size=1).astype(np.float32)
        observation, reward, terminated, truncated, _ = robot_env.step(action)
        builder.add_step(action, observation, reward, terminated, truncated)
        observations.append(observation)
    memory = ReplayMemory(robot_env.layout, capacity=64)
    assert memory.add_batch("worker-1", builder.build(seq=0, weights_version=0)) == 13
    batch = memory.transitions(np.arange(1, 13))
    for step in range(1, 13):
        for part, expected in enumerate(observations[step - 1]):
            np.testing.assert_array_equal(batch.observation[part][step - 1].numpy(), np.asarray(expected, np.float32))
        for part, expected in enumerate(observations[step]):
            np.testing.assert_array_equal(batch.next_observation[part][step - 1].numpy(), np.asarray(expected, np.float32))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tutorial_pipeline_trains_the_robot_through_relay_and_trainer(tmp_path) -> None:
    """docs/byo-robot.md step 4, on loopback without keys (--insecure), shortened: the trainer must receive a batch
    the worker collected with weights the trainer published from the worker's own earlier samples."""
    config = tmp_path / "robot.toml"
    config.write_text(f"""
[trainer]
layout_file = "{LAYOUT_FILE.as_posix()}"
device = "cpu"
publish_every = 20
status_interval_s = 0.5
[trainer.sac]
hidden_sizes = [32, 32]
batch_size = 32
learning_starts = 100
[worker]
env = "{SPEC}"
time_step_duration = 0.02
max_episode_steps = 50
batch_steps = 25
""")
    with LocalStack(tmp_path, config=config, env={"PYTHONPATH": str(REPO)}) as stack:
        stack.start_relay()
        stack.start_trainer()
        stack.start_worker("worker-1", "--max-steps", "4000", name="worker")

        def collected_with_published_weights() -> dict | None:
            status = stack.status()
            if status.get("workers", {}).get("worker-1", {}).get("weights_version", 0) >= 1:
                return status
            assert stack.processes["worker"].poll() is None, f"the worker ended before using published weights\n{stack.tails()}"
            return None

        # status.json is rewritten every status_interval_s
        status = wait_until(collected_with_published_weights, 90, stack,
                            "a batch collected with published weights reaching the trainer", "relay", "trainer")
        assert status["samples_received"] >= 100 and status["updates"] >= 20 and status["rejects"] == {}
        for name in ("worker", "trainer", "relay"):
            assert stack.stop(name, timeout=30) == 0, f"{name} did not stop cleanly\n{stack.tails()}"
