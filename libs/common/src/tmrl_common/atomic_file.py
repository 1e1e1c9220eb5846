"""Crash-safe file writes: a reader sees the old content or the new one, never a torn file.

Used for everything tmrl rewrites in place: checkpoints, ``status.json``, a worker's sequence-number state,
allow-listed key certificates. And :func:`read_regular_file`, which reads back the files that hold state
(checkpoints, replay memories, policy files) only when they are files.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
"""The ``errno`` of a write that a full disk or a quota refused: passing, unlike a missing folder or permission."""


class NotARegularFileError(OSError):
    """The path names a FIFO, a device or a socket: reading it could block for ever (a FIFO with no writer) or
    never end (a link to ``/dev/zero``)."""


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file at ``path`` (links followed). :class:`NotARegularFileError` for a FIFO, a
    device or a socket, found without blocking; :class:`IsADirectoryError` for a folder; :class:`FileNotFoundError`
    when there is nothing."""
    # O_NONBLOCK: a FIFO's open would wait for a writer; on a regular file it changes nothing
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(kind):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(kind):
            raise NotARegularFileError(errno.EINVAL, "is not a regular file (a FIFO, a device or a socket)", str(path))
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(descriptor)


def write_atomically(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync it, ``os.replace`` it onto ``path``, then fsync the
    directory (POSIX), so that after a power cut the name points at the new content, not at the old file or at nothing.

    The file gets permission bits ``mode`` (owner-only by default: state files, checkpoints)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_directory(target.parent)
    return target


def _sync_directory(directory: Path) -> None:
    """fsync ``directory`` so that a rename in it survives a power cut. POSIX only: Windows cannot open a directory
    as a file, and NTFS journals the rename itself."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
