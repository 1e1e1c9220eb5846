"""write_atomically: the target holds the old or the new bytes, never a torn file, with the asked permissions."""

from __future__ import annotations

import os
import stat

import pytest
from tmrl_common.atomic_file import write_atomically


def test_write_replaces_the_content_and_sets_owner_only_mode_by_default(tmp_path):
    target = tmp_path / "deep" / "state.json"
    write_atomically(target, b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_mode_is_applied_for_files_others_must_read(tmp_path):
    target = write_atomically(tmp_path / "relay.key", b"public", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    write_atomically(target, b"old")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_the_directory_is_synced_after_the_rename_so_the_new_name_survives_a_power_cut(tmp_path, monkeypatch):
    synced: list[tuple[str, bool]] = []  # (what was synced, was it a directory), in order
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        synced.append(("fsync", stat.S_ISDIR(os.fstat(descriptor).st_mode)))
        real_fsync(descriptor)

    def recording_replace(source, destination):
        synced.append(("replace", False))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_atomically(tmp_path / "checkpoint.safetensors", b"tensors")
    directory_sync = [("fsync", True)] if os.name == "posix" else []  # NTFS journals the rename itself
    assert synced == [("fsync", False), ("replace", False), *directory_sync]


def test_a_name_too_long_for_the_file_system_is_an_output_path_error(tmp_path):
    """A CLI probe: `eval --gif` with a 300-character name ended in an ENAMETOOLONG traceback from `is_dir()`."""
    from tmrl_common.atomic_file import OutputPathError, prepare_output_file

    with pytest.raises(OutputPathError, match=r"--gif '.*x{300}\.gif': cannot write there: File name too long"):
        prepare_output_file(tmp_path / ("x" * 300 + ".gif"), "--gif", suffix=".gif")
