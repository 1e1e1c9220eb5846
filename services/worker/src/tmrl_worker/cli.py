"""``tmrl-worker``: a rollout worker."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from tmrl_common.config import load_config_for_command
from tmrl_common.options import FOLDER_OPTION, HELP, LogLevel, config_help, configure_logging

from tmrl_worker.config import WorkerConfig
from tmrl_worker.eval_cli import eval_command
from tmrl_worker.sim.cli import sim_app

if TYPE_CHECKING:  # runtime imports torch: only the run command loads it
    from tmrl_worker.runtime import RolloutStats

WORKER_FINISHING = ("it waits up to flush_timeout_s for its batches to be acknowledged first; SIGKILL would lose "
                    "those not acknowledged, but for a durable spool's")
"""What a worker still does after a stop signal, said when another one comes."""

app = typer.Typer(help="tmrl rollout worker: runs a real-time environment and sends samples to the relay.",
                  no_args_is_help=True)
app.add_typer(sim_app, name="sim")  # built-in race-track simulator tools
app.command("eval")(eval_command)  # evaluate a saved policy, no relay (tmrl_worker.evaluate)


@app.callback()
def main() -> None:
    """tmrl worker service. Every command takes --config FILE; TMRL_WORKER__<FIELD> env vars override it."""


ConfigOption = typer.Option(None, "--config", "-c", help=config_help("worker"), exists=True, dir_okay=False)


@app.command()
def run(
    config: Path | None = ConfigOption,
    show_config: bool = typer.Option(False, "--show-config", help=HELP["show_config"]),
    env: str | None = typer.Option(None, "--env", help=HELP["env"]),
    worker_id: str | None = typer.Option(None, "--worker-id", help="This worker's id (unique per worker)."),
    relay_host: str | None = typer.Option(None, "--relay-host", help=HELP["relay_host"]),
    worker_port: int | None = typer.Option(None, "--worker-port", help=HELP["worker_port"]),
    weights_port: int | None = typer.Option(None, "--weights-port", help=HELP["weights_port"]),
    test: bool = typer.Option(False, "--test", help="Send no samples; act deterministically with received weights."),
    keep_best: bool = typer.Option(False, "--keep-best", help="With --test: keep the policy of the best episode so far "
                                   "in STATE_DIR/<worker-id>.best-policy.safetensors (finished beats unfinished, then "
                                   "fewer steps, then higher return); weights change at episode starts only."),
    expert: bool = typer.Option(False, "--expert", help="Send samples, ignore weights: the env's scripted expert (or --policy) drives."),
    policy: Path | None = typer.Option(None, "--policy", help="Safetensors policy file for --expert.", exists=True, dir_okay=False),
    max_steps: int | None = typer.Option(None, "--max-steps", help=HELP["max_steps"]),
    batch_steps: int | None = typer.Option(None, "--batch-steps", help="Send a batch every N steps (and at episode ends)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", **FOLDER_OPTION, help="Keeps <worker-id>.state.json (sequence numbers "
                                          "unique across restarts), <worker-id>.progress.json (what a killed run lost) "
                                          "and, with durable_spool, <worker-id>.spool/ [~/.local/state/tmrl/worker]."),
    seed: int | None = typer.Option(None, "--seed", help=HELP["seed"] + " It draws environment resets and exploration."),
    insecure: bool = typer.Option(False, "--insecure", help=HELP["insecure"]),
    secret_key: Path | None = typer.Option(None, "--secret-key", help=HELP["secret_key"], exists=True, dir_okay=False),
    server_key: Path | None = typer.Option(None, "--server-key", help=HELP["server_key"], exists=True, dir_okay=False),
    log_level: LogLevel = typer.Option(LogLevel.INFO, "--log-level", case_sensitive=False, help=HELP["log_level"]),
) -> None:
    """Run the worker in the foreground: roll out episodes, send samples to the relay, use the weights it broadcasts.

    If the relay refuses this worker's key (not in its allow-list), an error says so within a second with the
    `tmrl-relay keys add` command that fixes it, and the worker retries every 10 s (its batches wait in the spool).
    If `max_consecutive_refusals` batches in a row are refused for good (another layout, rewards out of bounds...),
    the worker stops with its summary, one line naming the reasons and what to fix, and exit status 1. A run that
    made samples and delivered none of them (it never reached the relay, or its key was refused every time) also
    ends with exit status 1, after its summary."""
    import logging
    import threading

    from tmrl_common.stop_signals import install_stop_signals, stopping

    stop = threading.Event()
    # first: importing torch below takes seconds, and a SIGTERM then must stop the worker cleanly, not kill it; and
    # never stop.set() inside a signal handler, which can deadlock on the lock stop.wait() holds
    # (tmrl_common.stop_signals)
    install_stop_signals(stopping(stop.set, logging.getLogger("tmrl_worker"), WORKER_FINISHING))

    if test and expert:
        raise typer.BadParameter("--test and --expert exclude each other")
    overrides = {
        "env": env, "worker_id": worker_id, "relay_host": relay_host, "worker_port": worker_port,
        "weights_port": weights_port, "policy_file": policy, "max_steps": max_steps, "batch_steps": batch_steps,
        "state_dir": state_dir, "seed": seed, "mode": "test" if test else "expert" if expert else None,
        "keep_best": True if keep_best else None,
        "security": {"insecure": True if insecure else None, "secret_key_file": secret_key, "server_public_key_file": server_key},
    }
    effective = load_config_for_command(WorkerConfig, "worker", config, overrides=overrides, show_config=show_config)
    configure_logging(log_level)
    import warnings

    # rtgym warns at every step that overran its time step, each with its own text (so Python shows them all): an
    # env slower than its rate is said once per progress line instead (WorkerRuntime._report)
    warnings.filterwarnings("ignore", message="Time-step timed out", category=UserWarning)
    import torch
    from tmrl_common.curve import KeyFileError
    from tmrl_common.sockets import SecurityError

    from tmrl_worker.envs import EnvFailure, EnvSpecError
    from tmrl_worker.relay_link import SenderFailure
    from tmrl_worker.runtime import BatchesRefused, PolicyFileError, run_worker
    from tmrl_worker.spool import StateFileError

    torch.set_num_threads(1)  # one observation at a time: extra threads only add latency
    try:
        stats = run_worker(effective, stop=stop, exit_if_stuck=True)
    except (EnvSpecError, PolicyFileError, StateFileError, SecurityError, KeyFileError) as exc:
        typer.echo(f"tmrl-worker: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except BatchesRefused as exc:  # nothing it sends can be stored: what it did, then why and what to fix; exit 1
        _echo_summary(run_summary(effective.worker_id, exc.stats))
        typer.echo(f"tmrl-worker: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    except (EnvFailure, SenderFailure) as exc:  # the env gave up while running (e.g. the game did not restart; what
        # was sent is delivered first), or the sender thread died (its traceback is logged): what the run did and
        # what became of its batches, then the cause in one line, exit 1
        if getattr(exc, "stats", None) is not None:
            _echo_summary(run_summary(effective.worker_id, exc.stats))
        typer.echo(f"tmrl-worker: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    _echo_summary(run_summary(effective.worker_id, stats))
    nothing_delivered = undelivered_run(stats, effective.durable_spool)
    if nothing_delivered:  # a supervisor or a script sees a worker that never reached the trainer
        typer.echo(f"tmrl-worker: {nothing_delivered}", err=True)
        raise typer.Exit(code=1)


def _echo_summary(summary: str) -> None:
    """The run's summary on stderr, stamped like the log lines before it (teardown's length shows between them)."""
    import logging

    typer.echo(f"{logging.Formatter().formatTime(logging.makeLogRecord({}))} {summary}", err=True)


_SPOOL_NOTES = (
    ("spool_write_errors", "batch(es) could not be written to the durable spool (kept in memory only, so a kill would "
                           "have lost them: a full or read-only state_dir?)"),
    ("spool_unreadable_files", "spool file(s) of an earlier run could not be read (renamed *.unreadable, not sent)"),
    ("spool_restored", "batch(es) restored from the durable spool at start (an earlier run's: among the acknowledged "
                       "and unacknowledged above, not in its rows and batches)"),
)
"""(delivery count, what it means): each non-zero one adds ``; <count> <meaning>`` to the run's summary, in order."""
_LOSS_NOTES = (
    ("not_numbered", "batch(es) handed over were never numbered nor spooled (the sender thread was still behind when "
                     "it stopped): lost"),
    ("seqs_reused", "of the acknowledged were NOT stored: their seq had been used before (a state file restored from "
                    "an older copy)"),
)
"""As :data:`_SPOOL_NOTES`, said after the batches dropped before they were numbered."""


