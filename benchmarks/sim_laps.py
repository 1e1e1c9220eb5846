"""Lap time against minutes of real-time training: the demo's stack, a policy snapshot every minute, each snapshot's
deterministic lap beside the scripted braking driver's on the same tracks and start positions.

What it runs: relay + trainer + 2 workers in real time (20 Hz, rtgym) with ``make demo``'s settings
(``scripts/demo.py``'s ``DEMO_CONFIG``; :class:`tmrl_stack.LocalStack`), for ``--minutes``. Every ``--snapshot-s``
seconds it copies the trainer's ``policy.safetensors`` (with the trainer's update and sample counts). After the run
(the stack stopped, so evaluation never competes with training) every snapshot drives the evaluation tracks with
``tmrl-worker eval``'s core (:func:`tmrl_worker.evaluate.evaluate`: the synchronous simulator, same observations and
one-step action delay as real time), and the scripted driver (:class:`tmrl_worker.sim.PurePursuitDriver`, which
reads the true pose and brakes before bends) drives the same tracks from the same reset seeds.

Printed per snapshot: minutes, updates, samples, finished episodes, the policy's mean lap (steps, over the tracks it
finished), the driver's mean lap on those same tracks, and the ratio; plus the load average when the run started and
ended (a loaded machine gives fewer updates per minute). ``--json FILE`` keeps the table. ``--keep-best`` adds a
third, test-mode worker (``tmrl-worker run --test --keep-best``: deterministic laps with the weights it receives,
the best one's policy kept) and evaluates that kept policy after the snapshots.

    .venv/bin/python benchmarks/sim_laps.py --minutes 15                        # hairpins, as make demo trains
    .venv/bin/python benchmarks/sim_laps.py --minutes 15 --set trainer.sac.gamma=0.995
    .venv/bin/python benchmarks/sim_laps.py --minutes 15 --train-tracks random:1000-100000 \\
        --eval-tracks held-out --eval-episodes 1 --eval-every 3                 # procedural, 20 held-out seeds
    .venv/bin/python benchmarks/sim_laps.py --policy run/policy.safetensors --eval-tracks held-out --eval-episodes 1
    .venv/bin/python benchmarks/sim_laps.py --reward-table                      # what a faster lap is worth
    .venv/bin/python benchmarks/sim_laps.py --minutes 15 --keep-best            # + a test worker keeping its best lap

``--set SECTION.FIELD=VALUE`` (repeatable) sets ``TMRL_<SECTION>__<FIELD>`` for the services (``trainer.sac.utd=4``,
``worker.env_options.reward.step_penalty=0.5``). ``--train-tracks`` sets the workers' ``episode_tracks``
(a new track per episode, see docs/tuning.md). ``--eval-tracks`` is a comma list of tracks or ``held-out``
(``random:0`` … ``random:19``, :data:`tmrl_worker.sim.HELD_OUT_TRACK_SEEDS`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from demo import DEMO_CONFIG, WORKERS  # noqa: E402  (make demo's settings, so this measures what the demo runs)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def env_overrides(assignments: list[str]) -> dict[str, str]:
    """``["trainer.sac.gamma=0.995"]`` -> ``{"TMRL_TRAINER__SAC__GAMMA": "0.995"}``."""
    variables = {}
    for assignment in assignments:
        path, separator, value = assignment.partition("=")
        if not separator or "." not in path:
            raise SystemExit(f"--set wants SECTION.FIELD=VALUE (e.g. trainer.sac.gamma=0.995), got {assignment!r}")
        variables["TMRL_" + "__".join(part.upper() for part in path.split("."))] = value
    return variables


def eval_tracks(spec: str) -> list[str]:
    from tmrl_worker.sim import HELD_OUT_TRACK_SEEDS

    if spec == "held-out":
        return [f"random:{seed}" for seed in HELD_OUT_TRACK_SEEDS]
    return [name.strip() for name in spec.split(",") if name.strip()]


VIEWER = "viewer"
"""The test worker ``--keep-best`` adds (``tmrl-worker run --test --keep-best``)."""


def train(out: Path, minutes: float, snapshot_s: float, variables: dict[str, str], keep_best: bool = False) -> list[dict]:
    """Run the demo's stack for ``minutes``; return the snapshots (path, minutes, updates, samples). ``keep_best``
    adds a test worker keeping the policy of its best lap, copied to ``out`` at the end."""
    from tmrl_stack import LocalStack, raise_on_sigterm
    from tmrl_worker.runtime import best_policy_paths

    work = Path(tempfile.mkdtemp(prefix="tmrl-sim-laps-"))
    config = work / "tmrl.toml"
    config.write_text(DEMO_CONFIG)
    snapshots_dir = out / "snapshots"
    snapshots_dir.mkdir(parents=True, exist_ok=True)
    viewers = (VIEWER,) if keep_best else ()
    clients = ("trainer", *WORKERS, *viewers)
    stack = LocalStack(work, config=config, curve_clients=clients, run_dir=out / "trainer",
                       state_dir="worker-state", logs=out / "logs", env=variables)
    snapshots: list[dict] = []
    raise_on_sigterm()  # `kill` of this script takes its services down too (the finally below)
    try:
        stack.start_relay()
        stack.start_trainer("--env", "sim")
        for index, worker in enumerate(WORKERS):
            stack.start_worker(worker, "--env", "sim", "--seed", str(index))
        if keep_best:
            stack.start_worker(VIEWER, "--env", "sim", "--test", "--keep-best", "--seed", "100")
        started = time.monotonic()
        policy = stack.run_dir / "policy.safetensors"
        for k in range(1, int(minutes * 60 / snapshot_s) + 1):
            while time.monotonic() - started < k * snapshot_s:
                time.sleep(0.5)
                stack.check_alive()
            status = stack.status()
            entry = {"minutes": round(k * snapshot_s / 60, 2), "updates": status.get("updates", 0),
                     "samples": status.get("samples_received", 0), "policy": None}
            if policy.exists():
                target = snapshots_dir / f"policy-{k:03d}.safetensors"
                shutil.copyfile(policy, target)
                entry["policy"] = str(target)
            snapshots.append(entry)
            print(f"{entry['minutes']:5.1f} min: {entry['updates']} updates, {entry['samples']} samples, "
                  f"load {load_average()}", flush=True)
        for name in (*viewers, *WORKERS, "trainer", "relay"):
            stack.stop(name, timeout=30.0)
        for viewer in viewers:
            for kept in best_policy_paths(stack.state_dir, viewer):
                if kept.exists():
                    shutil.copyfile(kept, out / kept.name)
    finally:
        stack.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    return snapshots


def scripted_laps(tracks: list[str], seed: int, episodes: int, max_steps: int) -> dict[str, int | None]:
    """The braking driver's lap (steps) per track and reset seed (``seed`` ...); None if it does not finish."""
    from tmrl_worker.sim import RaceTrackEnv
    from tmrl_worker.sim.rollout import drive_episode

    laps = {}
    for track in tracks:
        env = RaceTrackEnv(track=track, max_episode_steps=max_steps)
        for episode_seed in range(seed, seed + episodes):
            record = drive_episode(env, brake=True, seed=episode_seed)
            laps[f"{track}@{episode_seed}"] = record.steps if record.finished else None
    return laps


