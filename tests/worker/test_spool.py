"""Spool bounds, drop-oldest accounting, resend timing, and sequence numbers that survive restarts."""

from __future__ import annotations

import json
import logging
import time

import msgpack
import pytest
from relay.relay_harness import make_batch
from tmrl_common.protocol import encode
from tmrl_worker.spool import SequenceCounter, Spool, StateFileError


def frames(n: int) -> list[bytes]:
    return [b"e" * 10, b"b" * (n - 10)]


def batch_frames(seq: int, sender: str = "w1") -> list[bytes]:
    """The frames of a real sample batch numbered ``seq``: what a durable spool restores (it reads the seq inside)."""
    return encode(make_batch(seq), sender=sender)


def test_spool_drops_oldest_when_count_bound_is_hit_and_counts_it(caplog):
    spool = Spool(max_batches=3, max_bytes=10_000, owner="w1")
    for seq in range(3):
        assert spool.add(seq, frames(100)) == []
    with caplog.at_level(logging.WARNING):
        assert spool.add(3, frames(100)) == [0]
    assert [b.seq for b in spool.pending()] == [1, 2, 3]
    assert spool.counters.dropped == 1 and spool.counters.dropped_bytes == 100
    assert "dropped 1 oldest" in caplog.text and "w1" in caplog.text


def test_spool_drops_as_many_oldest_as_needed_to_fit_the_byte_bound():
    spool = Spool(max_batches=100, max_bytes=1000)
    for seq in range(4):
        spool.add(seq, frames(250))
    assert spool.nbytes == 1000
    assert spool.add(4, frames(600)) == [0, 1, 2]
    assert [b.seq for b in spool.pending()] == [3, 4]
    assert spool.nbytes == 850
    assert spool.counters.dropped == 3 and spool.counters.dropped_bytes == 750


def test_ack_removes_batches_and_counts_unknown_acks():
    spool = Spool(max_batches=10, max_bytes=10_000)
    for seq in (5, 6, 7):
        spool.add(seq, frames(100))
    assert spool.ack([5, 7, 99]) == 2
    assert [b.seq for b in spool.pending()] == [6]
    assert spool.nbytes == 100
    assert spool.counters.acked == 2 and spool.counters.unknown_acks == 1


def test_due_returns_unsent_batches_then_only_those_past_the_ack_timeout():
    spool = Spool(max_batches=10, max_bytes=10_000)
    spool.add(0, frames(50))
    spool.add(1, frames(50))
    assert [b.seq for b in spool.due(ack_timeout_s=5.0, now=100.0)] == [0, 1]
    spool.mark_sent(0, now=100.0)
    spool.mark_sent(1, now=103.0)
    assert spool.due(ack_timeout_s=5.0, now=104.0) == []
    assert [b.seq for b in spool.due(ack_timeout_s=5.0, now=105.0)] == [0]
    spool.mark_sent(0, now=105.0)  # the resend
    assert spool.counters.resent == 1
    assert [b.seq for b in spool.due(ack_timeout_s=5.0, now=108.5)] == [1]
    # after a resend the timeout doubles: seq 0 is due again 10 s after its resend, not 5 s
    assert 0 not in [b.seq for b in spool.due(ack_timeout_s=5.0, now=114.0)]
    assert 0 in [b.seq for b in spool.due(ack_timeout_s=5.0, now=115.0)]


def test_resend_backoff_is_capped():
    spool = Spool(max_batches=10, max_bytes=10_000)
    spool.add(0, frames(50))
    now = 0.0
    for _ in range(10):
        spool.mark_sent(0, now=now)
        now += 1000.0
    assert spool.due(ack_timeout_s=1.0, now=now - 1000.0 + 7.9) == []
    assert [b.seq for b in spool.due(ack_timeout_s=1.0, now=now - 1000.0 + 8.0)] == [0]


def test_spool_rejects_a_seq_twice_and_bad_bounds():
    spool = Spool(max_batches=2, max_bytes=1000)
    spool.add(1, frames(20))
    with pytest.raises(ValueError, match="already spooled"):
        spool.add(1, frames(20))
    with pytest.raises(ValueError):
        Spool(max_batches=0, max_bytes=10)


