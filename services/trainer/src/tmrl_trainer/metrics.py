"""TensorBoard scalars for a training run: SAC losses, alpha, Q values, episode returns, updates/s and samples/s."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from time import monotonic

from torch.utils.tensorboard import SummaryWriter

from tmrl_trainer.write_failures import WriteFailures

log = logging.getLogger(__name__)

REOPEN_AFTER_S = 60.0
"""After a write fails, TensorBoard's writer is closed and a new one (a new event file) tried this long after."""


EVENT_WRITER_THREAD = "_AsyncWriterThread"
"""The class of TensorBoard's event writer thread (``tensorboard.summary.writer.event_file_writer``)."""


def _quiet_event_writer_errors() -> None:
    """A write error (a full disk) ends TensorBoard's writer thread, which re-raises it, and Python prints its
    traceback on stderr; the same error reaches :class:`TrainingMetrics` at its next call, which logs it in one line.
    Install, once per process, a :func:`threading.excepthook` that drops the ``OSError`` of that thread only."""
    previous = threading.excepthook
    if getattr(previous, "drops_event_writer_errors", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == EVENT_WRITER_THREAD:
            return
        previous(args)

    hook.drops_event_writer_errors = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TrainingMetrics:
    """Writes scalars under ``log_dir`` (``tensorboard --logdir <log_dir>``); a ``None`` directory logs nothing.

    Tags: ``sac/<metric>`` for learner metrics, ``episode/return`` and ``episode/length`` for finished training
    episodes (and ``episode_return/<worker>`` when the worker is given), ``eval/return`` for deterministic
    evaluations, ``speed/updates_per_s`` and ``speed/samples_per_s``.

    Rates are measured from a baseline: the counts ``updates_at_start`` and ``samples_at_start`` at construction, or
    those given to :meth:`set_rate_baseline` (a resumed run, whose update count continues the checkpoint's), then the
    previous :meth:`log_rates` call. So the first rates of a run count only that run's progress.

    A disk that refuses TensorBoard's event file (full, a quota) stops its writer thread, and from then on every
    ``add_scalar`` raises that error. Here the failure is counted and logged (:attr:`failures`), the writer closed,
    the scalars until :data:`REOPEN_AFTER_S` later left out, and then a new writer (a new event file in the same
    folder, which TensorBoard reads with the others) tried: training goes on.
    """

    def __init__(self, log_dir: str | Path | None, flush_secs: int = 10, updates_at_start: int = 0,
                 samples_at_start: int = 0, reopen_after_s: float = REOPEN_AFTER_S) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.flush_secs = flush_secs
        self.reopen_after_s = reopen_after_s
        self.failures = WriteFailures(log, f"TensorBoard's event file under {self.log_dir}",
                                      f"its scalars are left out and a new event file is tried in {reopen_after_s:g} s")
        self._failed_at: float | None = None
        if self.log_dir is not None:
            _quiet_event_writer_errors()
        self._writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs) if self.log_dir is not None else None
        self.set_rate_baseline(updates_at_start, samples_at_start)

    def set_rate_baseline(self, updates: int, samples: int) -> None:
        """Measure the next rates from now and these running totals (e.g. the updates a resumed learner starts from)."""
        self._rate_time = time.perf_counter()
        self._rate_updates = updates
        self._rate_samples = samples

    def _scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write ``values`` (tag → value) at ``step``, or count and log why not (see the class docstring)."""
        if self.log_dir is None or not values:
            return
        reopened = False
        try:
            if self._writer is None:
                if self._failed_at is not None and monotonic() - self._failed_at < self.reopen_after_s:
                    return
                self._writer, reopened = SummaryWriter(str(self.log_dir), flush_secs=self.flush_secs), True
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            if reopened:
                self._writer.flush()  # waits for the writer thread: the disk takes events again, or this raises
        except Exception as exc:  # noqa: BLE001 - the writer thread's error (a full disk), raised at every later call
            self._failed(exc)
            return
        self.failures.succeeded()

    def _failed(self, exc: BaseException) -> None:
        self.failures.failed(exc)
        self._failed_at = monotonic()
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001, S110 - it fails with the same error; the writer is dropped either way
                pass

    def log_update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Learner metrics (as returned by :meth:`Learner.update <tmrl_trainer.learner.Learner.update>`) at ``step``."""
        self._scalars(step, {f"sac/{name}": value for name, value in metrics.items()})

    def log_episode(self, step: int, episode_return: float, length: int, worker: str | None = None) -> None:
        """A finished training episode (of ``worker``: also under ``episode_return/<worker>``)."""
        values = {"episode/return": episode_return, "episode/length": length}
        if worker is not None:
            values[f"episode_return/{worker}"] = episode_return
        self._scalars(step, values)

    def log_evaluation(self, step: int, mean_return: float) -> None:
        """The mean return of a deterministic evaluation."""
        self._scalars(step, {"eval/return": mean_return})

    def log_rates(self, step: int, updates: int, samples: int) -> dict[str, float]:
        """Updates/s and samples/s since the previous call (the first call: since the baseline), given the running
        totals ``updates`` and ``samples``."""
        now = time.perf_counter()
        elapsed = max(now - self._rate_time, 1e-9)
        rates = {"updates_per_s": (updates - self._rate_updates) / elapsed,
                 "samples_per_s": (samples - self._rate_samples) / elapsed}
        self._rate_time, self._rate_updates, self._rate_samples = now, updates, samples
        self._scalars(step, {f"speed/{name}": value for name, value in rates.items()})
        return rates

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()  # flushes: the disk may refuse that too
            except Exception as exc:  # noqa: BLE001 - the run's other files are still to be closed
                self.failures.failed(exc)
