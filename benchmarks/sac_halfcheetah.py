"""HalfCheetah-v5: tmrl's local SAC beside Stable-Baselines3's SAC with the same settings, 3 seeds x 50,000 steps.

Both sides train with the hyperparameters of one :class:`~tmrl_trainer.sac.SACConfig` (tmrl's defaults unless
``--set`` changes them): the same [256, 256] ReLU networks, batch, learning rate (one for the actor, the critics and
alpha, as SB3 has one), learning starts (uniform random actions until then), gamma, tau, updates per step (1), replay
capacity, alpha learned from 1.0 towards ``-dim(A)``. tmrl runs :func:`tmrl_trainer.local.train_local`: the learner from
``make_learner`` (``cpu-fast`` on CPU), the replay memory and the sample batches of the trainer service, driven
synchronously. SB3 runs ``SAC.learn`` in chunks of ``--eval-every`` steps.

Every ``--eval-every`` steps and at the end both sides are scored the same way: the mean undiscounted return of
``--episodes`` deterministic episodes on a fresh environment reset with seeds ``seed + 1_000_000``,
``seed + 1_000_001``... (:func:`tmrl_trainer.local.evaluate`'s protocol). The learning curves (mean and min-max over
the seeds) go to ``--plot`` (PNG) and the figures to ``--json``. Each run is one process with 1 torch thread;
``--jobs`` runs that many at once (the wall-clock figures are only comparable between runs that shared the machine
alike: the script prints each run's wall and CPU seconds).

Needs MuJoCo, which ``make install`` does not install:

    .venv/bin/pip install "gymnasium[mujoco]"      # mujoco + imageio, a few seconds
    nice -n 15 .venv/bin/python benchmarks/sac_halfcheetah.py [--steps 50000] [--seeds 0 1 2] [--jobs 2] \
        [--eval-every 5000] [--episodes 10] [--no-sb3] [--set sac.learning_starts=10000 ...] \
        [--plot benchmarks/sac_halfcheetah.png] [--json out.json]

``--env`` takes any gymnasium id with a flat ``Box`` observation and a bounded ``Box`` action (``Pendulum-v1`` for a
quick try).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sac_pendulum import EVAL_SEED_OFFSET, evaluate_sb3, parse_overrides, tmrl_config  # noqa: E402

LIBRARIES = ("tmrl", "stable-baselines3")


@dataclass
class Run:
    """One library's training run on one seed."""

    library: str
    seed: int
    curve: list[tuple[int, float]]
    """(environment step, mean deterministic return) of every evaluation, the last one at the final step."""
    wall_s: float
    cpu_s: float

    @property
    def final(self) -> float:
        return self.curve[-1][1]


class ProgressLog:
    """Appends one JSON line per evaluation to ``path`` (when set), so that a run cut short still leaves its curve
    (``--report PATH`` prints and plots it)."""

    def __init__(self, path: Path | None, library: str, seed: int) -> None:
        self.path, self.library, self.seed = path, library, seed
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def point(self, step: int, mean_return: float) -> None:
        if self.path is None:
            return
        line = {"library": self.library, "seed": self.seed, "step": step, "return": mean_return,
                "wall_s": time.perf_counter() - self.started, "cpu_s": time.process_time() - self.cpu_started}
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")


def run_tmrl(env_id: str, seed: int, steps: int, episodes: int, eval_every: int, overrides: dict,
             progress: Path | None = None) -> Run:
    from tmrl_trainer.local import train_local

    torch.set_num_threads(1)
    config = tmrl_config(episodes, {**overrides, "eval_every": eval_every})
    log = ProgressLog(progress, "tmrl", seed)
    cpu_started = time.process_time()
    result = train_local(env_id, steps, seed, config,
                         on_progress=lambda step, info: log.point(step, info["eval_return"]) if "eval_return" in info else None)
    log.point(steps, result.final_return)
    return Run("tmrl", seed, [(int(s), float(r)) for s, r in result.evaluations], result.wall_s,
               time.process_time() - cpu_started)


