"""Rebuilt observations are the env's, component by component, with history depth > 1 (LIDAR depth 4, action buffer
2), across gaps, reordering, trainer restarts without memory and episode boundaries (issue 13, findings 2 and 3).

A small env stamps every step with a unique id (component ``stamp``); the test keeps the full observation tuple the
env returned at each id, delivers the workers' batches to the replay memory in a scenario's order, and checks every
sampleable transition: its observation and next observation must equal the env's at two consecutive steps of one
episode, and its action must be the one applied between them. Rows whose history cannot be rebuilt from real frames
must not be sampleable.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from tmrl_common.arrays import WireArray
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationComponent, ObservationLayout, observation_digest
from tmrl_common.protocol import SampleBatch
from tmrl_trainer.memory import ReplayMemory

LAYOUT = ObservationLayout(
    components=[ObservationComponent(name="stamp", frame_shape=[1]),
                ObservationComponent(name="lidar", frame_shape=[3], history=4)],
    action_dim=2,
    action_history=2,
)
DEFAULT_ACTION = np.array([0.3, -0.2], np.float32)  # not zero: a rebuilt action buffer must use the real one


class StampedEnv:
    """rtgym-like: LIDAR history filled with the reset frame at reset, action buffer with the default action."""

    def __init__(self, first_stamp: int, rng: np.random.Generator) -> None:
        self.stamp = first_stamp
        self.rng = rng
        self.lidar: deque = deque(maxlen=4)
        self.actions: deque = deque(maxlen=2)

    def _frame(self) -> np.ndarray:
        return np.array([self.stamp, self.stamp + 0.25, -self.stamp], np.float32)

    def _observation(self) -> tuple:
        return (np.array([self.stamp], np.float32), np.stack(self.lidar), *[a.copy() for a in self.actions])

    def reset(self) -> tuple:
        self.stamp += 1
        self.lidar.extend([self._frame()] * 4)
        self.actions.extend([DEFAULT_ACTION] * 2)
        return self._observation()

    def step(self, action: np.ndarray) -> tuple:
        self.stamp += 1
        self.lidar.append(self._frame())
        self.actions.append(action)
        return self._observation()


def reward_of(stamp: int) -> float:
    """The reward of the step that produced ``stamp``: distinct from its neighbours', exact in float32."""
    return ((stamp * 7) % 11) / 4.0 - 1.0


def worker_batches(first_stamp: int, steps: int, seed: int, truth: dict, previous: dict,
                   max_batch: int = 7) -> list[SampleBatch]:
    """One worker's batches (seq 0, 1, ...) over ``steps`` steps: random batch sizes 1..max_batch (often below the history
    depth), a batch cut at every episode end as the worker does; episodes of 3..25 steps. Fills ``truth`` (stamp →
    observation) and ``previous`` (stamp → (stamp before it in its episode, action applied)); the step that produced
    a stamp is rewarded :func:`reward_of` it, and ends its episode (terminated or truncated, in turns) every 3..25 steps."""
    rng = np.random.default_rng(seed)
    env = StampedEnv(first_stamp, rng)
    builder, batches = SampleBatchBuilder(LAYOUT), []
    observation = env.reset()
    truth[env.stamp] = observation
    builder.add_reset(observation, DEFAULT_ACTION)
    size, length = int(rng.integers(1, max_batch + 1)), int(rng.integers(3, 26))
    for step in range(steps):
        before = env.stamp
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        observation = env.step(action)
        truth[env.stamp], previous[env.stamp] = observation, (before, action)
        length -= 1
        done = length == 0
        builder.add_step(action, observation, reward_of(env.stamp), done and step % 2 == 0, done and step % 2 == 1)
        if done or len(builder) >= size or step == steps - 1:
            batches.append(builder.build(seq=len(batches), weights_version=0))
            size = int(rng.integers(1, max_batch + 1))
        if done:
            observation = env.reset()
            truth[env.stamp] = observation
            builder.add_reset(observation, DEFAULT_ACTION)
            length = int(rng.integers(3, 26))
    return batches