def run_summary(worker_id: str, stats: RolloutStats) -> str:
    """The line ``tmrl-worker run`` prints at the end: what the rollout did and, when it sent samples, what became of
    them (refused batches by reason)."""
    delivery = stats.delivery
    summary = (f"{worker_id}: {stats.steps} steps, {stats.episodes} episodes, "
               f"{stats.batches_submitted} batches, weights version {stats.weights_version}")
    if delivery:
        summary += (f"; delivery: {delivery['steps_submitted']} rows in {delivery['batches_built']} batches, "
                    f"{delivery['spool_acked']} acknowledged, {delivery['spool_resent']} resent, "
                    f"{delivery['spool_dropped']} dropped, {delivery['spool_batches']} unacknowledged, "
                    f"{delivery['batches_rejected']} rejected")  # last: log parsers read the fields before it
        reasons = sorted((key.removeprefix("rejected."), count) for key, count in delivery.items()
                         if key.startswith("rejected.") and count)
        if reasons:
            summary += f" ({', '.join(f'{reason}: {count}' for reason, count in reasons)})"
        summary += "".join(f"; {delivery[key]} {what}" for key, what in _SPOOL_NOTES if delivery.get(key))
        if delivery.get("waiting_dropped"):
            cause = ("no sequence numbers could be reserved in the state file (state_dir full or read-only) "
                     f"{delivery['reservations_failed']} time(s)" if delivery.get("reservations_failed") else
                     "the sender thread fell a whole spool behind (a slow or hung disk under the durable spool?)")
            summary += (f"; {delivery['waiting_dropped']} batch(es) ({delivery['waiting_dropped_steps']} rows) dropped "
                        f"before they were numbered: {cause}")
        summary += "".join(f"; {delivery[key]} {what}" for key, what in _LOSS_NOTES if delivery.get(key))
        if delivery.get("ids_lost") and stats.id_refusal and delivery["spool_batches"]:
            summary += (f"; the relay refused this connection's messages as {worker_id}'s {delivery['ids_lost']} "
                        f"time(s), last: {stats.id_refusal}")
        advice = stats.handshake_advice  # the error line of its latest failed handshake: cause and fix
        if not delivery.get("connections") and delivery["steps_submitted"] and not delivery.get("handshake_refused"):
            summary += (f"; it never connected to the relay: {advice}" if advice else "; it never connected to the "
                        "relay (is it running, on this worker's relay_host and worker_port?)")
        if delivery.get("handshake_refused"):
            summary += f"; the relay refused this worker's key {delivery['handshake_refused']} time(s)"
            summary += (" (and allowed it at other times: the key was added late, or removed while this worker ran)"
                        if delivery["spool_acked"] else f": {advice}" if advice
                        else ": allow it with `tmrl-relay keys add` on the relay host")
    return summary


