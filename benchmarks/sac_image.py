"""SAC with the CNN policy on the simulator's image env, beside a uniformly random policy on the same episodes.

Trains ``tmrl/RaceTrackImage-v0`` (speed, 4 x 64 x 64 grayscale top-down frames, 2 past actions; ``hairpins``
track) with :func:`tmrl_trainer.local.train_local` for ``--steps`` environment steps: the default CNN
(``conv_channels`` 16-32-64-64, one CNN for the actor and one per critic) and ``[256, 256]`` heads, with a smaller
batch than the default (``--batch-size 64``: an update at batch 256 takes about 0.65 s on one core). Then it prints
the mean undiscounted return of ``--episodes`` deterministic evaluation episodes (reset seeds ``seed + 1_000_000``
onwards, as ``train_local`` evaluates) beside, on the same reset seeds:

* a uniformly random policy (the peer the CNN must beat),
* full throttle, wheel straight (a blind policy: what ignoring the image earns),
* the simulator's scripted pure-pursuit driver (reads the car's true pose: an upper reference).

The return is progress along the track (plus 100 at the finish), so any policy that reaches the finish scores the
same however fast it drives or however much it scrapes the walls: the ``finished``, ``steps`` and ``wall hits``
columns tell those apart. The trained actor is reloaded from ``train_local``'s checkpoint for them (its returns
must equal ``train_local``'s final evaluation, checked).

Updates per second count the whole run (environment steps and evaluations included); one torch thread.

    .venv/bin/python benchmarks/sac_image.py [--steps 5000] [--seed 0] [--episodes 10] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

ENV_ID = "tmrl_worker.sim:tmrl/RaceTrackImage-v0"
EVAL_SEED_OFFSET = 1_000_000  # train_local's evaluation reset seeds start here


class EpisodeStats(NamedTuple):
    """One policy's evaluation episodes."""

    returns: list[float]
    steps: list[int]
    finished: int
    """Episodes that reached the finish line (the others ran out of steps or stopped progressing)."""
    wall_hits: list[int]
    mean_action: np.ndarray
    """Mean ``[gas, brake, steer]`` over every step."""


def rollouts(policy: Callable[[tuple, Any, Any], np.ndarray], episodes: int, seed: int) -> EpisodeStats:
    """``episodes`` episodes of ``policy(observation, sim, driver)`` on the evaluation reset seeds of ``train_local``."""
    from tmrl_worker.sim import PurePursuitDriver

    env = gym.make(ENV_ID)
    sim = env.unwrapped
    returns, steps, wall_hits, actions, finished = [], [], [], [], 0
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + EVAL_SEED_OFFSET + episode)
        driver = PurePursuitDriver(sim.track, sim.config.car)
        total, length, done, info = 0.0, 0, False, {}
        while not done:
            action = policy(observation, sim, driver)
            actions.append(action)
            observation, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            length += 1
            done = terminated or truncated
        returns.append(total)
        steps.append(length)
        wall_hits.append(int(info.get("wall_hits", 0)))
        finished += bool(info.get("finished", False))
    env.close()
    return EpisodeStats(returns, steps, finished, wall_hits, np.mean(actions, axis=0))


def trained_actor(checkpoint: Path, sac) -> Any:
    """The actor ``train_local`` saved in ``checkpoint``."""
    from tmrl_trainer.checkpoint import load_checkpoint
    from tmrl_trainer.cpu_fast import SACLearner

    env = gym.make(ENV_ID)
    layout = env.unwrapped.layout
    env.close()
    learner = SACLearner(sac, sac.architecture(layout), device="cpu")
    load_checkpoint(checkpoint, learner)
    return learner.actor.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="environment steps of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=10, help="deterministic evaluation episodes")
    parser.add_argument("--eval-every", type=int, default=2500, help="steps between evaluations (learning curve)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--utd", type=float, default=1.0, help="updates per environment step")
    args = parser.parse_args()

    from tmrl_trainer.local import LocalTrainingConfig, train_local
    from tmrl_trainer.sac import SACConfig

    torch.set_num_threads(1)
    sac = SACConfig(batch_size=args.batch_size, learning_starts=args.learning_starts, utd=args.utd)
    with tempfile.TemporaryDirectory() as run_dir:
        config = LocalTrainingConfig(sac=sac, device="cpu", eval_episodes=args.episodes, eval_every=args.eval_every,
                                     memory_capacity=max(args.steps, 2), run_dir=Path(run_dir))
        result = train_local(ENV_ID, args.steps, args.seed, config)
        actor = trained_actor(result.checkpoint, sac)

    rng = np.random.default_rng(args.seed)
    full_throttle = np.array([1.0, -1.0, 0.0], dtype=np.float32)  # [gas, brake, steer]
    policies: dict[str, Callable[[tuple, Any, Any], np.ndarray]] = {
        "SAC CNN (trained)": lambda observation, _, __: actor.act(observation, deterministic=True),
        "random": lambda *_: rng.uniform(-1.0, 1.0, 3).astype(np.float32),
        "full throttle": lambda *_: full_throttle,
        "scripted driver": lambda _, sim, driver: driver.act(sim.car.pose()),
    }
    stats = {name: rollouts(policy, args.episodes, args.seed) for name, policy in policies.items()}
    if stats["SAC CNN (trained)"].returns != result.final_returns:
        raise SystemExit("the reloaded actor's episodes differ from train_local's final evaluation")

    print(f"{ENV_ID}: SAC + CNN, {args.steps} env steps, batch {args.batch_size}, utd {args.utd}, seed {args.seed}; "
          f"{args.episodes} deterministic evaluation episodes, the same reset seeds for every policy")
    print(f"  {'policy':<18}{'mean return':>12}{'min':>8}{'max':>8}{'finished':>10}{'steps':>8}{'wall hits':>10}"
          f"   mean [gas, brake, steer]")
    for name, row in stats.items():
        action = ", ".join(f"{value:+.2f}" for value in row.mean_action)
        print(f"  {name:<18}{np.mean(row.returns):12.1f}{np.min(row.returns):8.1f}{np.max(row.returns):8.1f}"
              f"{row.finished:>7}/{args.episodes:<2}{np.mean(row.steps):8.0f}{np.mean(row.wall_hits):10.1f}   [{action}]")
    curve = ", ".join(f"{step}: {value:.1f}" for step, value in result.evaluations)
    print(f"  learning curve (env step: mean return): {curve}")
    print(f"  {result.updates} updates, {result.episodes} training episodes in {result.wall_s:.0f} s: "
          f"{result.updates / result.wall_s:.2f} updates/s (env steps and evaluations included, 1 torch thread)")
    random_mean = float(np.mean(stats["random"].returns))
    verdict = "beats" if result.final_return > random_mean else "does NOT beat"
    print(f"  SAC CNN {verdict} the random policy: {result.final_return:.1f} vs {random_mean:.1f}")


if __name__ == "__main__":
    main()