def check_every_sampleable_transition(memory: ReplayMemory, truth: dict, previous: dict) -> int:
    """Assert every sampleable transition is real; return how many there are."""
    positions = memory.sampleable_positions()
    if positions.size == 0:
        return 0
    batch = memory.transitions(positions)
    for i in range(positions.size):
        observation = [part[i].numpy() for part in batch.observation]
        next_observation = [part[i].numpy() for part in batch.next_observation]
        stamp, next_stamp = int(observation[0][0]), int(next_observation[0][0])
        assert previous[next_stamp][0] == stamp, f"transition {stamp} -> {next_stamp} crosses a gap or an episode"
        for got, want in zip(observation, truth[stamp], strict=True):
            assert np.array_equal(got, want), f"observation at step {stamp} is not the env's"
        for got, want in zip(next_observation, truth[next_stamp], strict=True):
            assert np.array_equal(got, want), f"next observation at step {next_stamp} is not the env's"
        assert np.array_equal(batch.action[i].numpy(), previous[next_stamp][1])
    return int(positions.size)


def two_workers(steps: int = 400) -> tuple[dict, dict, dict[str, list[SampleBatch]]]:
    truth, previous = {}, {}
    streams = {"w1": worker_batches(0, steps, 1, truth, previous),
               "w2": worker_batches(1_000_000, steps, 2, truth, previous)}
    return truth, previous, streams


def interleave(streams: dict[str, list[SampleBatch]], rng: np.random.Generator) -> list[tuple[str, SampleBatch]]:
    order = [worker for worker, batches in streams.items() for _ in batches]
    rng.shuffle(order)
    cursors = dict.fromkeys(streams, 0)
    out = []
    for worker in order:
        out.append((worker, streams[worker][cursors[worker]]))
        cursors[worker] += 1
    return out


def lost_and_reordered(streams: dict[str, list[SampleBatch]], rng: np.random.Generator,
                       loss: float = 0.15) -> list[tuple[str, SampleBatch]]:
    """The workers' batches interleaved, about ``loss`` of them lost, and in every group of four the first and third
    swapped half the time (a resend arriving after newer batches)."""
    arrivals = [(w, b) for w, b in interleave(streams, rng) if rng.random() > loss]
    for start in range(0, len(arrivals) - 3, 4):
        if rng.random() < 0.5:
            arrivals[start], arrivals[start + 2] = arrivals[start + 2], arrivals[start]
    return arrivals


def test_in_order_delivery_gives_every_transition_and_all_are_the_envs():
    truth, previous, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    for worker, batch in interleave(streams, np.random.default_rng(0)):
        memory.add_batch(worker, batch)
    assert check_every_sampleable_transition(memory, truth, previous) == len(previous)


@pytest.mark.parametrize("seed", range(4))
def test_lost_batches_leave_no_transition_built_across_the_gap(seed):
    rng = np.random.default_rng(seed)
    truth, previous, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    delivered = [(w, b) for w, b in interleave(streams, rng) if rng.random() > 0.15]  # a full spool dropped 15 %
    for worker, batch in delivered:
        memory.add_batch(worker, batch)
    sampled = check_every_sampleable_transition(memory, truth, previous)
    assert sampled > 0.5 * sum(int((~b.first.array).sum()) for _, b in delivered)


@pytest.mark.parametrize("seed", range(4))
def test_reordered_batches_are_never_linked_in_arrival_order(seed):
    rng = np.random.default_rng(seed)
    truth, previous, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    arrivals = interleave(streams, rng)
    for start in range(0, len(arrivals) - 3, 4):  # swap neighbours: a resend arrives after newer batches
        if rng.random() < 0.5:
            arrivals[start], arrivals[start + 2] = arrivals[start + 2], arrivals[start]
    for worker, batch in arrivals:
        memory.add_batch(worker, batch)
    assert check_every_sampleable_transition(memory, truth, previous) > 0.5 * len(previous)


