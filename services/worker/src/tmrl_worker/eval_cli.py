"""``tmrl-worker eval``: the command-line entry of :mod:`tmrl_worker.evaluate` (argument parsing only)."""

from __future__ import annotations

from pathlib import Path

import typer
from tmrl_common.options import HELP, config_help

MAX_EPISODES = 10_000
"""``--episodes``' upper bound: :data:`tmrl_worker.evaluate.MAX_EPISODES` (not imported here, so that ``--help``
needs no torch)."""


def eval_command(
    policy: Path = typer.Option(..., "--policy", help="Policy file: safetensors (a trainer run's policy.safetensors) or ONNX "
                                "(tmrl-trainer export --onnx, name ending in .onnx; needs onnxruntime).",
                                exists=True, dir_okay=False),
    env: str | None = typer.Option(None, "--env", help=HELP["env"] + " sim is evaluated synchronously, as sim-fast "
                                                       "(default: the config's env, else sim)."),
    track: str | None = typer.Option(None, "--track", "-t", help="sim only: oval, hairpins, circuit, random:SEED, random-open:SEED or file:PATH."),
    episodes: int = typer.Option(5, "--episodes", "-n", min=1, max=MAX_EPISODES, help="Episodes to run."),
    seed: int = typer.Option(0, "--seed", min=0, help=HELP["seed"] + " Episode i is reset with seed SEED + i."),
    gif: Path | None = typer.Option(None, "--gif", help="Write a GIF of the best episode here (sim, gym:<id>; a name "
                                    "ending in .gif, its folder created if missing).", dir_okay=False),
    json_output: bool = typer.Option(False, "--json", help="Print the JSON summary on stdout (episode lines go to stderr)."),
    max_episode_steps: int | None = typer.Option(None, "--max-episode-steps", min=1, help="Truncate sim, TrackMania and module:Class "
                                                 "episodes after this many steps (default: the config's, else 1000); a "
                                                 "gym:<id> env keeps its own time limit (env_options max_episode_steps "
                                                 "changes it)."),
    config: Path | None = typer.Option(None, "--config", "-c", help=config_help("worker") + " Eval reads env, env_options, "
                                       "time_step_duration and max_episode_steps.", exists=True, dir_okay=False),
) -> None:
    """Evaluate a saved policy deterministically: one line per episode, the mean and spread, optionally a GIF and a
    JSON summary. No relay, no trainer. module:Class envs run in real time (rtgym paces them)."""
    import torch
    from pydantic import ValidationError
    from tmrl_common.config import load_config_for_command

    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.envs import EnvFailure, EnvSpecError, one_line_message
    from tmrl_worker.evaluate import EvalConfig, GifPathError, episode_line, evaluate, summary_line
    from tmrl_worker.runtime import PolicyFileError
    from tmrl_worker.sim.track import TrackError

    worker = load_config_for_command(WorkerConfig, "worker", config,
                                     overrides={"env": env, "max_episode_steps": max_episode_steps})
    try:
        settings = EvalConfig(policy=policy, env=worker.env, track=track, episodes=episodes, seed=seed,
                              time_step_duration=worker.time_step_duration, max_episode_steps=worker.max_episode_steps,
                              env_options=worker.env_options, gif=gif)
    except ValidationError as exc:
        typer.echo(f"tmrl-worker eval: invalid settings: {one_line_message(exc)}", err=True)
        raise typer.Exit(code=2) from exc
    torch.set_num_threads(1)  # one observation at a time: extra threads only add latency
    late_steps = _LateStepCount()
    try:
        with late_steps:
            summary = evaluate(settings, on_episode=lambda result: typer.echo(episode_line(result), err=json_output))
    except (EnvSpecError, PolicyFileError, TrackError, GifPathError) as exc:
        typer.echo(f"tmrl-worker eval: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except EnvFailure as exc:  # the env gave up while running (e.g. the game did not restart)
        typer.echo(f"tmrl-worker eval: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    late = f"; {late_steps.count} time step(s) ran late (rtgym's time-step time-out)" if late_steps.count else ""
    typer.echo(summary_line(summary) + late + (f"; GIF: {summary.gif}" if summary.gif else ""), err=json_output)
    if json_output:
        typer.echo(summary.to_json())
    if summary.gif_error is not None:  # the results above stand, but the GIF asked for was not written
        typer.echo(f"tmrl-worker eval: no GIF written: {summary.gif_error}", err=True)
        raise typer.Exit(code=1)


class _LateStepCount:
    """Counts rtgym's "Time-step timed out" warnings instead of printing each between the episode lines (an
    emulated-game probe saw eight of them in one evaluation's output); other warnings show as usual. Inside,
    ``warnings.catch_warnings`` makes every late step reach the count (whatever ``-W`` or an earlier identical warning
    would have hidden) and restores the warning filters and display on the way out."""

    def __init__(self) -> None:
        self.count = 0
        self._caught = None

    def __enter__(self) -> _LateStepCount:
        import warnings

        self._caught = warnings.catch_warnings()
        self._caught.__enter__()
        warnings.filterwarnings("always", message="Time-step timed out", category=UserWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
            if issubclass(category, UserWarning) and str(message).startswith("Time-step timed out"):
                self.count += 1
                return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc: object) -> None:
        self._caught.__exit__(*exc)
