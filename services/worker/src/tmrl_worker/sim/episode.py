"""What the agent sees and earns on the race track, shared by the fast and the real-time modes.

:class:`RaceEpisode` turns car poses into TrackMania-shaped observations (without the action buffer, which rtgym
or :class:`~tmrl_worker.sim.env.RaceTrackEnv` append) and into the trajectory reward along the track's centre line:

* ``lidar``: ``(speed (1,), lidar (img_hist_len, beams))``, layout :func:`~tmrl_common.layout.tm20_lidar_layout`;
* ``lidar_progress``: ``(speed (1,), progress (1,), lidar (img_hist_len, beams))``,
  layout :func:`~tmrl_common.layout.tm20_lidar_progress_layout`;
* ``image``: ``(speed (1,), image (img_hist_len, size, size) uint8)``, layout :func:`~tmrl_common.layout.tm20_image_layout`.

With ``img_hist_len = 1`` there is no history axis: the LIDAR is ``(beams,)`` and the image ``(size, size)``, as a
layout component with history 1 has its frame shape (:attr:`~tmrl_common.layout.ObservationComponent.observation_shape`).

Speed is in km/h (|m/s| × 3.6) like TrackMania's speedometer; LIDAR distances are metres (see :mod:`.lidar`);
progress is the fraction of the lap covered. Histories are oldest first; at the start of an episode they hold the
first frame repeated.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium.spaces as spaces
import numpy as np
from tmrl_common.layout import ObservationLayout, tm20_image_layout, tm20_lidar_layout, tm20_lidar_progress_layout

from tmrl_worker.reward import RewardPathError, TrajectoryReward, load_points, resample_path
from tmrl_worker.sim.camera import TopDownCamera
from tmrl_worker.sim.car import CarPose
from tmrl_worker.sim.config import SimConfig
from tmrl_worker.sim.lidar import Lidar
from tmrl_worker.sim.track import Track

KMH_PER_MS = 3.6
MAX_SPEED_KMH = 1000.0


def observation_layout(config: SimConfig) -> ObservationLayout:
    """The :class:`ObservationLayout` of the environment ``config`` describes (action buffer included)."""
    if config.observation == "lidar":
        return tm20_lidar_layout(config.img_hist_len, config.lidar_beams, config.act_buf_len)
    if config.observation == "lidar_progress":
        return tm20_lidar_progress_layout(config.img_hist_len, config.lidar_beams, config.act_buf_len)
    return tm20_image_layout(config.img_hist_len, config.image_size, config.image_size, config.act_buf_len)


def reward_points(config: SimConfig, track: Track) -> np.ndarray:
    """The points the reward follows: those saved in ``config.demo_path`` (used as they are, like TrackMania's
    recorded reward file), else the track's centre line resampled every ``reward_spacing`` metres."""
    if config.demo_path is None:
        return resample_path(track.lap_path(), config.reward_spacing)
    points = load_points(config.demo_path)
    if points.shape[1] != 2:
        raise RewardPathError(f"demo path {config.demo_path} holds {points.shape[1]}-D points; the simulator needs 2-D (x, y)")
    return points


def action_space() -> spaces.Box:
    """``[gas, brake, steer]`` in [-1, 1]; gas and brake count as pressed by their positive part."""
    return spaces.Box(low=-1.0, high=1.0, shape=(3,), dtype=np.float32)


def default_action() -> np.ndarray:
    return np.zeros(3, dtype=np.float32)


