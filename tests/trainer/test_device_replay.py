"""The device-resident replay mirror (issue 16) is the host replay memory, copied: after a sync its index of
sampleable rows is the host's ``sampleable_positions()``, and its batch at any of those positions is the host
sampler's batch, every component bit for bit (observation histories, action buffers, next observations, rewards,
flags), in the cases of ``test_memory_histories.py`` (in-order, lost and reordered batches, a trainer restarted
mid-episode, orphans, a ring that wrapped) and with syncs interleaved with ingest, in chunks, from another thread.
Here the mirror lives on the CPU (the same code as on CUDA); the CUDA tests skip without a GPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from random_episodes import fill_with_random_episodes
from test_memory_histories import (
    LAYOUT,
    check_every_sampleable_transition,
    interleave,
    lost_and_reordered,
    two_workers,
    worker_batches,
)
from tmrl_common.layout import tm20_image_layout, tm20_lidar_layout
from tmrl_trainer.device_replay import DeviceReplay
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory, TransitionBatch
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the mirror on a CUDA device and sampling "
                                "inside a CUDA graph need a GPU; this machine has none (the same code is tested on "
                                "CPU above)")


def assert_mirror_equals_host(memory: ReplayMemory, replay: DeviceReplay) -> int:
    """The mirror's index is the host's, and its batch at every indexed position is the host's; return the count."""
    positions = memory.sampleable_positions()
    mirrored = replay.sampleable_positions().cpu().numpy()
    np.testing.assert_array_equal(mirrored, positions)
    if positions.size == 0:
        return 0
    expected, actual = memory.transitions(positions), replay.gather(torch.from_numpy(positions).to(replay.device))
    for index, (want, got) in enumerate(zip(expected.tensors(), actual.tensors(), strict=True)):
        assert got.dtype == want.dtype and got.shape == want.shape, f"part {index}: {got.dtype}{tuple(got.shape)}"
        assert torch.equal(got.cpu(), want), f"part {index} differs from the host sampler's"
    return int(positions.size)


def assert_batch_is_real(batch: TransitionBatch, truth: dict, previous: dict) -> int:
    """Every transition of ``batch`` is two consecutive steps of one episode, as the env returned them (the check of
    ``test_memory_histories.py``, on a batch); return how many."""
    for i in range(batch.action.shape[0]):
        observation = [part[i].cpu().numpy() for part in batch.observation]
        next_observation = [part[i].cpu().numpy() for part in batch.next_observation]
        stamp, next_stamp = int(observation[0][0]), int(next_observation[0][0])
        assert previous[next_stamp][0] == stamp, f"transition {stamp} -> {next_stamp} crosses a gap or an episode"
        for got, want in zip([*observation, *next_observation], [*truth[stamp], *truth[next_stamp]], strict=True):
            assert np.array_equal(got, want), f"transition {stamp} -> {next_stamp} is not the env's"
        assert np.array_equal(batch.action[i].cpu().numpy(), previous[next_stamp][1])
    return int(batch.action.shape[0])


def deliver(memory: ReplayMemory, replay: DeviceReplay, arrivals, sync_every: int | None) -> None:
    """Store ``arrivals`` in ``memory``; every ``sync_every`` batches sync the mirror and check it against the host."""
    for count, (worker, batch) in enumerate(arrivals, start=1):
        memory.add_batch(worker, batch)
        if sync_every is not None and count % sync_every == 0:
            replay.sync()
            assert_mirror_equals_host(memory, replay)
    replay.sync()


@pytest.mark.parametrize("sync_every", [None, 1, 7])
def test_the_mirror_of_in_order_batches_samples_what_the_host_samples(sync_every):
    truth, previous, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    replay = DeviceReplay(memory, "cpu", chunk_rows=50)  # several chunks per sync
    deliver(memory, replay, interleave(streams, np.random.default_rng(0)), sync_every)
    assert assert_mirror_equals_host(memory, replay) == len(previous)
    assert check_every_sampleable_transition(memory, truth, previous) == len(previous)


