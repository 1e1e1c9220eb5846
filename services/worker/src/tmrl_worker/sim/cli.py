"""``tmrl-worker sim ...``: look at the built-in simulator (tracks, pictures, a scripted drive, speed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tmrl_common.options import HELP

sim_app = typer.Typer(help="Built-in race-track simulator: tracks, pictures, scripted drives.", no_args_is_help=True)

TrackOption = Annotated[str, typer.Option("--track", "-t", help="oval, hairpins, circuit, random:SEED, random-open:SEED or file:PATH (a track file).")]
FullThrottleOption = Annotated[bool, typer.Option("--full-throttle", help="The driver never brakes.")]


@sim_app.command("tracks")
def tracks() -> None:
    """List the built-in tracks with their length and shape."""
    from tmrl_worker.sim.track import BUILTIN_TRACKS, load_track, min_turn_radius

    for name in BUILTIN_TRACKS:
        track = load_track(name)
        typer.echo(f"{name:10s} {track.length:6.0f} m  {'closed' if track.closed else 'open  '}  width {track.width:4.1f} m"
                   f"  tightest turn radius {min_turn_radius(track.centre, track.closed):5.1f} m")
    typer.echo("random:SEED / random-open:SEED   a generated closed / open track")
    typer.echo("file:PATH                        a track of your own, from a TOML file (docs/tuning.md)")


def _writable(path: Path, what: str, suffix: str | None = None) -> None:
    """End the command (one line, status 2) unless ``path`` can be written, before the drive."""
    from tmrl_common.atomic_file import OutputPathError, prepare_output_file

    try:
        prepare_output_file(path, what, suffix)
    except OutputPathError as exc:
        typer.echo(f"tmrl-worker sim: {exc}", err=True)
        raise typer.Exit(code=2) from exc


@sim_app.command("render-track")
def render_track(
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.", dir_okay=False)],
    track: TrackOption = "hairpins",
    drive: Annotated[bool, typer.Option("--drive/--no-drive", help="Draw the scripted driver's trajectory.")] = True,
    full_throttle: FullThrottleOption = False,
    gif: Annotated[Path | None, typer.Option("--gif", help="Also write a GIF of the episode.", dir_okay=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help=HELP["seed"], min=0, max=2**32 - 1)] = 0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop the drive after this many steps.", min=1)] = 2000,
) -> None:
    """Write a PNG of a track (with a driven trajectory coloured by speed) and optionally a GIF of the drive."""
    from tmrl_worker.sim.render import render_track_png
    from tmrl_worker.sim.rollout import render_drive
    from tmrl_worker.sim.track import TrackError, load_track

    _writable(output, "--output", ".png")
    if gif is not None:
        _writable(gif, "--gif", ".gif")
    try:
        if not drive:
            render_track_png(load_track(track), output)
            typer.echo(f"wrote {output}")
            return
        record = render_drive(track, png=output, gif=gif, brake=not full_throttle, seed=seed, max_episode_steps=max_steps)
    except TrackError as exc:
        typer.echo(f"tmrl-worker sim: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"{track}: {'finished' if record.finished else 'did not finish'} in {record.steps} steps "
               f"({record.seconds:.2f} s), return {record.episode_return:.1f}, {record.crashes} crash(es); wrote {output}"
               + (f" and {gif}" if gif else ""))


@sim_app.command("record-demo")
def record_demo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Reward points file to write (safetensors).", dir_okay=False)],
    track: TrackOption = "hairpins",
    spacing: Annotated[float, typer.Option("--spacing", help="Distance between reward points (m).", min=0.05)] = 0.5,
) -> None:
    """Record the scripted expert's path as a reward demonstration (use it with demo_path = FILE)."""
    from tmrl_worker.sim.rollout import record_demo
    from tmrl_worker.sim.track import TrackError

    _writable(output, "--output")
    try:
        record = record_demo(track, output, spacing=spacing)
    except (TrackError, RuntimeError) as exc:
        typer.echo(f"tmrl-worker sim: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"{track}: demonstration of {record.seconds:.2f} s saved to {output}")


@sim_app.command("drive")
def drive_command(
    track: TrackOption = "hairpins",
    episodes: Annotated[int, typer.Option("--episodes", "-n", min=1, help="Episodes to drive.")] = 1,
    full_throttle: FullThrottleOption = False,
) -> None:
    """Drive the scripted expert in fast mode and print lap times and returns."""
    from tmrl_worker.sim.env import RaceTrackEnv
    from tmrl_worker.sim.rollout import drive_episode
    from tmrl_worker.sim.track import TrackError

    try:
        env = RaceTrackEnv(track=track, max_episode_steps=5000)
    except TrackError as exc:
        typer.echo(f"tmrl-worker sim: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    for episode in range(episodes):
        record = drive_episode(env, brake=not full_throttle, seed=episode)
        typer.echo(f"episode {episode}: {'finished' if record.finished else 'stopped'} after {record.seconds:.2f} s, "
                   f"return {record.episode_return:.1f}, top speed {record.speeds_kmh.max():.0f} km/h, "
                   f"{record.crashes} crash(es)")
