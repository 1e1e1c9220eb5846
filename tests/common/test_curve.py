"""CurveZMQ key files: generation in the ZeroMQ certificate format, loading, allow-list management, clear errors."""

from __future__ import annotations

import stat

import pytest
import zmq
import zmq.auth
from tmrl_common.curve import (
    KeyFileError,
    allow_public_key,
    generate_key_pair,
    list_allowed_keys,
    load_public_key,
    load_secret_key,
    revoke_public_key,
)


def test_generated_pair_is_a_zeromq_certificate_readable_by_pyzmq(tmp_path):
    files = generate_key_pair(tmp_path, "relay")
    assert files.public_file == tmp_path / "relay.key" and files.secret_file == tmp_path / "relay.key_secret"
    text = files.secret_file.read_text()
    assert "curve" in text and "secret-key" in text  # ZPL text, not pickle
    public, secret = zmq.auth.load_certificate(files.secret_file)
    assert load_secret_key(files.secret_file) == (public, secret)
    assert load_public_key(files.public_file) == public
    assert zmq.curve_public(secret) == public
    assert stat.S_IMODE(files.secret_file.stat().st_mode) == 0o600


def test_a_secret_key_is_written_where_only_its_owner_can_reach_it_and_nothing_else_is_left(tmp_path, monkeypatch):
    """pyzmq writes under the umask (most often 0644) before any chmod: the folder it writes in must be private."""
    folders = []
    create = zmq.auth.create_certificates

    def recording(directory, name, metadata=None):
        folders.append((directory, stat.S_IMODE(directory.stat().st_mode)))
        return create(directory, name, metadata)

    monkeypatch.setattr(zmq.auth, "create_certificates", recording)
    files = generate_key_pair(tmp_path / "keys", "worker-1")
    [(folder, mode)] = folders
    assert folder != tmp_path / "keys" and mode == 0o700
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["worker-1.key", "worker-1.key_secret"]
    assert stat.S_IMODE(files.secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.public_file.stat().st_mode) == 0o644
    assert load_secret_key(files.secret_file)[0] == load_public_key(files.public_file)


def test_a_secret_key_others_can_read_is_loaded_with_a_warning_naming_the_fix(tmp_path, caplog):
    files = generate_key_pair(tmp_path, "worker-1")
    with caplog.at_level("WARNING"):
        load_secret_key(files.secret_file)
    assert not caplog.records
    files.secret_file.chmod(0o644)
    with caplog.at_level("WARNING"):
        load_secret_key(files.secret_file)
    [record] = caplog.records
    assert "mode 644" in record.getMessage() and f"chmod 600 {files.secret_file}" in record.getMessage()


def test_generate_refuses_to_overwrite_an_existing_pair(tmp_path):
    first = generate_key_pair(tmp_path, "worker-1")
    first_public = load_public_key(first.public_file)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_pair(tmp_path, "worker-1")
    second = generate_key_pair(tmp_path, "worker-1", overwrite=True)
    assert load_public_key(second.public_file) != first_public
    assert load_secret_key(second.secret_file)[0] == load_public_key(second.public_file)


def test_key_names_that_are_not_file_names_are_refused(tmp_path):
    with pytest.raises(KeyFileError, match="key name"):
        generate_key_pair(tmp_path, "../escape")


def test_missing_key_file_error_says_how_to_create_one(tmp_path):
    with pytest.raises(KeyFileError, match="keys generate"):
        load_public_key(tmp_path / "nope.key")


def test_public_certificate_is_refused_where_a_secret_key_is_needed(tmp_path):
    files = generate_key_pair(tmp_path, "w")
    with pytest.raises(KeyFileError, match="no secret key"):
        load_secret_key(files.public_file)


@pytest.mark.parametrize(
    "content, match",
    [
        ("hello world\n", "not a ZeroMQ certificate"),
        ('curve\n    public-key = "short"\n', "characters"),
        ('curve\n    public-key = "' + "~" * 40 + '"\n', "Z85"),
    ],
)
def test_invalid_key_files_raise_key_file_error(tmp_path, content, match):
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=match):
        load_public_key(path)


def test_mismatched_public_and_secret_keys_are_refused(tmp_path):
    a, b = generate_key_pair(tmp_path, "a"), generate_key_pair(tmp_path, "b")
    public_a, _ = load_secret_key(a.secret_file)
    _, secret_b = load_secret_key(b.secret_file)
    path = tmp_path / "mixed.key_secret"
    path.write_text(f'curve\n    public-key = "{public_a.decode()}"\n    secret-key = "{secret_b.decode()}"\n')
    with pytest.raises(KeyFileError, match="do not belong together"):
        load_secret_key(path)


