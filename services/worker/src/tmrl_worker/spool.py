"""Unacknowledged sample batches kept for resending, and sequence numbers that are never reused.

:class:`Spool` holds the encoded frames of every batch sent but not yet acknowledged by the trainer, bounded both in
batch count and in bytes. When a bound is hit the **oldest** batch is dropped; drops are counted and logged, never
silent. :meth:`Spool.due` says which batches to resend after the ack timeout; :meth:`Spool.pending` lists them all
(resend everything after a reconnection).

With a ``directory`` (``durable_spool = true``), the spool also keeps each batch on disk until it is acknowledged:
``<seq>.batch`` holds the batch's frames as one msgpack array of byte strings (never pickle), written atomically
(fsync, then rename) before the batch is first sent, and deleted when it is acknowledged or dropped. A worker that
restarts with the same directory, after a crash or a SIGKILL, loads those files and resends them; the trainer
stores each ``(worker, seq)`` once. A file that cannot be read, or whose batch holds another seq than its name (it
could never be acknowledged), is renamed ``<name>.unreadable``, counted and logged, never resent; a failed write is counted and logged, and that batch stays in memory only. The temporary file of a
write that a kill cut short (before its rename, so the batch was never sent) is removed at the next start.

:class:`SequenceCounter` hands out ``seq`` numbers that a worker id never reuses, restarts included. It persists a
*reservation* in a small JSON state file (``{"worker_id": ..., "reserved_until": N}``, written atomically with
``os.replace``): numbers below ``reserved_until`` may have been used, so a restarted worker starts at
``reserved_until`` and reserves the next block. One file write per ``block`` batches; a crash wastes at most one
block of numbers (the trainer's dedupe tolerates gaps). A worker without a state file (a first start, a container
without a persistent ``state_dir``, a file deleted) starts at the clock, in microseconds since 1970: above every
number an earlier run under that id can have used (it sent far fewer than one batch per microsecond), so the trainer
never takes its batches for duplicates of the earlier run's and drops them (an outside probe lost a restarted
worker's first batches that way when it started again at 0).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from filelock import FileLock, Timeout
from tmrl_common.atomic_file import DISK_FULL_ERRNOS, NotARegularFileError, read_regular_file, write_atomically
from tmrl_common.log_limit import RateLimitedLog
from tmrl_common.protocol import batch_seq_of

log = logging.getLogger(__name__)

MAX_BACKOFF = 8
"""A batch resent n times waits ``ack_timeout_s * min(2**n, MAX_BACKOFF)`` before its next resend."""


class StateFileError(RuntimeError):
    """The worker state file exists but cannot be read; fix or delete it (deleting it restarts the numbering from the clock)."""


class ReservationError(OSError):
    """A new block of sequence numbers could not be reserved in the state file (a full disk, a folder gone
    read-only): no number past the last reservation is handed out, since a crash could then reuse it. Retry later."""


@dataclass
class SpooledBatch:
    """One sent batch waiting for its acknowledgement."""

    seq: int
    frames: list[bytes]
    nbytes: int
    last_sent: float = 0.0
    sends: int = 0
    spooled_at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when this process spooled it (built, or read back from the durable spool)."""


@dataclass
class SpoolCounters:
    """Monotonic counters, reported in heartbeats and logs."""

    added: int = 0
    acked: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    resent: int = 0
    unknown_acks: int = 0
    refused: int = 0
    """Batches the trainer answered ``rejected`` (dropped, never resent, not counted in ``acked``)."""
    restored: int = 0
    """Batches loaded from the spool directory at start (sent again)."""
    unreadable_files: int = 0
    """Spool files that could not be read at start (renamed ``*.unreadable``, not sent)."""
    write_errors: int = 0
    """Batches that could not be written to the spool directory (kept in memory only)."""


_BATCH_FILE = re.compile(r"^(.*)\.batch$", re.IGNORECASE)
"""Any name ending in ``.batch``: the ones that are not ``<seq>.batch`` as the spool writes it are set aside."""
_UNFINISHED_WRITE = re.compile(r"^\.\d{1,19}\.batch\..+\.tmp$")
"""A temporary file of ``write_atomically`` that a killed run left before renaming it (never a complete batch)."""


