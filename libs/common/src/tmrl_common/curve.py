"""CurveZMQ key files: generate key pairs, load keys, manage the relay's allow-list directory.

Keys are stored as ZeroMQ certificates (the ZPL text format of ``zmq.auth.create_certificates``, no pickle):

* ``<name>.key``: the public certificate, safe to copy around (give it to the relay's operator);
* ``<name>.key_secret``: public + secret key, readable by its owner only (mode 0600).

The relay's allow-list is a directory of public certificates (``*.key``). :func:`allow_public_key` copies a
validated public key into it under a name; :func:`start_authenticator` runs the ZAP handler that admits only
those keys.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from tmrl_common.atomic_file import write_atomically

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_KEY_LENGTH = 40


class KeyFileError(ValueError):
    """A key file or allow-list directory is missing or does not hold a valid CurveZMQ key."""


@dataclass(frozen=True)
class KeyPairFiles:
    """Where :func:`generate_key_pair` wrote a key pair."""

    public_file: Path
    secret_file: Path


@dataclass(frozen=True)
class AllowedKey:
    """One entry of an allow-list directory."""

    name: str
    public_key: bytes
    """Z85-encoded (40 ASCII characters), as ZeroMQ socket options and ZAP take it."""
    path: Path


def _check_name(name: str) -> str:
    if not KEY_NAME_PATTERN.match(name):
        raise KeyFileError(f"key name {name!r} must match {KEY_NAME_PATTERN.pattern} (it becomes a file name)")
    return name


def _check_z85_key(key: bytes | None, path: Path, which: str) -> bytes:
    if not key:
        raise KeyFileError(f"{path} holds no {which} key; expected a ZeroMQ certificate from `tmrl-relay keys generate`")
    if len(key) != _Z85_KEY_LENGTH:
        raise KeyFileError(f"{which} key in {path} has {len(key)} characters, a Z85 CurveZMQ key has {_Z85_KEY_LENGTH}")
    try:
        z85.decode(key)
    except Exception as exc:  # z85 raises ValueError/KeyError/TypeError depending on the bad character
        raise KeyFileError(f"{which} key in {path} is not valid Z85 text: {exc}") from exc
    return key


def _read_certificate(path: Path) -> tuple[bytes | None, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"key file {path} does not exist; create one with `tmrl-relay keys generate --dir DIR --name NAME`")
    try:
        return zmq.auth.load_certificate(path)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate (no public-key line): {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc


def generate_key_pair(directory: Path, name: str, *, overwrite: bool = False) -> KeyPairFiles:
    """Write a new key pair ``<name>.key`` / ``<name>.key_secret`` into ``directory`` (created if needed).

    Refuses to replace an existing pair unless ``overwrite`` (a replaced key locks its owner out of the relay).
    """
    _check_name(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if not overwrite and (public_file.exists() or secret_file.exists()):
        raise KeyFileError(f"a key pair named {name!r} already exists in {directory}; pick another name or pass overwrite")
    public_path, secret_path = zmq.auth.create_certificates(directory, name)
    os.chmod(secret_path, 0o600)
    return KeyPairFiles(public_file=Path(public_path), secret_file=Path(secret_path))


def load_public_key(path: Path) -> bytes:
    """The Z85 public key of a certificate (``.key`` or ``.key_secret``); raises :class:`KeyFileError`."""
    public, _ = _read_certificate(Path(path))
    return _check_z85_key(public, Path(path), "public")


def load_secret_key(path: Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` certificate; raises :class:`KeyFileError`."""
    public, secret = _read_certificate(Path(path))
    if not secret:
        raise KeyFileError(
            f"{path} holds no secret key: it is a public certificate; use the matching {SECRET_SUFFIX} file"
        )
    public = _check_z85_key(public, Path(path), "public")
    secret = _check_z85_key(secret, Path(path), "secret")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"the public and secret keys in {path} do not belong together")
    return public, secret


