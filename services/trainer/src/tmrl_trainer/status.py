"""What the trainer reports while it runs, in three places under its ``run_dir``:

* ``status.json``: a snapshot rewritten atomically every ``interval`` seconds (:class:`StatusFile`): updates done,
  weights version published, samples stored, and per worker the batches/steps received, the weights version carried
  by its latest batch, episodes and the last return. Other tools (the demo, the end-to-end test, an operator's
  ``watch cat``) read it; they never see half a file.
* ``metrics.jsonl``: one JSON object per line (:class:`RunRecorder`): ``{"kind": "episode", ...}`` for every finished
  episode of every worker, ``{"kind": "train", ...}`` for learner metrics and ``{"kind": "start", ...}`` where each
  trainer process begins (the update count and checkpoint it resumed from). Append-only; the demo's learning curve
  is drawn from it.
* ``tensorboard/``: the same values as TensorBoard scalars (``episode_return/<worker>``, ``train/<metric>``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tmrl_trainer.ingest import EpisodeRecord
from tmrl_trainer.metrics import TrainingMetrics
from tmrl_trainer.tensor_file import write_atomically
from tmrl_trainer.write_failures import WriteFailures

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _ends_mid_line(path: Path) -> bool:
    """Whether the file at ``path`` is not empty and its last byte is not a newline (False when it cannot be read:
    the first write says what is wrong)."""
    try:
        with open(path, "rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except OSError:
        return False


class RunRecorder:
    """Appends episode and training records to ``metrics.jsonl`` and TensorBoard
    (:class:`~tmrl_trainer.metrics.TrainingMetrics`, plus ``episode_return/<worker>``). Thread-safe.

    The ``updates_per_s`` and ``samples_per_s`` of a ``train`` record are measured since the previous one; the first
    record's since the rate baseline: 0 updates and 0 samples when the recorder was made, unless a resumed trainer
    calls :meth:`set_rate_baseline` with the update count it resumed from.

    ``train_every_s`` > 0 keeps at most one ``train`` record (file and TensorBoard) per that many seconds: the
    trainer calls :meth:`training` at every weights publication, which a fast trainer does ten times a second or
    more (at 1,000 updates/s and ``publish_every`` 100, about 400 MB of records a day otherwise). A record left out
    is not lost work: the next one's rates cover its span, and its losses are those of the update it was made at.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, train_every_s: float = 0.0) -> None:
        self.run_dir = Path(run_dir)
        self.train_every_s = train_every_s
        self._last_train_record = float("-inf")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        path = self.run_dir / METRICS_FILE
        self._metrics = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close(); unbuffered: see _write
        self._torn = _ends_mid_line(path)
        """Whether the file ends in part of a record (a write the disk cut short, this process's or a killed one's):
        the next record starts a line. A storage probe: a previous run's cut-short last line took the next run's
        ``start`` record with it."""
        self.lost = WriteFailures(log, str(path), "this record is lost")
        self._started = time.time()
        self._board = TrainingMetrics(self.run_dir / TENSORBOARD_DIR if tensorboard else None)
        self._samples = 0

    def _write(self, record: dict[str, Any]) -> None:
        """Append one line. Unbuffered, so that a write the disk refuses (full, a quota) loses this record only, is
        counted in :attr:`lost` and logged, and training goes on; a record cut short leaves a partial line, which
        the next record ends first (:func:`read_metrics` skips it)."""
        line = json.dumps(record, allow_nan=False).encode() + b"\n"
        with self._lock:
            data = b"\n" + line if self._torn else line
            written = 0
            try:
                while written < len(data):
                    written += self._metrics.write(memoryview(data)[written:])
            except OSError as exc:
                if written:
                    self._torn = data[written - 1:written] != b"\n"
                self.lost.failed(exc)
                return
            self._torn = False
        self.lost.succeeded()

    def start(self, updates: int, weights_version: int, checkpoint: str | None) -> None:
        """A ``start`` record: where this process's records continue from. After a crash, the records the killed
        run wrote past its last checkpoint stay in the file, so ``updates`` may go back at this line."""
        now = time.time()
        self._write({"kind": "start", "time": now, "elapsed_s": 0.0, "updates": updates,
                     "weights_version": weights_version, "checkpoint": checkpoint})

    def episode(self, record: EpisodeRecord) -> None:
        self._write({
            "kind": "episode", "time": record.finished_at, "elapsed_s": record.finished_at - self._started,
            "worker": record.worker, "return": record.episode_return, "length": record.length,
            "worker_steps": record.worker_steps, "weights_version": record.weights_version,
        })
        with self._lock:
            self._board.log_episode(record.worker_steps, record.episode_return, record.length, worker=record.worker)

    def set_rate_baseline(self, updates: int, samples: int) -> None:
        """Measure the next rates from now and these running totals: call it once a resumed trainer knows the update
        count its learner continues from (``samples``: the count this run's :meth:`training` calls start from)."""
        with self._lock:
            self._board.set_rate_baseline(updates, samples)

    def training(self, updates: int, samples: int, weights_version: int, metrics: dict[str, float]) -> None:
        clock = time.monotonic()
        if clock - self._last_train_record < self.train_every_s:
            return
        self._last_train_record = clock
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        now = time.time()
        with self._lock:
            rates = self._board.log_rates(updates, updates, samples)
            self._board.log_update(updates, finite)
        self._write({"kind": "train", "time": now, "elapsed_s": now - self._started, "updates": updates,
                     "samples": samples, "weights_version": weights_version, **finite, **rates})

    def write_failures(self) -> dict[str, int]:
        """What the disk refused so far (``records`` in ``status.json``): ``metrics_records_lost``, lines of
        ``metrics.jsonl`` not written, and ``tensorboard_writes_failed``, TensorBoard writes that failed."""
        return {"metrics_records_lost": self.lost.total, "tensorboard_writes_failed": self._board.failures.total}

    def close(self) -> None:
        with self._lock:
            self._metrics.close()
            self._board.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file; a torn last line (writer killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class StatusFile:
    """Rewrites ``status.json`` atomically every ``interval_s`` seconds from ``snapshot()`` on its own thread."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]], interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.snapshot = snapshot
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-file", daemon=True)
        self.failures = WriteFailures(log, str(self.path), f"it is retried every {interval_s:g} s")

    def write_now(self) -> None:
        status = {"updated_at": time.time(), **self.snapshot()}
        write_atomically(self.path, json.dumps(status, indent=1, sort_keys=True, allow_nan=False).encode())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write_now()
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop training: say so (once a minute), retry
                self.failures.failed(exc)
            else:
                self.failures.succeeded()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        try:  # the last snapshot: a run directory gone read-only must not cut the rest of the shutdown short
            self.write_now()
        except OSError as exc:
            log.error("could not write the final %s (%s)", self.path, exc)


def read_status(path: Path) -> dict[str, Any] | None:
    """The last ``status.json`` written, or ``None`` when there is none yet."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
