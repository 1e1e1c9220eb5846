"""ReplayMemory (frames stored once, histories rebuilt at sampling) against a naive memory of full observations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationComponent, ObservationLayout, layout_for_box
from tmrl_trainer.memory import MemoryFileError, NoTransitionYet, ReplayMemory

LAYOUT = ObservationLayout(
    components=[
        ObservationComponent(name="speed", frame_shape=[1]),
        ObservationComponent(name="lidar", frame_shape=[5], history=4),
        ObservationComponent(name="image", frame_shape=[3, 4], dtype="uint8", history=2),
    ],
    action_dim=2,
    action_history=2,
)


class NaiveEpisodeEnv:
    """Builds full observations the way an rtgym environment does: histories and the action buffer start filled with
    the reset frame and the default (zero) action, then shift by one each step (oldest first)."""

    def __init__(self, layout: ObservationLayout, rng: np.random.Generator) -> None:
        self.layout, self.rng = layout, rng

    def _frame(self, component: ObservationComponent) -> np.ndarray:
        if component.dtype == "uint8":
            return self.rng.integers(0, 256, component.frame_shape, dtype=np.uint8)
        return self.rng.standard_normal(component.frame_shape).astype(np.float32)

    def reset(self) -> tuple[np.ndarray, ...]:
        self.histories = [[self._frame(c)] * c.history for c in self.layout.components]
        self.actions = [np.zeros(self.layout.action_dim, np.float32)] * self.layout.action_history
        return self.observation()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, ...]:
        self.histories = [h[1:] + [self._frame(c)] for h, c in zip(self.histories, self.layout.components, strict=True)]
        self.actions = (self.actions[1:] + [action]) if self.layout.action_history else []
        return self.observation()

    def observation(self) -> tuple[np.ndarray, ...]:
        parts = [np.stack(h) if c.history > 1 else h[0] for h, c in zip(self.histories, self.layout.components, strict=True)]
        return tuple(parts + list(self.actions))


def _fill(memory: ReplayMemory, seed: int, workers: int = 3, rows_per_worker: int = 120):
    """Random episodes from several workers, sent in random-sized batches that interleave between workers.

    Returns ``(naive, expected_oldest)``: every transition keyed by its unique reward, and for each the absolute index
    of the oldest row its two observations need (the row ``depth`` steps back in its episode, or the episode start).
    """
    rng = np.random.default_rng(seed)
    depth = memory.depth
    naive: dict[float, tuple] = {}
    oldest: dict[float, int] = {}
    envs, builders, observations, episode_rows, remaining, seqs = {}, {}, {}, {}, {}, {}
    absolute = 0
    for w in range(workers):
        worker = f"worker-{w}"
        envs[worker] = NaiveEpisodeEnv(memory.layout, rng)
        builders[worker] = SampleBatchBuilder(memory.layout)
        observations[worker] = envs[worker].reset()
        builders[worker].add_reset(observations[worker])
        episode_rows[worker] = [None]  # filled with the absolute index when the batch is sent
        remaining[worker] = rows_per_worker
        seqs[worker] = 0
    pending: dict[str, list] = {w: [("reset", None)] for w in envs}
    reward_id = 1.0
    while any(remaining.values()):
        worker = rng.choice([w for w, left in remaining.items() if left > 0])
        for _ in range(int(rng.integers(1, 9))):
            if remaining[worker] == 0:
                break
            remaining[worker] -= 1
            action = rng.uniform(-1, 1, memory.layout.action_dim).astype(np.float32)
            next_observation = envs[worker].step(action)
            end = rng.random()
            terminated, truncated = bool(end < 0.06), bool(0.06 <= end < 0.1)
            builders[worker].add_step(action, next_observation, reward_id, terminated, truncated)
            naive[reward_id] = (observations[worker], action, reward_id, next_observation, terminated, truncated)
            pending[worker].append(("step", reward_id))
            reward_id += 1.0
            observations[worker] = next_observation
            if terminated or truncated:
                observations[worker] = envs[worker].reset()
                builders[worker].add_reset(observations[worker])
                pending[worker].append(("reset", None))
        batch = builders[worker].build(seq=seqs[worker], weights_version=0)
        seqs[worker] += 1
        for kind, key in pending[worker]:
            if kind == "reset":
                episode_rows[worker] = [absolute]
            else:
                episode_rows[worker].append(absolute)
                rows = episode_rows[worker]
                oldest[key] = rows[max(0, len(rows) - 1 - depth)]
            absolute += 1
        pending[worker] = []
        memory.add_batch(worker, batch)
    return naive, oldest


def _assert_transition_matches(memory: ReplayMemory, batch, index: int, naive: dict) -> float:
    key = float(batch.reward[index])
    observation, action, reward, next_observation, terminated, truncated = naive[key]
    for got, want in zip(batch.observation, observation, strict=True):
        np.testing.assert_array_equal(got[index].numpy(), want)
    for got, want in zip(batch.next_observation, next_observation, strict=True):
        np.testing.assert_array_equal(got[index].numpy(), want)
    np.testing.assert_array_equal(batch.action[index].numpy(), action)
    assert float(batch.terminated[index]) == float(terminated)
    assert float(batch.truncated[index]) == float(truncated)
    return key


def test_every_transition_rebuilt_from_single_frames_equals_the_naive_full_observation_transition():
    memory = ReplayMemory(LAYOUT, capacity=10_000, seed=0)
    naive, _ = _fill(memory, seed=1)
    positions = memory.sampleable_positions()
    batch = memory.transitions(positions)
    seen = {_assert_transition_matches(memory, batch, i, naive) for i in range(len(positions))}
    assert seen == set(naive)
    assert batch.observation[1].shape == (len(positions), 4, 5)
    assert batch.observation[2].dtype.is_floating_point is False  # images stay uint8 until the encoder
    assert len(batch.observation) == len(LAYOUT.observation_shapes())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), capacity=st.sampled_from([9, 23, 64, 200, 5000]), workers=st.integers(1, 4))
def test_ring_buffer_keeps_exactly_the_transitions_whose_rows_are_all_still_stored(seed, capacity, workers):
    memory = ReplayMemory(LAYOUT, capacity=capacity, seed=seed)
    naive, oldest = _fill(memory, seed=seed, workers=workers, rows_per_worker=60)
    low_water = memory.rows_added - capacity
    expected = {key for key, row in oldest.items() if row >= low_water}
    positions = memory.sampleable_positions()
    batch = memory.transitions(positions)
    got = {_assert_transition_matches(memory, batch, i, naive) for i in range(len(positions))}
    assert got == expected
    if expected:
        sampled = memory.sample(64)
        for i in range(64):
            assert _assert_transition_matches(memory, sampled, i, naive) in expected


def test_sampled_batches_never_cross_a_reset_and_keep_terminated_distinct_from_truncated():
    memory = ReplayMemory(LAYOUT, capacity=10_000, seed=3)
    naive, _ = _fill(memory, seed=4)
    batch = memory.sample(2000)
    for i in range(2000):
        _assert_transition_matches(memory, batch, i, naive)
    assert batch.terminated.sum() > 0 and batch.truncated.sum() > 0
    assert float((batch.terminated * batch.truncated).sum()) == 0.0


def test_rows_of_a_worker_whose_episode_start_was_never_received_give_no_transition_until_their_next_step():
    layout = layout_for_box(2, 1)
    memory = ReplayMemory(layout, capacity=100)
    builder = SampleBatchBuilder(layout)
    builder.add_step([0.5], (np.ones(2, np.float32),), 1.0, False, False)  # no reset row: its predecessor is unknown
    builder.add_step([0.25], (np.full(2, 2.0, np.float32),), 2.0, False, False)
    memory.add_batch("late-joiner", builder.build(seq=0, weights_version=0))
    assert memory.orphan_rows == 1
    batch = memory.transitions(memory.sampleable_positions())
    assert batch.reward.tolist() == [2.0]
    np.testing.assert_array_equal(batch.observation[0].numpy(), [[1.0, 1.0]])


def test_a_batch_that_does_not_match_the_layout_is_rejected_and_nothing_is_stored():
    memory = ReplayMemory(layout_for_box(3, 1), capacity=100)
    builder = SampleBatchBuilder(layout_for_box(2, 1))
    builder.add_reset((np.zeros(2, np.float32),))
    with pytest.raises(ProtocolError, match="layout expects"):
        memory.add_batch("w", builder.build(seq=0, weights_version=0))
    assert len(memory) == 0


def test_sampling_before_any_complete_transition_says_why():
    memory = ReplayMemory(layout_for_box(2, 1), capacity=10)
    with pytest.raises(ValueError, match="empty"):
        memory.sample(4)
    builder = SampleBatchBuilder(memory.layout)
    builder.add_reset((np.zeros(2, np.float32),))
    memory.add_batch("w", builder.build(seq=0, weights_version=0))
    with pytest.raises(NoTransitionYet, match="none ends a complete transition"):
        memory.sample(4)


def test_saved_memory_loads_into_a_fresh_one_and_samples_identically(tmp_path):
    memory = ReplayMemory(LAYOUT, capacity=150, seed=5)
    _fill(memory, seed=6)
    path = memory.save(tmp_path / "memory.safetensors")
    restored = ReplayMemory(LAYOUT, capacity=150, seed=99)
    restored.load(path)
    assert len(restored) == len(memory) and restored.rows_added == memory.rows_added
    first, second = memory.sample(32), restored.sample(32)
    for a, b in zip(first.observation + first.next_observation, second.observation + second.next_observation, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    assert open(path, "rb").read(1) != b"\x80"  # not a pickle stream


def test_loading_a_memory_saved_with_another_capacity_or_a_corrupt_file_raises_memory_file_error(tmp_path):
    memory = ReplayMemory(LAYOUT, capacity=150)
    _fill(memory, seed=7, workers=1, rows_per_worker=30)
    path = memory.save(tmp_path / "memory.safetensors")
    with pytest.raises(MemoryFileError, match=r"saved capacity 150, configured 151; set memory_capacity back"):
        ReplayMemory(LAYOUT, capacity=151).load(path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(MemoryFileError):
        ReplayMemory(LAYOUT, capacity=150).load(tmp_path / "bad.safetensors")


def test_a_memory_of_another_format_version_is_refused_naming_both_formats():
    """An upgrade probe: a memory saved on 2026-11-27 ('tmrl-replay-memory-1') was refused as "saved memory format is
    not 'tmrl-replay-memory-2'", without the format found or whether it could be converted."""
    from tmrl_trainer.memory import MEMORY_FORMAT
    from tmrl_trainer.tensor_file import pack, unpack

    source = ReplayMemory(LAYOUT, capacity=150)
    _fill(source, seed=7, workers=1, rows_per_worker=30)
    arrays, meta = unpack(source.to_bytes())
    with pytest.raises(MemoryFileError, match=rf"saved memory format 'tmrl-replay-memory-1' is not this build's "
                                              rf"'{MEMORY_FORMAT}': a memory saved by another build of tmrl cannot be "
                                              "converted"):
        ReplayMemory(LAYOUT, capacity=150).load_bytes(pack(arrays, {**meta, "format": "tmrl-replay-memory-1"}))
    with pytest.raises(MemoryFileError, match=rf"^saved memory format is not '{MEMORY_FORMAT}'$"):
        ReplayMemory(LAYOUT, capacity=150).load_bytes(pack(arrays, {**meta, "format": "something else"}))