def test_sequence_numbers_are_never_reused_across_restarts(tmp_path):
    first = SequenceCounter(tmp_path, "worker-a", block=10, first_seq=0)
    used = [first.take() for _ in range(13)]
    assert used == list(range(13))
    # a crash now: the process never says how far it got; the reservation on disk covers it
    second = SequenceCounter(tmp_path, "worker-a", block=10)
    assert second.next_seq >= 13
    assert second.take() not in used
    state = json.loads((tmp_path / "worker-a.state.json").read_text())
    assert state["worker_id"] == "worker-a" and state["reserved_until"] > second.next_seq - 1


def test_sequence_state_is_per_worker_id(tmp_path):
    SequenceCounter(tmp_path, "a", block=5, first_seq=0).take()
    assert SequenceCounter(tmp_path, "b", block=5, first_seq=0).take() == 0


def test_a_worker_without_its_state_file_numbers_above_every_batch_of_its_earlier_runs(tmp_path):
    """A container without a persistent state_dir, or a deleted state file: an outside probe's worker started again
    at seq 0 and the trainer answered its first batches `duplicate` (stored already: the earlier run's), so they were
    dropped as delivered. Without a state file the numbering now starts at the clock (microseconds)."""
    earlier = SequenceCounter(tmp_path / "first-run", "w", block=10)
    used = [earlier.take() for _ in range(500)]  # far more batches than a worker sends per microsecond
    time.sleep(0.01)
    later = SequenceCounter(tmp_path / "state-lost", "w", block=10)  # same id, no state file
    assert later.take() > max(used)
    assert 1.7e15 < used[0] < 2**62  # microseconds since 1970, far inside the protocol's int63


def test_unreadable_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "w.state.json").write_text("{not json")
    with pytest.raises(StateFileError, match="fix it or delete it"):
        SequenceCounter(tmp_path, "w")
    (tmp_path / "w.state.json").write_text(json.dumps({"worker_id": "other", "reserved_until": 3}))
    with pytest.raises(StateFileError, match="other"):
        SequenceCounter(tmp_path, "w")


@pytest.mark.parametrize("blocked", ["a file", "under a file"])
def test_a_state_dir_that_cannot_be_a_folder_is_a_one_line_state_file_error(tmp_path, blocked):
    (tmp_path / "taken").write_text("a file where the folder should be")
    state_dir = tmp_path / "taken" if blocked == "a file" else tmp_path / "taken" / "state"
    with pytest.raises(StateFileError, match=rf"state_dir {state_dir} cannot hold this worker's state file: .*Errno"):
        SequenceCounter(state_dir, "w")