def test_allow_list_add_list_revoke(tmp_path):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    worker = generate_key_pair(keys, "worker-1")
    entry = allow_public_key(allow, worker.secret_file, name="w1")  # only the public half is copied
    assert entry.path == allow / "w1.key"
    assert "secret-key" not in entry.path.read_text()
    assert zmq.auth.load_certificates(allow) == {load_public_key(worker.public_file): True}
    assert [(k.name, k.public_key) for k in list_allowed_keys(allow)] == [("w1", load_public_key(worker.public_file))]
    # adding the same key again under the same name is idempotent; under another name it is refused
    allow_public_key(allow, worker.public_file, name="w1")
    with pytest.raises(KeyFileError, match="already allowed as 'w1'"):
        allow_public_key(allow, worker.public_file, name="other")
    other = generate_key_pair(keys, "worker-2")
    with pytest.raises(KeyFileError, match="different key"):
        allow_public_key(allow, other.public_file, name="w1")
    assert allow_public_key(allow, other.public_file).name == "worker-2"  # name defaults to the file stem
    revoke_public_key(allow, "w1")
    assert [k.name for k in list_allowed_keys(allow)] == ["worker-2"]
    with pytest.raises(KeyFileError, match="no key named"):
        revoke_public_key(allow, "w1")


def test_listing_a_missing_allow_list_says_how_to_create_it(tmp_path):
    with pytest.raises(KeyFileError, match="keys add"):
        list_allowed_keys(tmp_path / "missing")


def test_listing_reports_a_corrupt_allow_list_entry(tmp_path):
    (tmp_path / "broken.key").write_text("not a certificate\n")
    with pytest.raises(KeyFileError, match="broken.key"):
        list_allowed_keys(tmp_path)


@pytest.mark.timeout(30)
def test_entries_that_hold_no_key_admit_no_one_never_block_an_addition_and_can_be_removed(tmp_path):
    """An outside probe left a link to nothing and a folder named *.key in the allow-list: `keys add` and `keys list`
    then failed on them, `keys remove` (the relay log's advice) said there was no such key, and a 300 MB file named
    *.key was read whole (5 s of the relay's main loop at each change) and taken as a valid key."""
    import os

    from tmrl_common.curve import read_allowed_keys

    keys, allow = tmp_path / "keys", tmp_path / "allow"
    good = allow_public_key(allow, generate_key_pair(keys, "good").public_file)
    (allow / "dangling.key").symlink_to(tmp_path / "nowhere")
    (allow / "folder.key").mkdir()
    os.mkfifo(allow / "pipe.key")
    with open(allow / "huge.key", "wb") as huge:  # a certificate, then 100 MB more: sparse, never read
        huge.write(good.path.read_bytes())
        huge.truncate(100 * 2**20)
    entries, problems = read_allowed_keys(allow)
    assert [entry.name for entry in entries] == ["good"]
    said = " | ".join(problems)
    assert "dangling.key does not exist (a link to" in said and "folder.key is a folder, not a key file" in said
    assert "pipe.key is not a regular file" in said and "huge.key is 104857600 bytes, not a key file" in said
    assert all("`tmrl-relay keys remove" in problem for problem in problems)
    assert allow_public_key(allow, generate_key_pair(keys, "late").public_file).name == "late"  # not blocked
    for name in ("dangling", "folder", "pipe", "huge"):
        revoke_public_key(allow, name)
    assert read_allowed_keys(allow)[1] == []
    assert [entry.name for entry in read_allowed_keys(allow)[0]] == ["good", "late"]
    (allow / "full.key").mkdir()
    (allow / "full.key" / "something").write_text("x")
    with pytest.raises(KeyFileError, match="cannot remove .*full.key: .*remove it yourself"):
        revoke_public_key(allow, "full")


def test_a_server_key_file_holding_the_relays_secret_works_but_is_warned_about_once(tmp_path, caplog):
    """An outside probe gave clients --server-key relay.key_secret without a word: the relay's secret key then sat
    on every client host."""
    from tmrl_common.curve import load_server_public_key

    relay = generate_key_pair(tmp_path, "relay")
    with caplog.at_level("WARNING", logger="tmrl_common.curve"):
        assert load_server_public_key(relay.public_file) == load_public_key(relay.public_file)
        assert caplog.text == ""
        assert load_server_public_key(relay.secret_file) == load_public_key(relay.public_file)
        load_server_public_key(relay.secret_file)
    (warning,) = caplog.records
    assert f"the server key file {relay.secret_file} holds the relay's secret key too" in warning.getMessage()


def test_a_secret_key_file_in_the_allow_list_folder_is_reported_not_read(tmp_path):
    """An outside probe copied a client's .key_secret into the allow-list folder: ignored without a word, though
    whoever can read that folder could then act as the client."""
    from tmrl_common.curve import read_allowed_keys

    keys, allow = tmp_path / "keys", tmp_path / "allow"
    worker = generate_key_pair(keys, "worker-1")
    allow_public_key(allow, worker.public_file)
    (allow / "worker-1.key_secret").write_bytes(worker.secret_file.read_bytes())
    entries, problems = read_allowed_keys(allow)
    assert [entry.name for entry in entries] == ["worker-1"]
    (problem,) = problems
    assert problem.startswith(f"{allow / 'worker-1.key_secret'} is a secret key file: an allow-list holds public")
