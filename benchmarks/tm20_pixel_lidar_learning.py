"""Steps to the first finish on the synchronous simulator, with the LIDAR the simulator measures or TrackMania's.

The same car, track (``hairpins``), SAC settings (``[128, 128]``, batch 128, 1,000 warm-up steps, one update per
step, one torch thread) and seed; only what the policy reads changes:

* ``metres``: the simulator's LIDAR (metres from the car to the walls, capped at 80) and speed in km/h;
* ``pixels``: TrackMania's LIDAR — each step the emulated game's cockpit frame (958 x 488) is rendered at the car's
  pose and measured by :class:`tmrl_worker.tm20.lidar.Lidar` (upstream's reading, pixels) — and speed in m/s, as the
  ``tm20-lidar`` env observes them, with the simulator's layout (no scale);
* ``pixels-scaled``: the same observations with ``tm20-lidar``'s layout, whose LIDAR ``scale`` (0.01) the networks
  apply.

and ``--reward sim`` (the simulator's reward settings) or ``tm`` (TrackMania's defaults). Each variant trains for
``--steps`` steps (``tmrl_trainer.local.train_local``, no evaluation) and the script prints the step of the first
finished episode (a return above the path's points: only the finish bonus gets there), side by side.

    nice -n 15 .venv/bin/python benchmarks/tm20_pixel_lidar_learning.py [--steps 20000] [--seed 0]
        [--variants metres,pixels,pixels-scaled] [--reward sim]
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import numpy as np
import torch
from tmrl_common.layout import tm20_pixel_lidar_layout
from tmrl_trainer.local import LocalTrainingConfig, train_local
from tmrl_trainer.sac import SACConfig
from tmrl_worker.reward import TrajectoryRewardConfig
from tmrl_worker.sim.config import SimConfig
from tmrl_worker.sim.env import RaceTrackEnv
from tmrl_worker.tm20.emulated_game import CockpitRenderer
from tmrl_worker.tm20.lidar import Lidar

KMH_PER_MS = 3.6


class TrackManiaLidar(gym.Wrapper):
    """The simulator with ``tm20-lidar``'s observations: LIDAR measured on rendered cockpit frames, speed in m/s."""

    def __init__(self, env: RaceTrackEnv, scaled: bool) -> None:
        super().__init__(env)
        self.renderer = CockpitRenderer(env.track, 488, 958)
        self.lidar = Lidar()
        if scaled:
            env.layout = tm20_pixel_lidar_layout()  # what train_local builds the networks for
        self.history: np.ndarray | None = None

    def _scan(self) -> np.ndarray:
        car = self.env.unwrapped.car
        return self.lidar.measure(self.renderer.frame(car.x, car.y, car.heading))

    def _observation(self, observation: tuple) -> tuple:
        return (observation[0] / KMH_PER_MS, self.history.copy(), *observation[2:])

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self.history = np.repeat(self._scan()[None], len(observation[1]), axis=0)
        return self._observation(observation), info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.history[:-1] = self.history[1:]
        self.history[-1] = self._scan()
        return self._observation(observation), reward, terminated, truncated, info


def make_env(variant: str, reward: str) -> gym.Env:
    rewards = {"sim": SimConfig().reward, "tm": TrajectoryRewardConfig()}
    env = RaceTrackEnv(track="hairpins", reward=rewards[reward], max_episode_steps=1000)
    if variant == "metres":
        return env
    return TrackManiaLidar(env, scaled=variant == "pixels-scaled")


def first_finish(variant: str, reward: str, steps: int, seed: int) -> tuple[int | None, int, float]:
    """(step of the first finished episode or None, episodes, wall seconds)."""
    env_id = f"tmrl-bench/{variant}-{reward}-v0"
    gym.register(env_id, entry_point=lambda: make_env(variant, reward), disable_env_checker=True)
    points = len(make_env("metres", reward).unwrapped.episode.reward.points)
    found: list[int] = []
    episodes = [0]

    def progress(step: int, info: dict) -> None:
        if "episode_return" in info:
            episodes[0] += 1
            if not found and info["episode_return"] > points:  # beyond every point's pay: the finish bonus
                found.append(step)

    config = LocalTrainingConfig(sac=SACConfig(hidden_sizes=[128, 128], batch_size=128, learning_starts=1000, utd=1.0),
                                 eval_episodes=0, device="cpu")
    started = time.perf_counter()
    train_local(env_id, steps, seed=seed, config=config, on_progress=progress)
    return (found[0] if found else None), episodes[0], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="metres,pixels,pixels-scaled")
    parser.add_argument("--reward", choices=["sim", "tm"], default="sim")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"hairpins, SAC [128, 128], seed {args.seed}, {args.steps} steps, reward {args.reward}; load average "
          f"{os.getloadavg()[0]:.2f}")
    for variant in args.variants.split(","):
        step, episodes, wall = first_finish(variant, args.reward, args.steps, args.seed)
        where = f"first finish at step {step:,}" if step is not None else f"no finish in {args.steps:,} steps"
        print(f"  {variant:14s} {where} ({episodes} episodes, {wall:.0f} s; load average {os.getloadavg()[0]:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