def policy_laps(policy: Path, tracks: list[str], seed: int, episodes: int, max_steps: int) -> dict[str, int | None]:
    """The deterministic policy's lap (steps) per track and reset seed (``seed`` ...); None if it does not finish."""
    from tmrl_worker.evaluate import EvalConfig, evaluate

    laps = {}
    for track in tracks:
        summary = evaluate(EvalConfig(policy=policy, env="sim", track=track, episodes=episodes, seed=seed,
                                      max_episode_steps=max_steps))
        for episode in summary.episodes:
            laps[f"{track}@{episode.seed}"] = episode.steps if episode.finished else None
    return laps


def compare(policy: dict[str, int | None], scripted: dict[str, int | None]) -> dict:
    """Finish rate, and mean laps of the policy and the driver over the tracks both finished, with their ratio."""
    both = [t for t in policy if policy[t] is not None and scripted.get(t) is not None]
    row = {"finished": sum(lap is not None for lap in policy.values()), "episodes": len(policy)}
    if both:
        mean_policy = statistics.fmean(policy[t] for t in both)
        mean_scripted = statistics.fmean(scripted[t] for t in both)
        row.update(policy_steps=mean_policy, scripted_steps=mean_scripted, ratio=mean_policy / mean_scripted)
    return row


def reward_table(track: str, gammas: tuple[float, ...] = (0.98, 0.99, 0.995, 0.999)) -> None:
    """What the upstream reward pays for speed: the scripted driver with its planned bend speeds scaled down, one
    lap each, its undiscounted return and its discounted return from the start at several discounts."""
    import numpy as np
    from tmrl_worker.sim import PurePursuitDriver, RaceTrackEnv

    print(f"{track}: scripted driver with its bend speeds scaled, return from the start (reward: points passed "
          "per step, +100 at the finish)")
    print(f"{'scale':>5} {'steps':>6} {'return':>7} " + " ".join(f"{'gamma ' + str(g):>12}" for g in gammas))
    for scale in (1.0, 0.9, 0.8, 0.7, 0.6):
        env = RaceTrackEnv(track=track)
        driver = PurePursuitDriver(env.track, env.config.car)
        driver.plan = driver.plan * scale
        env.reset(seed=0)
        rewards, done = [], False
        while not done:
            _, reward, terminated, truncated, _ = env.step(driver.act(env.car.pose()))
            rewards.append(reward)
            done = terminated or truncated
        rewards = np.asarray(rewards)
        discounted = [float((rewards * g ** np.arange(len(rewards))).sum()) for g in gammas]
        print(f"{scale:5.1f} {len(rewards):6d} {rewards.sum():7.1f} " + " ".join(f"{d:12.1f}" for d in discounted))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--snapshot-s", type=float, default=60.0, help="seconds between policy snapshots")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--train-tracks", default=None, help="workers' episode_tracks (e.g. random:1000-100000)")
    parser.add_argument("--eval-tracks", default="hairpins", help="comma list of tracks, or held-out")
    parser.add_argument("--eval-seed", type=int, default=0, help="reset seed of the first evaluation episode")
    parser.add_argument("--eval-episodes", type=int, default=3, help="episodes per evaluation track (seeds SEED...)")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate every k-th snapshot (and the last)")
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="default runs/sim-laps-<time>")
    parser.add_argument("--evaluate-only", type=Path, default=None, metavar="RUN_JSON",
                        help="skip training: evaluate the snapshots listed in a previous run's --json file")
    parser.add_argument("--policy", type=Path, default=None,
                        help="skip training: evaluate this policy file (e.g. a run's policy.safetensors)")
    parser.add_argument("--json", type=Path, default=None, help="write the table here")
    parser.add_argument("--keep-best", action="store_true",
                        help="also run a test worker with --keep-best, and evaluate the policy of its best lap last")
    parser.add_argument("--reward-table", action="store_true",
                        help="only print what the reward pays for a faster lap of the first --eval-tracks track")
    args = parser.parse_args()
    if args.reward_table:
        reward_table(eval_tracks(args.eval_tracks)[0])
        return 0

    variables = env_overrides(args.assignments)
    if args.train_tracks:
        variables["TMRL_WORKER__ENV_OPTIONS__EPISODE_TRACKS"] = args.train_tracks
    out = (args.out or ROOT / "runs" / time.strftime("sim-laps-%Y%m%d-%H%M%S")).resolve()
    if not args.policy:
        out.mkdir(parents=True, exist_ok=True)
        viewer = " + a test worker keeping its best lap" if args.keep_best else ""
        print(f"sim_laps: {args.minutes:g} min real time, 2 workers at 20 Hz{viewer}, settings {variables or 'as make demo'}; "
              f"outputs in {out}", flush=True)
    load_before = load_average()
    if args.policy:
        snapshots, load_after = [{"minutes": 0.0, "updates": 0, "samples": 0, "policy": str(args.policy)}], load_before
    elif args.evaluate_only:
        previous = json.loads(args.evaluate_only.read_text())
        snapshots, load_before, load_after = previous["snapshots"], previous["load_before"], previous["load_after"]
    else:
        snapshots = train(out, args.minutes, args.snapshot_s, variables, keep_best=args.keep_best)
        load_after = load_average()

    import torch

    torch.set_num_threads(1)
    tracks = eval_tracks(args.eval_tracks)
    scripted = scripted_laps(tracks, args.eval_seed, args.eval_episodes, args.max_episode_steps)
    print(f"\nload average (1, 5, 15 min) at start: {load_before}; at the end of training: {load_after}")
    print(f"evaluation: {len(tracks)} track(s) {tracks if len(tracks) <= 3 else tracks[0] + ' ... ' + tracks[-1]}, "
          f"{args.eval_episodes} episode(s) each from reset seed {args.eval_seed}, deterministic policy vs scripted braking driver")
    print(f"{'min':>5} {'updates':>8} {'samples':>8} {'finished':>9} {'policy lap':>11} {'scripted lap':>13} {'ratio':>6}")
    rows = []
    for index, snapshot in enumerate(snapshots):
        last = index == len(snapshots) - 1
        if snapshot["policy"] is None or not (last or (index + 1) % args.eval_every == 0):
            continue
        laps = policy_laps(Path(snapshot["policy"]), tracks, args.eval_seed, args.eval_episodes, args.max_episode_steps)
        row = {**snapshot, **compare(laps, scripted), "laps": laps}
        rows.append(row)
        lap = (f"{row['policy_steps']:11.1f} {row['scripted_steps']:13.1f} {row['ratio']:6.3f}" if "ratio" in row
               else f"{'-':>11} {'-':>13} {'-':>6}")
        print(f"{row['minutes']:5.1f} {row['updates']:8d} {row['samples']:8d} {row['finished']:4d}/{row['episodes']:<4d} "
              f"{lap}", flush=True)
    ratios = [row["ratio"] for row in rows if "ratio" in row and row["finished"] == row["episodes"]]
    if rows and "ratio" in rows[-1]:
        tail = [row["ratio"] for row in rows[-5:] if "ratio" in row]
        print(f"last snapshot: ratio {rows[-1]['ratio']:.3f}, finished {rows[-1]['finished']}/{rows[-1]['episodes']}; "
              f"mean ratio of the last {len(tail)} evaluations {statistics.fmean(tail):.3f}; best ratio with every "
              f"episode finished {min(ratios) if ratios else float('nan'):.3f}")
    if args.keep_best and not args.policy:
        from tmrl_worker.runtime import best_policy_paths

        kept, kept_summary = best_policy_paths(out, VIEWER)
        if kept.exists():
            found = json.loads(kept_summary.read_text())
            laps = policy_laps(kept, tracks, args.eval_seed, args.eval_episodes, args.max_episode_steps)
            row = {"policy": str(kept), "kept": found, **compare(laps, scripted), "laps": laps}
            rows.append(row)
            ratio = f"ratio {row['ratio']:.3f}" if "ratio" in row else "no lap finished"
            print(f"kept by the test worker (weights version {found['version']}, its lap {found['steps']} steps, "
                  f"finished {found['finished']}): {row['finished']}/{row['episodes']} finished, {ratio}")
        else:
            print("the test worker kept no policy (no whole episode driven by received weights)")
    if args.json:
        args.json.write_text(json.dumps({"settings": variables, "load_before": load_before, "load_after": load_after,
                                         "snapshots": snapshots, "rows": rows, "scripted": scripted}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
