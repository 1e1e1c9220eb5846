"""The run recorder's ``train`` records: updates/s and samples/s measure this run's progress, also after a resume."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import tmrl_trainer.metrics as metrics_module
from tmrl_trainer.metrics import TrainingMetrics
from tmrl_trainer.status import METRICS_FILE, RunRecorder, read_metrics


@pytest.fixture
def clock(monkeypatch):
    """The rate clock of :mod:`tmrl_trainer.metrics`, set by the test (seconds)."""
    now = SimpleNamespace(seconds=100.0)
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(perf_counter=lambda: now.seconds))
    return now


def train_records(run_dir):
    return [r for r in read_metrics(run_dir / METRICS_FILE) if r["kind"] == "train"]


def test_the_first_train_record_after_a_resume_counts_only_the_updates_and_samples_of_this_run(tmp_path, clock):
    recorder = RunRecorder(tmp_path, tensorboard=False)  # made before the checkpoint is loaded, as the trainer does
    clock.seconds += 5.0  # loading the checkpoint and its memory
    recorder.set_rate_baseline(updates=3000, samples=0)  # the learner resumed at 3000 updates; no row received yet
    clock.seconds += 2.0
    recorder.training(3200, 400, weights_version=61, metrics={"critic_loss": 0.5})
    clock.seconds += 4.0
    recorder.training(3600, 1200, weights_version=62, metrics={"critic_loss": 0.4})
    recorder.close()
    first, second = train_records(tmp_path)
    assert first["updates"] == 3200 and first["updates_per_s"] == pytest.approx(100.0)
    assert first["samples_per_s"] == pytest.approx(200.0)
    assert second["updates_per_s"] == pytest.approx(100.0) and second["samples_per_s"] == pytest.approx(200.0)


def test_a_fresh_run_measures_its_first_rates_from_zero_when_the_recorder_was_made(tmp_path, clock):
    recorder = RunRecorder(tmp_path, tensorboard=False)
    clock.seconds += 10.0
    recorder.training(500, 2000, weights_version=10, metrics={})
    recorder.close()
    (record,) = train_records(tmp_path)
    assert record["updates_per_s"] == pytest.approx(50.0) and record["samples_per_s"] == pytest.approx(200.0)


def test_training_metrics_made_with_the_counts_a_run_starts_from_measure_its_first_rates_from_them(clock):
    board = TrainingMetrics(None, updates_at_start=3000, samples_at_start=0)
    clock.seconds += 2.0
    assert board.log_rates(3200, 3200, 400) == pytest.approx({"updates_per_s": 100.0, "samples_per_s": 200.0})


def test_train_records_are_thinned_to_one_per_interval_and_the_next_rates_cover_the_gap(tmp_path, clock, monkeypatch):
    from tmrl_trainer import status as status_module

    monotonic = SimpleNamespace(seconds=0.0)
    monkeypatch.setattr(status_module.time, "monotonic", lambda: monotonic.seconds)
    recorder = RunRecorder(tmp_path, tensorboard=False, train_every_s=1.0)
    for publication in range(1, 25):  # eight publications a second for three seconds
        clock.seconds += 0.125
        monotonic.seconds += 0.125
        recorder.training(100 * publication, 10 * publication, weights_version=publication, metrics={"q": 1.0})
    recorder.close()
    records = train_records(tmp_path)
    assert [record["weights_version"] for record in records] == [1, 9, 17]
    assert records[1]["updates_per_s"] == pytest.approx(800.0)  # (900 - 100) updates over the 1 s between records


def test_a_status_file_that_cannot_be_written_is_logged_once_without_a_traceback_then_its_recovery(tmp_path, caplog):
    """An outside probe: a full disk logged a 15-line traceback every second (1.3 M lines a day)."""

    from tmrl_trainer.status import StatusFile

    full = {"disk": True}

    def snapshot():
        if full["disk"]:
            raise OSError(28, "No space left on device")
        return {"updates": 1}

    status = StatusFile(tmp_path / "status.json", snapshot, interval_s=0.01)
    with caplog.at_level("INFO", logger="tmrl_trainer.status"):
        status.start()
        time.sleep(0.3)
        full["disk"] = False
        deadline = time.monotonic() + 5
        while not (tmp_path / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        status.stop()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "No space left on device" in errors[0].getMessage() and "1 failure(s) in a row" in errors[0].getMessage()
    assert any("written again after" in r.getMessage() for r in caplog.records)


def test_metrics_records_the_disk_refuses_are_counted_and_logged_once_and_training_goes_on(tmp_path, caplog):
    """An outside probe filled the run directory's disk: the first refused ``metrics.jsonl`` line raised out of the
    trainer's loop (and out of the ingest thread, which then left the batch unanswered)."""
    (tmp_path / METRICS_FILE).symlink_to("/dev/full")  # every write: ENOSPC, from the kernel
    recorder = RunRecorder(tmp_path, tensorboard=False)
    with caplog.at_level("INFO", logger="tmrl_trainer.status"):
        recorder.start(updates=0, weights_version=0, checkpoint=None)
        for version in range(1, 4):
            recorder.training(100 * version, 10 * version, weights_version=version, metrics={"q": 1.0})
    recorder.close()
    assert recorder.write_failures() == {"metrics_records_lost": 4, "tensorboard_writes_failed": 0}
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "No space left on device" in errors[0].getMessage() and "this record is lost" in errors[0].getMessage()