class Spool:
    """Bounded FIFO of unacknowledged batches (by count and by bytes); drops the oldest when full. With a
    ``directory``, batches are also kept on disk until acknowledged (see the module docstring)."""

    def __init__(self, max_batches: int, max_bytes: int, owner: str = "worker", directory: Path | None = None) -> None:
        if max_batches < 1 or max_bytes < 1:
            raise ValueError(f"spool bounds must be positive, got max_batches={max_batches} max_bytes={max_bytes}")
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.owner = owner
        self.counters = SpoolCounters()
        self._batches: OrderedDict[int, SpooledBatch] = OrderedDict()
        self._bytes = 0
        self.unwritten: set[int] = set()
        """Spooled seqs whose file could not be written (a full disk): held in memory only, lost if the process ends."""
        self.highest_restored: int | None = None
        """The highest seq restored from the directory: the sequence counter must hand out numbers above it."""
        self._log = RateLimitedLog(log, interval_s=10.0)  # spool-full and write-error lines: one per burst
        self.directory = Path(directory).expanduser() if directory is not None else None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file where the folder should be: a traceback before (an outside probe)
                raise StateFileError(f"spool directory {self.directory} cannot be used: {exc.strerror or exc} (move "
                                     "what is there aside, or set [worker] state_dir)") from exc
            self._restore()

    # ------------------------------------------------------------------------------------------------- on disk

    def _file(self, seq: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{seq:012d}.batch"

    def _restore(self) -> None:
        """Load the batches a previous run left unacknowledged, oldest seq first."""
        assert self.directory is not None
        for path in self.directory.iterdir():
            if _UNFINISHED_WRITE.match(path.name):  # the run was killed while writing it: the batch was never sent
                try:
                    path.unlink()
                    log.info("%s: removed %s, a spool file whose write was cut short by the end of the previous run",
                             self.owner, path)
                except OSError as exc:
                    log.warning("%s: could not remove the unfinished spool file %s: %s", self.owner, path, exc)
        named = [(m.group(1), path) for path in self.directory.iterdir() if (m := _BATCH_FILE.match(path.name))]
        found = sorted((int(stem) if stem.isascii() and stem.isdigit() else -1, path) for stem, path in named)
        for seq, path in found:
            try:
                if seq < 0 or path.name != self._file(seq).name:  # 007.batch, +7.batch, 7.BATCH: an ack deletes
                    # the name the spool writes, so such a file would be sent at every start and never deleted
                    raise ValueError("not a name this spool writes (<seq>.batch, the seq in 12 or more digits)")
                frames = msgpack.unpackb(read_regular_file(path), raw=False)  # a FIFO there would block for ever
                if not (isinstance(frames, list) and len(frames) == 2 and all(isinstance(f, bytes) for f in frames)):
                    raise ValueError("not an array of 2 byte strings")
                inside = batch_seq_of(frames[1])
                if inside != seq:  # acknowledged by the seq inside, never by the name: it would be resent for ever
                    raise ValueError(f"its name says seq {seq}, but the batch inside holds "
                                     f"{'no seq' if inside is None else f'seq {inside}'}")
            except (OSError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
                self.counters.unreadable_files += 1
                log.warning("%s: spool file %s is unreadable (%s); renamed *.unreadable, not sent", self.owner, path,
                            exc)
                try:
                    path.rename(path.with_name(path.name + ".unreadable"))
                except OSError as rename_error:  # still never sent: it stays out of the spool
                    log.warning("%s: could not rename %s: %s", self.owner, path, rename_error)
                continue
            self._keep(seq, frames, write=False)
            self.counters.restored += 1
            self.highest_restored = seq  # found is sorted
        if found:
            log.info("%s: %d unacknowledged batch(es) restored from %s, to be sent again", self.owner,
                     self.counters.restored, self.directory)

    def _write(self, seq: int, frames: list[bytes]) -> None:
        if self.directory is None:
            return
        try:
            write_atomically(self._file(seq), msgpack.packb(frames, use_bin_type=True))
        except OSError as exc:
            self.counters.write_errors += 1
            self.unwritten.add(seq)
            self._log.warning("write", "%s: could not write batch seq %d to the spool directory (%s); it is kept in "
                              "memory only (%d batch(es) so far)", self.owner, seq, exc, self.counters.write_errors)

    def _forget(self, seq: int) -> None:
        self.unwritten.discard(seq)
        if self.directory is not None:
            try:
                self._file(seq).unlink(missing_ok=True)
            except OSError as exc:  # a folder gone read-only: once per interval, not at every acknowledgement
                self._log.warning("delete", "%s: could not delete spool file of seq %d: %s (a restart sends such a "
                                  "batch again, and the trainer answers it as a duplicate)", self.owner, seq, exc)

    # --------------------------------------------------------------------------------------------------- bookkeeping

    def __len__(self) -> int:
        return len(self._batches)

    def __contains__(self, seq: int) -> bool:
        return seq in self._batches

    @property
    def nbytes(self) -> int:
        return self._bytes

    def add(self, seq: int, frames: list[bytes]) -> list[int]:
        """Keep ``frames`` until ``seq`` is acknowledged; return the seqs dropped to make room (oldest first)."""
        if seq in self._batches:
            raise ValueError(f"seq {seq} is already spooled")
        dropped = self._keep(seq, frames, write=True)
        self.counters.added += 1
        return dropped

    def _keep(self, seq: int, frames: list[bytes], write: bool) -> list[int]:
        nbytes = sum(len(f) for f in frames)
        dropped: list[int] = []
        while self._batches and (len(self._batches) >= self.max_batches or self._bytes + nbytes > self.max_bytes):
            old_seq, old = self._batches.popitem(last=False)
            self._bytes -= old.nbytes
            self._forget(old_seq)
            self.counters.dropped += 1
            self.counters.dropped_bytes += old.nbytes
            dropped.append(old_seq)
        if dropped:
            self._log.warning(
                "full", "%s: spool full (%d batches / %d bytes max): dropped %d oldest unacknowledged batch(es) seq %s; "
                "%d dropped in total", self.owner, self.max_batches, self.max_bytes, len(dropped),
                seq_ranges(dropped), self.counters.dropped,
            )
        if write:
            self._write(seq, frames)
        self._batches[seq] = SpooledBatch(seq=seq, frames=frames, nbytes=nbytes)
        self._bytes += nbytes
        return dropped

    def sends_of(self, seq: int) -> int:
        """How many times ``seq`` was sent by this process (0: not spooled, or not sent yet)."""
        entry = self._batches.get(seq)
        return 0 if entry is None else entry.sends

    def mark_sent(self, seq: int, now: float | None = None) -> None:
        entry = self._batches.get(seq)
        if entry is None:
            return
        if entry.sends:
            self.counters.resent += 1
        entry.sends += 1
        entry.last_sent = time.monotonic() if now is None else now

    def ack(self, seqs: list[int]) -> int:
        """Forget acknowledged batches; return how many were spooled (acks for unknown seqs are counted apart)."""
        removed = self._remove(seqs)
        self.counters.acked += removed
        self.counters.unknown_acks += len(seqs) - removed
        return removed

    def refuse(self, seqs: list[int]) -> int:
        """Forget batches the trainer refused for good (they are never resent); return how many were spooled."""
        removed = self._remove(seqs)
        self.counters.refused += removed
        return removed

    def _remove(self, seqs: list[int]) -> int:
        removed = 0
        for seq in seqs:
            entry = self._batches.pop(seq, None)
            if entry is not None:
                self._bytes -= entry.nbytes
                self._forget(seq)
                removed += 1
        return removed

    def due(self, ack_timeout_s: float, now: float | None = None) -> list[SpooledBatch]:
        """Batches never sent, or sent without an ack for longer than their timeout, oldest first. The timeout is
        ``ack_timeout_s`` after the first send and doubles with each resend, up to ``MAX_BACKOFF`` times it, so a
        trainer that is away for long is not flooded with the same batches."""
        now = time.monotonic() if now is None else now
        return [b for b in self._batches.values()
                if b.sends == 0 or now - b.last_sent >= ack_timeout_s * min(2 ** (b.sends - 1), MAX_BACKOFF)]

    def oldest_wait(self, now: float | None = None) -> float:
        """Seconds the oldest unacknowledged batch has been spooled (0 when none is)."""
        oldest = next(iter(self._batches.values()), None)
        return 0.0 if oldest is None else (time.monotonic() if now is None else now) - oldest.spooled_at

    def pending(self) -> list[SpooledBatch]:
        """Every unacknowledged batch, oldest first (resend them all after a reconnection)."""
        return list(self._batches.values())


def seq_ranges(seqs: list[int]) -> str:
    """Up to three seqs as a list, more as their first and last (``12..40``)."""
    if len(seqs) <= 3:
        return ",".join(map(str, seqs))
    return f"{seqs[0]}..{seqs[-1]}"


def lock_worker_state(state_dir: Path, worker_id: str) -> FileLock:
    """Hold ``state_dir/<worker_id>.lock`` for this process (released by :meth:`FileLock.release`, or by the OS when
    the process ends however it ends). Two processes under one id and state folder would take the same seqs from
    the state file, and the trainer would answer one's batches as duplicates of the other's: lost, though counted
    delivered. :class:`StateFileError` when another process holds it."""
    directory = Path(state_dir).expanduser()
    path = directory / f"{worker_id}.lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise StateFileError(f"another worker process runs as {worker_id!r} with state_dir {directory} (it holds "
                             f"{path}): two processes under one id would number their batches alike and the trainer "
                             "would drop one's as the other's duplicates; stop it, or give this one another "
                             "worker_id") from exc
    except OSError as exc:
        raise StateFileError(f"state_dir {directory} cannot hold this worker's lock file: {exc} (set [worker] "
                             "state_dir to a folder this user can write)") from exc
    return lock


@dataclass
class SequenceCounter:
    """Thread-safe ``seq`` source persisted in ``state_dir/<worker_id>.state.json`` (see the module docstring)."""

    state_dir: Path
    worker_id: str
    block: int = 1000
    first_seq: int | None = None
    """Where a worker without a state file starts (None: the clock, see the module docstring; tests pass 0)."""
    _next: int = field(init=False, default=0)
    _reserved_until: int = field(init=False, default=0)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._next = self._load()
            self._reserved_until = self._next
            self._reserve()
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:  # a file where the folder should be, no permission, read-only
                raise StateFileError(f"state_dir {self.state_dir} cannot hold this worker's state file: {exc} (set "
                                     "[worker] state_dir to a folder this user can write)") from exc
            # a full disk passes: a worker whose durable spool filled it frees it by delivering; no number is handed
            # out before a reservation is written (take() retries it)
            log.error("%s: could not reserve sequence numbers in %s (%s): the worker starts, and numbers its batches "
                      "once the state file can be written (free disk space)", self.worker_id, self.path, exc)

    @property
    def path(self) -> Path:
        return self.state_dir / f"{self.worker_id}.state.json"

    def _load(self) -> int:
        try:
            data = read_regular_file(self.path)  # a FIFO there would block the start for ever
        except FileNotFoundError:
            return time.time_ns() // 1000 if self.first_seq is None else self.first_seq
        except NotARegularFileError as exc:
            raise StateFileError(f"worker state file {self.path} {exc.strerror}: delete it (deleting it starts the "
                                 "numbering again from the clock, above every number used before)") from exc
        try:
            state = json.loads(data.decode("utf-8"))
            value = state["reserved_until"]
            if type(value) is not int or value < 0 or state.get("worker_id") != self.worker_id:
                raise ValueError(f"worker_id {state.get('worker_id')!r}, reserved_until {value!r}")
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise StateFileError(
                f"worker state file {self.path} is unreadable ({exc}); fix it or delete it "
                "(deleting it starts the numbering again from the clock, above every number used before)"
            ) from exc
        return value

    def _reserve(self) -> None:
        """Persist ``reserved_until = next + block``; only then take it (a failed write reserves nothing)."""
        reserved_until = self._next + self.block
        payload = json.dumps({"worker_id": self.worker_id, "reserved_until": reserved_until})
        write_atomically(self.path, payload.encode())
        self._reserved_until = reserved_until

    @property
    def next_seq(self) -> int:
        """The number the next :meth:`take` returns (announced in ``Hello.next_seq``)."""
        with self._lock:
            return self._next

    def start_above(self, seq: int) -> bool:
        """Never hand out ``seq`` or a lower number from now on (a durable spool's restored batch; numbers found to be
        used before); True when the next number moved."""
        with self._lock:
            if self._next > seq:
                return False
            self._next = seq + 1
            try:
                self._reserve()
            except OSError:  # a full disk: take() reserves before it hands out a number at or past the reservation
                pass
            return True

    def take(self) -> int:
        """A fresh sequence number; persists a new reservation when the current block is used up.
        :class:`ReservationError` when that write fails: nothing is taken, and a later call tries again."""
        with self._lock:
            if self._next >= self._reserved_until:
                try:
                    self._reserve()
                except OSError as exc:
                    raise ReservationError(exc.errno, f"could not reserve sequence numbers in {self.path}: "
                                                      f"{exc.strerror or exc}") from exc
            seq = self._next
            self._next += 1
            return seq