def test_a_durable_spool_keeps_unacknowledged_batches_on_disk_for_the_next_run(tmp_path):
    first = Spool(max_batches=10, max_bytes=100_000, owner="w1", directory=tmp_path / "spool")
    sent = {seq: batch_frames(seq) for seq in (3, 4, 5)}
    for seq, batch in sent.items():
        first.add(seq, batch)
    first.ack([4])
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["000000000003.batch", "000000000005.batch"]

    second = Spool(max_batches=10, max_bytes=100_000, owner="w1", directory=tmp_path / "spool")  # the worker restarted
    assert [(b.seq, b.frames, b.sends) for b in second.pending()] == [(3, sent[3], 0), (5, sent[5], 0)]
    assert second.counters.restored == 2 and second.nbytes == first.nbytes
    second.ack([3, 5])
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_durable_spool_deletes_the_files_of_batches_it_drops_to_stay_within_bounds(tmp_path):
    spool = Spool(max_batches=2, max_bytes=10_000, directory=tmp_path)
    for seq in range(4):
        spool.add(seq, [b"e", b"b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000000002.batch", "000000000003.batch"]
    assert spool.counters.dropped == 2


def test_an_unreadable_spool_file_is_set_aside_counted_and_never_sent(tmp_path):
    Spool(max_batches=10, max_bytes=100_000, directory=tmp_path).add(1, batch_frames(1))
    (tmp_path / "000000000002.batch").write_bytes(b"\xc1 not msgpack")
    (tmp_path / "000000000003.batch").write_bytes(msgpack.packb(["a string", 7]))
    (tmp_path / "notes.txt").write_text("not a batch: ignored")
    spool = Spool(max_batches=10, max_bytes=100_000, directory=tmp_path)
    assert [b.seq for b in spool.pending()] == [1]
    assert spool.counters.unreadable_files == 2 and spool.counters.restored == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000000000001.batch", "000000000002.batch.unreadable", "000000000003.batch.unreadable", "notes.txt"]


def test_a_spool_file_whose_name_is_not_its_batch_seq_is_set_aside_not_resent_for_ever(tmp_path, caplog):
    """An outside probe renamed spool files (1000 -> 500, a copy of 1001 as 600): the worker keyed them by name, the
    trainer acknowledged the seqs inside, so both were resent at every start and never left the spool; the hello's
    next_seq fell to 500 with them."""
    first = Spool(max_batches=10, max_bytes=100_000, owner="w1", directory=tmp_path)
    for seq in (1000, 1001):
        first.add(seq, batch_frames(seq))
    (tmp_path / "000000001000.batch").rename(tmp_path / "000000000500.batch")
    (tmp_path / "000000000600.batch").write_bytes((tmp_path / "000000001001.batch").read_bytes())
    (tmp_path / "000000000700.batch").write_bytes(msgpack.packb([b"envelope", b"no batch body"]))
    # a re-check probe: the same seq under another name (a leading zero) was restored and sent at every start, the
    # ack deleting the name the spool writes; a name of 20 digits was left there without a word
    (tmp_path / "0000000001001.batch").write_bytes((tmp_path / "000000001001.batch").read_bytes())
    (tmp_path / "00000000000000001001.batch").write_bytes((tmp_path / "000000001001.batch").read_bytes())
    for odd in ("+000000001001", " 000000001001", "000000001001.0", "000000001_001"):  # the second re-check's
        (tmp_path / f"{odd}.batch").write_bytes((tmp_path / "000000001001.batch").read_bytes())
    (tmp_path / "000000001001.BATCH").write_bytes((tmp_path / "000000001001.batch").read_bytes())
    with caplog.at_level(logging.WARNING, logger="tmrl_worker.spool"):
        spool = Spool(max_batches=10, max_bytes=100_000, owner="w1", directory=tmp_path)
    assert [b.seq for b in spool.pending()] == [1001] and spool.highest_restored == 1001
    assert spool.counters.unreadable_files == 10 and spool.counters.restored == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        " 000000001001.batch.unreadable", "+000000001001.batch.unreadable", "000000001001.0.batch.unreadable",
        "000000001001.BATCH.unreadable", "000000001_001.batch.unreadable",
        "00000000000000001001.batch.unreadable", "0000000001001.batch.unreadable", "000000000500.batch.unreadable",
        "000000000600.batch.unreadable", "000000000700.batch.unreadable", "000000001001.batch"])
    assert "0000000001001.batch is unreadable (not a name this spool writes (<seq>.batch, the seq in 12 or more " \
        "digits))" in caplog.text
    assert "its name says seq 500, but the batch inside holds seq 1000" in caplog.text
    assert "its name says seq 700, but the batch inside holds no seq" in caplog.text


def test_a_file_where_the_spool_directory_should_be_is_a_one_line_state_file_error(tmp_path):
    (tmp_path / "w1.spool").write_text("a file, not the spool's folder")
    with pytest.raises(StateFileError, match=r"spool directory .*w1.spool cannot be used: File exists \(move what is "
                                             r"there aside, or set \[worker\] state_dir\)"):
        Spool(max_batches=10, max_bytes=10_000, owner="w1", directory=tmp_path / "w1.spool")


def test_a_write_cut_short_by_a_kill_leaves_no_temporary_file_behind_after_the_restart(tmp_path):
    Spool(max_batches=10, max_bytes=100_000, directory=tmp_path).add(1, batch_frames(1))
    (tmp_path / ".000000000002.batch.k3j9_x.tmp").write_bytes(b"\x92\xc4")  # killed between write and rename
    (tmp_path / ".notes.tmp").write_text("not the spool's: kept")
    spool = Spool(max_batches=10, max_bytes=100_000, directory=tmp_path)
    assert [b.seq for b in spool.pending()] == [1] and spool.counters.unreadable_files == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "000000000001.batch"]


