"""``tmrl-relay keys ...``: CurveZMQ key pairs and the relay's allow-list (thin commands over :mod:`tmrl_common.curve`).

Allow-list layout (one directory, ``--allow-dir``): worker keys are ``<allow-dir>/NAME.key``, trainer keys are
``<allow-dir>/trainers/NAME.key`` (:func:`role_dir`; ``keys add --role trainer``), so a worker's key never opens the
trainer socket, which can publish weights to every worker. One key has one role: adding a key that the other role's
list already holds is refused. :func:`write_local_setup` makes every pair and entry of a one-machine setup
(``tmrl-relay keys init``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import typer
from tmrl_common.config import load_config
from tmrl_common.curve import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    AllowedKey,
    KeyFileError,
    KeyPairFiles,
    allow_public_key,
    check_key_name,
    generate_key_pair,
    load_public_key,
    read_allowed_keys,
    revoke_public_key,
)
from tmrl_common.errors import ConfigError
from tmrl_common.options import FOLDER_OPTION

from tmrl_relay.config import TRAINER_ALLOWLIST_SUBDIR

keys_app = typer.Typer(help="CurveZMQ keys: generate key pairs, manage the relay's allow-list.", no_args_is_help=True)

KeyRole = Literal["worker", "trainer"]
RELAY_KEY_NAME = "relay"


class Role(StrEnum):
    """Which relay socket a key may use."""

    worker = "worker"
    trainer = "trainer"


def role_dir(allow_dir: Path, role: Role | KeyRole) -> Path:
    """Where keys of ``role`` are allowed: ``allow_dir`` itself for workers, ``allow_dir/trainers`` for trainers."""
    return Path(allow_dir) / TRAINER_ALLOWLIST_SUBDIR if Role(role) is Role.trainer else Path(allow_dir)


def allow_key_for_role(allow_dir: Path, public_key_file: Path, role: Role | KeyRole = Role.worker,
                       name: str | None = None, *, overwrite: bool = False) -> AllowedKey:
    """Allow the public key in ``public_key_file`` for ``role`` (into :func:`role_dir`); raises
    :class:`KeyFileError` if the other role's list holds it."""
    role = Role(role)
    other = Role.worker if role is Role.trainer else Role.trainer
    key = load_public_key(public_key_file)
    other_dir = role_dir(allow_dir, other)
    if other_dir.is_dir():
        for entry in read_allowed_keys(other_dir)[0]:  # a broken entry admits no one: it must not block an addition
            if entry.public_key == key:
                raise KeyFileError(f"this key is allowed as a {other.value} ({entry.path}); one key has one role: remove "
                                   f"it with `tmrl-relay keys remove {entry.name} --allow-dir {allow_dir} --role "
                                   f"{other.value}` or give the {role.value} its own key pair")
    return allow_public_key(role_dir(allow_dir, role), public_key_file, name, overwrite=overwrite)


@dataclass(frozen=True)
class LocalSetup:
    """What :func:`write_local_setup` made or found: ``pairs`` by name, ``allowed`` entries, ``kept`` pair names
    that already existed (left untouched, so running the setup twice changes nothing)."""

    pairs: dict[str, KeyPairFiles]
    allowed: list[AllowedKey]
    kept: list[str]


def _pair_of(keys_dir: Path, name: str) -> tuple[KeyPairFiles, bool]:
    """The pair ``name`` in ``keys_dir``, generated unless both files exist; the flag says whether it existed."""
    files = KeyPairFiles(keys_dir / f"{name}{PUBLIC_SUFFIX}", keys_dir / f"{name}{SECRET_SUFFIX}")
    if files.public_file.is_file() and files.secret_file.is_file():
        return files, True
    return generate_key_pair(keys_dir, name), False


