"""How far a sending worker got, kept current on disk after every step, so that the next run can say what a crash lost.

``state_dir/<worker_id>.progress.json`` holds one JSON object that the rollout loop rewrites in place after every step
(a fixed-size record copied into a shared memory map of the file, about 3 us, no system call and no fsync: the page
cache keeps it across a SIGKILL of the worker, which is the case it is for; a power loss may leave an older record, and
a reader racing a live worker may see a torn one):

* ``pid``, ``started_at``, ``updated_at`` (unix seconds) and ``running`` (``false`` once the worker stopped cleanly);
* ``steps`` and ``resets`` of the environment; each made one row, so ``rows_built == steps + resets``;
* ``rows_handed_over`` and ``batches_handed_over``: rows in the batches given to the sender thread, which numbers,
  spools (on disk too with ``durable_spool``) and sends them;
* ``rows_unfinished``: rows of the batch being filled, not yet a batch: what dies with the process.

A worker that starts and finds a record still ``running`` (its previous run was killed or crashed) logs what that run
had built and what it lost (see :func:`describe_unclean_stop`) before it overwrites the record.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError
from tmrl_common.atomic_file import read_regular_file

log = logging.getLogger(__name__)

RECORD_BYTES = 512
"""Fixed size of the record on disk (JSON padded with spaces): each update overwrites the whole previous one."""

_FORMAT = (b'{"pid": %d, "started_at": %.3f, "updated_at": %.3f, "running": %s, "steps": %d, "resets": %d, '
           b'"rows_built": %d, "rows_handed_over": %d, "batches_handed_over": %d, "rows_unfinished": %d}')
"""Bytes %-formatting: about 1 us per record, a quarter of ``str.format`` with keywords (it runs after every step)."""


class WorkerProgress(BaseModel):
    """One progress record (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    started_at: float
    updated_at: float
    running: bool
    steps: int
    resets: int
    rows_built: int
    rows_handed_over: int
    batches_handed_over: int
    rows_unfinished: int


class ProgressFileError(ValueError):
    """A progress file exists but does not hold a progress record."""


def progress_path(state_dir: Path, worker_id: str) -> Path:
    return Path(state_dir).expanduser() / f"{worker_id}.progress.json"


def read_progress(path: Path) -> WorkerProgress | None:
    """The record in ``path``; ``None`` when there is no file (:class:`ProgressFileError` when it cannot be read)."""
    try:
        text = read_regular_file(path).decode("utf-8")  # a FIFO there would block the start for ever
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProgressFileError(f"progress file {path} cannot be read: {exc}") from exc
    try:
        return WorkerProgress.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise ProgressFileError(f"progress file {path} holds no progress record: {exc}") from exc


def describe_unclean_stop(previous: WorkerProgress, durable_spool: bool, restored_batches: int = 0) -> str:
    """What a run that did not stop cleanly had built and what it lost, for the log of the run after it
    (``restored_batches``: the unacknowledged batches the durable spool loaded from disk)."""
    if not durable_spool:
        fate = ("the batches it handed over that were not acknowledged yet were in its in-memory spool and are lost "
                "(durable_spool is off)")
    elif restored_batches:
        fate = f"the {restored_batches} unacknowledged batch(es) its durable spool kept on disk are sent again now"
    else:
        fate = "its durable spool kept no unacknowledged batch on disk, so none is sent again"
    return (f"the previous run (pid {previous.pid}) did not stop cleanly; at its last step it had taken "
            f"{previous.steps} steps and {previous.resets} resets, built {previous.rows_built} rows, handed over "
            f"{previous.rows_handed_over} rows in {previous.batches_handed_over} batches, and had "
            f"{previous.rows_unfinished} rows in its unfinished batch (lost); {fate}")


class ProgressFile:
    """Writer of the progress record: :meth:`update` after every step, :meth:`close` at a clean stop."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pid = os.getpid()
        self._started_at = time.time()
        self._map: mmap.mmap | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
            try:
                # a real write first: the page is then backed on disk, so a full disk fails here, with an OSError,
                # and never later as a SIGBUS when the mapped page is written (which is what a sparse page would risk)
                first = self._record(0, 0, 0, 0, 0, 0, running=True)
                if os.write(descriptor, first) != RECORD_BYTES:
                    raise OSError(f"short write of the first {RECORD_BYTES}-byte record")
                self._map = mmap.mmap(descriptor, RECORD_BYTES, access=mmap.ACCESS_WRITE)
            finally:
                os.close(descriptor)  # the mapping keeps the file
        except OSError as exc:  # the record is a report, not the data: rollouts go on without it
            log.warning("progress file %s cannot be written (%s); this run keeps no progress record", self.path, exc)

    def _record(self, steps: int, resets: int, rows_built: int, rows_handed_over: int, batches_handed_over: int,
                rows_unfinished: int, running: bool) -> bytes:
        text = _FORMAT % (self._pid, self._started_at, time.time(), b"true" if running else b"false", steps, resets,
                          rows_built, rows_handed_over, batches_handed_over, rows_unfinished)
        record = text.ljust(RECORD_BYTES - 1) + b"\n"
        if len(record) > RECORD_BYTES:  # ~250 bytes of JSON with 19-digit counters: cannot happen
            raise ValueError(f"progress record over {RECORD_BYTES} bytes: {text!r}")
        return record

    def update(self, steps: int, resets: int, rows_built: int, rows_handed_over: int, batches_handed_over: int,
               rows_unfinished: int, running: bool = True) -> None:
        if self._map is None:
            return
        # a copy into the shared page: no system call, so the GIL stays with the rollout loop
        self._map[:] = self._record(steps, resets, rows_built, rows_handed_over, batches_handed_over, rows_unfinished,
                                    running)

    def close(self) -> None:
        """Stop updating (the last record stays in the file)."""
        if self._map is not None:
            self._map.close()
            self._map = None
