"""``tmrl-worker check-env``: watch the LIDAR, speed and reward while a person drives.

Nothing is sent to the game: the person drives with their own controller, the tool captures the window at
``period`` and prints what an agent would see. Frames with the beams drawn can be written as PNGs to check the
LIDAR origin and threshold against the real picture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tmrl_worker.reward import TrajectoryReward
from tmrl_worker.tm20.capture import FrameCapture
from tmrl_worker.tm20.lidar import Lidar
from tmrl_worker.tm20.openplanet import TelemetryClient

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Reading:
    """One capture: what the agent would observe and be paid."""

    step: int
    speed: float
    lidar: np.ndarray
    position: tuple[float, float, float]
    finished: bool
    reward: float | None = None
    total_reward: float | None = None
    progress: float | None = None
    terminated: bool = False
    frame_file: Path | None = None


def readings(capture: FrameCapture, telemetry: TelemetryClient, lidar: Lidar, reward: TrajectoryReward | None = None,
             *, period: float = 0.05, steps: int | None = None, save_frames: Path | None = None, save_every: int = 20,
             should_stop: Callable[[], bool] = lambda: False) -> Iterator[Reading]:
    """Capture every ``period`` seconds and yield a :class:`Reading` (``steps=None``: until ``should_stop()``).

    A terminated episode (no progress, finish) restarts the reward count, like an environment reset would.
    """
    if save_frames is not None:
        save_frames.mkdir(parents=True, exist_ok=True)
    total = 0.0
    step = 0
    next_time = time.monotonic()
    while (steps is None or step < steps) and not should_stop():
        frame = capture.grab()
        packet = telemetry.latest()
        scan = lidar.measure(frame)
        reading = Reading(step, packet.speed, scan, packet.position, packet.finished)
        if reward is not None:
            value, terminated, _ = reward.compute(packet.position)
            total += value
            reading.reward, reading.total_reward, reading.progress = value, total, reward.progress
            reading.terminated = terminated or packet.finished
            if reading.terminated:
                reward.reset()
                total = 0.0
        if save_frames is not None and step % save_every == 0:
            from PIL import Image

            reading.frame_file = save_frames / f"lidar_{step:06d}.png"
            Image.fromarray(lidar.draw(frame, scan)).save(reading.frame_file)
        yield reading
        step += 1
        next_time += period
        time.sleep(max(0.0, next_time - time.monotonic()))


def describe(reading: Reading) -> str:
    """One line of text for a reading (rich markup)."""
    beams = " ".join(f"{d:4.0f}" for d in reading.lidar)
    line = f"[bold]#{reading.step:5d}[/] speed {reading.speed:6.1f}  lidar [cyan]{beams}[/]"
    if reading.reward is not None:
        line += f"  reward {reading.reward:5.1f} total {reading.total_reward:7.1f} progress {100 * reading.progress:5.1f}%"
    if reading.terminated:
        line += "  [red]episode end[/]"
    return line


def check_env_tool(*, steps: int | None, telemetry_port: int, reward_path: Path | None = None,
                   capture_backend: str = "auto", window_title: str = "Trackmania", save_frames: Path | None = None,
                   synthetic: bool = False, period: float = 0.05, console: Console | None = None) -> int:
    """``tmrl-worker check-env``: print LIDAR, speed and reward at ``period`` while a person drives; exit code."""
    from contextlib import ExitStack

    from rich.console import Console

    from tmrl_worker.tm20.capture import CaptureError, make_capture
    from tmrl_worker.tm20.interfaces import LIDAR_WINDOW_SIZE
    from tmrl_worker.tm20.openplanet import TelemetryTimeoutError
    from tmrl_worker.tm20.synthetic import SyntheticSession
    from tmrl_worker.tm20.window import WindowNotFoundError
    from tmrl_worker.tm20.windows_only import WindowsOnlyError

    console = console or Console()
    with ExitStack() as stack:
        try:
            if synthetic:
                session = stack.enter_context(SyntheticSession())
                devices = session.devices()
                capture, telemetry = devices["capture"], devices["telemetry"]
                reward = devices["reward"] if reward_path is None else TrajectoryReward.from_file(reward_path)
            else:
                capture = make_capture(capture_backend, "rgb", window_title, window_size=LIDAR_WINDOW_SIZE)  # type: ignore[arg-type]
                telemetry = TelemetryClient(telemetry_port)
                reward = TrajectoryReward.from_file(reward_path) if reward_path is not None else None
            stack.callback(telemetry.close)
            stack.callback(capture.close)
            for reading in readings(capture, telemetry, Lidar(), reward, period=period, steps=steps, save_frames=save_frames):
                console.print(describe(reading))
        except (TelemetryTimeoutError, CaptureError, WindowNotFoundError, WindowsOnlyError, ValueError) as exc:
            console.print(f"[red]{exc}[/]")
            return 2
        except KeyboardInterrupt:
            return 0
    return 0
