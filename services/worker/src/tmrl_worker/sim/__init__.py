"""Built-in race-track simulator: a TrackMania 2020 stand-in that runs anywhere and trains the same way.

Fast mode (synchronous gymnasium env, thousands of steps per second)::

    env = gymnasium.make("tmrl_worker.sim:tmrl/RaceTrack-v0")            # LIDAR, like TM20 LIDAR
    env = gymnasium.make("tmrl_worker.sim:tmrl/RaceTrackLidarProgress-v0")
    env = gymnasium.make("tmrl_worker.sim:tmrl/RaceTrackImage-v0")       # 4x64x64 grayscale
    env = RaceTrackEnv(track="circuit", observation="lidar")             # any SimConfig field as keyword

Real-time mode (physics thread at 100 Hz, rtgym at 20 Hz)::

    env = make_realtime_env(track="hairpins")     # gymnasium.make("real-time-gym-v1", config=realtime_config(...))

``episode_tracks="random:1000-100000"`` (either mode) drives a new track every episode, never one of the held-out
evaluation tracks ``random:0`` to ``random:19`` (:data:`HELD_OUT_TRACK_SEEDS`, :mod:`.track_pool`).

Both expose the same spaces and an :class:`~tmrl_common.layout.ObservationLayout` (``env.unwrapped.layout``).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from tmrl_worker.sim.car import Car, CarPose
from tmrl_worker.sim.config import CarParams, ObservationKind, SimConfig
from tmrl_worker.sim.driver import PurePursuitDriver, speed_plan
from tmrl_worker.sim.env import RaceTrackEnv, sim_config
from tmrl_worker.sim.episode import RaceEpisode, observation_layout
from tmrl_worker.sim.realtime import (
    PhysicsLoop,
    RaceTrackInterface,
    close_realtime_env,
    make_realtime_env,
    realtime_config,
)
from tmrl_worker.sim.track import BUILTIN_TRACKS, HELD_OUT_TRACK_SEEDS, Track, TrackError, generate_track, load_track

#: gymnasium ids (fast mode) and the observation each one gives.
ENV_IDS: dict[str, ObservationKind] = {
    "tmrl/RaceTrack-v0": "lidar",
    "tmrl/RaceTrackLidarProgress-v0": "lidar_progress",
    "tmrl/RaceTrackImage-v0": "image",
}

for _env_id, _observation in ENV_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point="tmrl_worker.sim.env:RaceTrackEnv", kwargs={"variant": _observation})

__all__ = [
    "BUILTIN_TRACKS", "ENV_IDS", "HELD_OUT_TRACK_SEEDS", "Car", "CarParams", "CarPose", "PhysicsLoop", "PurePursuitDriver", "RaceEpisode",
    "RaceTrackEnv", "RaceTrackInterface", "SimConfig", "Track", "TrackError", "close_realtime_env", "generate_track",
    "load_track", "make_realtime_env", "observation_layout", "realtime_config", "sim_config", "speed_plan",
]
