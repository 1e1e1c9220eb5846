"""The run recorder's ``train`` records: updates/s and samples/s measure this run's progress, also after a resume."""

from __future__ import annotations

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
    import time

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
