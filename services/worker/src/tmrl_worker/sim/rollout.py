"""Drive one episode in fast mode with a scripted driver and keep what happened (for demos, pictures and tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tmrl_worker.reward import resample_path, save_points
from tmrl_worker.sim.driver import PurePursuitDriver
from tmrl_worker.sim.env import RaceTrackEnv
from tmrl_worker.sim.render import render_track_png, write_gif


@dataclass
class EpisodeRecord:
    """One driven episode: positions (including the start), speeds in km/h, rewards and how it ended."""

    track: str
    positions: np.ndarray
    speeds_kmh: np.ndarray
    rewards: np.ndarray
    finished: bool
    terminated: bool
    truncated: bool
    crashes: int
    seconds: float
    frames: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def steps(self) -> int:
        return len(self.rewards)

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())


def drive_episode(env: RaceTrackEnv, brake: bool = True, seed: int = 0, keep_frames: bool = False) -> EpisodeRecord:
    """Drive ``env`` with :class:`PurePursuitDriver` (``brake=False``: full throttle) until the episode ends."""
    driver = PurePursuitDriver(env.track, env.config.car, brake=brake)
    env.reset(seed=seed)
    speeds, rewards, frames = [0.0], [], []
    if keep_frames:
        frames.append(env.render())
    terminated = truncated = False
    info: dict = {}
    while not (terminated or truncated):
        _, reward, terminated, truncated, info = env.step(driver.act(env.car.pose()))
        rewards.append(reward)
        speeds.append(info["speed_kmh"])
        if keep_frames:
            frames.append(env.render())
    return EpisodeRecord(
        track=env.track.name, positions=np.asarray(env.trajectory), speeds_kmh=np.asarray(speeds),
        rewards=np.asarray(rewards, dtype=np.float64), finished=bool(info.get("finished")), terminated=terminated,
        truncated=truncated, crashes=env.car.crashes, seconds=len(rewards) * env.config.time_step_duration,
        frames=frames)


def render_drive(track: str, png: Path | None = None, gif: Path | None = None, brake: bool = True, seed: int = 0,
                 max_episode_steps: int = 2000, gif_every: int = 2) -> EpisodeRecord:
    """Drive ``track`` with the scripted driver; write a PNG of the trajectory and/or a GIF of the episode."""
    env = RaceTrackEnv(track=track, max_episode_steps=max_episode_steps, render_mode="rgb_array" if gif else None)
    record = drive_episode(env, brake=brake, seed=seed, keep_frames=gif is not None)
    driver_name = "braking driver" if brake else "full-throttle driver"
    if png is not None:
        outcome = f"finished in {record.seconds:.2f} s" if record.finished else f"stopped after {record.seconds:.2f} s"
        render_track_png(env.track, png, trajectory=record.positions, speeds=record.speeds_kmh,
                         title=f"{track}: {driver_name}, {outcome}, {record.crashes} crash(es)")
    if gif is not None:
        write_gif(record.frames[::gif_every], gif, fps=20.0 / gif_every)
    return record


def record_demo(track: str, output: Path, spacing: float = 0.5, seed: int = 0) -> EpisodeRecord:
    """Drive ``track`` with the braking expert and save its path as reward points (safetensors) for ``demo_path``.
    Raises ``RuntimeError`` if the expert does not reach the finish."""
    env = RaceTrackEnv(track=track, max_episode_steps=5000, start_jitter=0.0)
    record = drive_episode(env, brake=True, seed=seed)
    if not record.finished:
        raise RuntimeError(f"the scripted driver did not finish {track!r}; no demonstration saved")
    finish = env.track.lap_path()[-1]
    path = np.concatenate([record.positions, finish[None]])  # end exactly on the finish line
    save_points(output, resample_path(path, spacing), spacing=spacing)
    return record
