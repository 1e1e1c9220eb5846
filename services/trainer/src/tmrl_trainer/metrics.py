"""TensorBoard scalars for a training run: SAC losses, alpha, Q values, episode returns, updates/s and samples/s."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TrainingMetrics:
    """Writes scalars under ``log_dir`` (``tensorboard --logdir <log_dir>``); a ``None`` directory logs nothing.

    Tags: ``sac/<metric>`` for learner metrics, ``episode/return`` and ``episode/length`` for finished training
    episodes, ``eval/return`` for deterministic evaluations, ``speed/updates_per_s`` and ``speed/samples_per_s``.

    Rates are measured from a baseline: the counts ``updates_at_start`` and ``samples_at_start`` at construction, or
    those given to :meth:`set_rate_baseline` (a resumed run, whose update count continues the checkpoint's), then the
    previous :meth:`log_rates` call. So the first rates of a run count only that run's progress.
    """

    def __init__(self, log_dir: str | Path | None, flush_secs: int = 10, updates_at_start: int = 0,
                 samples_at_start: int = 0) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs) if self.log_dir is not None else None
        self.set_rate_baseline(updates_at_start, samples_at_start)

    def set_rate_baseline(self, updates: int, samples: int) -> None:
        """Measure the next rates from now and these running totals (e.g. the updates a resumed learner starts from)."""
        self._rate_time = time.perf_counter()
        self._rate_updates = updates
        self._rate_samples = samples

    def log_update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Learner metrics (as returned by :meth:`Learner.update <tmrl_trainer.learner.Learner.update>`) at ``step``."""
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"sac/{name}", value, step)

    def log_episode(self, step: int, episode_return: float, length: int) -> None:
        """A finished training episode."""
        if self._writer is not None:
            self._writer.add_scalar("episode/return", episode_return, step)
            self._writer.add_scalar("episode/length", length, step)

    def log_evaluation(self, step: int, mean_return: float) -> None:
        """The mean return of a deterministic evaluation."""
        if self._writer is not None:
            self._writer.add_scalar("eval/return", mean_return, step)

    def log_rates(self, step: int, updates: int, samples: int) -> dict[str, float]:
        """Updates/s and samples/s since the previous call (the first call: since the baseline), given the running
        totals ``updates`` and ``samples``."""
        now = time.perf_counter()
        elapsed = max(now - self._rate_time, 1e-9)
        rates = {"updates_per_s": (updates - self._rate_updates) / elapsed,
                 "samples_per_s": (samples - self._rate_samples) / elapsed}
        self._rate_time, self._rate_updates, self._rate_samples = now, updates, samples
        if self._writer is not None:
            for name, value in rates.items():
                self._writer.add_scalar(f"speed/{name}", value, step)
        return rates

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