def sb3_settings(overrides: dict) -> dict:
    """SB3 ``SAC`` keyword arguments equal to the tmrl side's :class:`SACConfig` (after ``overrides``)."""
    config = tmrl_config(1, overrides)
    sac = config.sac
    if not sac.actor_lr == sac.critic_lr == sac.alpha_lr:
        raise SystemExit("SB3 has one learning rate: set sac.actor_lr, sac.critic_lr and sac.alpha_lr alike")
    if sac.redq_n != 2 or sac.redq_m != 2 or sac.utd != 1.0 or not sac.learn_alpha:
        raise SystemExit("the SB3 peer is plain SAC with learned alpha and one update per step")
    if sac.reward_scale != 1.0:
        raise SystemExit("SB3's SAC has no reward scale: leave sac.reward_scale at 1 (or run with --no-sb3)")
    if sac.critic_layer_norm:
        raise SystemExit("SB3's SAC critics have no LayerNorm: leave sac.critic_layer_norm off (or run with --no-sb3)")
    n_step = {}
    if sac.n_step > 1:  # SB3's own n-step buffer: the same returns, cut at episode ends, and discount per transition
        from stable_baselines3.common.buffers import NStepReplayBuffer

        n_step = {"replay_buffer_class": NStepReplayBuffer,
                  "replay_buffer_kwargs": {"n_steps": sac.n_step, "gamma": sac.gamma}}
    return {
        **n_step,
        "learning_rate": sac.actor_lr, "buffer_size": config.memory_capacity, "learning_starts": sac.learning_starts,
        "batch_size": sac.batch_size, "tau": sac.tau, "gamma": sac.gamma, "train_freq": 1, "gradient_steps": 1,
        "ent_coef": f"auto_{sac.init_alpha}",
        "target_entropy": "auto" if sac.target_entropy is None else sac.target_entropy,
        "policy_kwargs": {"net_arch": list(sac.hidden_sizes),
                          "activation_fn": {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU,
                                            "silu": torch.nn.SiLU}[sac.activation]},
    }


