"""Verification mode end to end in one process: the simulator (LIDAR history 4, action buffer 2) driven by the
rollout loop with ``verify_observations``, its batches stored in a replay memory that compares every observation it
rebuilds with the env's digest."""

from __future__ import annotations

from tmrl_trainer.memory import ReplayMemory
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import RolloutLoop, UniformPolicy


class ListSink:
    def __init__(self) -> None:
        self.batches = []

    def submit(self, builder, weights_version: int) -> None:
        self.batches.append(builder.build(seq=len(self.batches), weights_version=weights_version))


def test_every_observation_the_trainer_rebuilds_from_a_simulator_worker_matches_its_digest():
    handle = make_env("sim-fast", max_episode_steps=60)
    sink = ListSink()
    try:
        RolloutLoop(handle, sink, None, UniformPolicy(handle.action_dim, seed=0), batch_steps=3,
                    verify_observations=True).run(max_steps=400)
    finally:
        handle.close()
    assert all(batch.digests is not None for batch in sink.batches)
    memory = ReplayMemory(handle.layout, capacity=10_000)
    for index, batch in enumerate(sink.batches):
        if index % 9 != 4:  # one batch in nine lost: the rows after each gap cannot be rebuilt
            memory.add_batch("w", batch)
    counts = memory.verification
    assert counts.mismatched_rows == 0 and counts.verified_rows > 250 and counts.unverifiable_rows > 0
