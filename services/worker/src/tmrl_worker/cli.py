"""``tmrl-worker``: a rollout worker."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmrl_common.config import load_config, render_config
from tmrl_worker.config import WorkerConfig

app = typer.Typer(help="tmrl rollout worker: runs a real-time environment and sends samples to the relay.",
                  no_args_is_help=True)


@app.callback()
def main() -> None:
    """tmrl worker service. Every command takes --config FILE; TMRL_WORKER__<FIELD> env vars override it."""


ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file; the [worker] table is read.", exists=True, dir_okay=False)


@app.command()
def run(config: Optional[Path] = ConfigOption,
        show_config: bool = typer.Option(False, "--show-config", help="Print the effective config and exit.")) -> None:
    """Run the worker in the foreground."""
    effective = load_config(WorkerConfig, "worker", config)
    if show_config:
        typer.echo(render_config(effective, "worker"))
        raise typer.Exit()
    typer.echo("worker run: not implemented yet", err=True)
    raise typer.Exit(code=3)
