"""Replay memories filled with random episodes, for the trainer's tests (no environment needed)."""

from __future__ import annotations

import numpy as np
from tmrl_common.batching import SampleBatchBuilder
from tmrl_trainer.memory import ReplayMemory

EPISODE_STEPS = 97


def fill_with_random_episodes(memory: ReplayMemory, steps: int, batch_rows: int, seed: int = 0) -> ReplayMemory:
    """Add ``steps`` random steps of worker ``worker-1`` to ``memory``, in batches of ``batch_rows`` rows (a last
    partial batch is not added). Episodes last :data:`EPISODE_STEPS` steps; one in seven ends terminated, the others
    truncated. Observations follow the memory's layout: uint8 parts take any byte, float parts are uniform in
    [0, 1), previous actions and actions are uniform in [-1, 1]."""
    layout = memory.layout
    builder = SampleBatchBuilder(layout)
    rng = np.random.default_rng(seed)
    shapes = layout.observation_shapes()
    components = len(layout.components)

    def observation() -> tuple[np.ndarray, ...]:
        parts = []
        for index, shape in enumerate(shapes):
            if index >= components:  # the action buffer
                parts.append(rng.uniform(-1, 1, shape).astype(np.float32))
            elif layout.components[index].dtype == "uint8":
                parts.append(rng.integers(0, 256, shape, dtype=np.uint8))
            else:
                parts.append(rng.random(shape, dtype=np.float32))
        return tuple(parts)

    builder.add_reset(observation())
    batches = 0  # consecutive seqs: the memory links batch seq to batch seq - 1
    for step in range(steps):
        ended = step % EPISODE_STEPS == EPISODE_STEPS - 1
        builder.add_step(rng.uniform(-1, 1, layout.action_dim), observation(), float(rng.normal()),
                         step % 7 == 0 and ended, ended)
        if ended:
            builder.add_reset(observation())
        if len(builder) >= batch_rows:
            memory.add_batch("worker-1", builder.build(seq=batches, weights_version=0))
            batches += 1
    return memory