def write_local_setup(keys_dir: Path, allow_dir: Path, workers: list[str], trainer: str = "trainer") -> LocalSetup:
    """Every key pair and allow-list entry of a one-machine setup: the relay's pair, the trainer's pair allowed in
    ``allow_dir/trainers``, one pair per worker allowed in ``allow_dir``. Existing pairs are kept (and allowed)."""
    if not workers:
        raise KeyFileError("name at least one worker (e.g. --worker worker-1)")
    keys_dir = Path(keys_dir)
    for name in (trainer, *workers):  # all of them before any file is written (a bad last name left half a setup)
        check_key_name(name)
    pairs: dict[str, KeyPairFiles] = {}
    kept: list[str] = []
    allowed: list[AllowedKey] = []
    plan: list[tuple[str, KeyRole | None]] = [(RELAY_KEY_NAME, None), (trainer, "trainer")]
    plan += [(worker, "worker") for worker in workers]
    for name, role in plan:
        pairs[name], existed = _pair_of(keys_dir, name)
        if existed:
            kept.append(name)
        if role is not None:
            allowed.append(allow_key_for_role(allow_dir, pairs[name].public_file, role))
    return LocalSetup(pairs=pairs, allowed=allowed, kept=kept)


def _fail(exc: Exception) -> typer.Exit:
    """One line and exit status 2; an OS error (a name too long for the file system: a traceback before, a re-check
    probe) names the path and the reason."""
    if isinstance(exc, OSError):
        where = f"cannot use {exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
    else:
        typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


@keys_app.command("generate")
def generate(
    directory: Path = typer.Option(..., "--dir", **FOLDER_OPTION, help="Directory to write NAME.key (public) and NAME.key_secret into."),
    name: str = typer.Option(..., "--name", help="Key name, e.g. relay, trainer, worker-1."),
    role: str | None = typer.Option(None, "--role", help="relay, trainer or worker: whose key it is, for the advice "
                                    "printed (default: from the name: relay*, trainer*, else worker)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pair of that name."),
) -> None:
    """Generate a key pair (for the relay itself, the trainer or a worker) and say where each half goes."""
    role = role or next((r for r in (RELAY_KEY_NAME, "trainer") if name.startswith(r)), "worker")
    if role not in (RELAY_KEY_NAME, "trainer", "worker"):
        raise _fail(KeyFileError(f"--role must be relay, trainer or worker, got {role!r}"))
    try:
        files = generate_key_pair(directory, name, overwrite=force)
    except (KeyFileError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"secret key: {files.secret_file}  (keep it on this machine only; mode 600)")
    if role == RELAY_KEY_NAME:
        typer.echo(f"public key: {files.public_file}  (the relay's own key: copy it to every worker and trainer, "
                   "which pass it as --server-key; it is not added to the allow-list)")
        typer.echo(f"run: tmrl-relay run --secret-key {files.secret_file} --allow-dir ALLOW")
        return
    typer.echo(f"public key: {files.public_file}  (copy it to the relay host, which allows this {role} with: "
               f"tmrl-relay keys add {files.public_file.name} --allow-dir ALLOW --role {role})")
    relay_public = files.public_file.with_name(f"{RELAY_KEY_NAME}{PUBLIC_SUFFIX}")  # where deployment.md copies it, as keys init
    typer.echo(f"run: tmrl-{role} run --secret-key {files.secret_file} --server-key {relay_public} ...  "
               f"({relay_public.name}: the relay's public key, copied from the relay host next to this pair)")


@keys_app.command("init")
def init(
    directory: Path = typer.Option(Path("keys"), "--dir", **FOLDER_OPTION, help="Directory of the key pairs (relay, trainer, workers)."),
    allow_dir: Path = typer.Option(Path("allow"), "--allow-dir", **FOLDER_OPTION,
                                   help="The relay's allow-list: workers in it, the trainer in its trainers/ folder."),
    workers: list[str] = typer.Option(["worker-1"], "--worker", help="A worker's name (repeat for more workers)."),
    trainer: str = typer.Option("trainer", "--trainer", help="The trainer's key name."),
) -> None:
    """One machine, every key at once: the relay's pair, the trainer's and each worker's, all allow-listed.

    Running it again keeps existing pairs (and allows them again). For several machines, generate each client's pair
    where it runs (`keys generate`) and `keys add` its public key on the relay host instead."""
    try:
        setup = write_local_setup(directory, allow_dir, workers, trainer)
    except (KeyFileError, OSError) as exc:
        raise _fail(exc) from exc
    for name, files in setup.pairs.items():
        typer.echo(f"{'kept' if name in setup.kept else 'made'} {files.public_file} + {files.secret_file.name}")
    for entry in setup.allowed:
        typer.echo(f"allowed {entry.name} -> {entry.path}")
    relay = setup.pairs[RELAY_KEY_NAME]
    typer.echo(f"relay:   tmrl-relay run --secret-key {relay.secret_file} --allow-dir {allow_dir}")
    typer.echo(f"clients: --secret-key {directory}/NAME.key_secret --server-key {relay.public_file}")