def test_a_batch_that_cannot_be_written_stays_in_memory_and_is_counted(tmp_path):
    directory = tmp_path / "spool"
    spool = Spool(max_batches=10, max_bytes=10_000, directory=directory)
    directory.rmdir()
    directory.write_bytes(b"")  # a file where the directory was: every write fails (even as root)
    spool.add(1, [b"e", b"b"])
    assert [b.seq for b in spool.pending()] == [1] and spool.counters.write_errors == 1


def test_a_second_process_under_one_worker_id_and_state_folder_is_refused_until_the_first_ends(tmp_path):
    """An outside probe started two workers with one id and state_dir by mistake: the second only warned that the
    previous run 'did not stop cleanly' and took the same seqs, which the trainer answers as duplicates."""
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.runtime import run_worker
    from tmrl_worker.spool import StateFileError, lock_worker_state

    worker_port, weights_port = free_ports(2)
    config = WorkerConfig(worker_id="twin", env="sim-fast", max_steps=20, max_steps_per_second=200, batch_steps=10,
                          worker_port=worker_port, weights_port=weights_port, state_dir=tmp_path, flush_timeout_s=0.1,
                          transport=TransportConfig(linger_ms=0), security=SecurityConfig(insecure=True))
    held = lock_worker_state(tmp_path, "twin")  # the first process
    try:
        with pytest.raises(StateFileError, match=rf"another worker process runs as 'twin' with state_dir {tmp_path} "
                                                 r"\(it holds .*twin.lock\): .* give this one another worker_id"):
            run_worker(config)
        assert not (tmp_path / "twin.state.json").exists()  # refused before taking any seq
    finally:
        held.release()
    assert run_worker(config).steps == 20
    lock_worker_state(tmp_path, "twin").release()  # the run let go of it


def test_a_state_file_older_than_the_durable_spool_moves_the_numbering_above_the_spooled_seqs(tmp_path, caplog):
    """Worker persistence probe: a state file whose next number was at or below a batch restored from the durable
    spool crashed the sender thread ('seq ... is already spooled', a traceback, exit 1)."""
    import json as json_module

    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.runtime import run_worker, spool_directory

    worker_port, weights_port = free_ports(2)  # no relay: everything stays spooled
    config = WorkerConfig(worker_id="old", env="sim-fast", max_steps=30, max_steps_per_second=300, batch_steps=10,
                          worker_port=worker_port, weights_port=weights_port, state_dir=tmp_path, flush_timeout_s=0.1,
                          durable_spool=True, transport=TransportConfig(linger_ms=0),
                          security=SecurityConfig(insecure=True))
    Spool(10, 10_000_000, owner="old", directory=spool_directory(config)).add(10, batch_frames(10, sender="old"))
    (tmp_path / "old.state.json").write_text(json_module.dumps({"worker_id": "old", "reserved_until": 10}))
    with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
        stats = run_worker(config)
    assert stats.steps == 30 and stats.delivery["spool_batches"] >= 4  # the restored one and this run's
    assert "the spool holds batch seq 10, at or above the state file's next number: numbering goes on from seq 11" \
        in caplog.text
    assert json_module.loads((tmp_path / "old.state.json").read_text())["reserved_until"] > 11


def test_a_full_spool_and_failed_spool_writes_cost_a_line_per_burst_and_unwritten_batches_are_known(tmp_path, caplog,
                                                                                                    monkeypatch):
    """Worker persistence probe: 'spool full' was logged once per dropped batch (2,464 lines), and at stop the
    worker said its unacknowledged batches were kept on disk when most had never been written (a full disk)."""
    from tmrl_worker import spool as spool_module

    spool = Spool(max_batches=2, max_bytes=10_000_000, owner="w", directory=tmp_path / "spool")
    with caplog.at_level("WARNING", logger="tmrl_worker.spool"):
        for seq in range(50):
            spool.add(seq, frames(1))

        def disk_full(path, data, mode=0o644):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(spool_module, "write_atomically", disk_full)
        for seq in range(50, 60):
            spool.add(seq, frames(1))
    full = [r for r in caplog.records if "spool full" in r.getMessage()]
    unwritable = [r for r in caplog.records if "could not write batch" in r.getMessage()]
    assert len(full) == 1 and len(unwritable) == 1 and spool.counters.dropped == 58
    assert spool.unwritten == {58, 59}  # the two still spooled; the dropped ones are forgotten
    spool.ack([58])
    assert spool.unwritten == {59}