class RaceEpisode:
    """Sensors, history and reward for one car on ``track``. Call :meth:`start` after placing the car, then
    :meth:`observe` once per environment step."""

    def __init__(self, config: SimConfig, track: Track) -> None:
        self.config = config
        self.track = track
        self.layout = observation_layout(config)
        self.reward = TrajectoryReward(reward_points(config, track), config.reward)
        self.lidar = Lidar(track, config.lidar_beams, config.lidar_range) if config.observation != "image" else None
        self.camera = (TopDownCamera(track, config.image_size, config.image_metres_per_pixel)
                       if config.observation == "image" else None)
        self._history: np.ndarray | None = None  # always (img_hist_len, *frame_shape), oldest first

    def observation_space(self) -> spaces.Tuple:
        """The observation tuple without the action buffer (what an rtgym interface returns)."""
        c = self.config
        speed = spaces.Box(low=0.0, high=MAX_SPEED_KMH, shape=(1,), dtype=np.float32)
        if c.observation == "image":
            image = spaces.Box(low=0, high=255, shape=self._history_shape((c.image_size, c.image_size)), dtype=np.uint8)
            return spaces.Tuple((speed, image))
        lidar = spaces.Box(low=0.0, high=c.lidar_range, shape=self._history_shape((c.lidar_beams,)), dtype=np.float32)
        if c.observation == "lidar_progress":
            progress = spaces.Box(low=0.0, high=1.0, shape=(1,), dtype=np.float32)
            return spaces.Tuple((speed, progress, lidar))
        return spaces.Tuple((speed, lidar))

    def _history_shape(self, frame_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(img_hist_len, *frame_shape)``, or ``frame_shape`` alone for a history of 1 (the layout's convention)."""
        hist_len = self.config.img_hist_len
        return frame_shape if hist_len == 1 else (hist_len, *frame_shape)

    def start_pose(self, rng: np.random.Generator) -> tuple[float, float, float]:
        """Start position and heading: the start line, shifted sideways by up to ``start_jitter`` metres."""
        jitter = self.config.start_jitter
        track = self.track
        offset = float(rng.uniform(-jitter, jitter)) if jitter > 0 else 0.0
        turn = math.radians(3.0) * float(rng.uniform(-jitter, jitter)) if jitter > 0 else 0.0
        nx, ny = track.normals[0]
        x, y = track.centre[0]
        return float(x + nx * offset), float(y + ny * offset), track.start_heading + turn

    def _frame(self, pose: CarPose) -> np.ndarray:
        if self.camera is not None:
            return self.camera.frame(pose.x, pose.y, pose.heading)
        return self.lidar.scan(pose.x, pose.y, pose.heading)

    def _parts(self, pose: CarPose) -> list[np.ndarray]:
        speed = np.array([min(abs(pose.speed) * KMH_PER_MS, MAX_SPEED_KMH)], dtype=np.float32)
        history = self._history.copy() if self.config.img_hist_len > 1 else self._history[0].copy()
        if self.config.observation == "lidar_progress":
            return [speed, np.array([self.reward.progress], dtype=np.float32), history]
        return [speed, history]

    def _info(self, pose: CarPose, reward_info: dict[str, Any] | None) -> dict[str, Any]:
        info = dict(reward_info) if reward_info else {"progress": self.reward.progress, "finished": False}
        info.update(speed_kmh=abs(pose.speed) * KMH_PER_MS, wall_hits=pose.wall_hits, position=(pose.x, pose.y))
        return info

    def start(self, pose: CarPose) -> tuple[list[np.ndarray], dict[str, Any]]:
        """First observation of an episode (reward restarts at the first point; history = first frame repeated)."""
        self.reward.reset()
        frame = self._frame(pose)
        self._history = np.repeat(frame[None], self.config.img_hist_len, axis=0)
        return self._parts(pose), self._info(pose, None)

    def observe(self, pose: CarPose) -> tuple[list[np.ndarray], float, bool, dict[str, Any]]:
        """Observation, reward, termination and info for the car now at ``pose``."""
        if self._history is None:
            raise RuntimeError("RaceEpisode.observe() called before start()")
        history = self._history
        history[:-1] = history[1:]
        history[-1] = self._frame(pose)
        reward, terminated, reward_info = self.reward.compute((pose.x, pose.y))
        return self._parts(pose), reward, terminated, self._info(pose, reward_info)
