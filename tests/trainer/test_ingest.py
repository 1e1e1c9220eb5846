"""Trainer ingestion: dedupe in bounded memory, acks for duplicates, rejects counted (never crashing), returns."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from tmrl_common.arrays import WireArray
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import layout_for_box, tm20_lidar_layout
from tmrl_common.protocol import Hello, SampleAck, decode, encode
from tmrl_trainer.ingest import DedupeStateError, Ingestor, SeqDeduplicator, ValueBounds
from tmrl_trainer.memory import ReplayMemory

LAYOUT = layout_for_box(3, 1)


def batch_frames(worker: str, seq: int, rewards, first: bool = True, end: bool = False, version: int = 0,
                 layout=LAYOUT) -> list[bytes]:
    builder = SampleBatchBuilder(layout)
    size = layout.components[0].frame_shape[0]
    if first:
        builder.add_reset((np.zeros(size, np.float32),))
    for i, reward in enumerate(rewards):
        last = end and i == len(rewards) - 1
        builder.add_step(np.array([0.5], np.float32), (np.full(size, i, np.float32),), reward, last, False)
    return encode(builder.build(seq=seq, weights_version=version), worker)


@pytest.fixture
def ingest():
    memory = ReplayMemory(LAYOUT, capacity=1000)
    episodes = []
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, on_episode=episodes.append)
    return ingestor, memory, episodes


def answers(replies) -> list[tuple[str, list[int], str, str]]:
    """``(worker, seqs, outcome, reason)`` of each ``sample_ack`` in ``replies``."""
    out = []
    for reply in replies:
        _, message = decode(reply)
        assert isinstance(message, SampleAck)
        out.append((message.worker, message.seqs, message.outcome, message.reason))
    return out


def acked(replies) -> list[tuple[str, list[int]]]:
    """``(worker, seqs)`` of each answer, which must say stored or duplicate."""
    found = answers(replies)
    assert all(outcome in ("stored", "duplicate") for _, _, outcome, _ in found), found
    return [(worker, seqs) for worker, seqs, _, _ in found]


def test_dedupe_keeps_stored_seqs_as_intervals_one_per_gap():
    dedupe = SeqDeduplicator(max_gaps=4)
    for seq in (0, 1, 3, 5):
        dedupe.mark_stored("w", seq)
    assert dedupe.tracked_intervals("w") == 3  # [0, 2) [3, 4) [5, 6)
    assert dedupe.is_duplicate("w", 1) and dedupe.is_duplicate("w", 3) and not dedupe.is_duplicate("w", 2)
    dedupe.mark_stored("w", 2)
    dedupe.mark_stored("w", 4)
    assert dedupe.tracked_intervals("w") == 1 and dedupe.state()["workers"]["w"]["stored"] == [[0, 6]]
    assert not dedupe.is_duplicate("other", 0)


def test_dedupe_memory_stays_bounded_when_seqs_never_arrive():
    dedupe = SeqDeduplicator(max_gaps=8)
    for seq in range(1, 1000, 2):  # every even seq is lost (dropped by a full spool, say)
        dedupe.mark_stored("w", seq)
        assert dedupe.tracked_intervals("w") <= 9
    assert dedupe.given_up > 0 and dedupe.horizon("w") > 900
    assert dedupe.is_duplicate("w", 999) and dedupe.status("w", 1001) == "new"
    assert dedupe.status("w", 2) == "stale" and dedupe.status("w", 3) == "stale"  # too old to tell: never a duplicate


def test_seqs_given_up_count_from_the_workers_lowest_and_are_said_once_per_interval(caplog):
    """A spec probe: a worker numbering from 1000 was told '1000 of them, from 0 up, never arrived' when its window
    first overflowed (clock-based seqs would count about 10^15), and each later gap wrote its own line (18 in a few
    milliseconds)."""
    dedupe = SeqDeduplicator(max_gaps=8)
    start = 1_795_989_709_166_872  # a clock-based first seq, as the reference worker draws
    with caplog.at_level("WARNING", logger="tmrl_trainer.ingest"):
        for seq in range(start, start + 1000, 2):  # every other seq lost
            dedupe.mark_stored("w", seq)
    assert dedupe.given_up == 500 - 9 - 1  # 491 intervals closed, each gap below one a lost seq, none below the first
    lines = [record.getMessage() for record in caplog.records if "refused as stale" in record.getMessage()]
    assert len(lines) == 1 and f"(0 of them, from {start} up, never arrived)" in lines[0], lines
    restored = SeqDeduplicator(max_gaps=4)
    restored.restore(dedupe.state())  # a restored window closes its extra gaps: each one a real, single seq
    assert restored.given_up == dedupe.given_up + 4


def test_batches_are_stored_once_and_duplicates_acked_again(ingest):
    ingestor, memory, _ = ingest
    frames = batch_frames("w1", 0, [1.0, 2.0])
    assert acked(ingestor.handle(frames)) == [("w1", [0])]
    assert acked(ingestor.handle(frames)) == [("w1", [0])]  # a resend after a lost ack
    assert memory.rows_added == 3
    snapshot = ingestor.snapshot()
    assert snapshot["duplicates"] == 1 and snapshot["batches_stored"] == 1
    assert snapshot["workers"]["w1"]["batches"] == 1 and snapshot["workers"]["w1"]["duplicates"] == 1


def test_each_worker_has_its_own_sequence_space(ingest):
    ingestor, memory, _ = ingest
    ingestor.handle(batch_frames("w1", 0, [1.0]))
    assert acked(ingestor.handle(batch_frames("w2", 0, [1.0]))) == [("w2", [0])]
    assert memory.rows_added == 4 and ingestor.snapshot()["duplicates"] == 0


def test_garbage_and_non_finite_values_are_rejected_and_counted_without_crashing(ingest):
    ingestor, memory, _ = ingest
    assert ingestor.handle([b"\xc1\xc1", b"junk"]) == []
    assert ingestor.handle([b"only one frame"]) == []
    envelope, body = batch_frames("w1", 0, [1.0, 1234.5])  # the builder refuses NaN, so corrupt the wire bytes
    marker = np.float32(1234.5).tobytes()
    assert body.count(marker) == 1
    assert answers(ingestor.handle([envelope, body.replace(marker, np.float32("nan").tobytes())])) == [
        ("w1", [0], "rejected", "non_finite")]  # the sender and seq still read: the batch is answered
    rejects = ingestor.snapshot()["rejects"]
    assert rejects["malformed"] == 2 and rejects["non_finite"] == 1
    assert memory.rows_added == 0
    # the service still works afterwards
    assert acked(ingestor.handle(batch_frames("w1", 1, [1.0]))) == [("w1", [1])]


def test_batches_with_another_layout_are_answered_rejected_and_never_marked_stored(ingest):
    ingestor, memory, _ = ingest
    other = layout_for_box(5, 1)
    assert answers(ingestor.handle(batch_frames("w1", 0, [1.0], layout=other))) == [("w1", [0], "rejected", "schema")]
    assert memory.rows_added == 0 and not ingestor.dedupe.is_duplicate("w1", 0)
    assert ingestor.snapshot()["rejects"] == {"schema": 1}


def test_unknown_senders_are_rejected_when_an_allow_list_is_set():
    memory = ReplayMemory(LAYOUT, capacity=100)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, allowed_workers=frozenset({"w1"}))
    assert answers(ingestor.handle(batch_frames("intruder", 0, [1.0]))) == [("intruder", [0], "rejected", "unknown_sender")]
    assert ingestor.snapshot()["rejects"] == {"unknown_sender": 1} and memory.rows_added == 0
    assert acked(ingestor.handle(batch_frames("w1", 0, [1.0]))) == [("w1", [0])]


def test_episode_returns_are_rebuilt_across_batches_per_worker(ingest):
    ingestor, _, episodes = ingest
    ingestor.handle(batch_frames("w1", 0, [1.0, 2.0], version=1))
    ingestor.handle(batch_frames("w2", 0, [10.0], end=True, version=1))
    ingestor.handle(batch_frames("w1", 1, [3.0, 4.0], first=False, end=True, version=2))
    assert [(e.worker, e.episode_return, e.length, e.worker_steps, e.weights_version) for e in episodes] == [
        ("w2", 10.0, 1, 1, 1), ("w1", 10.0, 4, 4, 2)]
    workers = ingestor.snapshot()["workers"]
    assert workers["w1"]["last_return"] == 10.0 and workers["w1"]["weights_version"] == 2


def test_hello_with_a_different_layout_is_logged(ingest, caplog):
    ingestor, _, _ = ingest
    hello = Hello(role="worker", software="test", layout=layout_for_box(7, 2), next_seq=5)
    assert ingestor.handle(encode(hello, "w9")) == []
    assert "differs from the trainer's" in caplog.text
    assert ingestor.snapshot()["workers"]["w9"]["hellos"] == 1


def test_a_hello_layout_differing_only_in_bounds_is_not_said_to_be_rejected(ingest, caplog):
    # Found by hand (docs/protocol.md client, hello layout without the bounds of §6.1): the trainer logged "its batches
    # will be rejected", named the same components twice, then stored every batch (shapes match; its own bounds apply).
    ingestor, memory, _ = ingest
    declared = layout_for_box(3, 1, low=-10.0, high=10.0)
    ingestor.handle(encode(Hello(role="worker", software="test", layout=declared, next_seq=0), "w1"))
    assert "will be rejected" not in caplog.text
    assert "obs.low" in caplog.text and "obs.high" in caplog.text  # what differs, not only the component names
    assert answers(ingestor.handle(batch_frames("w1", 0, [1.0]))) == [("w1", [0], "stored", "")]


def test_a_worker_layout_without_the_trainers_lidar_scale_is_named_and_its_batches_stored(caplog):
    from tmrl_common.layout import tm20_pixel_lidar_layout

    memory = ReplayMemory(tm20_pixel_lidar_layout(), capacity=100)
    ingestor = Ingestor("trainer", tm20_pixel_lidar_layout(), store=memory.add_batch)
    ingestor.handle(encode(Hello(role="worker", software="test", layout=tm20_lidar_layout(), next_seq=0), "w1"))
    assert "lidar.scale None vs 0.01" in caplog.text and "will be rejected" not in caplog.text
    # an operator probe ran the trainer with --env tm20-lidar for sim workers and missed this line
    assert ("which fits another env's units (the trainer's --env, or its layout_file, is not this worker's env? they "
            "must be the same)") in caplog.text


def test_a_hello_layout_with_other_frame_shapes_names_them_and_says_rejected(ingest, caplog):
    ingestor, _, _ = ingest
    ingestor.handle(encode(Hello(role="worker", software="test", layout=layout_for_box(7, 2), next_seq=0), "w9"))
    assert "will be rejected" in caplog.text
    assert "obs.frame_shape" in caplog.text and "action_dim" in caplog.text


def test_a_restart_gap_costs_one_interval_and_the_hello_next_seq_is_reported(ingest):
    ingestor, _, _ = ingest
    ingestor.handle(batch_frames("w1", 0, [1.0]))
    ingestor.handle(batch_frames("w1", 1, [1.0]))
    # the worker restarts: its state file reserved seqs up to 1000, so it continues there
    ingestor.handle(encode(Hello(role="worker", software="test", layout=LAYOUT, next_seq=1000), "w1"))
    assert ingestor.snapshot()["workers"]["w1"]["next_seq"] == 1000
    assert acked(ingestor.handle(batch_frames("w1", 1000, [1.0]))) == [("w1", [1000])]
    assert ingestor.dedupe.tracked_intervals("w1") == 2 and ingestor.dedupe.given_up == 0
    assert ingestor.dedupe.state()["workers"]["w1"]["stored"] == [[0, 2], [1000, 1001]]


def test_worker_stats_give_the_stored_seq_range(ingest):
    ingestor, _, _ = ingest
    for seq in (7, 5, 6, 6):  # out of order, one duplicate
        ingestor.handle(batch_frames("w", seq, [1.0]))
    stats = ingestor.snapshot()["workers"]["w"]
    assert (stats["min_seq"], stats["max_seq"], stats["batches"], stats["duplicates"]) == (5, 7, 3, 1)
    assert stats["distinct_seqs"] == stats["batches"]  # nothing stored twice
    assert stats["batches"] == stats["max_seq"] - stats["min_seq"] + 1  # contiguous: nothing between lost or doubled


def test_distinct_seqs_counts_this_runs_seqs_after_a_restored_dedupe_state(ingest):
    # a trainer restarted with save_memory restores the dedupe state, while its batch counters start again at 0
    first, _, _ = ingest
    for seq in range(5):
        first.handle(batch_frames("w", seq, [1.0]))
    memory = ReplayMemory(LAYOUT, capacity=1000)
    second = Ingestor("trainer", LAYOUT, store=memory.add_batch)
    second.restore_dedupe(json.loads(json.dumps(first.dedupe_state())))
    for seq in (3, 5, 6, 9):  # one duplicate of the first run, three new
        second.handle(batch_frames("w", seq, [1.0]))
    stats = second.snapshot()["workers"]["w"]
    assert (stats["batches"], stats["duplicates"], stats["distinct_seqs"]) == (3, 1, 3)


def test_dedupe_state_survives_a_json_round_trip():
    dedupe = SeqDeduplicator(max_gaps=8)
    for seq in (0, 1, 2, 5, 7):
        dedupe.mark_stored("w1", seq)
    for seq in range(1, 40, 2):  # odd seqs only: the window closes some even ones
        dedupe.mark_stored("w2", seq)
    dedupe.mark_stored("w3", 100)
    restored = SeqDeduplicator(max_gaps=8)
    restored.restore(json.loads(json.dumps(dedupe.state())))
    assert restored.state() == dedupe.state() and restored.given_up == dedupe.given_up > 0
    for worker in ("w1", "w2", "w3", "never-seen"):
        assert restored.horizon(worker) == dedupe.horizon(worker)
        assert [restored.status(worker, s) for s in range(120)] == [dedupe.status(worker, s) for s in range(120)]


def test_a_dedupe_state_saved_with_a_larger_window_closes_its_lowest_gaps_when_restored():
    wide = SeqDeduplicator(max_gaps=100)
    for seq in range(1, 21, 2):  # seq 0, 2, 4... never arrive: 10 gaps
        wide.mark_stored("w", seq)
    narrow = SeqDeduplicator(max_gaps=4)
    narrow.restore(wide.state())
    assert narrow.tracked_intervals("w") <= 5 and narrow.given_up > 0
    assert all(narrow.status("w", seq) != "new" for seq in range(1, 21, 2))  # nothing stored becomes storable again
    assert all(narrow.is_duplicate("w", seq) for seq in range(11, 21, 2))


def test_a_format_1_dedupe_state_is_read_with_its_watermark_as_stored():
    dedupe = SeqDeduplicator()
    dedupe.restore({"format": "tmrl-dedupe-1", "given_up": 2, "workers": {"w": {"watermark": 5, "above": [7, 8]}}})
    assert [dedupe.status("w", s) for s in range(10)] == ["stored"] * 5 + ["new", "new", "stored", "stored", "new"]
    assert dedupe.given_up == 2


@pytest.mark.parametrize("garbage", [
    None, [], "state", {},
    {"format": "tmrl-dedupe-0", "given_up": 0, "workers": {}},
    {"format": "tmrl-dedupe-1", "given_up": -1, "workers": {}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": -3, "above": []}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": 5, "above": [4]}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": 5, "above": [7, 7]}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": "5", "above": []}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": True, "above": []}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": 1.5, "above": []}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": 0}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": {"w": {"watermark": 0, "above": [], "extra": 1}}},
    {"format": "tmrl-dedupe-1", "given_up": 0, "workers": ["w"]},
    {"format": "tmrl-dedupe-2", "given_up": 0, "workers": {"w": {"horizon": 0, "stored": [[3, 2]]}}},
    {"format": "tmrl-dedupe-2", "given_up": 0, "workers": {"w": {"horizon": 0, "stored": [[0, 2], [2, 4]]}}},
    {"format": "tmrl-dedupe-2", "given_up": 0, "workers": {"w": {"horizon": 0, "stored": [[5, 8], [0, 2]]}}},
    {"format": "tmrl-dedupe-2", "given_up": 0, "workers": {"w": {"horizon": 4, "stored": [[0, 2]]}}},
    {"format": "tmrl-dedupe-2", "given_up": 0, "workers": {"w": {"horizon": 0, "stored": [[0, 2, 4]]}}},
    {"format": "tmrl-dedupe-2", "given_up": 0, "workers": {"w": {"horizon": -1, "stored": []}}},
])
def test_a_malformed_dedupe_state_is_rejected_and_changes_nothing(garbage):
    dedupe = SeqDeduplicator()
    dedupe.mark_stored("w", 0)
    before = dedupe.state()
    with pytest.raises(DedupeStateError, match="not a saved dedupe state"):
        dedupe.restore(garbage)
    assert dedupe.state() == before


class _RecordingLock:
    """A store lock that notes, when released, whether the batch being stored was already marked as stored."""

    def __init__(self) -> None:
        self.ingestor: Ingestor | None = None
        self.marked_at_release: list[bool] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.marked_at_release.append(self.ingestor.dedupe.is_duplicate("w", len(self.marked_at_release)))


def test_a_batch_is_stored_and_marked_stored_under_one_hold_of_the_store_lock():
    memory = ReplayMemory(LAYOUT, capacity=100)
    lock = _RecordingLock()
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, store_lock=lock)
    lock.ingestor = ingestor
    for seq in range(3):
        ingestor.handle(batch_frames("w", seq, [1.0]))
    ingestor.handle(batch_frames("w", 1, [1.0]))  # a duplicate never reaches the store (nor the lock)
    assert lock.marked_at_release == [True, True, True] and len(memory) == 6
    assert ingestor.dedupe_state()["workers"] == {"w": {"horizon": 0, "stored": [[0, 3]]}}


# ------------------------------------------------------------------------------------- exact dedupe (issue 13)


def stored_seqs(ingestor: Ingestor, worker: str, seqs) -> list[int]:
    return [seq for seq in seqs if ingestor.dedupe.is_duplicate(worker, seq)]


def test_a_late_never_stored_batch_is_stored_even_after_the_window_overflowed():
    memory = ReplayMemory(LAYOUT, capacity=1000)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, dedupe_window=4)
    for seq in range(10, 30):  # seqs 0..9 are held up (a relay died holding them) while newer ones are stored
        ingestor.handle(batch_frames("w", seq, [1.0]))
    rows = memory.rows_added
    assert acked(ingestor.handle(batch_frames("w", 7, [1.0]))) == [("w", [7])]
    assert memory.rows_added == rows + 2, "the late batch 7 was never stored, so it must be stored now"
    assert ingestor.snapshot()["duplicates"] == 0
    assert acked(ingestor.handle(batch_frames("w", 7, [1.0]))) == [("w", [7])]  # now it is a duplicate
    assert memory.rows_added == rows + 2 and ingestor.snapshot()["duplicates"] == 1


def test_a_hello_never_turns_a_never_stored_seq_into_a_duplicate(ingest):
    ingestor, memory, _ = ingest
    ingestor.handle(batch_frames("w", 10, [1.0]))
    # a client that reads next_seq as "my next new seq" while it still holds seq 7 unacknowledged
    ingestor.handle(encode(Hello(role="worker", software="test", layout=LAYOUT, next_seq=11), "w"))
    ingestor.handle(batch_frames("w", 7, [1.0]))
    assert memory.rows_added == 4 and ingestor.snapshot()["duplicates"] == 0


def test_distinct_seqs_still_counts_the_stored_seqs_below_a_raised_horizon():
    # Found by hand: 4,200 batches with a gap after each (docs/protocol.md §5.3.1) gave status.json batches 4201,
    # distinct_seqs 4098, which IngestStats documents as "batches - distinct_seqs stored twice, must be 0".
    dedupe = SeqDeduplicator(max_gaps=2)
    for seq in (0, 2, 4, 6, 8):
        dedupe.mark_stored("w", seq)
    assert dedupe.given_up > 0 and dedupe.horizon("w") > 0
    assert dedupe.stored_count("w") == 5


def test_dedupe_is_exact_under_random_reordering_and_gaps_in_bounded_memory():
    rng = np.random.default_rng(3)
    dedupe = SeqDeduplicator(max_gaps=512)
    seqs = [s for s in range(5000) if rng.random() > 0.05]  # 5 % never arrive (dropped by a full spool)
    order = np.array(seqs)
    for start in range(0, len(order), 50):  # reordered within windows of 50
        rng.shuffle(order[start:start + 50])
    stored: set[int] = set()
    for seq in order.tolist():
        assert not dedupe.is_duplicate("w", seq)
        dedupe.mark_stored("w", seq)
        stored.add(seq)
    assert [s for s in range(5100) if dedupe.is_duplicate("w", s)] == sorted(stored)
    assert dedupe.tracked_intervals("w") <= 512 + 1 and dedupe.given_up == 0


# ------------------------------------------------------------------- one answer per batch, values bounded (issue 13)


def corrupted_batch(worker: str, seq: int, what: str, value: float, layout=LAYOUT) -> list[bytes]:
    """A batch whose ``what`` (``rewards``, ``actions`` or an observation component) holds ``value`` in one row."""
    builder = SampleBatchBuilder(layout)
    parts = lambda fill: tuple(np.full(c.observation_shape, fill, np.float32) for c in layout.components) + tuple(  # noqa: E731
        np.zeros(layout.action_dim, np.float32) for _ in range(layout.action_history))
    builder.add_reset(parts(0.5))
    for step in range(3):
        action = np.full(layout.action_dim, value if what == "actions" and step == 1 else 0.1, np.float32)
        reward = value if what == "rewards" and step == 1 else 1.0
        builder.add_step(action, parts(0.5), reward, False, False)
    batch = builder.build(seq=seq, weights_version=0)
    if what not in ("rewards", "actions"):
        frames = batch.observations[what].array.copy()
        frames[2] = value
        batch = batch.model_copy(update={"observations": {**batch.observations, what: WireArray.from_numpy(frames)}})
    return encode(batch, worker)


@pytest.mark.parametrize(("what", "value", "reason"), [
    ("rewards", 3e38, "reward_out_of_bounds"),
    ("rewards", -2e4, "reward_out_of_bounds"),
    ("actions", 1e30, "action_out_of_bounds"),
    ("actions", -1.01, "action_out_of_bounds"),
    ("obs", 1e30, "observation_out_of_bounds"),
])
def test_finite_but_absurd_values_are_refused_with_their_own_reason_counted_and_answered(ingest, what, value, reason):
    ingestor, memory, _ = ingest
    assert answers(ingestor.handle(corrupted_batch("w", 4, what, value))) == [("w", [4], "rejected", reason)]
    snapshot = ingestor.snapshot()
    assert memory.rows_added == 0 and snapshot["rejects"] == {reason: 1} and snapshot["workers"]["w"]["rejected"] == 1
    assert not ingestor.dedupe.is_duplicate("w", 4) and snapshot["answers"] == {"rejected": 1}
    assert acked(ingestor.handle(batch_frames("w", 5, [1.0]))) == [("w", [5])]  # the next honest batch is stored


def test_a_value_just_past_a_bound_is_named_as_itself_not_as_the_bound():
    """A hostile-worker probe: an action of nextafter(1) was refused as "actions hold values in [-1, 1], outside the
    allowed [-1, 1]", and a speed of 1000.0001 as "[1000, 1000], outside the allowed [-1000, 1000]"."""
    import re

    from tmrl_common.errors import ProtocolError
    from tmrl_common.protocol import decode

    just_past = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    _, batch = decode(corrupted_batch("w", 0, "actions", just_past))
    with pytest.raises(ProtocolError, match=re.escape("actions hold values in [0, 1.0000001192092896], outside the "
                                                      "allowed [-1, 1]")):
        batch.check_bounds(LAYOUT, max_abs_reward=1e4, max_abs_observation=1e6)
    layout = tm20_lidar_layout()
    _, batch = decode(corrupted_batch("w", 1, "speed", 1000.0001, layout))
    with pytest.raises(ProtocolError, match=re.escape("observations['speed'] hold values in [0.5, "
                                                      "1000.0001220703125], outside the allowed [-1000, 1000]")):
        batch.check_bounds(layout, max_abs_reward=1e4, max_abs_observation=1e6)


