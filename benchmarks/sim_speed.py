"""Fast-mode simulator speed: environment steps per second for each observation variant, side by side with
gymnasium's Pendulum-v1 (a tiny pure-NumPy classic-control env) measured in the same run on the same core.

Each env is built with ``gymnasium.make`` (so the same wrappers are in the loop), driven with random actions,
reset when an episode ends, and timed over several repeats (best repeat kept, to damp noise from other processes).
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


def steps_per_second(env_id: str, steps: int, repeats: int, **kwargs) -> float:
    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, *env.action_space.shape)).astype(np.float32)
    if env_id == PEER_ID:
        actions *= 2.0  # Pendulum's torque range is [-2, 2]
    else:
        actions[:, 0] = np.abs(actions[:, 0])  # press the gas so the car drives around instead of idling
    env.reset(seed=0)
    for action in actions[:200]:  # warm-up
        if any(env.step(action)[2:4]):
            env.reset()
    best = 0.0
    for _ in range(repeats):
        env.reset(seed=0)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        best = max(best, steps / (time.perf_counter() - start))
    env.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--track", default="hairpins")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for every side
    peer = steps_per_second(PEER_ID, args.steps, args.repeats)
    print(f"one core, {args.steps} steps x best of {args.repeats}, track {args.track}")
    print(f"{'environment':40s} {'steps/s':>10s} {'vs ' + PEER_ID:>16s}")
    print(f"{PEER_ID:40s} {peer:10.0f} {1.0:16.2f}")
    for env_id in ENV_IDS:
        rate = steps_per_second(env_id, args.steps, args.repeats, track=args.track)
        print(f"{env_id:40s} {rate:10.0f} {rate / peer:16.2f}")


if __name__ == "__main__":
    main()
