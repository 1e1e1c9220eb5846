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
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from tmrl_common.atomic_file import file_on_the_way, write_atomically
from tmrl_common.log_limit import LineBudget, RateLimitedLog

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_KEY_LENGTH = 40

log = logging.getLogger(__name__)


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


def check_key_name(name: str) -> str:
    if not KEY_NAME_PATTERN.fullmatch(name):
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


MAX_KEY_FILE_BYTES = 64 * 1024
"""A key file larger than this is refused unread: certificates are under 1 KiB, and the relay reads its allow-list on
its main loop (an outside probe's 300 MB file stalled it for 5 s at each change, and was taken as a valid key)."""


def _read_certificate(path: Path) -> tuple[bytes | None, bytes | None]:
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        target = f" (a link to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
        raise KeyFileError(f"key file {path} does not exist{target}; create one with `tmrl-relay keys generate --dir "
                           "DIR --name NAME`") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise KeyFileError(f"{path} is a folder, not a key file")
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file (a FIFO, a device or a socket), not a key file")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is {info.st_size} bytes, not a key file: a ZeroMQ certificate is under 1 KiB (files "
                           f"over {MAX_KEY_FILE_BYTES} bytes are not read)")
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
    check_key_name(name)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = file_on_the_way(directory / name)
        why = f"{blocking} is a file, not a folder" if blocking is not None else exc.strerror or str(exc)
        raise KeyFileError(f"cannot make the key folder {directory}: {why}") from exc
    public_file, secret_file = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if not overwrite and (public_file.exists() or secret_file.exists()):
        raise KeyFileError(f"a key pair named {name!r} already exists in {directory}; pick another name or pass overwrite")
    # pyzmq writes both files under the umask (0644 most often) and only then could they be chmod-ed: write them in a
    # private folder (mkdtemp: 0700) and move them into place, so the secret is never readable by others on the way
    private = Path(tempfile.mkdtemp(prefix=".keygen-", dir=directory))
    try:
        public_path, secret_path = (Path(path) for path in zmq.auth.create_certificates(private, name))
        os.chmod(secret_path, 0o600)
        os.chmod(public_path, 0o644)
        os.replace(secret_path, secret_file)
        os.replace(public_path, public_file)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return KeyPairFiles(public_file=public_file, secret_file=secret_file)


def load_public_key(path: Path) -> bytes:
    """The Z85 public key of a certificate (``.key`` or ``.key_secret``); raises :class:`KeyFileError`."""
    public, _ = _read_certificate(Path(path))
    return _check_z85_key(public, Path(path), "public")


_WARNED_SECRET_SERVER_KEYS: set[str] = set()
"""Server key files warned about for holding a secret key (once per file: a client loads it once per socket)."""


def load_server_public_key(path: Path) -> bytes:
    """The relay's public key, for a client's ``--server-key`` (:func:`load_public_key`). A file that holds the secret
    key too (the relay's ``.key_secret`` copied to the client) works, but whoever can read it there can act as the
    relay: warned once per file."""
    public, secret = _read_certificate(Path(path))
    if secret and str(path) not in _WARNED_SECRET_SERVER_KEYS:
        _WARNED_SECRET_SERVER_KEYS.add(str(path))
        log.warning("the server key file %s holds the relay's secret key too: a client needs only the public file "
                    "(relay%s), and whoever can read this copy can act as the relay; give the public file and delete "
                    "this copy from this host", path, PUBLIC_SUFFIX)
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
    _warn_if_others_may_read(Path(path))  # a secret key only: a public certificate given by mistake is refused above
    return public, secret


_WARNED_READABLE: set[tuple[str, int]] = set()
"""(secret key file, mode) pairs warned about: a relay loads its key once per socket, and says it once."""


def _warn_if_others_may_read(path: Path) -> None:
    """Warn (once per file and mode) when a secret key file's mode lets its group or others in (POSIX; on Windows the
    folder's ACL decides, docs/deployment.md): whoever can read it can act as that key."""
    if os.name != "posix":
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077 and (str(path), mode) not in _WARNED_READABLE:
        _WARNED_READABLE.add((str(path), mode))
        log.warning("secret key file %s has mode %03o: users other than its owner can read it and act as this key; "
                    "run `chmod 600 %s` as its owner", path, mode, path)


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
    name = check_key_name(name if name is not None else Path(public_key_file).name.split(".")[0])
    allowlist_dir = Path(allowlist_dir)
    allowlist_dir.mkdir(parents=True, exist_ok=True)
    target = allowlist_dir / f"{name}{PUBLIC_SUFFIX}"
    if target.exists() and not overwrite:
        existing = load_public_key(target)
        if existing != public_key:
            raise KeyFileError(f"{target} already allows a different key; remove it first or choose another name")
    for entry in read_allowed_keys(allowlist_dir)[0]:  # a broken entry admits no one: it must not block an addition
        if entry.public_key == public_key and entry.name != name:
            raise KeyFileError(f"this key is already allowed as {entry.name!r} ({entry.path})")
    _write_public_certificate(target, public_key, name)
    return AllowedKey(name=name, public_key=public_key, path=target)