def _write_public_certificate(path: Path, public_key: bytes, name: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = (
        f"#   ZeroMQ CURVE Public Certificate, allow-listed as {name!r} on {stamp} by tmrl-relay\n"
        "#   Exchange securely, or use a secure mechanism to verify the contents\n"
        "#   of this file after exchange. Store public certificates in your home\n"
        "#   directory, in the .curve subdirectory.\n\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{public_key.decode("ascii")}"\n'
    )
    write_atomically(path, text.encode("utf-8"), mode=0o644)  # public: the relay's service user must read it


def allow_public_key(allowlist_dir: Path, public_key_file: Path, name: str | None = None, *, overwrite: bool = False) -> AllowedKey:
    """Allow the key in ``public_key_file`` by writing ``<name>.key`` into ``allowlist_dir`` (created if needed).

    ``name`` defaults to the file's stem. Only the public key is copied, even from a ``.key_secret`` file.
    """
    public_key = load_public_key(public_key_file)
    name = _check_name(name if name is not None else Path(public_key_file).name.split(".")[0])
    allowlist_dir = Path(allowlist_dir)
    allowlist_dir.mkdir(parents=True, exist_ok=True)
    target = allowlist_dir / f"{name}{PUBLIC_SUFFIX}"
    if target.exists() and not overwrite:
        existing = load_public_key(target)
        if existing != public_key:
            raise KeyFileError(f"{target} already allows a different key; remove it first or choose another name")
    for entry in list_allowed_keys(allowlist_dir):
        if entry.public_key == public_key and entry.name != name:
            raise KeyFileError(f"this key is already allowed as {entry.name!r} ({entry.path})")
    _write_public_certificate(target, public_key, name)
    return AllowedKey(name=name, public_key=public_key, path=target)


def revoke_public_key(allowlist_dir: Path, name: str) -> Path:
    """Remove ``<name>.key`` from the allow-list; the relay refuses that key from its next allow-list reload."""
    target = Path(allowlist_dir) / f"{_check_name(name)}{PUBLIC_SUFFIX}"
    if not target.is_file():
        raise KeyFileError(f"no key named {name!r} in {allowlist_dir}")
    target.unlink()
    return target


def list_allowed_keys(allowlist_dir: Path) -> list[AllowedKey]:
    """Every ``*.key`` in ``allowlist_dir``, validated and sorted by name; raises :class:`KeyFileError` on a bad one."""
    allowlist_dir = Path(allowlist_dir)
    if not allowlist_dir.is_dir():
        raise KeyFileError(
            f"allow-list directory {allowlist_dir} does not exist; add a client with "
            f"`tmrl-relay keys add --allow-dir {allowlist_dir} CLIENT.key`"
        )
    return [
        AllowedKey(name=path.name[: -len(PUBLIC_SUFFIX)], public_key=load_public_key(path), path=path)
        for path in sorted(allowlist_dir.glob(f"*{PUBLIC_SUFFIX}"))
    ]


def user_id_of(public_key: bytes) -> str:
    """The ZAP ``User-Id`` the authenticator gives a client with this Z85 public key (received frames carry it)."""
    return public_key.decode("ascii")


def start_authenticator(context: zmq.Context, domains: dict[str, Path]):  # -> zmq.auth.thread.ThreadAuthenticator
    """Start a ZAP handler on ``context`` admitting, per ZAP domain, only the keys in that domain's allow-list dir.

    Every allow-list is validated first (:func:`list_allowed_keys`), so a malformed file fails loudly here instead
    of silently locking every client out. Call :func:`reload_authenticator` after the directories change.
    Sockets choose their domain with ``socket.zap_domain = b"..."`` before ``bind``.
    """
    from zmq.auth.thread import ThreadAuthenticator

    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    try:
        reload_authenticator(authenticator, domains)
    except Exception:
        authenticator.stop()
        raise
    return authenticator


def reload_authenticator(authenticator, domains: dict[str, Path]) -> dict[str, int]:
    """Re-read each domain's allow-list directory; returns how many keys each domain now allows."""
    counts: dict[str, int] = {}
    for domain, directory in domains.items():
        counts[domain] = len(list_allowed_keys(directory))
        authenticator.configure_curve(domain=domain, location=str(directory))
    return counts