@keys_app.command("add")
def add(
    public_key_file: Path = typer.Argument(..., help="A client's public certificate (NAME.key)."),
    allow_dir: Path = typer.Option(..., "--allow-dir", **FOLDER_OPTION, help="The relay's allow-list directory."),
    name: str | None = typer.Option(None, "--name", help="Name in the allow-list (default: the file's name)."),
    force: bool = typer.Option(False, "--force", help="Replace a different key already allowed under that name."),
    role: Role = typer.Option(Role.worker, "--role", help="worker: workers and weights sockets; trainer: the trainer "
                                                          "socket (kept in ALLOW/trainers)."),
) -> None:
    """Allow a client's public key for a role; a running relay picks it up within allowlist_reload_s."""
    try:
        entry = allow_key_for_role(allow_dir, public_key_file, role, name, overwrite=force)
    except (KeyFileError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"allowed {entry.name} as {role.value}: {entry.public_key.decode()} -> {entry.path}")
    if entry.name == RELAY_KEY_NAME:  # an operator probe allowed keys/relay.key without a word (the relay warns later)
        typer.echo(f"warning: {RELAY_KEY_NAME!r} is the name of the relay's own key pair (`keys init`, `keys generate "
                   f"--name {RELAY_KEY_NAME}`): a client must have a pair of its own (`tmrl-relay keys generate --name "
                   f"NAME`); if this is the relay's key, undo it with `tmrl-relay keys remove {RELAY_KEY_NAME} "
                   f"--allow-dir {allow_dir} --role {role.value}`", err=True)


@keys_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="Name of the allowed key."),
    allow_dir: Path = typer.Option(..., "--allow-dir", **FOLDER_OPTION, help="The relay's allow-list directory."),
    role: Role = typer.Option(Role.worker, "--role", help="The role the key was added for."),
) -> None:
    """Remove a key from the allow-list (new connections with it are refused; open ones last until they drop)."""
    try:
        path = revoke_public_key(role_dir(allow_dir, role), name)
    except (KeyFileError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"removed {path}")


@keys_app.command("list")
def list_keys(
    allow_dir: Path | None = typer.Option(None, "--allow-dir", **FOLDER_OPTION, help="The allow-list directory (default: from --config)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Relay TOML config: security.allowlist_dir is listed.",
                                          exists=True, dir_okay=False),
    role: Role = typer.Option(Role.worker, "--role", help="Which role's keys to list."),
) -> None:
    """List the allowed public keys of a role."""
    try:
        allow_dir = role_dir(allow_dir, role) if allow_dir is not None else _configured_allow_dir(config, role)
        entries, problems = read_allowed_keys(allow_dir)
    except (KeyFileError, ConfigError, OSError) as exc:
        raise _fail(exc) from exc
    for entry in entries:
        typer.echo(f"{entry.name}\t{entry.public_key.decode()}\t{entry.path}")
    if not entries:
        typer.echo(f"(no keys allowed in {allow_dir})", err=True)
    for problem in problems:  # listed after the good ones, which still admit their clients
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(code=1)


def _configured_allow_dir(config: Path | None, role: Role) -> Path:
    from tmrl_relay.config import RelayConfig

    relay_config = load_config(RelayConfig, "relay", config)
    if role is Role.trainer and relay_config.trainer_allowlist_dir is not None:
        return relay_config.trainer_allowlist_dir
    if relay_config.security.allowlist_dir is None:
        raise ConfigError("no allow-list directory: pass --allow-dir DIR or set [relay.security] allowlist_dir")
    return role_dir(relay_config.security.allowlist_dir, role)
