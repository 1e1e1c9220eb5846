"""Pendulum-v1 with tmrl's local SAC: 3 seeds x 10,000 environment steps, final deterministic return per seed.

The figure is the mean undiscounted return of 10 deterministic evaluation episodes after training, with the default
``SACConfig`` (batch 256, lr 1e-3, [256, 256], learning_starts 1000, one update per step). Target: >= -200 for every
seed. ``--with-sb3`` trains Stable-Baselines3's SAC with its defaults for the same number of steps, as a peer.

    .venv/bin/python benchmarks/sac_pendulum.py [--steps 10000] [--seeds 0 1 2] [--jobs 2] [--with-sb3]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

TARGET = -200.0


def run_tmrl(seed: int, steps: int, episodes: int) -> tuple[float, float]:
    from tmrl_trainer.local import LocalTrainingConfig, train_local

    torch.set_num_threads(1)
    result = train_local("Pendulum-v1", steps, seed, LocalTrainingConfig(device="cpu", eval_episodes=episodes))
    return result.final_return, result.wall_s


def run_sb3(seed: int, steps: int, episodes: int) -> tuple[float, float]:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=steps)
    env = gym.make("Pendulum-v1")
    env.reset(seed=seed + 1_000_000)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True)
    return float(mean), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="deterministic evaluation episodes")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes (1 torch thread each)")
    parser.add_argument("--with-sb3", action="store_true", help="also train Stable-Baselines3 SAC (defaults) as a peer")
    args = parser.parse_args()

    runners = [("tmrl", run_tmrl)] + ([("stable-baselines3", run_sb3)] if args.with_sb3 else [])
    results: dict[str, list[tuple[float, float]]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: [pool.submit(runner, seed, args.steps, args.episodes) for seed in args.seeds]
                   for name, runner in runners}
        for name, jobs in futures.items():
            results[name] = [job.result() for job in jobs]

    print(f"Pendulum-v1, {args.steps} env steps per seed, mean deterministic return over {args.episodes} episodes "
          f"(target >= {TARGET:.0f} for every seed)")
    header = "  seed " + "".join(f"{name:>22}" for name in results)
    print(header)
    for index, seed in enumerate(args.seeds):
        cells = "".join(f"{results[name][index][0]:12.1f} ({results[name][index][1]:5.0f} s)" for name in results)
        print(f"  {seed:>4} {cells}")
    for name, values in results.items():
        returns = [value for value, _ in values]
        verdict = "PASS" if min(returns) >= TARGET else "FAIL"
        print(f"  {name}: mean {np.mean(returns):.1f}, worst {min(returns):.1f} -> {verdict}")


if __name__ == "__main__":
    main()