class CutShortFile:
    """A raw file on a disk that fills up: takes ``room`` bytes, then refuses (ENOSPC) until ``room`` grows again."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.room = 10**6

    def write(self, chunk) -> int:
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        taken = bytes(chunk[:self.room])
        self.data += taken
        self.room -= len(taken)
        return len(taken)

    def close(self) -> None:
        pass


def test_a_metrics_record_cut_short_by_a_full_disk_is_ended_by_the_next_one_and_the_others_read_back(tmp_path,
                                                                                                      caplog):
    recorder = RunRecorder(tmp_path, tensorboard=False)
    disk = recorder._metrics = CutShortFile()
    recorder.training(100, 10, weights_version=1, metrics={})
    disk.room = 20  # the second record gets 20 bytes in, then the disk is full
    recorder.training(200, 20, weights_version=2, metrics={})
    recorder.training(300, 30, weights_version=3, metrics={})  # refused whole
    disk.room = 10**6  # space freed
    with caplog.at_level("INFO", logger="tmrl_trainer.status"):
        recorder.training(400, 40, weights_version=4, metrics={})
    (tmp_path / METRICS_FILE).write_bytes(bytes(disk.data))
    assert [r["weights_version"] for r in train_records(tmp_path)] == [1, 4]
    lines = bytes(disk.data).split(b"\n")
    assert len(lines[1]) == 20 and lines[2].startswith(b'{"kind": "train"')  # the cut line ended, then a whole one
    assert recorder.write_failures()["metrics_records_lost"] == 2
    assert "written again after 2 failed attempt(s)" in caplog.text


def test_a_record_a_killed_run_cut_short_is_ended_by_the_next_runs_first_one(tmp_path):
    """A storage probe: metrics.jsonl cut 20 bytes short (a run killed mid-write), then a restart; the new run's
    `start` record went onto the broken line and was lost with it."""
    first = RunRecorder(tmp_path, tensorboard=False)
    first.training(100, 10, weights_version=1, metrics={})
    first.training(200, 20, weights_version=2, metrics={})
    first.close()
    path = tmp_path / METRICS_FILE
    path.write_bytes(path.read_bytes()[:-20])
    second = RunRecorder(tmp_path, tensorboard=False)
    second.start(updates=100, weights_version=1, checkpoint="checkpoint-000000000100.safetensors")
    second.close()
    kinds = [(record["kind"], record["weights_version"]) for record in read_metrics(path)]
    assert kinds == [("train", 1), ("start", 1)]  # the cut record skipped, the new run's first one kept
    RunRecorder(tmp_path, tensorboard=False).close()  # a file that ends a line gets no empty one
    assert path.read_bytes().endswith(b'.safetensors"}\n') and b"\n\n" not in path.read_bytes()


def test_a_tensorboard_writer_the_disk_stopped_is_dropped_and_a_new_event_file_tried_later(tmp_path, caplog,
                                                                                            monkeypatch):
    """An outside probe filled the run directory's disk: TensorBoard's writer thread died with a traceback on stderr,
    and from then on every scalar raised its error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    later = SimpleNamespace(seconds=0.0)
    monkeypatch.setattr(metrics_module, "monotonic", lambda: later.seconds)
    printed = []  # what Python would print on stderr: the uncaught exceptions of threads
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
    board_dir = tmp_path / "tensorboard"
    board = TrainingMetrics(board_dir, reopen_after_s=60.0)
    board.log_episode(1, 5.0, 10, worker="w1")
    board._writer.flush()
    board_dir.rename(tmp_path / "kept")  # the writer opens its event file for every write: now it cannot
    board_dir.write_text("a file where the folder was")
    with caplog.at_level("INFO", logger="tmrl_trainer.metrics"):
        board.log_episode(2, 6.0, 10, worker="w1")  # taken by the writer thread, which fails on it and ends
        deadline = time.monotonic() + 10
        while board.failures.total == 0 and time.monotonic() < deadline:
            board.log_episode(3, 7.0, 10, worker="w1")  # raises the thread's error: counted, logged, writer dropped
            time.sleep(0.01)
        time.sleep(0.2)  # the writer thread has ended
        board.log_episode(4, 8.0, 10, worker="w1")  # within the minute: left out, nothing tried
        later.seconds = 61.0
        board.log_episode(5, 9.0, 10, worker="w1")  # a new writer cannot be made either: counted, not logged again
        board_dir.unlink()
        (tmp_path / "kept").rename(board_dir)
        later.seconds = 122.0
        board.log_episode(6, 10.0, 10, worker="w1")  # a new writer, a new event file
    board.close()
    assert board.failures.total == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "Errno" in errors[0].getMessage()
    assert "written again after 2 failed attempt(s)" in caplog.text
    assert printed == []  # the writer thread's end is not printed: the one-line error above says it
    files = sorted(board_dir.glob("events.out.tfevents.*"))
    assert len(files) == 2
    steps = []
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        steps += [event.step for event in events.Scalars("episode_return/w1")]
    assert sorted(steps) == [1, 6]