def test_observation_bounds_declared_by_the_layout_are_enforced_per_component():
    layout = tm20_lidar_layout()
    memory = ReplayMemory(layout, capacity=100)
    ingestor = Ingestor("trainer", layout, store=memory.add_batch)
    assert answers(ingestor.handle(corrupted_batch("w", 0, "lidar", 2e4, layout)))[0][3] == "observation_out_of_bounds"
    assert answers(ingestor.handle(corrupted_batch("w", 1, "speed", -1001.0, layout)))[0][3] == "observation_out_of_bounds"
    assert answers(ingestor.handle(corrupted_batch("w", 2, "lidar", 70.0, layout)))[0][2] == "stored"
    assert memory.rows_added == 4


def test_a_reward_bound_is_configurable():
    memory = ReplayMemory(LAYOUT, capacity=100)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, bounds=ValueBounds(max_abs_reward=10.0))
    assert answers(ingestor.handle(corrupted_batch("w", 0, "rewards", 11.0)))[0][3] == "reward_out_of_bounds"
    assert answers(ingestor.handle(corrupted_batch("w", 1, "rewards", 9.0)))[0][2] == "stored"


@pytest.mark.parametrize("field", ["wrong_dtype", "missing_field"])
def test_a_batch_that_fails_to_decode_is_answered_rejected_when_its_seq_can_be_read(ingest, field):
    ingestor, memory, _ = ingest
    envelope, body = batch_frames("w", 9, [1.0])
    raw = msgpack.unpackb(body)
    if field == "wrong_dtype":
        raw["rewards"]["dtype"] = "float64"
        raw["rewards"]["data"] = raw["rewards"]["data"] * 2
    else:
        del raw["terminated"]
    assert answers(ingestor.handle([envelope, msgpack.packb(raw)])) == [("w", [9], "rejected", "schema")]
    assert memory.rows_added == 0 and ingestor.snapshot()["rejects"] == {"schema": 1}