def undelivered_run(stats: RolloutStats, durable_spool: bool) -> str | None:
    """Why a run that made samples delivered none of them, or None: it never connected to the relay, or the relay
    refused its key every time. ``tmrl-worker run`` then exits with status 1 after its summary (which names the
    cause and the fix), so that a supervisor restarts it and a script sees the failure. A run that reached the relay
    but whose batches no trainer answered (none running yet) is not such a failure."""
    delivery = stats.delivery
    if not delivery or not delivery.get("steps_submitted") or delivery.get("spool_acked"):
        return None
    if delivery.get("handshake_refused"):
        cause = "the relay refused its key every time"
    elif not delivery.get("connections"):
        cause = "it never connected to the relay"
    else:
        return None
    kept = ("they wait in its durable spool for the next run with the same worker_id and state_dir" if durable_spool
            else "they are lost with this process (durable_spool would keep them on disk)")
    return f"none of the {delivery['steps_submitted']} rows this run made was delivered: {cause}; {kept}"


# TrackMania 2020 tools (logic in tmrl_worker.tm20; these functions only parse arguments) -----------------------------
TelemetryPortOption = typer.Option(9000, "--telemetry-port", min=0, max=65535,
                                   help="Port of the TMRL OpenPlanet plugin on 127.0.0.1.")
SyntheticOption = typer.Option(False, "--synthetic", help="No game: synthetic frames and telemetry served over loopback.")


def _capture_backend(value: str) -> str:
    """``--capture``, checked as it is read: an unknown backend ends the command (one line, status 2) before the game
    window is looked for."""
    from tmrl_worker.tm20.capture import CaptureError, check_capture_backend

    try:
        return check_capture_backend(value, "--capture")
    except CaptureError as exc:
        typer.echo(f"tmrl-worker: {exc}", err=True)
        raise typer.Exit(code=2) from exc