@pytest.mark.parametrize("seed", range(3))
def test_the_mirror_keeps_the_hosts_verdict_across_lost_and_reordered_batches(seed):
    _, _, streams = two_workers()
    arrivals = lost_and_reordered(streams, np.random.default_rng(seed))
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    replay = DeviceReplay(memory, "cpu", chunk_rows=64)
    deliver(memory, replay, arrivals, sync_every=5)
    assert assert_mirror_equals_host(memory, replay) > 0
    assert memory.orphan_rows > 0  # gaps were there, and the mirror left the same rows out


def test_the_mirror_of_a_trainer_restarted_mid_episode_invents_no_history_either():
    _, _, streams = two_workers()
    arrivals = interleave(streams, np.random.default_rng(5))
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    replay = DeviceReplay(memory, "cpu")
    deliver(memory, replay, arrivals[len(arrivals) // 2 :], sync_every=3)
    assert memory.orphan_rows > 0 and assert_mirror_equals_host(memory, replay) > 0


def test_rows_after_an_orphan_are_left_out_of_the_mirrors_index_too():
    truth, previous = {}, {}
    batches = [b for b in worker_batches(0, 400, 3, truth, previous, max_batch=30)
               if not b.first.array.any() and b.steps >= 8]
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    replay = DeviceReplay(memory, "cpu")
    memory.add_batch("w1", batches[1].model_copy(update={"seq": 100}))
    replay.sync()
    assert assert_mirror_equals_host(memory, replay) == max(0, batches[1].steps - memory.depth)


@pytest.mark.parametrize(("chunk_rows", "sync_every"), [(5, 1), (13, 4), (97, 9), (1000, None)])
def test_a_mirror_of_a_ring_that_wrapped_holds_only_what_the_ring_holds(chunk_rows, sync_every):
    truth, previous, streams = two_workers(steps=600)
    memory = ReplayMemory(LAYOUT, capacity=97)
    replay = DeviceReplay(memory, "cpu", chunk_rows=chunk_rows)
    rng = np.random.default_rng(9)
    arrivals = [(w, b) for w, b in interleave(streams, rng) if rng.random() > 0.1]
    deliver(memory, replay, arrivals, sync_every)
    assert memory.rows_added > 5 * memory.capacity
    assert assert_mirror_equals_host(memory, replay) > 0
    assert check_every_sampleable_transition(memory, truth, previous) > 0


def test_a_mirror_synced_after_the_ring_overwrote_unsynced_rows_catches_up_whole():
    memory = ReplayMemory(LAYOUT, capacity=97)
    replay = DeviceReplay(memory, "cpu", chunk_rows=10)
    _, _, streams = two_workers(steps=300)
    arrivals = interleave(streams, np.random.default_rng(3))
    deliver(memory, replay, arrivals[:20], sync_every=None)
    for worker, batch in arrivals[20:]:  # several capacities' worth of rows before the next sync
        memory.add_batch(worker, batch)
    assert replay.sync() == memory.capacity
    assert assert_mirror_equals_host(memory, replay) > 0


class IngestBetweenChunks:
    """A stand-in for the memory lock that stores the next arriving batches each time a sync takes it, as the ingest
    thread may between two chunks of one sync."""

    def __init__(self, memory: ReplayMemory, arrivals, per_entry: int) -> None:
        self.memory, self.arrivals, self.per_entry = memory, list(arrivals), per_entry

    def __enter__(self) -> None:
        for worker, batch in self.arrivals[: self.per_entry]:
            self.memory.add_batch(worker, batch)
        del self.arrivals[: self.per_entry]

    def __exit__(self, *exc) -> None:
        return None


@pytest.mark.parametrize("per_entry", [1, 6, 40])
def test_rows_overwritten_between_the_chunks_of_one_sync_leave_a_mirror_of_one_moment(per_entry):
    memory = ReplayMemory(LAYOUT, capacity=97)
    replay = DeviceReplay(memory, "cpu", chunk_rows=8)
    truth, previous, streams = two_workers(steps=600)
    lock = IngestBetweenChunks(memory, interleave(streams, np.random.default_rng(4)), per_entry)
    checked = 0
    while lock.arrivals:
        replay.sync(lock)  # it ends although rows keep arriving, holding the memory as it was at one moment
        positions = replay.sampleable_positions()
        if positions.numel():
            checked += assert_batch_is_real(replay.gather(positions), truth, previous)
    assert checked > 0
    replay.sync()
    assert memory.rows_added > 3 * memory.capacity
    assert assert_mirror_equals_host(memory, replay) > 0


def test_the_mirror_of_image_and_lidar_layouts_matches_the_host():
    for layout in (tm20_lidar_layout(), tm20_image_layout(img_hist_len=3, height=8, width=8, act_buf_len=2)):
        memory = fill_with_random_episodes(ReplayMemory(layout, capacity=500, seed=0), steps=1200, batch_rows=50)
        replay = DeviceReplay(memory, "cpu", chunk_rows=128)
        replay.sync()
        assert assert_mirror_equals_host(memory, replay) > 300


def test_a_memory_loaded_from_a_file_is_mirrored_again_whole():
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=0), steps=700, batch_rows=30)
    replay = DeviceReplay(memory, "cpu")
    replay.sync()
    smaller = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=300, seed=1), steps=120, batch_rows=30, seed=4)
    memory.load_bytes(smaller.to_bytes())  # fewer rows, other content: the old rows must not stay sampleable
    replay.sync()
    assert assert_mirror_equals_host(memory, replay) > 0


