"""n-step returns (``sac.n_step``): the transition starting at a row sums the rewards of up to ``n`` consecutive steps
of its episode, bootstraps from the observation after the last of them with ``γ^k``, and stops where the episode
ended or where the memory holds no linked successor (a gap, a batch still in flight, the newest row). It is built
from the same links as the histories, so it crosses no reset and no gap either; the device mirror builds the same
batches bit for bit; and every learner backend bootstraps with the batch's discount.

The scenarios are those of ``test_memory_histories.py`` (stamped env, two workers, lost and reordered batches, a
trainer restarted mid-episode, a ring that wrapped, a memory loaded from a file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from random_episodes import fill_with_random_episodes
from test_device_replay import assert_mirror_equals_host, deliver
from test_memory_histories import LAYOUT, interleave, lost_and_reordered, reward_of, two_workers
from tmrl_common.layout import tm20_lidar_layout
from tmrl_trainer.device_replay import DeviceReplay
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import SACConfig, soft_td_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAMMA = 0.9


def _episode_ends(streams) -> dict[int, tuple[float, float]]:
    """stamp → (terminated, truncated) of the step that produced it, from the workers' batches."""
    ends = {}
    for batches in streams.values():
        for batch in batches:
            stamps = batch.observations["stamp"].array[:, 0].astype(int)
            for stamp, terminated, truncated in zip(stamps, batch.terminated.array, batch.truncated.array, strict=True):
                ends[int(stamp)] = (float(terminated), float(truncated))
    return ends


def _stamps(parts: tuple[torch.Tensor, ...]) -> list[int]:
    return [int(s) for s in parts[0][:, 0]]


def check_n_step_transitions(memory: ReplayMemory, n_step: int, ends: dict, previous: dict) -> tuple[int, int]:
    """Every sampleable n-step transition, checked against the one-step transitions the memory holds (the walk may
    only take those) and the env's rewards and episode ends; returns (transitions checked, those that summed n)."""
    positions = memory.sampleable_positions()
    one_step = memory.transitions(positions, n_step=1)
    linked = dict(zip(_stamps(one_step.observation), _stamps(one_step.next_observation), strict=True))
    for stamp, successor in linked.items():
        assert previous[successor][0] == stamp  # one-step transitions are the env's (test_memory_histories)
    batch = memory.transitions(positions)
    assert batch.discount is not None and batch.discount.dtype == torch.float32
    full = 0
    starts, finals = _stamps(batch.observation), _stamps(batch.next_observation)
    for i, (start, final) in enumerate(zip(starts, finals, strict=True)):
        walk, expected = [linked[start]], reward_of(linked[start])
        while len(walk) < n_step and walk[-1] in linked and ends[walk[-1]] == (0.0, 0.0):
            walk.append(linked[walk[-1]])
            expected += GAMMA ** (len(walk) - 1) * reward_of(walk[-1])
        assert final == walk[-1], f"the walk from {start} ends at {final}, expected {walk[-1]}"
        assert float(batch.reward[i]) == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert float(batch.discount[i]) == pytest.approx(GAMMA ** len(walk), rel=1e-6)
        assert (float(batch.terminated[i]), float(batch.truncated[i])) == ends[final]
        full += len(walk) == n_step
    # the replayed part is the one-step transition's own: observation, action
    for got, want in zip((*batch.observation, batch.action), (*one_step.observation, one_step.action), strict=True):
        assert torch.equal(got, want)
    return len(starts), full


@pytest.mark.parametrize("n_step", [2, 3, 5])
def test_in_order_delivery_sums_n_rewards_up_to_the_episode_end(n_step):
    truth, previous, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000, n_step=n_step, gamma=GAMMA)
    for worker, batch in interleave(streams, np.random.default_rng(0)):
        memory.add_batch(worker, batch)
    checked, full = check_n_step_transitions(memory, n_step, _episode_ends(streams), previous)
    assert checked == len(previous) and full > checked // 2


@pytest.mark.parametrize("seed", range(3))
def test_n_step_walks_stop_at_lost_and_reordered_batches(seed):
    _, previous, streams = two_workers()
    arrivals = lost_and_reordered(streams, np.random.default_rng(seed))
    memory = ReplayMemory(LAYOUT, capacity=10_000, n_step=4, gamma=GAMMA)
    for worker, batch in arrivals:
        memory.add_batch(worker, batch)
    checked, full = check_n_step_transitions(memory, 4, _episode_ends(streams), previous)
    assert checked > 0 and full > 0 and memory.orphan_rows > 0


