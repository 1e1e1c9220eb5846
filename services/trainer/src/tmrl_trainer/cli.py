"""``tmrl-trainer``: Soft Actor-Critic trainer."""

from __future__ import annotations

from pathlib import Path

import typer
from tmrl_common.config import load_config_for_command
from tmrl_common.options import FOLDER_OPTION, HELP, LogLevel, config_help, configure_logging

from tmrl_trainer.config import TrainerConfig
from tmrl_trainer.export_cli import export_command

TRAINER_FINISHING = "it saves its final checkpoint first; SIGKILL would lose what it has not saved"
"""What a trainer still does after a stop signal, said when another one comes."""

app = typer.Typer(help="tmrl trainer: learns from worker samples with SAC and publishes policy weights.",
                  no_args_is_help=True)
app.command("export")(export_command)  # ONNX / policy file from a run (tmrl_trainer.policy_export)


@app.callback()
def main() -> None:
    """tmrl trainer service. Every command takes --config FILE; TMRL_TRAINER__<FIELD> env vars override it."""


ConfigOption = typer.Option(None, "--config", "-c", help=config_help("trainer"), exists=True, dir_okay=False)
ShowConfigOption = typer.Option(False, "--show-config", help=HELP["show_config"])
LogLevelOption = typer.Option(LogLevel.INFO, "--log-level", case_sensitive=False, help=HELP["log_level"])


