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


# TrackMania 2020 tools (logic in tmrl_worker.tm20; these functions only parse arguments) -----------------------------
TelemetryPortOption = typer.Option(9000, "--telemetry-port", help="Port of the TMRL OpenPlanet plugin on 127.0.0.1.")
SyntheticOption = typer.Option(False, "--synthetic", help="No game: synthetic frames and telemetry served over loopback.")
CaptureOption = typer.Option("auto", "--capture", help="Screen capture: auto (dxcam on Windows, mss elsewhere), dxcam, mss.")
WindowTitleOption = typer.Option("Trackmania", "--window-title", help="Title of the game window.")


@app.command("record-reward")
def record_reward(
    output: Path = typer.Option(..., "--output", "-o", help="Reward points file to write (safetensors).", dir_okay=False),
    telemetry_port: int = TelemetryPortOption,
    spacing: float = typer.Option(0.5, "--spacing", help="Distance between reward points (m)."),
    max_seconds: float = typer.Option(900.0, "--max-seconds", help="Give up after this long."),
    raw_telemetry: Optional[Path] = typer.Option(None, "--raw-telemetry", help="Also save the raw packets (replayable).", dir_okay=False),
    save_unfinished: bool = typer.Option(False, "--save-unfinished", help="Save even if the finish line was not reached."),
    timeout: float = typer.Option(30.0, "--timeout", help="Give up when no telemetry arrives for this long (s)."),
) -> None:
    """TrackMania 2020: record the reward path while you drive the track once, start to finish."""
    from tmrl_worker.tm20.recording import record_reward_tool

    raise typer.Exit(code=record_reward_tool(output, telemetry_port=telemetry_port, spacing=spacing, max_seconds=max_seconds,
                                             raw_telemetry=raw_telemetry, save_unfinished=save_unfinished,
                                             timeout=timeout))


@app.command("check-env")
def check_env(
    steps: int = typer.Option(0, "--steps", help="Readings to show (0: until Ctrl-C)."),
    telemetry_port: int = TelemetryPortOption,
    reward: Optional[Path] = typer.Option(None, "--reward", help="Reward points file: also show rewards.", exists=True, dir_okay=False),
    capture: str = CaptureOption,
    window_title: str = WindowTitleOption,
    save_frames: Optional[Path] = typer.Option(None, "--save-frames", help="Folder for PNG frames with the LIDAR beams drawn.", file_okay=False),
    synthetic: bool = SyntheticOption,
) -> None:
    """TrackMania 2020: show LIDAR, speed and rewards while you drive (nothing is sent to the game)."""
    from tmrl_worker.tm20.check_env import check_env_tool

    raise typer.Exit(code=check_env_tool(steps=steps or None, telemetry_port=telemetry_port, reward_path=reward,
                                         capture_backend=capture, window_title=window_title, save_frames=save_frames,
                                         synthetic=synthetic))


@app.command()
def benchmark(
    env: str = typer.Option("tm20-lidar", "--env", help="tm20-lidar, tm20-lidar-progress or tm20-full."),
    steps: int = typer.Option(200, "--steps", help="Time steps to run."),
    reward: Optional[Path] = typer.Option(None, "--reward", help="Reward points file (required with the game).", exists=True, dir_okay=False),
    telemetry_port: int = TelemetryPortOption,
    controller: str = typer.Option("auto", "--controller", help="auto, gamepad, keyboard or none (drive nothing)."),
    capture: str = CaptureOption,
    window_title: str = WindowTitleOption,
    time_step: float = typer.Option(0.05, "--time-step", help="Nominal time step (s)."),
    synthetic: bool = SyntheticOption,
) -> None:
    """TrackMania 2020: run the env and print rtgym's timing statistics."""
    from tmrl_worker.tm20.benchmark import benchmark_tool

    raise typer.Exit(code=benchmark_tool(variant=env, steps=steps, telemetry_port=telemetry_port, reward_path=reward,
                                         controller_kind=controller, capture_backend=capture, window_title=window_title,
                                         synthetic=synthetic, time_step_duration=time_step))
