"""Action histories for an env whose actions are not in [-1, 1] (issue 13, finding 6): rtgym appends env-unit
actions (and ``get_default_action()`` at reset) to its action buffer, batches carry policy-unit actions; the actor
must see exactly the history the trainer rebuilds. Run with a real rtgym interface, Box(0, 10) actions and a
non-zero default action."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from tmrl_trainer.memory import ReplayMemory
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import RolloutLoop

BOXED_INTERFACE = textwrap.dedent('''
    import numpy as np
    from gymnasium import spaces
    from rtgym import RealTimeGymInterface


    class BoxedInterface(RealTimeGymInterface):
        """Observation: a step stamp; actions in Box(0, 10) of size 2; default action (5, 2)."""

        def __init__(self):
            self.stamp = 0.0

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(0.0, 1e6, (1,), np.float32),))

        def get_action_space(self):
            return spaces.Box(0.0, 10.0, (2,), np.float32)

        def get_default_action(self):
            return np.array([5.0, 2.0], dtype=np.float32)

        def send_control(self, control):
            pass

        def reset(self, seed=None, options=None):
            self.stamp += 1
            return [np.array([self.stamp], dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            self.stamp += 1
            return [np.array([self.stamp], dtype=np.float32)], 1.0, False, {}
''')


class RecordingPolicy:
    """Random actions (some beyond [-1, 1], as a scripted expert may give); keeps every observation it saw."""

    version = 0

    def __init__(self) -> None:
        self.seen: dict[int, tuple] = {}
        self._rng = np.random.default_rng(0)

    def act(self, observation: tuple) -> np.ndarray:
        self.seen[int(observation[0][0])] = tuple(np.array(part, copy=True) for part in observation)
        return self._rng.uniform(-1.3, 1.3, 2).astype(np.float32)


class ListSink:
    def __init__(self) -> None:
        self.batches = []

    def submit(self, builder, weights_version: int) -> None:
        self.batches.append(builder.build(seq=len(self.batches), weights_version=weights_version))


@pytest.fixture
def boxed_module(tmp_path, monkeypatch):
    (tmp_path / "my_boxed_robot.py").write_text(BOXED_INTERFACE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_boxed_robot"
    sys.modules.pop("my_boxed_robot", None)


def test_the_actor_sees_the_action_history_the_trainer_rebuilds_for_box_0_10_and_a_non_zero_default(boxed_module):
    handle = make_env(f"{boxed_module}:BoxedInterface", time_step_duration=0.01, max_episode_steps=7)
    policy, sink = RecordingPolicy(), ListSink()
    try:
        np.testing.assert_allclose(handle.default_action, [0.0, -0.6], atol=1e-6)  # (5, 2) of Box(0, 10)
        RolloutLoop(handle, sink, None, policy, batch_steps=3).run(max_steps=40)
    finally:
        handle.close()
    memory = ReplayMemory(handle.layout, capacity=1000)
    for batch in sink.batches:
        memory.add_batch("w", batch)
    positions = memory.sampleable_positions()
    transitions = memory.transitions(positions)
    checked = 0
    for i in range(positions.size):
        for side in (transitions.observation, transitions.next_observation):
            rebuilt = [part[i].numpy() for part in side]
            seen = policy.seen.get(int(rebuilt[0][0]))
            if seen is None:  # the last observation of an episode is never acted on
                continue
            for got, want in zip(rebuilt, seen, strict=True):
                np.testing.assert_array_equal(got, want)
            checked += 1
    assert checked >= 40 and all(np.all(np.abs(b.actions.array) <= 1.0) for b in sink.batches)