def test_a_batch_with_seq_twice_is_answered_rejected_malformed_under_its_first_seq_and_stores_nothing(ingest):
    """docs/protocol.md §2: the relay counts such a batch under its first seq; the trainer names that one too, and
    neither seq is marked stored (a later batch 9 is stored, not answered duplicate)."""
    ingestor, memory, _ = ingest
    envelope, body = batch_frames("w", 4, [1.0])
    entries = list(msgpack.unpackb(body).items())
    twice = msgpack.Packer().pack_map_pairs([entries[0], ("seq", 9), *entries[1:]])
    assert answers(ingestor.handle([envelope, twice])) == [("w", [4], "rejected", "malformed")]
    assert memory.rows_added == 0 and ingestor.snapshot()["rejects"] == {"malformed": 1}
    assert answers(ingestor.handle(batch_frames("w", 9, [1.0]))) == [("w", [9], "stored", "")]


def test_every_batch_gets_exactly_one_answer_stored_duplicate_or_rejected(ingest):
    ingestor, _, _ = ingest
    outcomes = [answers(ingestor.handle(frames)) for frames in (
        batch_frames("w", 0, [1.0]), batch_frames("w", 0, [1.0]), corrupted_batch("w", 1, "rewards", 3e38))]
    assert [[(seqs, outcome) for _, seqs, outcome, _ in reply] for reply in outcomes] == [
        [([0], "stored")], [([0], "duplicate")], [([1], "rejected")]]


