"""A synthetic TrackMania session for trying the tools without the game (``--synthetic``).

Screenshots of a road between black borders that winds left and right, telemetry of a car driving along x at a
constant speed served by :class:`~tmrl_worker.tm20.replay_server.TelemetryReplayServer` over loopback exactly as the
plugin would, a controller that only records, and a straight reward path. Timings measured with it are those of
the worker's own code path (capture stand-in, LIDAR, telemetry socket, rtgym), not of the game.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tmrl_worker.reward import TrajectoryReward, TrajectoryRewardConfig
from tmrl_worker.tm20.capture import RecordedFrames
from tmrl_worker.tm20.control import RecordingController
from tmrl_worker.tm20.openplanet import TelemetryClient, encode_packet
from tmrl_worker.tm20.replay_server import TelemetryReplayServer


def winding_road_frames(count: int = 16, height: int = 488, width: int = 958, road_width: float = 0.45) -> np.ndarray:
    """RGB frames of a grey road with black borders whose centre sways left and right from frame to frame."""
    frames = np.full((count, height, width, 3), 150, np.uint8)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    for i in range(count):
        bend = 0.25 * np.sin(2 * np.pi * i / count)  # fraction of the width at the top of the frame
        centre = width * (0.5 + bend * (1 - rows / height))
        off_road = np.abs(cols - centre) > road_width * width / 2 * (0.4 + 0.6 * rows / height)
        frames[i][off_road] = 10
    return frames


class StraightDrive:
    """Telemetry of a car driving along +x at ``speed`` m/s, one packet per server tick (:meth:`packet` is the
    server's chunk source). Like the game, :meth:`respawn` puts the car back at the start (distance 0, not
    finished) and ``finish_at`` metres raise the finish flag, which stays up until the next respawn. ``gear`` and
    ``rpm`` are sent as they are (tests set values no game sends)."""

    def __init__(self, speed: float = 10.0, rate_hz: float = 100.0, y: float = 0.0, z: float = 0.0,
                 finish_at: float | None = None, countdown_s: float = 0.0, gear: float = 3.0,
                 rpm: float = 6000.0) -> None:
        self.speed, self.rate_hz, self.y, self.z, self.finish_at = speed, rate_hz, y, z, finish_at
        self.gear, self.rpm = gear, rpm
        self.countdown_ticks = round(countdown_s * rate_hz)
        """After a respawn the car stands at the start this long, like the game's 3-2-1 countdown."""
        self.respawns = 0
        self._start_tick = 0
        self._respawn_pending = False

    def respawn(self) -> None:
        self._respawn_pending = True
        self.respawns += 1

    def packet(self, tick: int) -> bytes:
        if self._respawn_pending:
            self._respawn_pending, self._start_tick = False, tick
        driving = tick - self._start_tick - (self.countdown_ticks if self.respawns else 0)
        x = self.speed * max(driving, 0) / self.rate_hz
        finished = self.finish_at is not None and x >= self.finish_at
        return encode_packet(tick, speed=self.speed if driving >= 0 else 0.0, distance=x, position=(x, self.y, self.z), gas=1.0,
                             finished=finished, gear=self.gear, rpm=self.rpm)


class SyntheticSession:
    """Context manager: ``with SyntheticSession() as s: make_tm20_env("lidar", **s.devices())``."""

    def __init__(self, speed: float = 10.0, rate_hz: float = 100.0, frames: np.ndarray | None = None) -> None:
        self.frames = winding_road_frames() if frames is None else frames
        self.drive = StraightDrive(speed, rate_hz)
        self.server = TelemetryReplayServer(self.drive.packet, rate_hz=rate_hz)
        self.speed = speed

    def __enter__(self) -> SyntheticSession:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()

    def devices(self, track_length: float = 2_000.0) -> dict[str, Any]:
        """Interface keyword arguments: capture, telemetry, controller, reward, no sleep at reset."""
        reward = TrajectoryReward.from_path([[0.0, 0.0, 0.0], [track_length, 0.0, 0.0]], 0.5,
                                            TrajectoryRewardConfig(grace_steps=10**9))
        return {"capture": RecordedFrames(self.frames), "telemetry": TelemetryClient(self.server.port, timeout=2.0),
                "controller": RecordingController(on_respawn=self.drive.respawn), "reward": reward,
                "sleep_time_at_reset": 0.0}
