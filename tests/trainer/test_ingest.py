"""Trainer ingestion: dedupe in bounded memory, acks for duplicates, rejects counted (never crashing), returns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import layout_for_box
from tmrl_common.protocol import Hello, SampleAck, decode, encode
from tmrl_trainer.ingest import DedupeStateError, Ingestor, SeqDeduplicator
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


def acked(replies) -> list[tuple[str, list[int]]]:
    out = []
    for reply in replies:
        _, message = decode(reply)
        assert isinstance(message, SampleAck)
        out.append((message.worker, message.seqs))
    return out


def test_dedupe_keeps_a_watermark_and_a_small_set_above_it():
    dedupe = SeqDeduplicator(max_above=4)
    for seq in (0, 1, 3, 5):
        dedupe.mark_stored("w", seq)
    assert dedupe.watermark("w") == 2 and dedupe.pending_above("w") == 2
    assert dedupe.is_duplicate("w", 1) and dedupe.is_duplicate("w", 3) and not dedupe.is_duplicate("w", 2)
    dedupe.mark_stored("w", 2)
    assert dedupe.watermark("w") == 4 and dedupe.pending_above("w") == 1
    assert not dedupe.is_duplicate("other", 0)


def test_dedupe_memory_stays_bounded_when_seqs_never_arrive():
    dedupe = SeqDeduplicator(max_above=8)
    for seq in range(1, 1000, 2):  # every even seq is lost (dropped by a full spool, say)
        dedupe.mark_stored("w", seq)
        assert dedupe.pending_above("w") <= 8
    assert dedupe.given_up > 0
    assert dedupe.is_duplicate("w", 999) and not dedupe.is_duplicate("w", 1001)


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
    assert ingestor.handle([envelope, body.replace(marker, np.float32("nan").tobytes())]) == []
    rejects = ingestor.snapshot()["rejects"]
    assert rejects["malformed"] == 2 and rejects["non_finite"] == 1
    assert memory.rows_added == 0
    # the service still works afterwards
    assert acked(ingestor.handle(batch_frames("w1", 1, [1.0]))) == [("w1", [1])]


def test_batches_with_another_layout_are_rejected_but_acknowledged(ingest):
    ingestor, memory, _ = ingest
    other = layout_for_box(5, 1)
    assert acked(ingestor.handle(batch_frames("w1", 0, [1.0], layout=other))) == [("w1", [0])]
    assert memory.rows_added == 0
    assert ingestor.snapshot()["rejects"] == {"schema": 1}


def test_unknown_senders_are_rejected_when_an_allow_list_is_set():
    memory = ReplayMemory(LAYOUT, capacity=100)
    ingestor = Ingestor("trainer", LAYOUT, store=memory.add_batch, allowed_workers=frozenset({"w1"}))
    assert ingestor.handle(batch_frames("intruder", 0, [1.0])) == []
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


def test_a_workers_hello_moves_the_dedupe_window_past_a_restart_gap(ingest):
    ingestor, _, _ = ingest
    ingestor.handle(batch_frames("w1", 0, [1.0]))
    ingestor.handle(batch_frames("w1", 1, [1.0]))
    # the worker restarts: its state file reserved seqs up to 1000, so it continues there
    ingestor.handle(encode(Hello(role="worker", software="test", layout=LAYOUT, next_seq=1000), "w1"))
    assert ingestor.dedupe.watermark("w1") == 1000 and ingestor.dedupe.pending_above("w1") == 0
    assert acked(ingestor.handle(batch_frames("w1", 1000, [1.0]))) == [("w1", [1000])]
    assert ingestor.dedupe.watermark("w1") == 1001 and ingestor.dedupe.given_up == 0
    # an old hello (lower next_seq, e.g. delivered late) never moves the window back
    ingestor.handle(encode(Hello(role="worker", software="test", layout=LAYOUT, next_seq=3), "w1"))
    assert ingestor.dedupe.watermark("w1") == 1001


def test_worker_stats_give_the_stored_seq_range(ingest):
    ingestor, _, _ = ingest
    for seq in (7, 5, 6, 6):  # out of order, one duplicate
        ingestor.handle(batch_frames("w", seq, [1.0]))
    stats = ingestor.snapshot()["workers"]["w"]
    assert (stats["min_seq"], stats["max_seq"], stats["batches"], stats["duplicates"]) == (5, 7, 3, 1)
    assert stats["batches"] == stats["max_seq"] - stats["min_seq"] + 1  # contiguous: nothing between lost or doubled


def test_dedupe_state_survives_a_json_round_trip():
    dedupe = SeqDeduplicator(max_above=8)
    for seq in (0, 1, 2, 5, 7):
        dedupe.mark_stored("w1", seq)
    for seq in range(1, 40, 2):  # odd seqs only: the window gives some even ones up
        dedupe.mark_stored("w2", seq)
    dedupe.advance_to("w3", 100)
    restored = SeqDeduplicator(max_above=8)
    restored.restore(json.loads(json.dumps(dedupe.state())))
    assert restored.state() == dedupe.state() and restored.given_up == dedupe.given_up > 0
    for worker in ("w1", "w2", "w3", "never-seen"):
        assert restored.watermark(worker) == dedupe.watermark(worker)
        assert restored.pending_above(worker) == dedupe.pending_above(worker)
        assert [restored.is_duplicate(worker, s) for s in range(120)] == [dedupe.is_duplicate(worker, s) for s in range(120)]


def test_a_dedupe_state_saved_with_a_larger_window_gives_up_its_lowest_gaps_when_restored():
    wide = SeqDeduplicator(max_above=100)
    for seq in range(1, 21, 2):  # seq 0, 2, 4... never arrive: 10 seqs held above watermark 0
        wide.mark_stored("w", seq)
    narrow = SeqDeduplicator(max_above=4)
    narrow.restore(wide.state())
    assert narrow.pending_above("w") <= 4 and narrow.given_up > 0
    assert all(narrow.is_duplicate("w", seq) for seq in range(1, 21, 2))  # nothing stored is forgotten


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
    assert ingestor.dedupe_state()["workers"] == {"w": {"watermark": 3, "above": []}}