def test_a_worker_sending_bad_batches_flat_out_costs_a_log_line_per_reason_and_interval_not_one_per_batch(ingest,
                                                                                                         caplog):
    ingestor, memory, _ = ingest
    caplog.set_level("WARNING", logger="tmrl_trainer.ingest")
    ingestor._reject_log.interval_s = 60.0  # the whole flood inside one interval
    other = layout_for_box(5, 1)
    for seq in range(300):
        assert answers(ingestor.handle(batch_frames("w1", seq, [1.0], layout=other))) == [
            ("w1", [seq], "rejected", "schema")]  # every batch is still answered with its reason
    assert acked(ingestor.handle(batch_frames("w2", 0, [1.0]))) == [("w2", [0])]
    assert answers(ingestor.handle(batch_frames("w2", 1, [1.0], layout=other)))[0][3] == "schema"
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and "from w1" in lines[0] and "batch seq 0:" in lines[0] and "from w2" in lines[1], lines
    assert ingestor.snapshot()["rejects"] == {"schema": 301} and ingestor.workers["w1"].rejected == 300
    ingestor._reject_log.interval_s = 0.0  # the interval is over: the next snapshot reports the count held back
    ingestor.snapshot()
    (summary,) = [record.getMessage() for record in caplog.records][2:]
    assert "from w1" in summary and "batch seq 299:" in summary and "the last of 299 like it" in summary, summary