def revoke_public_key(allowlist_dir: Path, name: str) -> Path:
    """Remove ``<name>.key`` from the allow-list; the relay refuses that key from its next allow-list reload. Also
    clears an entry that holds no key (a link to nothing, an empty folder, a FIFO), as the relay's log advises."""
    target = Path(allowlist_dir) / f"{check_key_name(name)}{PUBLIC_SUFFIX}"
    if not target.is_symlink() and not target.exists():
        raise KeyFileError(f"no key named {name!r} in {allowlist_dir}")
    try:
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        else:
            target.unlink()
    except OSError as exc:  # a folder holding files: not ours to delete
        raise KeyFileError(f"cannot remove {target}: {exc.strerror or exc}; remove it yourself") from exc
    return target


def list_allowed_keys(allowlist_dir: Path) -> list[AllowedKey]:
    """Every ``*.key`` in ``allowlist_dir``, validated and sorted by name; raises :class:`KeyFileError` on a bad one."""
    keys, problems = read_allowed_keys(allowlist_dir)
    if problems:
        raise KeyFileError(problems[0])
    return keys


def read_allowed_keys(allowlist_dir: Path) -> tuple[list[AllowedKey], list[str]]:
    """The valid ``*.key`` entries of ``allowlist_dir`` sorted by name, and one line per entry that is not (a
    malformed file, a folder, an unreadable file: it admits no one, and the line says how to clear it) and per secret
    key file found there (never read, but a secret copied where it does not belong). Raises
    :class:`KeyFileError` when the directory itself cannot be listed (missing, unreadable): then nothing in it can
    be trusted to be complete."""
    allowlist_dir = Path(allowlist_dir)
    try:
        listed = os.listdir(allowlist_dir)
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"allow-list directory {allowlist_dir} does not exist; add a client with "
            f"`tmrl-relay keys add --allow-dir {allowlist_dir} CLIENT.key`"
        ) from exc
    except OSError as exc:  # no permission, not a directory: os.listdir says so where Path.glob says nothing
        raise KeyFileError(f"allow-list directory {allowlist_dir} cannot be read: {exc.strerror or exc}") from exc
    names = sorted(name for name in listed if name.endswith(PUBLIC_SUFFIX))
    keys, problems = [], []
    for secret in sorted(name for name in listed if name.endswith(SECRET_SUFFIX)):  # read by no one here; a leak
        problems.append(f"{allowlist_dir / secret} is a secret key file: an allow-list holds public {PUBLIC_SUFFIX} "
                        f"files only, and a secret key belongs on its own host alone (move it out of {allowlist_dir}; "
                        "whoever can read it can act as that key)")
    for file_name in names:
        path, name = allowlist_dir / file_name, file_name[: -len(PUBLIC_SUFFIX)]
        try:
            keys.append(AllowedKey(name=name, public_key=load_public_key(path), path=path))
        except (KeyFileError, OSError) as exc:
            problems.append(f"{exc} (it admits no one; `tmrl-relay keys remove {name} --allow-dir {allowlist_dir}` "
                            "clears it)")
    return keys, problems


