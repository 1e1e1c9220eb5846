"""``tmrl-worker check-env``: watch the LIDAR, speed and reward while a person drives, and whether the screen is stale.

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
from tmrl_worker.tm20.stale_frames import StaleFrameDetector, StaleFrameError
from tmrl_worker.tm20.window import GameWindow

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
    window_in_front: bool | None = None
    """Whether the game window had the focus (None: not checked, e.g. ``--synthetic``)."""
    stale: str | None = None
    """Why the picture looks stale (frozen while the car drives, no new frame), as a worker would end the episode."""


def readings(capture: FrameCapture, telemetry: TelemetryClient, lidar: Lidar, reward: TrajectoryReward | None = None,
             *, period: float = 0.05, steps: int | None = None, save_frames: Path | None = None, save_every: int = 20,
             should_stop: Callable[[], bool] = lambda: False, window: GameWindow | None = None) -> Iterator[Reading]:
    """Capture every ``period`` seconds and yield a :class:`Reading` (``steps=None``: until ``should_stop()``).

    A terminated episode (no progress, finish) restarts the reward count, like an environment reset would. With
    ``window``, every reading says whether the game window has the focus (input from an agent would go elsewhere).
    """
    if save_frames is not None:
        save_frames.mkdir(parents=True, exist_ok=True)
    stale_frames = StaleFrameDetector()
    total = 0.0
    step = 0
    next_time = time.monotonic()
    while (steps is None or step < steps) and not should_stop():
        frame = capture.grab()
        packet = telemetry.latest()
        scan = lidar.measure(frame)
        reading = Reading(step, packet.speed, scan, packet.position, packet.finished,
                          window_in_front=None if window is None else window.is_foreground())
        try:
            stale_frames.check(frame, packet, getattr(capture, "last_new_frame_at", None))
        except StaleFrameError as exc:
            reading.stale = str(exc)
            stale_frames.reset()  # warn again only after another full period of evidence
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
    if reading.stale is not None:
        line += f"  [yellow]stale screen: {reading.stale}[/]"
    if reading.window_in_front is False:
        line += "  [yellow]game window not in front: an agent's keys would go to another window[/]"
    return line


def check_env_tool(*, steps: int | None, telemetry_port: int, reward_path: Path | None = None,
                   capture_backend: str = "auto", window_title: str = "Trackmania", save_frames: Path | None = None,
                   synthetic: bool = False, period: float = 0.05, console: Console | None = None) -> int:
    """``tmrl-worker check-env``: print LIDAR, speed and reward at ``period`` while a person drives; exit code."""
    from contextlib import ExitStack

    from rich.console import Console
    from rich.markup import escape

    from tmrl_worker.tm20.capture import CaptureError, check_capture_backend, make_capture
    from tmrl_worker.tm20.interfaces import LIDAR_WINDOW_SIZE
    from tmrl_worker.tm20.openplanet import TelemetryTimeoutError
    from tmrl_worker.tm20.synthetic import SyntheticSession
    from tmrl_worker.tm20.window import WindowNotFoundError, find_game_window
    from tmrl_worker.tm20.windows_only import WindowsOnlyError

    console = console or Console()
    window: GameWindow | None = None
    with ExitStack() as stack:
        try:
            if synthetic:
                session = stack.enter_context(SyntheticSession())
                devices = session.devices()
                capture, telemetry = devices["capture"], devices["telemetry"]
                reward = devices["reward"] if reward_path is None else TrajectoryReward.from_file(reward_path)
            else:
                check_capture_backend(capture_backend)  # a typo is refused before the window search
                window = find_game_window(window_title)
                window.place(0, 0, *LIDAR_WINDOW_SIZE)
                capture = make_capture(capture_backend, "rgb", region=window.client_area())  # type: ignore[arg-type]
                telemetry = TelemetryClient(telemetry_port)
                reward = TrajectoryReward.from_file(reward_path) if reward_path is not None else None
                if not window.is_foreground():
                    console.print(f"[yellow]warning: the game window {escape(repr(window_title))} is not in front. check-env "
                                  f"only watches, but a worker's keyboard input goes to the focused window: the "
                                  f"worker brings the game to the front at every reset[/]")
            stack.callback(telemetry.close)
            stack.callback(capture.close)
            for reading in readings(capture, telemetry, Lidar(), reward, period=period, steps=steps,
                                    save_frames=save_frames, window=window):
                console.print(describe(reading))
        except (TelemetryTimeoutError, CaptureError, WindowNotFoundError, WindowsOnlyError, ValueError) as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            return 2
        except KeyboardInterrupt:
            return 0
    return 0
