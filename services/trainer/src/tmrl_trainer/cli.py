"""``tmrl-trainer``: Soft Actor-Critic trainer."""

from __future__ import annotations

from pathlib import Path

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
def run(
    config: Path | None = ConfigOption,
    show_config: bool = typer.Option(False, "--show-config", help="Print the effective config and exit."),
    env: str | None = typer.Option(None, "--env", help="The workers' env (fixes the observation layout): sim, tm20-lidar, gym:<id>..."),
    relay_host: str | None = typer.Option(None, "--relay-host"),
    trainer_port: int | None = typer.Option(None, "--trainer-port"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="status.json, metrics.jsonl, tensorboard/, checkpoints/."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N]."),
    max_updates: int | None = typer.Option(None, "--max-updates", help="Stop after this many SAC updates."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain-text ZeroMQ, no CurveZMQ (trusted loopback only)."),
    secret_key: Path | None = typer.Option(None, "--secret-key", help="This client's NAME.key_secret (CurveZMQ).", exists=True, dir_okay=False),
    server_key: Path | None = typer.Option(None, "--server-key", help="The relay's public NAME.key (CurveZMQ).", exists=True, dir_okay=False),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run the trainer in the foreground: ingest samples from the relay, train SAC, publish weights."""
    import logging
    import signal
    import threading

    from tmrl_common.errors import ConfigError

    overrides = {"env": env, "relay_host": relay_host, "trainer_port": trainer_port, "run_dir": run_dir, "device": device}
    try:
        effective = load_config(TrainerConfig, "trainer", config, overrides=overrides)
        security = {"insecure": True if insecure else None, "secret_key_file": secret_key, "server_public_key_file": server_key}
        security = {k: v for k, v in security.items() if v is not None}
        if security:
            effective = effective.model_copy(update={"security": effective.security.model_copy(update=security)})
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=2) from exc
    if show_config:
        typer.echo(render_config(effective, "trainer"))
        raise typer.Exit()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tmrl_common.sockets import SecurityError

    from tmrl_trainer.service import TrainerService

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        service = TrainerService(effective)
        updates = service.run(stop=stop, max_updates=max_updates)
    except (ConfigError, SecurityError) as exc:
        typer.echo(f"tmrl-trainer: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"trainer stopped after {updates} updates, weights version {service.weights_version}", err=True)
