"""Fast mode: the race track as a synchronous gymnasium environment that steps as fast as the CPU allows.

Observations, actions and timing semantics are those of the real-time mode under rtgym, so a policy trained here
runs there unchanged:

* the observation ends with the action buffer (``act_buf_len`` actions, oldest first, zeros at reset) exactly as
  rtgym appends it: after ``step(a)`` the buffer ends with ``a``;
* with ``delayed_actions`` (default), an action takes effect during the *next* step, as in rtgym where ``step(a)``
  returns the observation captured at the end of the time step during which the previous action was applied.

Each step advances the physics by ``time_step_duration`` seconds in ``physics_hz`` ticks (5 ticks of 10 ms by default).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

from tmrl_worker.sim.car import Car
from tmrl_worker.sim.config import SimConfig
from tmrl_worker.sim.episode import RaceEpisode, action_space, default_action
from tmrl_worker.sim.track import Track, check_track_name, load_track
from tmrl_worker.sim.track_pool import TrackPool


def sim_config(config: SimConfig | dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
               **overrides: Any) -> SimConfig:
    """A :class:`SimConfig` from ``defaults``, then a model or a dict (e.g. a TOML table), then keyword overrides.

    ``defaults`` only fill fields the config does not set explicitly (a gymnasium id's observation variant).
    """
    if isinstance(config, SimConfig):
        explicit = config.model_dump(include=config.model_fields_set)
    else:
        explicit = dict(config or {})
    base = {**(defaults or {}), **explicit, **overrides}
    return SimConfig.model_validate(base)


class RaceTrackEnv(gym.Env):
    """The simulated race track, stepped synchronously.

    Build it with ``RaceTrackEnv(observation="lidar", track="hairpins")`` (any :class:`SimConfig` field as keyword)
    or through gymnasium: ``gymnasium.make("tmrl_worker.sim:tmrl/RaceTrack-v0")``. ``.layout`` tells how to split
    its observations into per-step frames (:func:`tmrl_common.layout.newest_frames`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, config: SimConfig | dict[str, Any] | None = None, render_mode: str | None = None,
                 delayed_actions: bool = True, track: Track | str | None = None, variant: str | None = None,
                 **overrides: Any) -> None:
        if isinstance(track, str):
            overrides["track"] = check_track_name(track)  # TrackError itself, not pydantic's wrapping of it
        # ``variant`` is the observation a gymnasium id stands for; an explicit ``observation`` still wins
        self.config = sim_config(config, defaults={"observation": variant} if variant else None, **overrides)
        if isinstance(track, Track):  # a custom track's name is no loadable track name: recorded, not validated
            self.config = self.config.model_copy(update={"track": track.name})
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r} is not supported; use 'rgb_array' or None")
        self.render_mode = render_mode
        self.delayed_actions = delayed_actions
        self.track_pool = TrackPool(self.config.episode_tracks) if self.config.episode_tracks else None
        self.track = track if isinstance(track, Track) else load_track(self.config.track)
        self.car = Car(self.track, self.config.car)
        self.episode = RaceEpisode(self.config, self.track)
        self.layout = self.episode.layout
        self.action_space = action_space()
        interface_space = self.episode.observation_space()
        self.observation_space = gym.spaces.Tuple(
            (*interface_space.spaces, *(self.action_space,) * self.config.act_buf_len))
        self._ticks = self.config.ticks_per_step
        self._dt = self.config.tick_seconds
        self._act_buf: deque[np.ndarray] = deque(maxlen=self.config.act_buf_len)
        self._pending = [0.0, 0.0, 0.0]
        self._steps = 0
        self._running = False
        self._renderer = None
        self.trajectory: list[tuple[float, float]] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if self.track_pool is not None:
            self._use_track(self.track_pool.track(self.track_pool.draw(self.np_random)))
        x, y, heading = self.episode.start_pose(self.np_random)
        self.car.place(x, y, heading)
        self._act_buf.clear()
        for _ in range(self.config.act_buf_len):
            self._act_buf.append(default_action())
        self._pending = [0.0, 0.0, 0.0]
        self._steps = 0
        self._running = True
        parts, info = self.episode.start(self.car.pose())
        self.trajectory = [(x, y)]
        return tuple(parts) + tuple(a.copy() for a in self._act_buf), info

    def _use_track(self, track: Track) -> None:
        """Drive ``track`` from the next reset on (``episode_tracks``): new car, sensors and reward points."""
        if track is self.track:
            return
        self.track = track
        self.car = Car(track, self.config.car)
        self.episode = RaceEpisode(self.config, track)
        self._renderer = None

    def step(self, action):
        if not self._running:
            raise RuntimeError("the episode is over (terminated or truncated): call reset() before step()")
        try:
            values = np.asarray(action, dtype=np.float32).reshape(3).tolist()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"action must be 3 numbers [gas, brake, steer], got {action!r}") from exc
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"action must be 3 finite numbers [gas, brake, steer], got {action!r}")
        values = [min(max(v, -1.0), 1.0) for v in values]  # clipped into the action space
        action = np.array(values, dtype=np.float32)
        applied = self._pending if self.delayed_actions else values
        self._pending = values
        car = self.car
        car.set_controls(applied[0], applied[1], applied[2])
        for _ in range(self._ticks):
            car.tick(self._dt)
        pose = car.pose()
        self.trajectory.append((pose.x, pose.y))
        parts, reward, terminated, info = self.episode.observe(pose)
        self._steps += 1
        truncated = not terminated and self._steps >= self.config.max_episode_steps
        self._running = not (terminated or truncated)
        self._act_buf.append(action)
        return tuple(parts) + tuple(a.copy() for a in self._act_buf), reward, terminated, truncated, info

    def render(self):
        """An RGB frame (``render_mode="rgb_array"``): the whole track, the car and its trail."""
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            from tmrl_worker.sim.render import TrackFrameRenderer
            self._renderer = TrackFrameRenderer(self.track)
        return self._renderer.frame(self.car.pose(), self.trajectory)
