"""``tmrl-trainer``: Soft Actor-Critic trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmrl_common.config import load_config, render_config
from tmrl_trainer.config import TrainerConfig

app = typer.Typer(help="tmrl trainer: learns from worker samples with SAC and publishes policy weights.",
                  no_args_is_help=True)


@app.callback()
def main() -> None:
    """tmrl trainer service. Every command takes --config FILE; TMRL_TRAINER__<FIELD> env vars override it."""


ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file; the [trainer] table is read.", exists=True, dir_okay=False)


@app.command()
def run(config: Optional[Path] = ConfigOption,
        show_config: bool = typer.Option(False, "--show-config", help="Print the effective config and exit.")) -> None:
    """Run the trainer in the foreground."""
    effective = load_config(TrainerConfig, "trainer", config)
    if show_config:
        typer.echo(render_config(effective, "trainer"))
        raise typer.Exit()
    typer.echo("trainer run: not implemented yet", err=True)
    raise typer.Exit(code=3)