def test_device_sampling_draws_only_sampleable_rows_uniformly_and_gathers_the_hosts_batch():
    _, _, streams = two_workers()
    memory = ReplayMemory(LAYOUT, capacity=10_000)
    rng = np.random.default_rng(1)
    deliver(memory, DeviceReplay(memory, "cpu"), [(w, b) for w, b in interleave(streams, rng) if rng.random() > 0.2],
             sync_every=None)
    replay = DeviceReplay(memory, "cpu", seed=7)
    assert not replay.ready()  # nothing synced yet: the index is empty
    replay.sync()
    assert replay.ready()
    state = replay.generator.get_state()
    positions = torch.cat([replay.sample_positions(256) for _ in range(40)])
    sampleable = memory.sampleable_positions()
    assert np.isin(positions.numpy(), sampleable).all()
    counts = np.bincount(np.searchsorted(sampleable, positions.numpy()), minlength=sampleable.size)
    expected = positions.numel() / sampleable.size
    assert counts.min() > 0 and abs(counts.mean() - expected) < 1e-9 and counts.std() < 3 * np.sqrt(expected)
    replay.generator.set_state(state)
    first = replay.sample(256)  # the same draw: the batch at the first 256 positions
    for want, got in zip(memory.transitions(positions[:256].numpy()).tensors(), first.tensors(), strict=True):
        assert torch.equal(got, want)


def test_syncing_from_the_learners_thread_while_the_ingest_thread_stores_batches_keeps_the_mirror_exact():
    truth, previous, streams = two_workers(steps=1500)
    memory = ReplayMemory(LAYOUT, capacity=701)
    replay = DeviceReplay(memory, "cpu", chunk_rows=64)
    lock = threading.Lock()
    arrivals = interleave(streams, np.random.default_rng(2))
    done = threading.Event()
    synced = threading.Semaphore(0)  # one release per sync: ingest waits for one every 5 batches, so the two interleave
    ingest_waits = 0

    def ingest() -> None:
        nonlocal ingest_waits
        for index, (worker, batch) in enumerate(arrivals):
            with lock:
                memory.add_batch(worker, batch)
            if index % 5 == 4:  # outside the lock: the syncer copies while the next batches are being stored
                ingest_waits += synced.acquire(timeout=10)
        done.set()

    thread = threading.Thread(target=ingest)
    thread.start()
    syncs = 0
    while not done.is_set():
        replay.sync(lock)
        syncs += 1
        synced.release()
        if replay.ready():
            assert_batch_is_real(replay.sample(32), truth, previous)  # what an update reads between two syncs
    thread.join()
    replay.sync(lock)
    assert ingest_waits == len(arrivals) // 5 and syncs >= ingest_waits > 1 and memory.rows_added > memory.capacity
    assert assert_mirror_equals_host(memory, replay) > 0
    check_every_sampleable_transition(memory, truth, previous)