class AllowedKeySets:
    """The keys each ZAP domain admits, for the authenticator's CURVE callback (``configure_curve_callback``):
    replaced as a whole on each reload, so a client is checked against one consistent set of lists."""

    def __init__(self) -> None:
        self._keys: dict[str, frozenset[bytes]] = {}
        self._lock = threading.Lock()
        self._refusal_log = RateLimitedLog(log, interval_s=30.0)
        self._refusal_budget = LineBudget(lines=20, window_s=30.0)  # a flood of fresh keys: one line per interval

    def replace(self, keys: dict[str, frozenset[bytes]]) -> None:
        with self._lock:
            self._keys = dict(keys)

    def allowed(self, domain: str) -> frozenset[bytes]:
        with self._lock:
            return self._keys.get(domain, frozenset())

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: ``key`` is the client's Z85 public key. A refusal is logged with the
        key (at most once per key and domain every 30 s), and the domains that do allow it: a key allowed elsewhere
        is most often a client pointed at the wrong port."""
        with self._lock:
            keys = self._keys
        if key in keys.get(domain, frozenset()):
            return True
        elsewhere = sorted(other for other, allowed in keys.items() if other != domain and key in allowed)
        many = not self._refusal_budget.take()  # past it, every key shares one line per interval (and its count)
        self._refusal_log.warning((domain, "many keys") if many else (domain, key), "refused the CurveZMQ key %s on "
                                  "%s: not in its allow-list%s%s", key.decode("ascii", errors="replace"), domain,
                                  f" (allowed on {', '.join(elsewhere)}: a client pointed at the wrong port?)"
                                  if elsewhere else "",
                                  f"; {self._refusal_budget.exceeded('refusals')}: one line per "
                                  f"{self._refusal_log.interval_s:.0f} s for the keys past them" if many else "")
        return False


def read_domains(domains: dict[str, Path], exclusive: tuple[set[str], set[str]] | None = None,
                 ) -> tuple[dict[str, frozenset[bytes]], list[str]]:
    """Each ZAP domain's allowed Z85 keys, read from its directory, and a line per problem (see
    :func:`read_allowed_keys`; a directory that cannot be listed raises :class:`KeyFileError`). ``exclusive``: two
    groups of domains (the workers' and the trainer's) no key may be in both of: such a key is dropped from every
    domain, with a line saying so (one key, one role; ``keys add`` refuses it, a file copied by hand is caught
    here)."""
    problems: list[str] = []
    names: dict[bytes, set[str]] = {}
    by_directory: dict[Path, frozenset[bytes]] = {}
    for directory in dict.fromkeys(Path(directory) for directory in domains.values()):  # each once (workers, weights)
        entries, found = read_allowed_keys(directory)
        problems.extend(found)
        by_directory[directory] = frozenset(entry.public_key for entry in entries)
        for entry in entries:
            names.setdefault(entry.public_key, set()).add(str(entry.path))
    keys = {domain: by_directory[Path(directory)] for domain, directory in domains.items()}
    if exclusive is not None:
        first = frozenset().union(*(keys.get(domain, frozenset()) for domain in exclusive[0]))
        second = frozenset().union(*(keys.get(domain, frozenset()) for domain in exclusive[1]))
        both = first & second
        problems.extend(f"one key is allowed in two roles ({', '.join(sorted(names[key]))}): it admits no one until "
                        "one of them is removed (`tmrl-relay keys remove`)" for key in sorted(both))
        keys = {domain: allowed - both for domain, allowed in keys.items()}
    return keys, problems


def user_id_of(public_key: bytes) -> str:
    """The ZAP ``User-Id`` the authenticator gives a client with this Z85 public key (received frames carry it)."""
    return public_key.decode("ascii")


def start_authenticator(context: zmq.Context, domains: dict[str, Path],
                        exclusive: tuple[set[str], set[str]] | None = None):  # -> ThreadAuthenticator
    """Start a ZAP handler on ``context`` admitting, per ZAP domain, only the keys in that domain's allow-list dir.

    Every allow-list is validated first, so a malformed file fails loudly here (:class:`KeyFileError`, its problem
    line) instead of silently locking a client out. Call :func:`reload_authenticator` after the directories change.
    Sockets choose their domain with ``socket.zap_domain = b"..."`` before ``bind``. ``exclusive``: see
    :func:`read_domains`. The returned authenticator's ``tmrl_keys`` is its :class:`AllowedKeySets`.
    """
    from zmq.auth.thread import ThreadAuthenticator

    keys, problems = read_domains(domains, exclusive)
    if problems:
        raise KeyFileError(problems[0])
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    try:
        authenticator.tmrl_keys = AllowedKeySets()
        authenticator.tmrl_keys.replace(keys)
        for domain in domains:
            authenticator.configure_curve_callback(domain=domain, credentials_provider=authenticator.tmrl_keys)
    except Exception:
        authenticator.stop()
        raise
    return authenticator


def reload_authenticator(authenticator, domains: dict[str, Path], exclusive: tuple[set[str], set[str]] | None = None,
                         ) -> tuple[dict[str, int], list[str]]:
    """Re-read each domain's allow-list directory and admit exactly its valid keys from now on: an entry that is
    not valid admits no one, and every other change (a removal above all) applies even so. Returns how many keys
    each domain now allows and a line per problem. A directory that cannot be listed raises :class:`KeyFileError`
    and changes nothing (its listing could be incomplete, so the previous lists stay)."""
    keys, problems = read_domains(domains, exclusive)
    authenticator.tmrl_keys.replace(keys)
    for domain in domains:  # a domain the previous start did not configure
        if domain not in authenticator.credentials_providers:
            authenticator.configure_curve_callback(domain=domain, credentials_provider=authenticator.tmrl_keys)
    return {domain: len(allowed) for domain, allowed in keys.items()}, problems
