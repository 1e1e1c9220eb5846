"""What ``durable_spool`` costs the worker: spooling one batch on disk (msgpack file, write + fsync + rename, then an
unlink on ack) beside spooling it in memory only, same batches, same run.

The batches are real: ``--batch-steps`` rows (default 50, the demo's ``batch_steps``) of the simulator with random
actions, built and encoded as the worker's sender thread does (zlib), for the LIDAR observation (the demo's and
``tm20-lidar``'s) and the 64x64 image one (``tm20-full``-sized; the simulator's flat images compress far better than
the game's, so it also runs uncompressed, the upper bound on size). For each, ``--batches`` batches go through
:meth:`Spool.add` then :meth:`Spool.ack` with ``directory=None`` (in memory, the default) and with a directory (durable),
in ``--repeats`` interleaved rounds; per-batch times are medians and 90th percentiles over every round. The directory
(``--dir``, default a temporary one under ``~/.cache``, not ``/tmp`` which may be RAM) and its file system are printed:
fsync costs what the disk under it costs.

    .venv/bin/python benchmarks/spool_durability.py [--batch-steps 50] [--batches 200] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.protocol import encode
from tmrl_worker.envs import make_env
from tmrl_worker.spool import Spool


def encoded_batches(observation: str, batch_steps: int, count: int, codec: str = "zlib") -> list[list[bytes]]:
    """``count`` batches of ``batch_steps`` simulator rows, encoded as the sender thread does (``codec``)."""
    env = make_env("sim-fast", max_episode_steps=1000, options={"observation": observation})
    rng = np.random.default_rng(0)
    batches = []
    try:
        obs = env.reset(seed=0)
        for seq in range(count):
            builder = SampleBatchBuilder(env.layout, codec=codec)  # type: ignore[arg-type]
            builder.add_reset(obs, env.default_action)  # every batch starts as one after an episode end would
            for _ in range(batch_steps - 1):
                action = rng.uniform(-1, 1, env.action_dim).astype(np.float32)
                obs, reward, terminated, truncated, _ = env.step(action)
                builder.add_step(action, obs, reward, terminated, truncated)
                if terminated or truncated:
                    obs = env.reset()
            batches.append(encode(builder.build(seq=seq, weights_version=1), "bench"))
    finally:
        env.close()
    return batches


def spool_round(batches: list[list[bytes]], directory: Path | None) -> tuple[list[float], list[float]]:
    """Seconds per :meth:`Spool.add` and per :meth:`Spool.ack`, one batch at a time (the worker's steady state:
    a batch is acknowledged long before the next one)."""
    spool = Spool(len(batches) + 1, 1 << 40, owner="bench", directory=directory)
    adds, acks = [], []
    for seq, frames in enumerate(batches):
        started = time.perf_counter()
        spool.add(seq, frames)
        added = time.perf_counter()
        spool.ack([seq])
        adds.append(added - started)
        acks.append(time.perf_counter() - added)
    assert not len(spool) and (directory is None or not any(directory.iterdir()))
    return adds, acks


def file_system(path: Path) -> str:
    """Type and device of the mount that holds ``path`` (from ``/proc/mounts``; ``unknown`` elsewhere)."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best = max((m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} on {best[0]}" if best else "unknown"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-steps", type=int, default=50, help="rows per batch (the demo's batch_steps)")
    parser.add_argument("--batches", type=int, default=200, help="batches per round and observation kind")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the durable spool writes (default: ~/.cache/...)")
    parser.add_argument("--step-hz", type=float, default=20.0, help="env steps per second, for the share of time")
    args = parser.parse_args()

    parent = args.dir or Path.home() / ".cache"
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tmrl-spool-bench-", dir=parent))
    kinds = {"lidar": encoded_batches("lidar", args.batch_steps, args.batches),
             "image": encoded_batches("image", args.batch_steps, max(args.batches // 4, 10)),
             "image raw": encoded_batches("image", args.batch_steps, max(args.batches // 4, 10), codec="raw")}
    times = {(kind, side): ([], []) for kind in kinds for side in ("memory", "durable")}
    try:
        for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits both sides alike
            for kind, batches in kinds.items():
                for side in ("memory", "durable"):
                    directory = workdir / f"{kind}.spool" if side == "durable" else None
                    adds, acks = spool_round(batches, directory)
                    times[kind, side][0].extend(adds)
                    times[kind, side][1].extend(acks)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    interval = args.batch_steps / args.step_hz
    print(f"{args.batch_steps} rows per batch (zlib; 'image raw': compress = false), {args.repeats} interleaved rounds; durable spool in {parent} "
          f"({file_system(parent)}), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'observation':11s} {'batch':>9s} {'side':8s} {'add median':>11s} {'add p90':>9s} {'ack median':>11s}"
          f" {'add+ack vs memory':>18s} {'share of a ' + format(interval, 'g') + ' s batch interval':>30s}")
    for kind, batches in kinds.items():
        size = statistics.mean(sum(len(f) for f in frames) for frames in batches)
        memory = statistics.median(times[kind, "memory"][0]) + statistics.median(times[kind, "memory"][1])
        for side in ("memory", "durable"):
            adds, acks = times[kind, side]
            total = statistics.median(adds) + statistics.median(acks)
            print(f"{kind:11s} {size / 1024:7.1f} KiB {side:8s} {statistics.median(adds) * 1e6:9.0f} us"
                  f" {percentile(adds, 90) * 1e6:7.0f} us {statistics.median(acks) * 1e6:9.0f} us"
                  f" {total / memory:17.0f}x {100 * total / interval:29.3f} %")


if __name__ == "__main__":
    main()
