"""Crash-safe file writes: a reader sees the old content or the new one, never a torn file.

Used for everything tmrl rewrites in place: checkpoints, ``status.json``, a worker's sequence-number state,
allow-listed key certificates.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
