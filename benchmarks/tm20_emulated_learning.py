"""Minutes to the first finished lap: relay + trainer + workers running ``tm20-lidar`` at 20 Hz against the emulated game.

(``--env tm20-full`` runs the image env the same way; its CNN updates are slow on a CPU.)

What runs is what an operator runs (:class:`tmrl_stack.LocalStack`, the launcher of ``make demo``): ``tmrl-relay``,
``tmrl-trainer`` and ``--workers`` ``tmrl-worker run --env tm20-lidar`` processes, each worker with its own
:class:`~tmrl_worker.tm20.emulated_game.EmulatedGame` (its own plugin port and window title) and the real TrackMania
interface: the telemetry client over TCP, the LIDAR measured on rendered 958 x 488 frames, the analog controls, the
respawns and the finish pop-up. The reward path is the track's centre line (the emulated game's default without
``reward_path``), or with ``--record-reward`` one recorded as an operator records it on the game: ``tmrl-worker
emulate-game --autodrive`` (the scripted driver's lap) with ``tmrl-worker record-reward`` beside it, before the run.

The run stops at the first finish line crossed (the emulated game logs ``finish 1, race time ...``) or after
``--minutes``. It prints, side by side:

* the minutes from the workers' start to the first finish (wall clock, 20 Hz), the samples the trainer had received
  and the updates it had made by then, the episodes run, and the load average (1-minute, sampled every 10 s);
* the race time of that first lap beside the scripted pure-pursuit driver's on the same emulated game (the
  simulator's expert, which reads the true pose), measured in the same run;
* the mean episode return per 5-minute window.

    .venv/bin/python benchmarks/tm20_emulated_learning.py [--workers 2] [--minutes 40] [--out runs/tm20-learning]

``--reward-config '{"no_progress_steps": 40}'`` (the workers' ``reward_config``; default: the TrackMania defaults)
and ``--trainer-sac utd=1.0`` (a ``[trainer.sac]`` field) reproduce other settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from tmrl_stack import LocalStack, free_ports, raise_on_sigterm

FINISH = re.compile(r"emulated game '.*': finish (\d+), race time ([0-9.]+) s")

DEFAULT_REWARD = {}
"""The worker's ``reward_config`` (empty: the TrackMania defaults of :class:`tmrl_worker.reward.TrajectoryRewardConfig`)."""


def config_text(args: argparse.Namespace) -> str:
    """The TOML every process reads: ``make demo``'s trainer and batching settings, the TrackMania env."""
    sac = {"hidden_sizes": [128, 128], "batch_size": 128, "learning_starts": 1000, "utd": 2.0}
    for item in args.trainer_sac:
        key, value = item.split("=", 1)
        sac[key] = json.loads(value)
    reward = json.loads(args.reward_config) if args.reward_config else DEFAULT_REWARD
    options = {"emulated_game": {"track": args.track}, "sleep_time_at_reset": args.sleep_time_at_reset}
    if args.reward_path is not None:
        options["reward_path"] = str(args.reward_path)
    if reward:
        options["reward_config"] = reward
    return "\n".join([
        "[trainer]", f'env = "{args.env}"', "publish_every = 50", "checkpoint_every = 5000", "memory_capacity = 200000",
        "", "[trainer.sac]", *(f"{k} = {json.dumps(v)}" for k, v in sac.items()),
        "", "[worker]", f'env = "{args.env}"', "batch_steps = 50", f"max_episode_steps = {args.max_episode_steps}",
        f"env_options = {toml_inline(options)}", "",
    ])


