"""The relay's open files: every connection holds one, and at the process's limit libzmq can accept no more.

An outside probe held 1,099 silent connections against a relay started under ``ulimit -n 1024``: no new peer got
in for 45 s, libzmq retried its failed ``accept`` in a busy loop (about 1.4 million failures in 6 s here, two cores
busy) and nothing was logged or counted; the relay recovered within a second once the connections closed. So:

* :func:`raise_open_file_limit` lifts the soft limit to the hard one, up to :data:`WANTED_OPEN_FILES` (what the
  systemd unit sets), at start, and says when the hard limit leaves the relay few connections;
* :class:`OpenFilesWatch` counts the open files now and then (Linux: ``/proc/self/fd``), for the
  ``tmrl_relay_open_files`` gauge, and warns (at most once a minute) from :data:`WARN_FRACTION` of the limit on.

The relay cannot make libzmq refuse connections before the limit, nor stop its accept loop at it; the limit, the
warning and the gauge are what it has (docs/security.md, "connections").
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

WANTED_OPEN_FILES = 65_536
"""The soft open-file limit the relay raises itself to when the hard limit allows (the systemd unit's LimitNOFILE)."""
FEW_OPEN_FILES = 4_096
"""A hard limit below this is said at start: a few thousand connections exhaust it."""
WARN_FRACTION = 0.9
"""Open files at this fraction of the limit or more are warned about."""
WARN_EVERY_S = 60.0
COUNT_EVERY_S = 2.0
"""Counting ``/proc/self/fd`` costs about a millisecond per thousand files: every 2 s at most."""
_FD_FOLDER = Path("/proc/self/fd")


def raise_open_file_limit() -> int | None:
    """Lift the soft ``RLIMIT_NOFILE`` towards :data:`WANTED_OPEN_FILES` (no further than the hard limit); return the
    soft limit in force, ``None`` where the platform has none (Windows)."""
    try:
        import resource
    except ImportError:  # Windows: no per-process soft limit of this kind
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(WANTED_OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("open-file limit raised from %d to %d (each connection holds one)", soft, wanted)
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d (%s)", soft, wanted, exc)
    if soft != resource.RLIM_INFINITY and soft < FEW_OPEN_FILES:
        log.warning("the open-file limit is %d (hard limit %s): the relay can hold about that many connections, and "
                    "at the limit no new peer gets in; raise it (`ulimit -n`, or LimitNOFILE as the systemd unit "
                    "sets)", soft, "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return None if soft == resource.RLIM_INFINITY else soft


class OpenFilesWatch:
    """Counts the process's open files every :data:`COUNT_EVERY_S` (where ``/proc/self/fd`` exists) against
    ``limit`` and warns from :data:`WARN_FRACTION` of it on (see the module docstring)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.enabled = limit is not None and _FD_FOLDER.is_dir()
        self.open_files: int | None = None
        self._counted_at = float("-inf")
        self._warned_at = float("-inf")

    def check(self, now: float | None = None) -> int | None:
        """The open files now (counted at most every :data:`COUNT_EVERY_S`; ``None`` where they cannot be)."""
        if not self.enabled:
            return None
        now = time.monotonic() if now is None else now
        if now - self._counted_at < COUNT_EVERY_S:
            return self.open_files
        self._counted_at = now
        try:
            self.open_files = len(os.listdir(_FD_FOLDER))
        except OSError:  # at the limit, listing the folder needs a file descriptor too
            self.open_files = self.limit
        assert self.limit is not None
        if self.open_files >= WARN_FRACTION * self.limit and now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("%d open files of the limit %d: each connection holds one, and at the limit no new peer gets "
                        "in (libzmq then retries its accepts in a busy loop) until some close. Many connections that "
                        "send nothing are an attack or a leak (tmrl_relay_open_files); raise the limit (`ulimit -n`, "
                        "LimitNOFILE) if they are peers", self.open_files, self.limit)
        return self.open_files
