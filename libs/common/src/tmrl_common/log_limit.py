"""A log that a peer cannot flood: the first message of each key is logged, later ones within an interval are only
counted, and the count is logged with the next one after the interval or, when none comes, by :meth:`flush`.

The relay keys its rejects by (link, reason, connection) and the trainer its refused batches by (worker, reason): a
peer that sends a thousand bad messages a second costs a line every few seconds, while the counters (and the
``error`` or ``sample_ack`` answers) still carry every one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

LOG_EVERY_S = 5.0
MAX_KEYS = 4096
"""Keys remembered at once; past this the counts are reported and forgotten (keys may hold ids a peer picked)."""


class RateLimitedLog:
    """Logs to ``logger``: the first occurrence of each key, then at most one line per ``interval_s`` with the count
    of those in between. Thread-safe; :meth:`flush` (call it now and then) reports the count of a key that stopped
    coming, with the last message it held back, so that no burst ends unreported."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_EVERY_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[Any, tuple[float, int]] = {}
        self._held: dict[Any, tuple[int, str, tuple[Any, ...], float]] = {}
        """Key → the last message held back under it (level, format, arguments, when), until its count is reported."""

    def due(self, key: Any) -> bool:
        """Whether a line under ``key`` would be logged now (not held back): e.g. to charge a :class:`LineBudget` only
        for the lines that would be written."""
        with self._lock:
            return time.monotonic() - self._last.get(key, (float("-inf"), 0))[0] >= self.interval_s

    def warning(self, key: Any, message: str, *args: Any) -> None:
        self.log(logging.WARNING, key, message, *args)

    def log(self, level: int, key: Any, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._last) > MAX_KEYS:
                self._flush(now, everything=True)
                self._last.clear()
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self.interval_s:
                self._last[key] = (last, held + 1)
                self._held[key] = (level, message, args, now)
                return
            self._last[key] = (now, 0)
            self._held.pop(key, None)
        suffix = f" (+{held} similar in the last {self.interval_s:.0f}s)" if held else ""
        self.logger.log(level, message + suffix, *args)

    def flush(self, now: float | None = None) -> None:
        """Log each key's held-back count whose interval is over, with the last message it held back."""
        with self._lock:
            self._flush(time.monotonic() if now is None else now)

    def _flush(self, now: float, everything: bool = False) -> None:
        for key, (level, message, args, held_at) in list(self._held.items()):
            last, held = self._last.get(key, (now, 0))
            if everything or now - last >= self.interval_s:
                del self._held[key]
                self._last[key] = (now, 0)
                # when it happened: a summary logged after the cause went away must not read as current (a chaos
                # probe saw a worker's refusals reported 2 s after it had its id back)
                self.logger.log(level, message + f" (the last of {held} like it in {self.interval_s:.0f}s, "
                                f"{max(0.0, now - held_at):.1f} s ago)", *args)


class LineBudget:
    """At most ``lines`` log lines per ``window_s`` for a group of keys that no one key's limit bounds, since a peer
    can pick new keys (new worker ids, new CurveZMQ keys): :meth:`take` says whether one more fits; past the budget
    the caller logs under one shared key of its :class:`RateLimitedLog` instead, so a flood costs a line per
    interval. Thread-safe."""

    def __init__(self, lines: int = 20, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=lines)
        self._lock = threading.Lock()

    def exceeded(self, what: str) -> str:
        """``more than 20 hellos in 10 s``: the words for a line logged past the budget."""
        return f"more than {self._times.maxlen} {what} in {self.window_s:.0f} s"

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._times) == self._times.maxlen and now - self._times[0] < self.window_s:
                return False
            self._times.append(now)
            return True
