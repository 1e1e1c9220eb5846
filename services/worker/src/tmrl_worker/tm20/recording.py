"""Recording a demonstration path for the trajectory reward (``tmrl-worker record-reward``), and raw telemetry.

A person drives the track once, start to finish. Every fresh telemetry packet adds the car position; a respawn
(the distance driven goes back down) starts the recording over; the finish flag ends it. The positions are
resampled into equally spaced points (:func:`tmrl_worker.reward.resample_path`) and saved with
:func:`tmrl_worker.reward.save_points` (safetensors, no pickle).

Raw telemetry files are packets back to back, exactly as the plugin sends them (``*.tmtelemetry``), so a recording
can be replayed by :class:`~tmrl_worker.tm20.replay_server.TelemetryReplayServer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tmrl_common.atomic_file import OutputPathError, prepare_output_file

from tmrl_worker.reward import path_length, resample_path, save_points
from tmrl_worker.tm20.openplanet import (
    PacketParser,
    Telemetry,
    TelemetryClient,
    TelemetryTimeoutError,
    encode_packet,
    position_jump,
)

if TYPE_CHECKING:
    from rich.console import Console


class RecordingError(RuntimeError):
    """The demonstration could not be recorded."""


@dataclass
class Demonstration:
    """What :func:`record_demonstration` collected."""

    positions: np.ndarray
    packets: list[Telemetry] = field(default_factory=list)
    finished: bool = False
    restarts: int = 0
    """Times the recording started over: a respawn, or a jump of the car's position (see ``jumps``)."""
    jumps: int = 0
    """Moves the car cannot have driven (:func:`~tmrl_worker.tm20.openplanet.position_jump`); each one starts the
    recording over, from the next run from the start line."""
    telemetry_lost: TelemetryTimeoutError | None = None
    """Why it ended early: the telemetry stopped (or never came) for the client's timeout. What was collected up
    to then is kept (``record-reward --save-unfinished`` saves it)."""
    interrupted: bool = False
    """It ended on Ctrl-C (KeyboardInterrupt); what was collected up to then is kept."""
    waiting_for_start: bool = False
    """It ended while waiting for a run from the start line (joined mid-run, or after a jump or a respawn at a
    checkpoint), so ``positions`` holds nothing of the run the car was in."""

    @property
    def length(self) -> float:
        return path_length(self.positions) if len(self.positions) > 1 else 0.0


def encode_telemetry(packet: Telemetry) -> bytes:
    """The wire bytes of a decoded packet."""
    return encode_packet(packet.sequence, packet.speed, packet.distance, packet.position, packet.steer, packet.gas,
                         packet.brake, packet.finished, packet.gear, packet.rpm)


def save_packets(path: str | Path, packets: list[Telemetry]) -> None:
    """Write packets back to back in the plugin's wire format."""
    Path(path).write_bytes(b"".join(encode_telemetry(p) for p in packets))


def load_packets(path: str | Path) -> list[bytes]:
    """The valid packets of a raw telemetry file (garbage skipped), as wire bytes for the replay server."""
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"telemetry recording {path} does not exist")
    parser = PacketParser()
    packets = [encode_telemetry(p) for p in parser.feed(path.read_bytes())]
    if not packets:
        raise RecordingError(f"{path} holds no valid telemetry packet")
    return packets


def record_demonstration(telemetry: TelemetryClient, *, max_seconds: float = 900.0, min_move: float = 0.05,
                         start_distance_m: float = 1.0, should_stop: Callable[[], bool] = lambda: False,
                         on_packet: Callable[[Telemetry, int], None] | None = None,
                         on_jump: Callable[[str], None] | None = None) -> Demonstration:
    """Collect car positions from ``telemetry`` until the finish, ``should_stop()``, ``max_seconds``, or the
    telemetry's silence for the client's timeout (``telemetry_lost``; so too when no packet came by ``max_seconds``).

    Positions closer than ``min_move`` to the previous kept one are skipped (a car waiting at the start).
    Joined mid-run (the first packet more than ``start_distance_m`` into the run), or respawned at a checkpoint
    rather than the start, nothing is kept until the next respawn at the start: the path must start at the start
    line. A move the car cannot have driven (a teleport, a wrong position from the plugin: :func:`position_jump`)
    would put track that does not exist into the path: the recording starts over likewise, and ``on_jump(why)`` is
    called. A finish flag within ``start_distance_m`` of the start is the previous run's, not yet cleared: ignored.
    ``on_packet(packet, kept)`` is called for every fresh packet (progress display; ``kept`` stays 0 while waiting for
    a run from the start). Ctrl-C ends it too (``interrupted``), with what it collected.
    """
    positions: list[tuple[float, float, float]] = []
    packets: list[Telemetry] = []
    restarts = jumps = 0
    last: Telemetry | None = None
    mid_run = False
    deadline = time.monotonic() + max_seconds

    def ended(finished: bool = False, lost: TelemetryTimeoutError | None = None,
              interrupted: bool = False) -> Demonstration:
        return Demonstration(np.array(positions, dtype=np.float64).reshape(-1, 3), packets, finished, restarts, jumps,
                             lost, interrupted, waiting_for_start=mid_run)

    try:
        while (left := deadline - time.monotonic()) > 0 and not should_stop():
            try:  # max_seconds bounds the wait for a packet too (an outside probe: 31 s past --max-seconds 2)
                packet = telemetry.newer_than(last.sequence if last else None, timeout=min(telemetry.timeout, left))
            except TelemetryTimeoutError as exc:
                if left < telemetry.timeout and last is not None:  # cut by max_seconds, not the telemetry's silence
                    break
                return ended(lost=exc)
            if last is None:
                mid_run = packet.distance > start_distance_m
            elif packet.distance < last.distance - 1.0:  # respawned: start over, from the start line only
                positions.clear()
                packets.clear()
                restarts += 1
                mid_run = packet.distance > start_distance_m  # at a checkpoint: wait for a restart from the start
            elif not mid_run and (jump := position_jump(last, packet)) is not None:
                positions.clear()
                packets.clear()
                restarts += 1
                jumps += 1
                mid_run = True  # the path must not hold the jump: wait for a restart from the start
                if on_jump is not None:
                    on_jump(jump)
            last = packet
            if mid_run:  # e.g. emulate-game --autodrive lapping before record-reward connected
                if on_packet is not None:
                    on_packet(packet, 0)
                continue
            packets.append(packet)
            if not positions or np.linalg.norm(np.subtract(packet.position, positions[-1])) >= min_move:
                positions.append(packet.position)
            if on_packet is not None:
                on_packet(packet, len(positions))
            if packet.finished and packet.distance > start_distance_m:  # at the start, a finish flag is the last run's
                return ended(finished=True)
    except KeyboardInterrupt:  # Ctrl-C is how a driver ends a recording: what it holds goes to the caller
        return ended(interrupted=True)
    return ended()


