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


def replace_atomically(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """``os.replace`` a file already written and synced (by :func:`write_atomically`) onto ``target`` in the same
    folder, then fsync the folder: the second half of a write whose file must appear only after another one did."""
    target = Path(target)
    os.replace(source, target)
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


class OutputPathError(ValueError):
    """A file a command is to write cannot be written there (one line, naming the path and why)."""


def file_on_the_way(path: Path) -> Path | None:
    """The first of ``path``'s folders that exists as something else (a file), or None: writing there fails with
    "File exists" or "Not a directory", which says nothing of which part is wrong."""
    return next((parent for parent in reversed(path.parents) if parent.exists() and not parent.is_dir()), None)


def prepare_output_file(path: str | os.PathLike[str], what: str, suffix: str | None = None) -> Path:
    """Check, before a command does its work, that it can write the file ``what`` (e.g. ``--output``) at ``path``:
    the name ends in ``suffix`` when one is given, no folder on the way is a file, its folder exists or is created,
    and a file can be created there (created and removed again when it did not exist). A recording or a drive is
    otherwise lost to a typo in the folder at its end. Raises :class:`OutputPathError`."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise OutputPathError(f"{what} {str(path)!r}: its name must end in {suffix} (the file is written in that format)")
    try:  # a name longer than the file system takes (ENAMETOOLONG) raises from is_dir() and exists() too
        if path.is_dir():
            raise OutputPathError(f"{what} {str(path)!r} is a folder; give a file name")
        blocking = file_on_the_way(path)
        if blocking is not None:
            raise OutputPathError(f"{what} {str(path)!r}: {str(blocking)!r} is a file, not a folder")
        existed = path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise OutputPathError(f"{what} {str(path)!r}: cannot write there: {exc.strerror or exc}") from exc
    if not existed:
        path.unlink(missing_ok=True)
    return path