@pytest.mark.parametrize(("field", "value", "says"), [
    ("rewards", np.array([7.0, 1.0], np.float32), "holds reward 7, terminated False"),
    ("terminated", np.array([True, False]), "terminated True"),
    ("truncated", np.array([True, False]), "truncated True"),
])
def test_a_first_row_with_a_reward_or_an_ending_is_refused_as_schema(ingest, field, value, says):
    """docs/protocol.md section 6.2: the row reset() returned has reward 0 and neither flag. An outside probe's such
    batches were stored without a word (a reward for no step; an episode that ends where it starts)."""
    ingestor, memory, _ = ingest
    builder = SampleBatchBuilder(LAYOUT)
    builder.add_reset((np.zeros(LAYOUT.components[0].frame_shape[0], np.float32),))
    builder.add_step(np.array([0.5], np.float32), (np.ones(LAYOUT.components[0].frame_shape[0], np.float32),), 1.0,
                     False, False)
    batch = builder.build(seq=0, weights_version=0)
    forged = batch.model_copy(update={field: WireArray.from_numpy(value)})
    replies = ingestor.handle(encode(forged, "w1"))
    assert answers(replies) == [("w1", [0], "rejected", "schema")]
    _, ack = decode(replies[0])
    assert says in ack.detail and "starts an episode" in ack.detail and memory.rows_added == 0
    assert acked(ingestor.handle(encode(batch.model_copy(update={"seq": 1}), "w1"))) == [("w1", [1])]  # honest: stored