def _controller_kind(value: str) -> str:
    """``--controller``, checked as it is read, as ``--capture`` is."""
    from tmrl_worker.tm20.control import ControlError, check_controller_kind

    try:
        return check_controller_kind(value, "--controller")
    except ControlError as exc:
        typer.echo(f"tmrl-worker: {exc}", err=True)
        raise typer.Exit(code=2) from exc


def _refuse_game_options_with_synthetic(ctx: typer.Context, synthetic: bool, flags: dict[str, str]) -> None:
    """``--synthetic`` serves its own frames, telemetry and controls: a game option given beside it (``{parameter:
    flag}``; given on the command line or by an environment variable, at its default value too) would be ignored, so
    the command ends (one line, status 2) naming it."""
    if not synthetic:
        return
    sources = {name: ctx.get_parameter_source(name) for name in flags}
    ignored = [f"{flag} {ctx.params[name]}" for name, flag in flags.items()
               if sources[name] is not None and sources[name].name != "DEFAULT"]
    if ignored:
        typer.echo(f"tmrl-worker: {', '.join(ignored)} cannot be used with --synthetic (its frames, telemetry and "
                   "controls are served over loopback, not taken from the game): drop one or the other", err=True)
        raise typer.Exit(code=2)


CaptureOption = typer.Option("auto", "--capture", callback=_capture_backend,
                             help="Screen capture: auto (dxcam on Windows, mss elsewhere), dxcam, mss.")
WindowTitleOption = typer.Option("Trackmania", "--window-title", help="Title of the game window.")


GAME_OPTIONS = {"telemetry_port": "--telemetry-port", "capture": "--capture", "window_title": "--window-title"}
"""The TrackMania tools' options that name the real game's devices (``--synthetic`` brings its own)."""


@app.command("record-reward")
def record_reward(
    output: Path = typer.Option(..., "--output", "-o", help="Reward points file to write (safetensors).", dir_okay=False),
    telemetry_port: int = TelemetryPortOption,
    spacing: float = typer.Option(0.5, "--spacing", min=0.05, help="Distance between reward points (m)."),
    max_seconds: float = typer.Option(900.0, "--max-seconds", min=1.0, max=86_400.0, help="Give up after this long (s)."),
    raw_telemetry: Path | None = typer.Option(None, "--raw-telemetry", help="Also save the raw packets (replayable).", dir_okay=False),
    save_unfinished: bool = typer.Option(False, "--save-unfinished", help="Save even if the finish line was not reached."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, max=86_400.0,
                                  help="Give up when no telemetry arrives for this long (s)."),
) -> None:
    """TrackMania 2020: record the reward path while you drive the track once, start to finish."""
    from tmrl_worker.tm20.recording import record_reward_tool

    raise typer.Exit(code=record_reward_tool(output, telemetry_port=telemetry_port, spacing=spacing, max_seconds=max_seconds,
                                             raw_telemetry=raw_telemetry, save_unfinished=save_unfinished,
                                             timeout=timeout))


@app.command("check-env")
def check_env(
    ctx: typer.Context,
    steps: int = typer.Option(0, "--steps", min=0, help="Readings to show (0: until Ctrl-C)."),
    telemetry_port: int = TelemetryPortOption,
    reward: Path | None = typer.Option(None, "--reward", help="Reward points file: also show rewards.", exists=True, dir_okay=False),
    capture: str = CaptureOption,
    window_title: str = WindowTitleOption,
    save_frames: Path | None = typer.Option(None, "--save-frames", **FOLDER_OPTION, help="Folder for PNG frames with the LIDAR beams drawn (every 20th reading, the first included)."),
    synthetic: bool = SyntheticOption,
) -> None:
    """TrackMania 2020: show LIDAR, speed and rewards while you drive (nothing is sent to the game)."""
    from tmrl_worker.tm20.check_env import check_env_tool

    _refuse_game_options_with_synthetic(ctx, synthetic, GAME_OPTIONS)

    raise typer.Exit(code=check_env_tool(steps=steps or None, telemetry_port=telemetry_port, reward_path=reward,
                                         capture_backend=capture, window_title=window_title, save_frames=save_frames,
                                         synthetic=synthetic))