def test_numbers_past_the_reservation_are_never_handed_out_while_the_state_file_cannot_be_written(tmp_path,
                                                                                                  refusing_disk):
    """An outside probe filled the state_dir's disk: at the next block the reservation's write failed inside take(),
    after the counter had already moved its reservation forward in memory, and the sender thread died."""
    from tmrl_worker.spool import ReservationError

    counter = SequenceCounter(tmp_path, "w", block=3, first_seq=0)
    assert [counter.take() for _ in range(3)] == [0, 1, 2]
    refusing_disk.full = True
    for _ in range(2):  # refused each time, nothing taken
        with pytest.raises(ReservationError, match=r"could not reserve sequence numbers in .*w.state.json: No space"):
            counter.take()
    assert counter.next_seq == 3 and json.loads((tmp_path / "w.state.json").read_text())["reserved_until"] == 3
    refusing_disk.full = False
    assert counter.take() == 3
    assert json.loads((tmp_path / "w.state.json").read_text())["reserved_until"] == 6


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("content", "says"), [
    (b"\x8f\xa2\x00garbage", "is unreadable"),  # was a UnicodeDecodeError traceback, exit 1
    (b'{"worker_id": "w", "reserved_until": 1.5e400}', "reserved_until inf"),  # was an OverflowError traceback
    (b'{"worker_id": "w", "reserved_until": true}', "reserved_until True"),  # was taken as 1
    ("fifo", "is not a regular file"),  # was a start blocked for ever, deaf to SIGTERM
])
def test_a_state_file_holding_no_state_is_one_clear_error_never_a_traceback_or_a_hang(tmp_path, content, says):
    """An outside probe replaced the worker's state file by random bytes, an infinite number, a boolean, a FIFO."""
    import os

    path = tmp_path / "w.state.json"
    if content == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    with pytest.raises(StateFileError, match=says):
        SequenceCounter(tmp_path, "w")


@pytest.mark.timeout(30)
def test_a_fifo_among_the_spool_files_or_as_the_progress_file_is_set_aside_not_read(tmp_path):
    import os

    from tmrl_worker.progress import ProgressFileError, read_progress

    directory = tmp_path / "spool"
    Spool(10, 100_000, owner="w1", directory=directory).add(3, batch_frames(3))
    os.mkfifo(directory / f"{4:012d}.batch")
    restored = Spool(10, 100_000, owner="w1", directory=directory)
    assert [entry.seq for entry in restored.pending()] == [3] and restored.counters.unreadable_files == 1
    os.mkfifo(tmp_path / "w1.progress.json")
    with pytest.raises(ProgressFileError, match="is not a regular file"):
        read_progress(tmp_path / "w1.progress.json")


def test_a_worker_started_on_a_full_disk_starts_and_numbers_nothing_until_it_can_reserve(tmp_path, refusing_disk,
                                                                                         caplog):
    """An outside probe's worker, whose durable spool had filled the disk, refused to start with exit 2 ("set
    state_dir to a folder this user can write"), which systemd does not retry: the spool it would deliver, freeing
    the disk, stayed there."""
    from tmrl_worker.spool import ReservationError

    SequenceCounter(tmp_path, "w", block=3, first_seq=0).take()  # an earlier run reserved [0, 3)
    refusing_disk.full = True
    with caplog.at_level("ERROR", logger="tmrl_worker.spool"):
        counter = SequenceCounter(tmp_path, "w", block=3)
    assert "could not reserve sequence numbers" in caplog.text and "the worker starts" in caplog.text
    with pytest.raises(ReservationError):
        counter.take()  # nothing reserved by this run: no number handed out
    refusing_disk.full = False
    assert counter.take() == 3
    with pytest.raises(StateFileError, match="cannot hold this worker's state file"):  # not a full disk: exit 2
        SequenceCounter(tmp_path / "w.state.json" / "below-a-file", "w")