def test_worker_ids_beyond_max_workers_are_not_answered_and_cost_no_state(caplog):
    memory = ReplayMemory(LAYOUT, capacity=1000)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, max_workers=3)
    for index in range(3):
        assert acked(ingestor.handle(batch_frames(f"w{index}", 0, [1.0]))) == [(f"w{index}", [0])]
    with caplog.at_level("WARNING"):
        for index in range(3, 50):  # a client inventing ids: each one new
            ingestor.handle(encode(Hello(role="worker", software="test", next_seq=0), f"w{index}"))
            assert ingestor.handle(batch_frames(f"w{index}", 0, [1.0])) == []  # unanswered: the worker resends
    snapshot = ingestor.snapshot()
    assert sorted(snapshot["workers"]) == ["w0", "w1", "w2"] and snapshot["over_max_workers"] == 94
    assert ingestor.dedupe.workers() == ["w0", "w1", "w2"] and snapshot["rows_stored"] == 6
    turned_away = [r.getMessage() for r in caplog.records if "max_workers" in r.getMessage()]
    assert len(turned_away) == 1 and "max_workers = 3" in turned_away[0]  # one line, not one per message
    # the tracked workers go on as before, and a rejected batch from a new id is still answered, with no state kept
    assert acked(ingestor.handle(batch_frames("w1", 1, [2.0], first=False))) == [("w1", [1])]
    other_layout = batch_frames("w99", 0, [1.0], layout=layout_for_box(5, 1))
    assert answers(ingestor.handle(other_layout)) == [("w99", [0], "rejected", "schema")]
    assert "w99" not in ingestor.snapshot()["workers"]