def test_a_trainer_restarted_without_memory_mid_episode_invents_no_history():
    truth, previous, streams = two_workers()
    arrivals = interleave(streams, np.random.default_rng(5))
    restarted = ReplayMemory(LAYOUT, capacity=10_000)  # the restarted trainer: empty, joins mid-episode
    for worker, batch in arrivals[len(arrivals) // 2:]:
        restarted.add_batch(worker, batch)
    assert restarted.orphan_rows > 0
    assert check_every_sampleable_transition(restarted, truth, previous) > 0


def test_rows_after_an_orphan_wait_for_a_full_history_of_real_frames():
    truth, previous = {}, {}
    batches = [b for b in worker_batches(0, 400, 3, truth, previous, max_batch=30)
               if not b.first.array.any() and b.steps >= 8]  # batches that start and stay mid-episode
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    orphan = batches[1]
    memory.add_batch("w1", orphan.model_copy(update={"seq": 100}))
    # its rows have 0, 1, 2... real frames behind them: none is sampleable before 4 LIDAR frames and 2 actions are real
    assert check_every_sampleable_transition(memory, truth, previous) == max(0, orphan.steps - memory.depth)


def test_a_ring_buffer_that_wrapped_keeps_only_real_histories():
    truth, previous, streams = two_workers(steps=600)
    memory = ReplayMemory(LAYOUT, capacity=97)
    rng = np.random.default_rng(9)
    for worker, batch in interleave(streams, rng):
        if rng.random() > 0.1:
            memory.add_batch(worker, batch)
    assert check_every_sampleable_transition(memory, truth, previous) > 0


# -------------------------------------------------------------------------------------------- verification mode


def digest_batches(steps: int = 300, max_batch: int = 7) -> tuple[dict, dict, list[SampleBatch]]:
    """One worker's batches built in verification mode (each row carries its full-observation digest)."""
    truth, previous = {}, {}
    batches = worker_batches(0, steps, 4, truth, previous, max_batch=max_batch)
    rebuilt = []
    for batch in batches:  # the same rows, with the digest of the env's observation at each row
        stamps = [int(s) for s in batch.observations["stamp"].array[:, 0]]
        digests = np.frombuffer(b"".join(observation_digest(LAYOUT, truth[s]) for s in stamps), np.uint8)
        rebuilt.append(batch.model_copy(update={"digests": WireArray.from_numpy(digests.reshape(len(stamps), 8))}))
    return truth, previous, rebuilt


def test_verification_mode_finds_every_rebuilt_observation_equal_across_gaps_and_reordering():
    _, _, batches = digest_batches()
    rng = np.random.default_rng(11)
    arrivals = [b for b in batches if rng.random() > 0.1]
    for start in range(0, len(arrivals) - 2, 3):
        arrivals[start], arrivals[start + 1] = arrivals[start + 1], arrivals[start]
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    for batch in arrivals:
        memory.add_batch("w", batch)
    counts = memory.verification
    assert counts.mismatched_rows == 0 and counts.verified_rows > 0.5 * sum(b.steps for b in arrivals)
    assert counts.unverifiable_rows > 0  # the rows after each gap: not rebuildable, never sampled


def test_verification_mode_counts_a_rebuilt_observation_that_differs_from_the_envs():
    _, _, batches = digest_batches(max_batch=30)
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    target = next(i for i, b in enumerate(batches) if b.steps >= 10 and not b.first.array[:6].any())
    for index, batch in enumerate(batches):
        if index == target:  # a frame that is not what the env returned (as an arrival-order link would produce)
            lidar = batch.observations["lidar"].array.copy()
            lidar[2] += 1.0
            batch = batch.model_copy(update={"observations": {**batch.observations, "lidar": WireArray.from_numpy(lidar)}})
        memory.add_batch("w", batch)
    assert memory.verification.mismatched_rows == 4  # that row and the 3 whose LIDAR history holds it
    assert memory.verification.mismatched_by_worker == {"w": 4}


def test_forged_digests_are_counted_against_the_worker_that_sent_them_and_logged_once_per_batch(caplog):
    """An outside probe's client sent batches with made-up digests: the one global counter that must stay 0 rose, as
    a fault of the memory would make it, and every later clean batch logged the warning again."""
    _, _, batches = digest_batches(max_batch=30)
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    forger = "forger"
    with caplog.at_level("WARNING", logger="tmrl_trainer.memory"):
        for index, batch in enumerate(batches):
            if index == 5:
                forged = np.zeros_like(batch.digests.array)
                memory.add_batch(forger, batch.model_copy(update={"digests": WireArray.from_numpy(forged), "seq": 0}))
            memory.add_batch("w", batch)
    counts = memory.verification
    assert counts.mismatched_by_worker == {forger: counts.mismatched_rows} and counts.mismatched_rows > 0
    lines = [r.getMessage() for r in caplog.records if "verification" in r.getMessage()]
    assert len(lines) == 1 and f"worker {forger}'s batch" in lines[0]