def toml_inline(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_inline(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def record_reward_path(track: str, output: Path, logs: Path) -> Path:
    """Record the reward path the operator's way: the scripted driver laps the emulated game, ``record-reward`` listens."""
    import subprocess

    port = free_ports(1)[0]
    bin_dir = Path(sys.executable).parent
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "emulate-game.log", "wb") as game_log, open(logs / "record-reward.log", "wb") as record_log:
        game = subprocess.Popen([bin_dir / "tmrl-worker", "emulate-game", "--track", track, "--telemetry-port", str(port),
                                 "--autodrive", "--speedup", "10"], stdout=game_log, stderr=subprocess.STDOUT)
        try:
            recorder = subprocess.run([bin_dir / "tmrl-worker", "record-reward", "--output", str(output),
                                       "--telemetry-port", str(port), "--max-seconds", "300"],
                                      stdout=record_log, stderr=subprocess.STDOUT, timeout=360)
        finally:
            game.terminate()
            game.wait(timeout=30)
    if recorder.returncode != 0 or not output.exists():
        raise SystemExit(f"record-reward failed (exit {recorder.returncode}); see {logs / 'record-reward.log'}")
    said = " ".join((logs / "record-reward.log").read_text().rpartition("saved ")[2].split())
    print(f"reward path recorded by record-reward on the emulated {track!r}: saved {said}", flush=True)
    return output


def scripted_lap_time(track: str) -> float:
    """Race time of the scripted driver's lap on the emulated game, in simulated time (20 Hz commands)."""
    from tmrl_worker.tm20.emulated_game import EmulatedGame

    lap = EmulatedGame({"track": track, "port": 0}).scripted_lap_time()
    return float("nan") if lap is None else lap


class FinishWatch:
    """Reads the workers' logs as they grow (from where it stopped) for the emulated game's first finish line."""

    def __init__(self, stack: LocalStack, workers: list[str]) -> None:
        self.stack, self.offsets = stack, dict.fromkeys(workers, 0)

    def first(self) -> tuple[str, float] | None:
        """``(worker, race time)`` of a finish logged since the last call, else None."""
        for worker, offset in self.offsets.items():
            with open(self.stack.logs[worker], "rb") as log:
                log.seek(offset)
                text = log.read()
            complete = text.rfind(b"\n") + 1  # a line still being written is read next time
            self.offsets[worker] = offset + complete
            match = FINISH.search(text[:complete].decode(errors="replace"))
            if match:
                return worker, float(match.group(2))
        return None


def episodes(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "episode":
            records.append(record)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--env", default="tm20-lidar", choices=["tm20-lidar", "tm20-lidar-progress", "tm20-full"])
    parser.add_argument("--minutes", type=float, default=40.0, help="give up after this long without a finish")
    parser.add_argument("--track", default="hairpins")
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument("--sleep-time-at-reset", type=float, default=1.5)
    parser.add_argument("--reward-config", default=None, help="the workers' reward_config as JSON")
    parser.add_argument("--record-reward", action="store_true",
                        help="record the reward path with emulate-game --autodrive and record-reward first, and use it")
    parser.add_argument("--trainer-sac", action="append", default=[], metavar="KEY=JSON",
                        help="override a [trainer.sac] field, e.g. utd=1.0")
    parser.add_argument("--out", type=Path, default=None, help="logs and the trainer's run (default: a temp dir)")
    args = parser.parse_args()

    out = (args.out or Path(tempfile.mkdtemp(prefix="tmrl-tm20-learning-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.reward_path = (record_reward_path(args.track, out / f"{args.track}-reward.safetensors", out / "logs")
                        if args.record_reward else None)
    config = out / "tmrl.toml"
    config.write_text(config_text(args))
    workers = [f"worker-{i + 1}" for i in range(args.workers)]
    print(f"config {config}:\n{config.read_text()}", flush=True)
    stack = LocalStack(out, config=config, curve_clients=("trainer", *workers), run_dir="trainer", logs=out / "logs")
    loads: list[float] = []
    found = None
    raise_on_sigterm()  # `kill` of this script takes its services down too (the finally below)
    try:
        stack.start_relay()
        stack.start_trainer()
        stack.wait_ready("relay", "trainer", timeout=120)
        for index, worker in enumerate(workers):
            title = "Trackmania" if index == 0 else f"Trackmania ({index + 1})"
            # each game its own window title and plugin port (0: a free one, as two games on one PC need)
            stack.start_worker(worker, "--seed", str(index), env={
                "TMRL_WORKER__ENV_OPTIONS__EMULATED_GAME__PORT": "0",
                "TMRL_WORKER__ENV_OPTIONS__EMULATED_GAME__WINDOW_TITLE": title})
        stack.wait_ready(*workers, timeout=120)
        started = time.monotonic()
        watch = FinishWatch(stack, workers)
        print(f"{len(workers)} workers running (load average {os.getloadavg()[0]:.2f})", flush=True)
        next_report = started
        while time.monotonic() - started < args.minutes * 60:
            stack.check_alive()
            found = watch.first()
            now = time.monotonic()
            if found:
                break
            if now >= next_report:
                loads.append(os.getloadavg()[0])
                status = stack.status()
                recent = [r["return"] for r in episodes(stack.run_dir)[-10:]]
                print(f"{(now - started) / 60:5.1f} min: {status.get('samples_received', 0)} samples, "
                      f"{status.get('updates', 0)} updates, mean of the last 10 returns "
                      f"{sum(recent) / len(recent) if recent else float('nan'):.1f}, load {loads[-1]:.2f}", flush=True)
                next_report += 10
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        status = stack.status()
        records = episodes(stack.run_dir)
        for worker in workers:
            stack.stop(worker, timeout=30)
        stack.stop("trainer", timeout=30)
        stack.stop("relay", timeout=30)
    finally:
        stack.kill_all()
    loads.append(os.getloadavg()[0])
    print()
    print(f"{args.env} against the emulated {args.track!r}, {len(workers)} workers at 20 Hz, reward path "
          f"{args.reward_path or 'the centre line'}, trainer "
          f"{dict(item.split('=', 1) for item in args.trainer_sac) or 'as make demo'}; outputs in {out}")
    if found:
        print(f"  first finish      {elapsed / 60:6.2f} min after the workers started ({found[0]}), "
              f"{status.get('samples_received', 0)} samples received, {status.get('updates', 0)} updates, "
              f"{len(records)} episodes")
    else:
        print(f"  no finish in {elapsed / 60:.1f} min: {status.get('samples_received', 0)} samples, "
              f"{status.get('updates', 0)} updates, {len(records)} episodes")
    print(f"  load average      mean {sum(loads) / len(loads):.2f}, max {max(loads):.2f} (1-minute, every 10 s)")
    scripted = scripted_lap_time(args.track)
    if found:
        print(f"  lap (race) time   {found[1]:.2f} s learned, {scripted:.2f} s scripted driver "
              f"({found[1] / scripted:.2f}x)")
    else:
        print(f"  scripted driver   {scripted:.2f} s lap (race) time")
    windows: dict[int, list[float]] = {}
    for record in records:
        windows.setdefault(int(record["elapsed_s"] // 300), []).append(record["return"])
    print("  mean return per 5 min (trainer clock): " + ", ".join(
        f"{5 * k}-{5 * k + 5} min {sum(v) / len(v):.1f} ({len(v)} ep)" for k, v in sorted(windows.items())))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
