"""Writes that fail while the trainer runs (a full disk, a quota, a folder gone read-only): counted, logged without a
traceback at most once per :data:`ERROR_LOG_INTERVAL_S`, and the first write that works again after them said once.
Training goes on; the next write tries again. Used for ``status.json``, ``metrics.jsonl``, TensorBoard and
``policy.safetensors`` (checkpoints have their own handling: :meth:`TrainerService._checkpoint`)."""

from __future__ import annotations

import logging
import math
import threading
import time

ERROR_LOG_INTERVAL_S = 60.0
"""A file that cannot be written is logged at most once per this long, without a traceback."""


class WriteFailures:
    """The failed writes of one file or folder. ``what`` names it in the log (``"metrics.jsonl under runs/x"``);
    ``after`` says what the failure means for the run (``"this record is lost"``). A disk that is nearly full fails
    some writes and takes others (pruned checkpoints free room for a moment): such a file is logged once per
    :data:`ERROR_LOG_INTERVAL_S` whatever the successes in between, and each logged failure gets one line when
    the file is written again. Thread-safe."""

    def __init__(self, logger: logging.Logger, what: str, after: str) -> None:
        self.logger = logger
        self.what = what
        self.after = after
        self.total = 0
        """Writes that failed since the trainer started (``status.json`` reports it)."""
        self.in_a_row = 0
        self._last_log = -math.inf
        self._logged = False
        """Whether a failure was logged and no success since: the next success is said."""
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.total += 1
            self.in_a_row += 1
            now = time.monotonic()
            if now - self._last_log < ERROR_LOG_INTERVAL_S:
                return
            self._last_log, self._logged = now, True
            in_a_row, total = self.in_a_row, self.total
        self.logger.error("could not write %s (%s: %s): %s; %d failure(s) in a row, %d since the start; training goes "
                          "on and the next write tries again (said at most once a minute): free disk space or fix "
                          "the folder's permissions", self.what, type(exc).__name__, exc, self.after, in_a_row, total)

    def succeeded(self) -> None:
        with self._lock:
            in_a_row, logged = self.in_a_row, self._logged
            self.in_a_row, self._logged = 0, False
        if logged:
            self.logger.info("%s written again after %d failed attempt(s)", self.what, in_a_row)