def test_a_worker_that_never_stored_a_batch_makes_room_for_a_new_id_the_longest_silent_first():
    """Probes: ids that only said hello (a churn of short connections) filled the table for the run."""
    memory = ReplayMemory(LAYOUT, capacity=1000)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, max_workers=2)
    assert acked(ingestor.handle(batch_frames("stores", 0, [1.0]))) == [("stores", [0])]
    ingestor.handle(encode(Hello(role="worker", software="test", next_seq=0), "hello-only"))
    assert acked(ingestor.handle(batch_frames("newcomer", 0, [1.0]))) == [("newcomer", [0])]
    assert sorted(ingestor.snapshot()["workers"]) == ["newcomer", "stores"]
    assert ingestor.handle(batch_frames("third", 0, [1.0])) == []  # both tracked ids have stored rows: kept
    assert ingestor.snapshot()["over_max_workers"] == 1


def test_a_worker_held_by_a_restored_dedupe_state_is_admitted_beyond_max_workers():
    memory = ReplayMemory(LAYOUT, capacity=1000)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, max_workers=1)
    saved = SeqDeduplicator()
    saved.mark_stored("old", 0)
    ingestor.restore_dedupe(saved.state())
    assert acked(ingestor.handle(batch_frames("new", 0, [1.0]))) == [("new", [0])]
    assert ingestor.handle(batch_frames("newer", 0, [1.0])) == []
    assert answers(ingestor.handle(batch_frames("old", 0, [1.0]))) == [("old", [0], "duplicate", "")]
    assert acked(ingestor.handle(batch_frames("old", 1, [1.0]))) == [("old", [1])]


def test_a_batch_claiming_weights_newer_than_any_published_is_stored_counted_and_logged_once(caplog):
    """Adversarial probe: a client's absurd weights_version (2**62) showed in status.json as if it were true. An
    honest worker can claim more too (it still holds the weights of a previous trainer run), so it is stored."""
    published = {"version": 7}
    memory = ReplayMemory(LAYOUT, capacity=1000)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, published_version=lambda: published["version"])
    with caplog.at_level("WARNING"):
        acked(ingestor.handle(batch_frames("w1", 0, [1.0], version=7)))
        acked(ingestor.handle(batch_frames("w1", 1, [1.0], first=False, version=2**62)))
        acked(ingestor.handle(batch_frames("w1", 2, [1.0], first=False, version=2**62)))
        published["version"] = 9
        acked(ingestor.handle(batch_frames("w1", 3, [1.0], first=False, version=9)))
    stats = ingestor.snapshot()["workers"]["w1"]
    assert stats["batches"] == 4 and stats["batches_ahead"] == 2 and stats["weights_version"] == 9
    lines = [r.getMessage() for r in caplog.records if "has published up to" in r.getMessage()]
    assert len(lines) == 1 and f"weights version {2**62}, but this trainer has published up to 7" in lines[0]


def zlib_bomb_frames(worker: str, seq: int, parts: dict[str, list[int]], rows: int) -> list[bytes]:
    """A sample batch whose observation ``parts`` ({name: frame shape}) are zlib streams of zeros: a few hundred KB
    on the wire, ``rows`` x the frame's size when inflated."""
    import zlib

    def zeros(shape, dtype="float32", itemsize=4):
        raw = b"\0" * (int(np.prod(shape)) * itemsize)
        return {"dtype": dtype, "shape": shape, "codec": "zlib", "data": zlib.compress(raw, 9)}

    body = {"seq": seq, "weights_version": 0, "first": zeros([rows], "bool", 1),
            "observations": {name: zeros([rows, *shape]) for name, shape in parts.items()},
            "actions": zeros([rows, 1]), "rewards": zeros([rows]), "terminated": zeros([rows], "bool", 1),
            "truncated": zeros([rows], "bool", 1)}
    from tmrl_common.protocol import encode_envelope

    return [encode_envelope("sample_batch", worker), msgpack.packb(body, use_bin_type=True)]


