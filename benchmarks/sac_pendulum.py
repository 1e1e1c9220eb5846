"""Pendulum-v1 with tmrl's local SAC: 3 seeds x 10,000 environment steps, final deterministic return per seed.

The figure is the mean undiscounted return of 10 deterministic evaluation episodes after training, with the default
``SACConfig`` (batch 256, lr 1e-3, [256, 256], learning_starts 1000, one update per step). Target: >= -200 for every
seed. ``--with-sb3`` trains Stable-Baselines3's SAC with its defaults for the same number of steps, as a peer.

Both sides are evaluated the same way: 10 deterministic episodes on a fresh environment reset with seeds
``seed + 1_000_000``, ``seed + 1_000_001``... (:func:`tmrl_trainer.local.evaluate`'s protocol). SB3's own
``evaluate_policy`` (one seeded reset, then unseeded ones: other initial states) is printed beside it, for the record.

``--set FIELD=VALUE`` (repeatable) overrides a :class:`~tmrl_trainer.local.LocalTrainingConfig` field for the tmrl
side, dotted for nested ones (``--set sac.learning_starts=100 --set sac.actor_lr=3e-4``); the value is read as JSON
when it parses, else as a string. The ablations of issue 17 are runs of this script with different ``--set``.

    .venv/bin/python benchmarks/sac_pendulum.py [--steps 10000] [--seeds 0 1 2] [--jobs 2] [--with-sb3] \
        [--set sac.learning_starts=100 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch

TARGET = -200.0


EVAL_SEED_OFFSET = 1_000_000
"""Evaluation reset seeds start at ``seed + EVAL_SEED_OFFSET``, as in :func:`tmrl_trainer.local.train_local`."""


def parse_overrides(assignments: list[str]) -> dict:
    """``["sac.actor_lr=3e-4", "eval_episodes=5"]`` -> ``{"sac": {"actor_lr": 0.0003}, "eval_episodes": 5}``."""
    overrides: dict = {}
    for assignment in assignments:
        path, separator, text = assignment.partition("=")
        if not separator or not path:
            raise SystemExit(f"--set wants FIELD=VALUE, got {assignment!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, name = path.split(".")
        node = overrides
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return overrides


def tmrl_config(episodes: int, overrides: dict):
    """The benchmark's :class:`LocalTrainingConfig` (CPU, ``episodes`` evaluation episodes) with ``overrides``."""
    from tmrl_trainer.local import LocalTrainingConfig

    fields = {"device": "cpu", "eval_episodes": episodes, **overrides}
    fields["sac"] = {**LocalTrainingConfig().sac.model_dump(), **overrides.get("sac", {})}
    return LocalTrainingConfig.model_validate(fields)


def run_tmrl(seed: int, steps: int, episodes: int, overrides: dict) -> tuple[float, float, float]:
    from tmrl_trainer.local import train_local

    torch.set_num_threads(1)
    result = train_local("Pendulum-v1", steps, seed, tmrl_config(episodes, overrides))
    return result.final_return, float("nan"), result.wall_s


def evaluate_sb3(model, episodes: int, seed: int, env_id: str = "Pendulum-v1") -> list[float]:
    """``model``'s deterministic returns on the reset seeds tmrl's :func:`~tmrl_trainer.local.evaluate` uses."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + EVAL_SEED_OFFSET + episode)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def run_sb3(seed: int, steps: int, episodes: int, overrides: dict) -> tuple[float, float, float]:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.logger import Logger

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), seed=seed, device="cpu", verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # else learn() leaves an empty /tmp/SB3-<date> folder
    model.learn(total_timesteps=steps)
    same_protocol = float(np.mean(evaluate_sb3(model, episodes, seed)))
    wall_s = time.perf_counter() - started
    # SB3's own protocol, as earlier runs of this script used it: one seeded reset, then unseeded ones
    env = gym.make("Pendulum-v1")
    env.reset(seed=seed + EVAL_SEED_OFFSET)
    own_protocol, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True)
    return same_protocol, float(own_protocol), wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="deterministic evaluation episodes")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes (1 torch thread each)")
    parser.add_argument("--with-sb3", action="store_true", help="also train Stable-Baselines3 SAC (defaults) as a peer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a LocalTrainingConfig field of the tmrl side (dotted: sac.learning_starts=100)")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    tmrl_config(args.episodes, overrides)  # a bad field fails here, before any training

    runners = [("tmrl", run_tmrl)] + ([("stable-baselines3", run_sb3)] if args.with_sb3 else [])
    results: dict[str, list[tuple[float, float, float]]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: [pool.submit(runner, seed, args.steps, args.episodes, overrides) for seed in args.seeds]
                   for name, runner in runners}
        names = {job: (name, seed) for name, jobs in futures.items() for job, seed in zip(jobs, args.seeds, strict=True)}
        for job in as_completed(names):  # each seed as it ends, for runs cut short on a busy machine
            name, seed = names[job]
            print(f"  ({name} seed {seed}: {job.result()[0]:.1f} after {job.result()[2]:.0f} s)", flush=True)
        for name, jobs in futures.items():
            results[name] = [job.result() for job in jobs]

    print(f"Pendulum-v1, {args.steps} env steps per seed, mean deterministic return over {args.episodes} episodes "
          f"on reset seeds seed + {EVAL_SEED_OFFSET:,}... (target >= {TARGET:.0f} for every seed)")
    if args.overrides:
        print(f"  tmrl overrides: {' '.join(args.overrides)}")
    header = "  seed " + "".join(f"{name:>22}" for name in results)
    print(header)
    for index, seed in enumerate(args.seeds):
        cells = "".join(f"{results[name][index][0]:12.1f} ({results[name][index][2]:5.0f} s)" for name in results)
        print(f"  {seed:>4} {cells}")
    for name, values in results.items():
        returns = [value for value, _, _ in values]
        verdict = "PASS" if min(returns) >= TARGET else "FAIL"
        print(f"  {name}: mean {np.mean(returns):.1f}, worst {min(returns):.1f}, "
              f"wall {sum(wall for _, _, wall in values):.0f} s in all -> {verdict}")
    if "stable-baselines3" in results:
        own = [value for _, value, _ in results["stable-baselines3"]]
        print(f"  stable-baselines3 with its own evaluate_policy protocol: "
              f"{' / '.join(f'{value:.1f}' for value in own)} (mean {np.mean(own):.1f})")


if __name__ == "__main__":
    main()