def test_the_newest_row_of_a_running_episode_ends_a_shorter_walk_until_its_successor_arrives():
    _, previous, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000, n_step=3, gamma=GAMMA)
    batches = streams["w1"]
    for batch in batches[:-1]:
        memory.add_batch("w1", batch)
    newest = memory.transitions(memory.sampleable_positions()[-1:])
    memory.add_batch("w1", batches[-1])
    check_n_step_transitions(memory, 3, _episode_ends(streams), previous)
    positions = memory.sampleable_positions()
    same_start = _stamps(memory.transitions(positions).observation).index(_stamps(newest.observation)[0])
    later = memory.transitions(positions[same_start : same_start + 1])
    ended = newest.terminated.item() or newest.truncated.item()
    assert float(newest.discount) == pytest.approx(GAMMA) and (ended or float(later.discount) < GAMMA)


@pytest.mark.parametrize("capacity", [11, 23, 97, 211])
def test_n_step_walks_in_a_ring_that_wrapped_follow_no_overwritten_row(capacity):
    """Late batches whose predecessor the ring has overwritten (small rings) must not link to the row now there."""
    _, previous, streams = two_workers(steps=600)
    memory = ReplayMemory(LAYOUT, capacity=capacity, n_step=3, gamma=GAMMA)
    rng = np.random.default_rng(9)
    arrivals = [(w, b) for w, b in interleave(streams, rng) if rng.random() > 0.1]
    for start in range(0, len(arrivals) - 3, 4):
        arrivals[start], arrivals[start + 3] = arrivals[start + 3], arrivals[start]
    checked = full = 0
    for worker, batch in arrivals:
        memory.add_batch(worker, batch)
        counts = check_n_step_transitions(memory, 3, _episode_ends(streams), previous)
        checked, full = checked + counts[0], full + counts[1]
    assert memory.rows_added > 5 * capacity
    assert checked > 0 and full > 0


def test_a_saved_memory_reloads_with_the_same_n_step_transitions():
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=0, n_step=3, gamma=GAMMA), steps=700,
                                       batch_rows=30)
    loaded = ReplayMemory(LAYOUT, capacity=300, seed=0, n_step=3, gamma=GAMMA)
    loaded.load_bytes(memory.to_bytes())
    positions = memory.sampleable_positions()
    np.testing.assert_array_equal(loaded.sampleable_positions(), positions)
    for got, want in zip(loaded.transitions(positions).tensors(), memory.transitions(positions).tensors(), strict=True):
        assert torch.equal(got, want)


def test_one_step_memories_give_no_discount_and_n_step_1_is_the_one_step_batch():
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=0), steps=400, batch_rows=30)
    positions = memory.sampleable_positions()
    batch = memory.transitions(positions)
    assert batch.discount is None
    with pytest.raises(ValueError, match="n_step"):
        ReplayMemory(LAYOUT, capacity=300, n_step=0)


def test_a_batch_lists_and_maps_its_tensors_with_the_discount_only_when_it_has_one():
    for n_step in (1, 3):
        memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=0, n_step=n_step, gamma=GAMMA),
                                           steps=400, batch_rows=30)
        batch = memory.sample(16)
        parts = [*batch.observation, batch.action, batch.reward, *batch.next_observation, batch.terminated,
                 batch.truncated] + ([] if n_step == 1 else [batch.discount])
        assert [id(t) for t in batch.tensors()] == [id(t) for t in parts]
        doubled = batch.map(lambda t: t * 2)
        assert (doubled.discount is None) == (n_step == 1)
        for got, want in zip(doubled.tensors(), parts, strict=True):
            assert torch.equal(got, want * 2)


# ----------------------------------------------------------------------------------------------- the device mirror


@pytest.mark.parametrize(("capacity", "chunk_rows", "sync_every", "loss"),
                         [(10_000, 50, 1, 0.0), (10_000, 64, 5, 0.15), (97, 5, 1, 0.1), (97, 13, 4, 0.1),
                          (211, 1000, None, 0.1)])
