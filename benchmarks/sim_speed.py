"""Fast-mode simulator speed: environment steps per second for each observation variant, side by side with
gymnasium's Pendulum-v1 (a tiny pure-NumPy classic-control env) measured in the same run on the same core.

Each env is built with ``gymnasium.make`` (so the same wrappers are in the loop), driven with random actions (gas
always pressed on the race track), reset when an episode ends, and timed over several repeats, interleaved between
the envs (best repeat kept, to damp noise from other processes).
One simulator step is 50 ms of simulated time: 5 physics ticks at 100 Hz, a sensor frame and the reward.

    .venv/bin/python benchmarks/sim_speed.py [--steps 5000] [--repeats 3] [--track hairpins]
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import numpy as np
from tmrl_worker.sim import ENV_IDS  # importing it registers the tmrl/RaceTrack* ids

PEER_ID = "Pendulum-v1"


class Runner:
    """One env built with ``gymnasium.make``, driven by a fixed sequence of random actions."""

    def __init__(self, env_id: str, steps: int, **kwargs) -> None:
        self.env = gym.make(env_id, **kwargs)
        rng = np.random.default_rng(0)
        self.actions = rng.uniform(-1, 1, (steps, *self.env.action_space.shape)).astype(np.float32)
        if env_id == PEER_ID:
            self.actions *= 2.0  # Pendulum's torque range is [-2, 2]
        else:
            self.actions[:, 0] = np.abs(self.actions[:, 0])  # press the gas so the car drives instead of idling
        self.best = 0.0
        self.measure(self.actions[:200])  # warm-up
        self.best = 0.0

    def measure(self, actions: np.ndarray | None = None) -> None:
        actions = self.actions if actions is None else actions
        env = self.env
        env.reset(seed=0)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        self.best = max(self.best, len(actions) / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--track", default="hairpins")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for every side
    peer = Runner(PEER_ID, args.steps)
    sims = {env_id: Runner(env_id, args.steps, track=args.track) for env_id in ENV_IDS}
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every side alike
        peer.measure()
        for runner in sims.values():
            runner.measure()
    print(f"one core, {args.steps} steps, best of {args.repeats} interleaved repeats, track {args.track}")
    print(f"{'environment':40s} {'steps/s':>10s} {'vs ' + PEER_ID:>16s}")
    print(f"{PEER_ID:40s} {peer.best:10.0f} {1.0:16.2f}")
    for env_id, runner in sims.items():
        print(f"{env_id:40s} {runner.best:10.0f} {runner.best / peer.best:16.2f}")


if __name__ == "__main__":
    main()