@app.command()
def run(
    config: Path | None = ConfigOption,
    show_config: bool = ShowConfigOption,
    env: str | None = typer.Option(None, "--env", help=HELP["env"] + " The workers' env: it fixes the observation "
                                   "layout (module:Class envs need layout_file)."),
    layout_file: Path | None = typer.Option(None, "--layout-file", exists=True, dir_okay=False, help="The workers' "
                                            "observation layout (JSON, from `tmrl-worker layout --env ...`); "
                                            "overrides the one --env implies. Needed for module:Class envs."),
    relay_host: str | None = typer.Option(None, "--relay-host", help=HELP["relay_host"]),
    trainer_port: int | None = typer.Option(None, "--trainer-port", help=HELP["trainer_port"]),
    run_dir: Path | None = typer.Option(None, "--run-dir", **FOLDER_OPTION, help="status.json, metrics.jsonl, tensorboard/, checkpoints/."),
    device: str | None = typer.Option(None, "--device", help=HELP["device"]),
    max_updates: int | None = typer.Option(None, "--max-updates", min=1, help="Stop once the learner has made this many SAC "
                                             "updates in all (a resumed run counts its checkpoint's)."),
    seed: int | None = typer.Option(None, "--seed", help=HELP["seed"] + " It draws the networks' initial weights and the minibatches."),
    torch_threads: int | None = typer.Option(None, "--torch-threads", "--threads", min=1, help=HELP["torch_threads"]),
    save_memory: bool = typer.Option(False, "--save-memory", help=HELP["save_memory"] + " A restart restores it."),
    insecure: bool = typer.Option(False, "--insecure", help=HELP["insecure"]),
    secret_key: Path | None = typer.Option(None, "--secret-key", help=HELP["secret_key"], exists=True, dir_okay=False),
    server_key: Path | None = typer.Option(None, "--server-key", help=HELP["server_key"], exists=True, dir_okay=False),
    log_level: LogLevel = LogLevelOption,
) -> None:
    """Run the trainer in the foreground: ingest samples from the relay, train SAC, publish weights.

    It logs the device it trains on first. If the relay refuses this trainer's key (not in its ALLOW/trainers
    allow-list), an error says so within a second with the `tmrl-relay keys add` command that fixes it, and the
    trainer retries every 10 s."""
    import logging
    import threading

    from tmrl_common.errors import ConfigError
    from tmrl_common.stop_signals import ignore_stop_signals, install_stop_signals, stopping

    stop = threading.Event()
    # first: a SIGTERM during the imports below stops the trainer cleanly instead of killing it; and never
    # stop.set() inside a signal handler, which can deadlock on the lock stop.wait() holds (tmrl_common.stop_signals)
    install_stop_signals(stopping(stop.set, logging.getLogger("tmrl_trainer"), TRAINER_FINISHING))
    overrides = {
        "env": env, "layout_file": layout_file, "relay_host": relay_host, "trainer_port": trainer_port,
        "run_dir": run_dir, "device": device, "seed": seed, "torch_threads": torch_threads, "save_memory": True if save_memory else None,
        "security": {"insecure": True if insecure else None, "secret_key_file": secret_key, "server_public_key_file": server_key},
    }
    effective = load_config_for_command(TrainerConfig, "trainer", config, overrides=overrides, show_config=show_config)
    configure_logging(log_level)
    from tmrl_common.curve import KeyFileError
    from tmrl_common.sockets import SecurityError

    from tmrl_trainer.checkpoint import CheckpointMismatchError
    from tmrl_trainer.service import TrainerService

    try:
        log_device(effective.device)
        service = TrainerService(effective)
        updates = service.run(stop=stop, max_updates=max_updates)
    except (ConfigError, SecurityError, KeyFileError, CheckpointMismatchError) as exc:  # what to fix, in one line
        typer.echo(f"tmrl-trainer: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):  # torch's CPU allocator says "allocate"
            raise
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        typer.echo(f"tmrl-trainer: not enough memory for this config ({first_line}): memory_capacity = "
                   f"{effective.memory_capacity} rows, sac.batch_size = {effective.sac.batch_size}, sac.hidden_sizes "
                   f"= {effective.sac.hidden_sizes}; lower the one that is too large", err=True)
        raise typer.Exit(code=2) from exc
    ignore_stop_signals()  # stopped cleanly: a repeated SIGTERM must not turn exit 0 into death by that signal
    typer.echo(f"trainer stopped after {updates} updates, weights version {service.weights_version}", err=True)
    if service.final_checkpoint_missing:  # logged above with why: status 1, so that a supervisor notices
        typer.echo("tmrl-trainer: the final checkpoint could not be saved (see the error above)", err=True)
        raise typer.Exit(code=1)


def log_device(device: str) -> None:
    """Log the device training will use (a GPU's name, or why it is the CPU); ConfigError when CUDA was asked for
    and this torch cannot use it, instead of torch's traceback later."""
    import logging

    import torch
    from tmrl_common.errors import ConfigError

    from tmrl_trainer.sac import resolve_device

    try:
        resolved = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"{exc}; this torch {torch.__version__} is {build} (a CUDA build: docs/deployment.md, "
                          "'The trainer's GPU')") from exc
    if resolved.type == "cuda":
        detail = f"{torch.cuda.get_device_name(resolved)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        detail = (f"torch {torch.__version__}; CUDA " + ("available but not asked for" if torch.cuda.is_available()
                                                          else "not available: this torch build or machine has no GPU"))
    logging.getLogger("tmrl_trainer").info("training on %s (%s)", resolved, detail)


def _return_text(value: float) -> str:
    """A return to one decimal, or to four significant digits when that would round it to 0 (rewards of 1e-6)."""
    return f"{value:.1f}" if abs(value) >= 1.0 or value == 0.0 else f"{value:.4g}"