def test_the_mirror_builds_the_hosts_n_step_batches(capacity, chunk_rows, sync_every, loss):
    _, _, streams = two_workers(steps=600)
    memory = ReplayMemory(LAYOUT, capacity=capacity, n_step=3, gamma=GAMMA)
    replay = DeviceReplay(memory, "cpu", chunk_rows=chunk_rows)
    rng = np.random.default_rng(capacity + chunk_rows)
    deliver(memory, replay, [(w, b) for w, b in interleave(streams, rng) if rng.random() >= loss], sync_every)
    assert assert_mirror_equals_host(memory, replay) > 0
    np.testing.assert_array_equal(replay.next[:capacity].numpy(), memory._next)


def test_the_mirror_of_a_reloaded_n_step_memory_is_rebuilt_whole():
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=0, n_step=3, gamma=GAMMA), steps=700,
                                       batch_rows=30)
    replay = DeviceReplay(memory, "cpu")
    replay.sync()
    smaller = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=1), steps=120, batch_rows=30, seed=4)
    memory.load_bytes(smaller.to_bytes())
    replay.sync()
    assert assert_mirror_equals_host(memory, replay) > 0
    np.testing.assert_array_equal(replay.next[:300].numpy(), memory._next)


# ------------------------------------------------------------------------------------------------------- learners


def test_the_target_bootstraps_with_each_transitions_own_discount():
    reward, terminated = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0])
    next_q, next_log_prob = torch.tensor([10.0, 10.0, 10.0]), torch.tensor([-1.0, -1.0, -1.0])
    target = soft_td_target(reward, terminated, next_q, next_log_prob, alpha=0.5, gamma=torch.tensor([0.9, 0.81, 0.9]))
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.9 * 10.5, 2.0 + 0.81 * 10.5, 3.0]))


def _lidar_memory(n_step: int) -> ReplayMemory:
    return fill_with_random_episodes(ReplayMemory(tm20_lidar_layout(), capacity=2_000, seed=3, n_step=n_step,
                                                  gamma=0.99), steps=1_500, batch_rows=100)


@pytest.mark.parametrize("backend", ["cpu-fast", "cuda-graph"])
def test_every_backend_learns_from_n_step_batches_as_the_reference_does(backend):
    memory = _lidar_memory(n_step=3)
    config = SACConfig(batch_size=32, hidden_sizes=[32, 32])
    architecture = config.architecture(memory.layout)
    reference = make_learner(config, architecture, device="cpu", seed=0, backend="reference")
    other = make_learner(config, architecture, device="cpu", seed=0, backend=backend)
    for _ in range(5):
        batch = memory.sample(32)
        assert batch.discount is not None and float(batch.discount.min()) < 0.99**3 + 1e-6
        for learner in (reference, other):
            learner.update(batch, with_metrics=False)
    for (name, want), got in zip(reference.critics.state_dict().items(), other.critics.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_a_discount_of_gamma_everywhere_is_the_one_step_update():
    memory = _lidar_memory(n_step=1)
    config = SACConfig(batch_size=32, hidden_sizes=[32, 32])
    architecture = config.architecture(memory.layout)
    plain, discounted = (make_learner(config, architecture, device="cpu", seed=0) for _ in range(2))
    for _ in range(3):
        batch = memory.sample(32)
        plain.update(batch, with_metrics=False)
        discounted.update(batch._replace(discount=torch.full_like(batch.reward, config.gamma)), with_metrics=False)
    for want, got in zip(plain.critics.parameters(), discounted.critics.parameters(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the n-step walk inside a CUDA graph needs a CUDA device")
def test_the_cuda_graph_draws_n_step_batches_on_the_device_as_the_reference_learns_from_them():
    memory = _lidar_memory(n_step=3)
    replay = DeviceReplay(memory, "cuda", seed=5)
    replay.sync()
    config = SACConfig(batch_size=32, hidden_sizes=[32, 32])
    architecture = config.architecture(memory.layout)
    reference = make_learner(config, architecture, device="cuda", seed=0, backend="reference")
    graph = make_learner(config, architecture, device="cuda", seed=0, backend="cuda-graph")
    state = replay.generator.get_state()
    batches = [replay.sample(32) for _ in range(6)]
    replay.generator.set_state(state)
    assert all(batch.discount is not None for batch in batches)
    assert float(torch.cat([batch.discount for batch in batches]).min()) < 0.99**3 + 1e-6
    for batch in batches:
        reference.update(batch, with_metrics=False)
        graph.update_sampled(replay, with_metrics=False)
    assert graph.graph_captured
    for (name, want), got in zip(reference.critics.state_dict().items(), graph.critics.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the n-step walk inside the graph asks the host nothing
    try:
        graph.update_sampled(replay, with_metrics=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graph.updates == 7