@app.command()
def benchmark(
    ctx: typer.Context,
    env: str = typer.Option("tm20-lidar", "--env", help="tm20-lidar, tm20-lidar-progress or tm20-full."),
    steps: int = typer.Option(200, "--steps", min=1, help="Time steps to run."),
    reward: Path | None = typer.Option(None, "--reward", help="Reward points file (required with the game).", exists=True, dir_okay=False),
    telemetry_port: int = TelemetryPortOption,
    controller: str = typer.Option("auto", "--controller", callback=_controller_kind,
                                   help="auto, gamepad, keyboard or none (drive nothing)."),
    capture: str = CaptureOption,
    window_title: str = WindowTitleOption,
    time_step: float = typer.Option(0.05, "--time-step", min=0.001, max=60.0, help="Nominal time step (s)."),
    synthetic: bool = SyntheticOption,
) -> None:
    """TrackMania 2020: run the env and print rtgym's timing statistics."""
    from tmrl_worker.tm20.benchmark import benchmark_tool

    _refuse_game_options_with_synthetic(ctx, synthetic, {**GAME_OPTIONS, "controller": "--controller"})

    raise typer.Exit(code=benchmark_tool(variant=env, steps=steps, telemetry_port=telemetry_port, reward_path=reward,
                                         controller_kind=controller, capture_backend=capture, window_title=window_title,
                                         synthetic=synthetic, time_step_duration=time_step))


@app.command("emulate-game")
def emulate_game(
    track: str = typer.Option("hairpins", "--track", help="Simulator track: oval, hairpins, circuit, random:SEED, random-open:SEED, file:PATH."),
    telemetry_port: int = TelemetryPortOption,
    window_title: str = WindowTitleOption,
    autodrive: bool = typer.Option(False, "--autodrive", help="The simulator's scripted driver drives laps (respawning after each finish)."),
    speedup: int = typer.Option(1, "--speedup", help="Simulated seconds per wall-clock second."),
    seconds: float = typer.Option(0.0, "--seconds", min=0.0, help="Stop after this long (0: until Ctrl-C)."),
) -> None:
    """TrackMania 2020 without the game: serve the OpenPlanet plugin protocol from a simulated car (e.g. to record a
    reward path with record-reward while --autodrive drives). A worker runs the emulated game itself with
    env_options.emulated_game."""
    import time

    from tmrl_worker.envs import one_line_message
    from tmrl_worker.tm20.emulated_game import EmulatedGame

    config = {"track": track, "port": telemetry_port, "window_title": window_title, "speedup": speedup}
    game: EmulatedGame | None = None
    try:
        game = EmulatedGame(config)
        game.start()
    except (ValueError, OSError) as exc:  # a bad track or setting (pydantic's errors are ValueErrors), a port in use
        if game is not None:
            game.close()
        typer.echo(f"tmrl-worker emulate-game: {one_line_message(exc)}", err=True)
        raise typer.Exit(code=2) from exc
    try:
        if autodrive:
            game.start_autodrive()
        typer.echo(f"emulated TrackMania: track {track} ({game.track.length:.0f} m), plugin on 127.0.0.1:{game.port}"
                   f"{', driving laps' if autodrive else ''}; Ctrl-C to stop")
        deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        try:
            while time.monotonic() < deadline:
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        except KeyboardInterrupt:
            pass
        typer.echo(f"{game.finishes} finish(es), {game.respawns} respawn(s)")
    finally:
        game.close()


@app.command()
def layout(
    config: Path | None = ConfigOption,
    env: str | None = typer.Option(None, "--env", help=HELP["env"] + " Default: the config's."),
) -> None:
    """Print the env's observation layout as JSON (the trainer's ``layout_file`` for ``module:Class`` envs, or for
    TrackMania envs whose ``env_options`` change it). TrackMania's is read from the config alone, on any OS: no game,
    window or Windows-only package is needed; other envs are built to ask them."""
    from tmrl_worker.envs import TM20_SPECS, EnvSpecError, make_env, tm20_layout

    effective = load_config_for_command(WorkerConfig, "worker", config, overrides={"env": env})
    spec = effective.env.strip()
    try:
        if spec in TM20_SPECS:
            typer.echo(tm20_layout(spec, effective.env_options).model_dump_json(indent=1))
            return
        handle = make_env(effective.env, time_step_duration=effective.time_step_duration,
                          max_episode_steps=effective.max_episode_steps, options=effective.env_options)
    except EnvSpecError as exc:
        typer.echo(f"tmrl-worker: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    try:
        typer.echo(handle.layout.model_dump_json(indent=1))
    finally:
        handle.close()