# ------------------------------------------------------------------------------------------------ in the learner


def _lidar_learners(*backends: str):
    config = SACConfig(hidden_sizes=[32, 32], batch_size=64)
    return [make_learner(config, config.architecture(tm20_lidar_layout()), device="cpu", seed=0, backend=backend)
            for backend in backends]


def _update_on_the_same_draws(reference, learner, replay: DeviceReplay, updates: int) -> None:
    """``updates`` steps of ``learner`` sampling from ``replay`` itself, and of ``reference`` fed the batches those
    same draws give (drawn first, then the generator rewound)."""
    state = replay.generator.get_state()
    batches = [replay.sample(reference.config.batch_size) for _ in range(updates)]
    replay.generator.set_state(state)
    for batch in batches:
        reference.update(batch, with_metrics=False)
        learner.update_sampled(replay, with_metrics=False)


@pytest.mark.parametrize("backend", ["cpu-fast", "cuda-graph"])
def test_a_learner_fed_by_device_sampling_ends_where_the_reference_fed_the_same_batches_does(backend):
    memory = fill_with_random_episodes(ReplayMemory(tm20_lidar_layout(), capacity=1000, seed=0), steps=900,
                                       batch_rows=100)
    replay = DeviceReplay(memory, "cpu", seed=3)
    replay.sync()
    reference, learner = _lidar_learners("reference", backend)
    _update_on_the_same_draws(reference, learner, replay, updates=6)
    for name, want in reference.state_dict()["actor"].items():
        torch.testing.assert_close(learner.state_dict()["actor"][name], want, rtol=1e-4, atol=1e-5, msg=name)
    for name, want in reference.state_dict()["critics"].items():
        torch.testing.assert_close(learner.state_dict()["critics"][name], want, rtol=1e-4, atol=1e-5, msg=name)
    assert learner.updates == 6


@needs_cuda
def test_the_mirror_on_a_cuda_device_matches_the_host():
    truth, previous, streams = two_workers(steps=600)
    memory = ReplayMemory(LAYOUT, capacity=97)
    replay = DeviceReplay(memory, "cuda", chunk_rows=13)
    deliver(memory, replay, interleave(streams, np.random.default_rng(9)), sync_every=3)
    assert assert_mirror_equals_host(memory, replay) > 0


@needs_cuda
def test_the_cuda_graph_samples_inside_the_graph_and_matches_the_reference_on_the_same_batches():
    memory = fill_with_random_episodes(ReplayMemory(tm20_lidar_layout(), capacity=1000, seed=0), steps=900,
                                       batch_rows=100)
    replay = DeviceReplay(memory, "cuda", seed=3)
    replay.sync()
    config = SACConfig(hidden_sizes=[32, 32], batch_size=64)
    architecture = config.architecture(tm20_lidar_layout())
    reference = make_learner(config, architecture, device="cuda", seed=0, backend="reference")
    graph = make_learner(config, architecture, device="cuda", seed=0, backend="cuda-graph")
    _update_on_the_same_draws(reference, graph, replay, updates=8)
    assert graph.graph_captured
    for name, want in reference.state_dict()["actor"].items():
        torch.testing.assert_close(graph.state_dict()["actor"][name], want, rtol=1e-4, atol=1e-5, msg=name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # an update that samples inside the graph asks the host nothing
    try:
        graph.update_sampled(replay, with_metrics=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