def save_demonstration(demonstration: Demonstration, output: str | Path, spacing: float = 0.5,
                       raw_telemetry: str | Path | None = None) -> np.ndarray:
    """Resample to points ``spacing`` metres apart, save them (safetensors) and optionally the raw packets."""
    if len(demonstration.positions) < 2:
        raise RecordingError("the car did not move while recording: drive the track from the start to the finish")
    points = resample_path(demonstration.positions, spacing)
    save_points(output, points, spacing)
    if raw_telemetry is not None:
        save_packets(raw_telemetry, demonstration.packets)
    return points


def record_reward_tool(output: Path, *, telemetry_port: int, spacing: float = 0.5, max_seconds: float = 900.0,
                       raw_telemetry: Path | None = None, save_unfinished: bool = False, timeout: float = 30.0,
                       console: Console | None = None) -> int:
    """``tmrl-worker record-reward``: record while a person drives, save the points; returns the exit code."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    try:  # before the drive: a folder typo found at the save lost the whole lap (a probe)
        prepare_output_file(output, "--output")
        if raw_telemetry is not None:
            prepare_output_file(raw_telemetry, "--raw-telemetry")
    except OutputPathError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        return 2
    console.print(f"Recording from the TMRL OpenPlanet plugin on port {telemetry_port}. Drive the track from the start "
                  "to the finish line; a respawn starts the recording over; Ctrl-C ends it"
                  + (" and saves what it holds." if save_unfinished else " (nothing saved without --save-unfinished)."))
    with TelemetryClient(telemetry_port, timeout=timeout) as client:
        shown = [0.0]

        def progress(packet: Telemetry, kept: int) -> None:
            if packet.received_at - shown[0] >= 1.0:
                shown[0] = packet.received_at
                if kept == 0 and packet.distance > 1.0:
                    console.print(f"  the car is {packet.distance:.1f} m into a run: waiting for a run from the start "
                                  "(restart the race)")
                    return
                console.print(f"  {kept:6d} positions, distance {packet.distance:8.1f} m, speed {packet.speed:6.1f}")

        def jumped(why: str) -> None:
            console.print(f"[yellow]  {escape(why)}: the recording starts over from the next run from the start line "
                          "(restart the race)[/]")

        demonstration = record_demonstration(client, max_seconds=max_seconds, on_packet=progress, on_jump=jumped)
    lost = demonstration.telemetry_lost
    partial = len(demonstration.positions)
    if lost is not None or demonstration.interrupted:
        console.print(f"[red]{escape(str(lost))}[/]" if lost is not None else "[yellow]interrupted[/]")
        if not save_unfinished or partial < 2:
            console.print("[yellow]nothing saved[/]" + (" (--save-unfinished keeps a partial path)" if partial >= 2 else ""))
            return 2 if lost is not None else 1
        console.print(f"[yellow]--save-unfinished: saving the {partial} positions recorded before "
                      + ("the telemetry stopped[/]" if lost is not None else "Ctrl-C[/]"))
    elif not demonstration.finished and demonstration.waiting_for_start:  # it holds nothing then
        console.print(f"[yellow]no run from the start line in {max_seconds:.0f} s: nothing saved (the car was already "
                      "under way, or jumped; restart the race while record-reward runs)[/]")
        return 1
    elif not demonstration.finished and not save_unfinished:
        console.print(f"[yellow]the finish line was not reached in {max_seconds:.0f} s: nothing saved "
                      "(--save-unfinished keeps a partial path)[/]")
        return 1
    try:
        points = save_demonstration(demonstration, output, spacing, raw_telemetry)
    except (RecordingError, ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        return 1
    except OSError as exc:  # checked at the start; a disk that filled up or a folder removed since
        console.print(f"[red]{escape(f'cannot write {output}: {exc.strerror or exc}')}[/]")
        return 1
    console.print(f"saved {len(points)} points {spacing} m apart ({demonstration.length:.1f} m of track) to {output}"
                  + (f"; raw telemetry to {raw_telemetry}" if raw_telemetry else ""))
    return 0