@pytest.mark.parametrize(("parts", "rows", "says"), [
    ({"c0": [160], "c1": [160], "c2": [160], "c3": [160]}, 100_000, "batch has components ['c0', 'c1', 'c2', 'c3']"),
    ({"obs": [4000]}, 10_000, "frames are float32[4000], layout expects float32[3]"),
], ids=["other-parts", "other-frame-shape"])
def test_a_batch_whose_headers_do_not_fit_the_layout_is_refused_before_any_array_is_inflated(
        ingest, monkeypatch, parts, rows, says):
    """An outside probe: 40 zlib bodies of 251 KB, each inflating to 256 MiB of parts no layout has, cost the trainer
    1.75 s apiece before their refusal, and held up the honest workers' batches for 70 s."""
    import tmrl_common.arrays

    ingestor, memory, _ = ingest
    inflated = []
    real_decode = tmrl_common.arrays._decode
    monkeypatch.setattr(tmrl_common.arrays, "_decode", lambda *a, **k: inflated.append(a[1]) or real_decode(*a, **k))
    replies = ingestor.handle(zlib_bomb_frames("w1", 7, parts, rows))
    assert answers(replies) == [("w1", [7], "rejected", "schema")]
    assert inflated == [] and len(memory) == 0
    assert ingestor.rejects["schema"] == 1
    detail = decode(replies[0])[1].detail
    assert says in detail, detail
    # a batch that fits the layout still decodes and is stored as before
    assert acked(ingestor.handle(batch_frames("w1", 8, [1.0]))) == [("w1", [8])]


def test_a_flood_of_hellos_costs_a_line_per_worker_and_interval(ingest, caplog):
    """An outside probe with one worker key: 5,000 hellos made 5,000 trainer log lines, and 2,000 announcing another
    layout 1,996 warnings more (the relay held its own lines to one per interval)."""
    ingestor, _, _ = ingest
    other = layout_for_box(5, 1)
    with caplog.at_level("INFO", logger="tmrl_trainer.ingest"):
        for index in range(500):
            ingestor.handle(encode(Hello(role="worker", software="x", next_seq=index), "w1"))
            ingestor.handle(encode(Hello(role="worker", software="x", layout=other), "w2"))
        ingestor.snapshot()  # flushes held-back counts only once their interval is over: none yet
    lines = [record.getMessage() for record in caplog.records]
    assert [line for line in lines if line.startswith("w1 ")] == ["w1 said hello (next_seq 0)"]
    assert sum(line.startswith("w2 announced an observation layout") for line in lines) == 1
    assert ingestor.workers["w1"].hellos == 500  # counted all the same


def test_a_flood_of_hellos_under_new_ids_costs_a_budget_of_lines_then_one_per_interval(ingest, caplog):
    """A hostile-peer probe: 5,000 hellos under 5,000 invented ids (each a fresh key of the per-worker limit) made
    5,252 trainer log lines, where the relay's budget for all ids together held its own to 22."""
    ingestor, _, _ = ingest
    ingestor.max_workers = 10_000
    other = layout_for_box(5, 1)
    with caplog.at_level("INFO", logger="tmrl_trainer.ingest"):
        for index in range(3_000):
            layout = other if index % 2 else None
            ingestor.handle(encode(Hello(role="worker", software="x", layout=layout), f"flood-{index}"))
    lines = [record.getMessage() for record in caplog.records]
    said = [line for line in lines if " said hello " in line]
    announced = [line for line in lines if " announced an observation layout " in line]
    # every line is charged (a recheck probe: the layout warnings were not, 42 lines got through instead of 20),
    # then one line per interval and kind under the shared key
    assert len(said) + len(announced) <= 20 + 2, (len(said), len(announced))
    assert "more than 20 hello lines in 10 s: one line per interval from here" in said[-1]
    assert len(ingestor.workers) == 3_000  # each still counted


def test_a_worker_whose_histories_differ_is_told_it_cannot_use_the_policy_though_its_batches_are_stored(caplog):
    """A TrackMania probe: a worker with img_hist_len 8 beside a trainer with 4 had its batches stored, and the warning
    said only that; the worker could never act with the policy trained on them."""
    from tmrl_common.layout import tm20_pixel_lidar_layout

    trainer_layout = tm20_pixel_lidar_layout(img_hist_len=4)
    ingestor = Ingestor("trainer", trainer_layout, store=lambda batch: None)
    with caplog.at_level("WARNING", logger="tmrl_trainer.ingest"):
        ingestor.handle(encode(Hello(role="worker", software="x", layout=tm20_pixel_lidar_layout(img_hist_len=8)),
                               "w8"))
    [line] = [record.getMessage() for record in caplog.records]
    assert "its batches still match the trainer's frames" in line
    assert "but the policy trained on them reads other observation shapes than this worker's: it refuses the " \
           "weights and stops" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="tmrl_trainer.ingest"):  # same shapes, other bounds: the policy fits
        other_bounds = trainer_layout.model_copy(update={"components": [
            component.model_copy(update={"high": 1.0}) if index == 0 else component
            for index, component in enumerate(trainer_layout.components)]})
        ingestor.handle(encode(Hello(role="worker", software="x", layout=other_bounds), "wb"))
    assert caplog.records and "refuses the weights" not in caplog.text