@pytest.mark.parametrize("tamper", ["header key missing", "header value of the wrong type", "array missing",
                                    "array shorter than the header says", "array of another dtype"])
def test_a_saved_memory_whose_header_and_arrays_disagree_raises_memory_file_error_and_loads_nothing(tmp_path, tamper):
    from tmrl_trainer.tensor_file import pack, unpack

    source = ReplayMemory(LAYOUT, capacity=150)
    _fill(source, seed=8, workers=1, rows_per_worker=30)
    arrays, meta = unpack(source.to_bytes())
    if tamper == "header key missing":
        del meta["tails"]
    elif tamper == "header value of the wrong type":
        meta["total"] = "many"
    elif tamper == "array missing":
        del arrays["oldest"]
    elif tamper == "array shorter than the header says":
        arrays["rewards"] = arrays["rewards"][:-1]
    else:
        arrays["frames.lidar"] = arrays["frames.lidar"].double()
    target = ReplayMemory(LAYOUT, capacity=150)
    _fill(target, seed=9, workers=1, rows_per_worker=10)
    before = target.to_bytes()
    with pytest.raises(MemoryFileError):
        target.load_bytes(pack(arrays, meta))
    assert target.to_bytes() == before  # nothing half-loaded


def _overwrite_one_value(data: bytes, array_name: str, value: bytes | None = None) -> bytes:
    """``data`` (a saved memory) with the middle element of ``array_name`` overwritten with ``value`` (default 0xFF
    bytes, as a disk error would write: NaN for a float32, -1 for an integer, 255 for a bool)."""
    import json

    header_size = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header_size])[array_name]
    begin, end = (8 + header_size + offset for offset in entry["data_offsets"])
    itemsize = {"F32": 4, "I64": 8, "I16": 2, "BOOL": 1, "U8": 1}[entry["dtype"]]
    middle = begin + ((end - begin) // itemsize // 2) * itemsize
    value = b"\xff" * itemsize if value is None else value
    assert len(value) == itemsize and data[middle : middle + itemsize] != value  # a change, of one element
    return data[:middle] + value + data[middle + itemsize :]


def _overwrite_one_value_with_ff_bytes(data: bytes, array_name: str) -> bytes:
    return _overwrite_one_value(data, array_name)


@pytest.mark.parametrize("array_name", ["frames.speed", "frames.lidar", "actions", "rewards", "terminated",
                                        "truncated", "complete", "prev", "oldest", "known"])
def test_a_saved_memory_with_one_corrupted_value_is_refused_whole_naming_the_array_and_loads_nothing(array_name):
    source = ReplayMemory(LAYOUT, capacity=150)
    _fill(source, seed=10, workers=2, rows_per_worker=100)  # 200 rows through a ring of 150
    corrupted = _overwrite_one_value_with_ff_bytes(source.to_bytes(), array_name)
    target = ReplayMemory(LAYOUT, capacity=150)
    _fill(target, seed=11, workers=1, rows_per_worker=10)
    before = target.to_bytes()
    with pytest.raises(MemoryFileError, match=f"array '{array_name}' holds .* in 1 of its 150 rows.*corrupt"):
        target.load_bytes(corrupted)
    assert target.to_bytes() == before and target.generation == 0  # nothing half-loaded


def _image_memory_bytes() -> bytes:
    from random_episodes import fill_with_random_episodes
    from tmrl_common.layout import tm20_image_layout

    layout = tm20_image_layout(img_hist_len=2, height=16, width=16, act_buf_len=2)
    return fill_with_random_episodes(ReplayMemory(layout, capacity=300, seed=0), steps=200, batch_rows=50).to_bytes()


@pytest.mark.parametrize(("array_name", "value"), [
    ("frames.lidar", np.float32(0.123).tobytes()),  # a finite, plausible LIDAR reading: no value check sees it
    ("frames.image", bytes([7])),  # any byte of a uint8 frame is a valid pixel
])
def test_damage_no_value_check_can_see_is_refused_by_the_crc32_saved_with_the_array(array_name, value):
    if array_name == "frames.image":
        from tmrl_common.layout import tm20_image_layout

        data = _image_memory_bytes()
        target = ReplayMemory(tm20_image_layout(img_hist_len=2, height=16, width=16, act_buf_len=2), capacity=300)
    else:
        source = ReplayMemory(LAYOUT, capacity=150)
        _fill(source, seed=14, workers=1, rows_per_worker=60)
        data = source.to_bytes()
        target = ReplayMemory(LAYOUT, capacity=150)
    before = target.to_bytes()
    damaged = _overwrite_one_value(data, array_name, value)
    with pytest.raises(MemoryFileError, match=f"array '{array_name}' does not match the CRC-32 saved with it"):
        target.load_bytes(damaged)
    assert target.to_bytes() == before and target.generation == 0  # nothing loaded
    target.load_bytes(data)  # the undamaged file loads
    assert target.generation == 1


def test_a_memory_saved_before_the_crc32s_were_written_loads_on_the_value_checks_alone():
    from tmrl_trainer.tensor_file import pack, unpack

    source = ReplayMemory(LAYOUT, capacity=150, seed=15)
    _fill(source, seed=15, workers=1, rows_per_worker=60)
    arrays, meta = unpack(source.to_bytes())
    del meta["crc32"]
    target = ReplayMemory(LAYOUT, capacity=150, seed=15)
    target.load_bytes(pack(arrays, meta))
    assert target.to_bytes() == source.to_bytes()  # the same memory, now saved with its CRCs again


def test_a_saved_memory_holding_a_nan_frame_is_refused_when_loaded_from_a_file(tmp_path):
    source = ReplayMemory(LAYOUT, capacity=150)
    _fill(source, seed=12, workers=1, rows_per_worker=40)
    path = tmp_path / "memory.safetensors"
    path.write_bytes(_overwrite_one_value_with_ff_bytes(source.to_bytes(), "frames.lidar"))
    with pytest.raises(MemoryFileError, match="'frames.lidar' holds NaN or inf"):
        ReplayMemory(LAYOUT, capacity=150).load(path)


def test_with_the_ingest_bounds_a_saved_memory_holding_a_value_no_batch_may_hold_is_refused():
    from tmrl_trainer.ingest import ValueBounds

    layout = layout_for_box(2, 1)
    source = ReplayMemory(layout, capacity=100)
    builder = SampleBatchBuilder(layout)
    builder.add_reset((np.zeros(2, np.float32),))
    builder.add_step([0.5], (np.ones(2, np.float32),), 2e4, False, False)  # add_batch stores it; ingest would not
    source.add_batch("w", builder.build(seq=0, weights_version=0))
    saved = source.to_bytes()

    ReplayMemory(layout, capacity=100).load_bytes(saved)  # no bounds given: only finiteness and links are checked
    ReplayMemory(layout, capacity=100).load_bytes(saved, ValueBounds(max_abs_reward=1e5))
    with pytest.raises(MemoryFileError, match=r"'rewards' holds values outside the ingest's bounds \[-10000, 10000\]"):
        ReplayMemory(layout, capacity=100).load_bytes(saved, ValueBounds())


def test_an_honest_saved_memory_passes_the_value_checks_with_the_ingest_bounds():
    from tmrl_trainer.ingest import ValueBounds

    source = ReplayMemory(LAYOUT, capacity=150, seed=13)
    _fill(source, seed=14)  # 360 rows through a ring of 150: links into overwritten rows are fine
    restored = ReplayMemory(LAYOUT, capacity=150, seed=13)
    restored.load_bytes(source.to_bytes(), ValueBounds())
    assert restored.to_bytes() == source.to_bytes()


def test_has_transition_says_exactly_whether_a_sampleable_row_is_stored():
    """O(1) against the O(capacity) scan, through episodes, first-rows-only batches (no transition), gaps and a
    ring overwritten many times."""
    layout = layout_for_box(2, 1)
    memory = ReplayMemory(layout, capacity=40)
    rng = np.random.default_rng(3)
    assert not memory.has_transition()
    states = []
    for seq in range(300):
        builder = SampleBatchBuilder(layout)
        kind = rng.integers(0, 3)
        for row in range(int(rng.integers(1, 12))):
            if kind == 0 or row == 0 and kind == 1:  # kind 0: every row starts an episode (no transition)
                builder.add_reset((rng.normal(size=2).astype(np.float32),))
            else:
                builder.add_step(rng.uniform(-1, 1, 1).astype(np.float32), (rng.normal(size=2).astype(np.float32),),
                                 1.0, bool(rng.random() < 0.1), False)
        memory.add_batch("w", builder.build(seq=seq + int(rng.random() < 0.1), weights_version=0))  # some gaps
        assert memory.has_transition() == (memory.sampleable_positions().size > 0), seq
        states.append(memory.has_transition())
    assert any(before and not after for before, after in zip(states[:-1], states[1:], strict=True))  # overwritten too
    restored = ReplayMemory(layout, capacity=40)
    restored.load_bytes(memory.to_bytes())
    assert restored.has_transition() == memory.has_transition()
