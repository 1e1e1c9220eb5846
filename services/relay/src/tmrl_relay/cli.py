"""``tmrl-relay``: the ZeroMQ broker between workers and the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmrl_common.config import load_config, render_config
from tmrl_relay.config import RelayConfig

app = typer.Typer(help="tmrl relay: forwards sample batches from workers to the trainer and weights back to workers.",
                  no_args_is_help=True)


@app.callback()
def main() -> None:
    """tmrl relay service. Every command takes --config FILE; TMRL_RELAY__<FIELD> env vars override it."""


ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file; the [relay] table is read.", exists=True, dir_okay=False)


@app.command()
def run(config: Optional[Path] = ConfigOption,
        show_config: bool = typer.Option(False, "--show-config", help="Print the effective config and exit.")) -> None:
    """Run the relay in the foreground."""
    effective = load_config(RelayConfig, "relay", config)
    if show_config:
        typer.echo(render_config(effective, "relay"))
        raise typer.Exit()
    raise typer.Exit(code=_not_built("relay run"))


def _not_built(what: str) -> int:
    typer.echo(f"{what}: not implemented yet", err=True)
    return 3
