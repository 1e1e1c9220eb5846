"""``tmrl-relay keys ...``: CurveZMQ key pairs and the relay's allow-list (thin commands over :mod:`tmrl_common.curve`)."""

from __future__ import annotations

from pathlib import Path

import typer
from tmrl_common.config import load_config
from tmrl_common.curve import (
    KeyFileError,
    allow_public_key,
    generate_key_pair,
    list_allowed_keys,
    revoke_public_key,
)
from tmrl_common.errors import ConfigError

keys_app = typer.Typer(help="CurveZMQ keys: generate key pairs, manage the relay's allow-list.", no_args_is_help=True)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


@keys_app.command("generate")
def generate(
    directory: Path = typer.Option(..., "--dir", help="Directory to write NAME.key (public) and NAME.key_secret into."),
    name: str = typer.Option(..., "--name", help="Key name, e.g. relay, trainer, worker-1."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pair of that name."),
) -> None:
    """Generate a key pair (for the relay itself, the trainer or a worker)."""
    try:
        files = generate_key_pair(directory, name, overwrite=force)
    except KeyFileError as exc:
        raise _fail(exc) from exc
    typer.echo(f"public key: {files.public_file}  (give it to the relay operator: tmrl-relay keys add)")
    typer.echo(f"secret key: {files.secret_file}  (keep it on this machine only; mode 600)")


@keys_app.command("add")
def add(
    public_key_file: Path = typer.Argument(..., help="A client's public certificate (NAME.key)."),
    allow_dir: Path = typer.Option(..., "--allow-dir", help="The relay's allow-list directory."),
    name: str | None = typer.Option(None, "--name", help="Name in the allow-list (default: the file's name)."),
    force: bool = typer.Option(False, "--force", help="Replace a different key already allowed under that name."),
) -> None:
    """Allow a client's public key; a running relay picks it up within allowlist_reload_s."""
    try:
        entry = allow_public_key(allow_dir, public_key_file, name, overwrite=force)
    except KeyFileError as exc:
        raise _fail(exc) from exc
    typer.echo(f"allowed {entry.name}: {entry.public_key.decode()} -> {entry.path}")


@keys_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="Name of the allowed key."),
    allow_dir: Path = typer.Option(..., "--allow-dir", help="The relay's allow-list directory."),
) -> None:
    """Remove a key from the allow-list (new connections with it are refused; open ones last until they drop)."""
    try:
        path = revoke_public_key(allow_dir, name)
    except KeyFileError as exc:
        raise _fail(exc) from exc
    typer.echo(f"removed {path}")


@keys_app.command("list")
def list_keys(
    allow_dir: Path | None = typer.Option(None, "--allow-dir", help="The allow-list directory (default: from --config)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Relay TOML config: security.allowlist_dir is listed.",
                                          exists=True, dir_okay=False),
) -> None:
    """List the allowed public keys."""
    try:
        if allow_dir is None:
            allow_dir = _configured_allow_dir(config)
        entries = list_allowed_keys(allow_dir)
    except (KeyFileError, ConfigError) as exc:
        raise _fail(exc) from exc
    for entry in entries:
        typer.echo(f"{entry.name}\t{entry.public_key.decode()}\t{entry.path}")
    if not entries:
        typer.echo(f"(no keys allowed in {allow_dir})", err=True)


def _configured_allow_dir(config: Path | None) -> Path:
    from tmrl_relay.config import RelayConfig

    relay_config = load_config(RelayConfig, "relay", config)
    if relay_config.security.allowlist_dir is None:
        raise ConfigError("no allow-list directory: pass --allow-dir DIR or set [relay.security] allowlist_dir")
    return relay_config.security.allowlist_dir