@app.command("train-local")
def train_local_command(
    env: str = typer.Option("gym:Pendulum-v1", "--env", help="gym:<id>, any gymnasium env, e.g. gym:Pendulum-v1 or "
                            "gym:module.path:ns/Env-v0 (a bare id works too)."),
    max_steps: int = typer.Option(10_000, "--max-steps", "--steps", min=1, help=HELP["max_steps"]),
    seed: int = typer.Option(0, "--seed", help=HELP["seed"] + " It draws the initial weights, environment resets, exploration and minibatches."),
    config: Path | None = ConfigOption,
    show_config: bool = ShowConfigOption,
    device: str | None = typer.Option(None, "--device", help=HELP["device"] + " Default: the config's device."),
    utd: float | None = typer.Option(None, "--utd", help="Updates per environment step (default: sac.utd)."),
    eval_episodes: int = typer.Option(10, "--eval-episodes", min=0, help="Deterministic episodes of each evaluation."),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Steps between evaluations (0: only at the end)."),
    run_dir: Path | None = typer.Option(None, "--run-dir", **FOLDER_OPTION, help="tensorboard/ and checkpoints/ go here \\[runs/local/<env>-s<seed>]."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="Steps between checkpoints (0: at the end)."),
    save_memory: bool = typer.Option(False, "--save-memory", help=HELP["save_memory"] + " train-local never resumes "
                                     "from it: each run starts afresh."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run directory that holds a checkpoint "
                                   "of an earlier run (replacing it and its TensorBoard logs); without it such a run "
                                   "directory is refused."),
    torch_threads: int | None = typer.Option(None, "--torch-threads", "--threads", min=1, help=HELP["torch_threads"]),
    log_level: LogLevel = LogLevelOption,
) -> None:
    """Train SAC synchronously in one process on a gymnasium env (quick experiments; no relay, no workers).

    Ctrl-C (or SIGTERM) ends the run after the current step: it saves the checkpoint, skips the final evaluation and
    exits 0. An env that raises or returns a NaN or infinite value ends the run in one line, exit 1, with the
    checkpoint of the steps before saved; observations outside the env's space are clipped into it, as a worker does;
    an evaluation episode ends after 10,000 steps at most."""
    import logging
    import re
    import threading

    from tmrl_common.stop_signals import ignore_stop_signals, install_stop_signals, stopping

    stop = threading.Event()  # first, as in run: a signal during the imports below stops the run cleanly
    install_stop_signals(stopping(stop.set, logging.getLogger("tmrl_trainer"), TRAINER_FINISHING))
    import torch
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from tmrl_common.config import validation_problems
    from tmrl_common.errors import ConfigError

    from tmrl_trainer.local import (
        LATEST_LOCAL_CHECKPOINT,
        LocalEnvFailure,
        LocalTrainingConfig,
        UnsupportedEnvironmentError,
        check_local_env,
        train_local,
        what_was_saved,
    )
    from tmrl_trainer.service import writable_directory

    overrides = {"device": device, "torch_threads": torch_threads, "seed": seed, "save_memory": True if save_memory else None,
                 "sac": {"utd": utd}}  # checked with the config (a model_copy skipped it: --utd inf hung)
    trainer = load_config_for_command(TrainerConfig, "trainer", config, overrides=overrides, show_config=show_config)
    configure_logging(log_level)
    try:
        log_device(trainer.device)
    except ConfigError as exc:
        typer.echo(f"tmrl-trainer train-local: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    if trainer.torch_threads is not None:
        torch.set_num_threads(trainer.torch_threads)
    env = env.removeprefix("gym:")
    steps = max_steps
    run_dir = run_dir or Path("runs/local") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', env)}-s{seed}"
    try:
        local = LocalTrainingConfig(sac=trainer.sac, memory_capacity=trainer.memory_capacity, device=trainer.device,
                                    eval_episodes=eval_episodes, eval_every=eval_every, run_dir=run_dir,
                                    checkpoint_every=checkpoint_every, save_memory=trainer.save_memory)
    except ValidationError as exc:
        typer.echo(f"tmrl-trainer train-local: {validation_problems(LocalTrainingConfig, exc)}", err=True)
        raise typer.Exit(code=2) from exc
    try:  # before the run directory and the progress bar are made (a probe's module:Class left both behind)
        check_local_env(env)
    except UnsupportedEnvironmentError as exc:
        typer.echo(f"tmrl-trainer train-local: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    earlier = run_dir / "checkpoints" / LATEST_LOCAL_CHECKPOINT
    try:
        had_earlier = earlier.exists()
    except OSError as exc:  # a name longer than the file system takes: a traceback before (a CLI probe)
        typer.echo(f"tmrl-trainer train-local: cannot use --run-dir {run_dir}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=2) from exc
    if had_earlier and not overwrite:
        typer.echo(f"tmrl-trainer train-local: {run_dir} holds the checkpoint of an earlier run ({earlier}); "
                   "train-local does not resume: pass --overwrite to start over there, or give another --run-dir",
                   err=True)
        raise typer.Exit(code=2)
    try:  # before training, not at its end: a run directory that cannot hold the checkpoint loses the whole run
        if had_earlier:  # --overwrite: the earlier run's curves would be drawn with this one's (a probe)
            stale = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
            for path in stale:  # only TensorBoard's own files (a re-check: other files there went too)
                try:
                    path.unlink()
                except OSError as exc:
                    raise ConfigError(f"--overwrite: cannot remove the earlier run's {path}: "
                                      f"{exc.strerror or exc}") from exc
            if stale:
                logging.getLogger("tmrl_trainer").info("--overwrite: removed the earlier run's %d TensorBoard event "
                                                       "file(s) from %s", len(stale), run_dir / "tensorboard")
        for folder in (run_dir / "checkpoints", run_dir / "tensorboard"):
            writable_directory(folder)
    except ConfigError as exc:
        typer.echo(f"tmrl-trainer train-local: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    if steps < local.sac.learning_starts:  # an outside probe read the untrained policy's return as a result
        logging.getLogger("tmrl_trainer").warning(
            "--steps %d is below sac.learning_starts (%d rows of the replay memory, a reset's included): few or no "
            "updates will be made, and the final evaluation measures a policy that has barely trained", steps,
            local.sac.learning_starts)
    last = {"episode": float("nan"), "eval": float("nan")}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("episode return {task.fields[episode]:9.1f}  eval {task.fields[eval]:9.1f}"),
                  TimeRemainingColumn()) as progress:
        task = progress.add_task(f"{env} seed {seed}", total=steps, episode=last["episode"], eval=last["eval"])

        def on_progress(step: int, info: dict[str, float]) -> None:
            last["episode"] = info.get("episode_return", last["episode"])
            last["eval"] = info.get("eval_return", last["eval"])
            if step % 50 == 0 or info:
                progress.update(task, completed=step, episode=last["episode"], eval=last["eval"])

        try:
            result = train_local(env, steps, seed, local, on_progress=on_progress, stop=stop)
        except UnsupportedEnvironmentError as exc:
            typer.echo(f"tmrl-trainer train-local: {exc}", err=True)
            raise typer.Exit(code=2) from exc
        except LocalEnvFailure as exc:  # the env failed mid-run: the steps before are saved, the line says where
            progress.stop()
            typer.echo(f"tmrl-trainer train-local: {exc}", err=True)
            raise typer.Exit(code=1) from exc
        progress.update(task, completed=result.steps, eval=result.final_return)
    ignore_stop_signals()  # stopped cleanly: a repeated Ctrl-C must not turn exit 0 into death by that signal
    if result.stopped:
        typer.echo(f"{env} seed {seed}: stopped at step {result.steps} of {steps}, {result.updates} updates, "
                   f"{result.episodes} episodes in {result.wall_s:.1f} s (no final evaluation)")
    else:
        final = (f"final deterministic return {_return_text(result.final_return)} (mean of "
                 f"{len(result.final_returns)} episodes)" if result.final_returns else "no final evaluation (--eval-episodes 0)")
        typer.echo(f"{env} seed {seed}: {steps} steps, {result.updates} updates, {result.episodes} episodes in "
                   f"{result.wall_s:.1f} s; {final}")
    typer.echo(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}; checkpoint: "
               f"{result.checkpoint or 'none written'}")
    if result.checkpoint_error is not None:  # the run's last state is not on disk: not a success
        typer.echo(f"tmrl-trainer train-local: {what_was_saved(result)}", err=True)
        raise typer.Exit(code=1)