def run_sb3(env_id: str, seed: int, steps: int, episodes: int, eval_every: int, overrides: dict,
            progress: Path | None = None) -> Run:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.logger import Logger

    torch.set_num_threads(1)
    log = ProgressLog(progress, "stable-baselines3", seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    model = SAC("MlpPolicy", gym.make(env_id), seed=seed, device="cpu", verbose=0, **sb3_settings(overrides))
    model.set_logger(Logger(folder=None, output_formats=[]))  # else learn() leaves an empty /tmp/SB3-<date> folder
    curve = []
    done_steps = 0
    while done_steps < steps:
        chunk = min(eval_every or steps, steps - done_steps)
        # reset_num_timesteps=False: the chunks continue one run (same env episode, same counters)
        model.learn(total_timesteps=chunk, reset_num_timesteps=done_steps == 0)
        done_steps += chunk
        curve.append((done_steps, float(np.mean(evaluate_sb3(model, episodes, seed, env_id)))))
        log.point(*curve[-1])
    return Run("stable-baselines3", seed, curve, time.perf_counter() - started, time.process_time() - cpu_started)


def runs_from_progress(path: Path) -> list[Run]:
    """The runs of a ``--progress`` file, each cut to the evaluations that every run has reached."""
    points: dict[tuple[str, int], list[dict]] = {}
    for line in path.read_text().splitlines():
        point = json.loads(line)
        points.setdefault((point["library"], point["seed"]), []).append(point)
    last = min(max(point["step"] for point in mine) for mine in points.values())
    runs = []
    for (library, seed), mine in sorted(points.items(), key=lambda item: (LIBRARIES.index(item[0][0]), item[0][1])):
        mine = sorted((point for point in mine if point["step"] <= last), key=lambda point: point["step"])
        runs.append(Run(library, seed, [(point["step"], point["return"]) for point in mine], mine[-1]["wall_s"],
                        mine[-1]["cpu_s"]))
    return runs


def plot(runs: list[Run], env_id: str, path: Path, title_note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for library, colour in zip(LIBRARIES, ("tab:blue", "tab:orange"), strict=True):
        mine = [run for run in runs if run.library == library]
        if not mine:
            continue
        steps = np.array([step for step, _ in mine[0].curve])
        returns = np.array([[value for _, value in run.curve] for run in mine])
        axes.plot(steps, returns.mean(0), color=colour, marker="o", label=f"{library} (mean of {len(mine)} seeds)")
        axes.fill_between(steps, returns.min(0), returns.max(0), color=colour, alpha=0.2)
    axes.set_xlabel("environment steps")
    axes.set_ylabel("deterministic return (mean of evaluation episodes)")
    axes.set_title(f"SAC on {env_id}: {title_note}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def check_environment(env_id: str) -> None:
    """Exit with status 2 and the install line when ``env_id`` cannot be made (MuJoCo missing)."""
    import gymnasium as gym

    try:
        gym.make(env_id).close()
    except (gym.error.Error, ImportError) as exc:
        print(f"cannot make {env_id}: {exc}\nMuJoCo tasks need: .venv/bin/pip install \"gymnasium[mujoco]\"")
        raise SystemExit(2) from exc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="deterministic episodes per evaluation")
    parser.add_argument("--eval-every", type=int, default=5_000, help="environment steps between evaluations")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel processes (1 torch thread each)")
    parser.add_argument("--no-sb3", action="store_true", help="train the tmrl side only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a LocalTrainingConfig field, for both sides (dotted: sac.learning_starts=10000)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "sac_halfcheetah.png")
    parser.add_argument("--json", type=Path, default=None, help="write every curve and timing here")
    parser.add_argument("--progress", type=Path, default=None,
                        help="append each evaluation here as it happens (JSON lines), for runs that may be cut short")
    parser.add_argument("--report", type=Path, default=None, metavar="PROGRESS",
                        help="train nothing: print and plot the evaluations a --progress file holds, up to the last "
                             "step every run reached")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    settings = sb3_settings(overrides)  # a bad field fails here, before any training
    check_environment(args.env)

    if args.report is not None:
        runs = runs_from_progress(args.report)
        args.steps = runs[0].curve[-1][0]
    else:
        runners = [run_tmrl] + ([] if args.no_sb3 else [run_sb3])
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            jobs = [pool.submit(runner, args.env, seed, args.steps, args.episodes, args.eval_every, overrides,
                                args.progress) for seed in args.seeds for runner in runners]
            runs = [job.result() for job in jobs]

    shown = {key: value for key, value in settings.items() if key != "policy_kwargs"}
    print(f"{args.env}, {args.steps:,} env steps per seed, mean deterministic return over {args.episodes} episodes "
          f"on reset seeds seed + {EVAL_SEED_OFFSET:,}..., evaluated every {args.eval_every:,} steps")
    print(f"  both sides: net {settings['policy_kwargs']['net_arch']}, {shown}")
    libraries = [library for library in LIBRARIES if any(run.library == library for run in runs)]
    print("    step" + "".join(f"{library + ': mean (min..max)':>36}" for library in libraries))
    for index, (step, _) in enumerate(runs[0].curve):
        cells = ""
        for library in libraries:
            values = [run.curve[index][1] for run in runs if run.library == library]
            cells += f"{np.mean(values):>18.1f} ({min(values):7.1f}..{max(values):7.1f})"
        print(f"  {step:>6}{cells}")
    print("  final, per seed (wall s / CPU s):")
    for library in libraries:
        mine = [run for run in runs if run.library == library]
        cells = "  ".join(f"seed {run.seed}: {run.final:8.1f} ({run.wall_s:5.0f} / {run.cpu_s:5.0f})" for run in mine)
        print(f"    {library:>18}: {cells}")
    finals = {library: [run.final for run in runs if run.library == library] for library in libraries}
    for library in libraries:
        mine = [run for run in runs if run.library == library]
        print(f"  {library:>18}: final mean {np.mean(finals[library]):8.1f} +- {np.std(finals[library]):6.1f} (std), "
              f"median {np.median(finals[library]):8.1f}, "
              f"wall {sum(run.wall_s for run in mine):6.0f} s, CPU {sum(run.cpu_s for run in mine):6.0f} s in all")
    if len(libraries) == 2:
        tmrl_runs = [run for run in runs if run.library == "tmrl"]
        sb3_runs = [run for run in runs if run.library == "stable-baselines3"]
        mean_tmrl, mean_sb3 = np.mean(finals["tmrl"]), np.mean(finals["stable-baselines3"])
        verdict = "PASS" if mean_tmrl >= mean_sb3 else "FAIL"
        ratio = f"{mean_tmrl / mean_sb3:.3f}x, " if mean_tmrl > 0 and mean_sb3 > 0 else ""
        print(f"  tmrl vs SB3: final return {ratio}{mean_tmrl - mean_sb3:+.1f} -> {verdict} (target: tmrl's mean >= SB3's); "
              f"wall clock {sum(r.wall_s for r in sb3_runs) / sum(r.wall_s for r in tmrl_runs):.2f}x faster, "
              f"CPU time {sum(r.cpu_s for r in sb3_runs) / sum(r.cpu_s for r in tmrl_runs):.2f}x")
    seeds = len({run.seed for run in runs})  # --report: the runs the progress file holds, not --seeds
    note = f"{seeds} seed{'s' if seeds != 1 else ''} x {max(run.curve[-1][0] for run in runs):,} steps, shaded: min..max"
    plot(runs, args.env, args.plot, note)
    print(f"  plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"env": args.env, "steps": args.steps, "episodes": args.episodes,
                                         "overrides": args.overrides, "runs": [asdict(run) for run in runs]}, indent=1))


if __name__ == "__main__":
    main()
