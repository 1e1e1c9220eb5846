"""What the trainer's ingest-time value checks cost: samples/s through ``Ingestor.handle`` with and without them.

The checks of issue 13 (``SampleBatch.check_bounds``: observation values within the layout's declared bounds,
actions within [-1, 1], rewards within ``max_abs_reward``) run on every batch after decoding. This script feeds the
same encoded batches, as workers send them (zlib-compressed, ``--rows`` rows each, the simulator's LIDAR layout and
the 64x64 image layout), through two ingestors that differ only in ``bounds`` (``ValueBounds()`` vs ``None``), each
storing into its own replay memory. The two run interleaved ``--repeats`` times (alternating which goes first); the
best round of each is kept, and the ratio is what the checks cost (the target: at most 5 %). Decoding computes each
float array's min and max in place of its former ``isfinite`` pass (NaN and inf still show), so the checks only
compare four cached pairs of numbers per batch.

    .venv/bin/python benchmarks/ingest_checks.py [--batches 200] [--rows 100] [--repeats 9]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationLayout, tm20_image_layout, tm20_lidar_layout
from tmrl_common.protocol import encode
from tmrl_trainer.ingest import Ingestor, ValueBounds
from tmrl_trainer.memory import ReplayMemory


def worker_batches(layout: ObservationLayout, batches: int, rows: int, seed: int = 0) -> list[list[bytes]]:
    """``batches`` encoded batches of one worker (consecutive seqs), values inside every bound, zlib as workers do."""
    rng = np.random.default_rng(seed)
    shapes = layout.observation_shapes()

    def observation():
        parts = []
        for index, shape in enumerate(shapes):
            component = layout.components[index] if index < len(layout.components) else None
            if component is not None and component.dtype == "uint8":
                parts.append(rng.integers(0, 256, shape, dtype=np.uint8))
            else:
                parts.append(rng.uniform(0, 1, shape).astype(np.float32))
        return tuple(parts)

    out = []
    for seq in range(batches):
        builder = SampleBatchBuilder(layout, codec="zlib")
        builder.add_reset(observation())
        for _ in range(rows - 1):
            builder.add_step(rng.uniform(-1, 1, layout.action_dim), observation(), float(rng.normal()), False, False)
        out.append(encode(builder.build(seq=seq, weights_version=0), "worker-1"))
    return out


def ingest_once(layout: ObservationLayout, frames: list[list[bytes]], bounds: ValueBounds | None) -> float:
    """Seconds to ingest every batch into a fresh memory (all must be answered stored)."""
    memory = ReplayMemory(layout, capacity=sum(1 for _ in frames) * 1000)
    ingestor = Ingestor("trainer", layout, store=memory.add_batch, bounds=bounds)
    started = time.perf_counter()
    for message in frames:
        ingestor.handle(message)
    elapsed = time.perf_counter() - started
    if ingestor.snapshot()["answers"] != {"stored": len(frames)}:
        raise SystemExit(f"not every batch was stored: {ingestor.snapshot()['answers']}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100, help="rows per batch (the worker's batch_steps default)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"{args.batches} batches of {args.rows} rows per layout, zlib, best of {args.repeats} interleaved rounds")
    print(f"{'layout':<8} {'without checks':>16} {'with checks':>16} {'with / without':>15}")
    for name, layout in (("lidar", tm20_lidar_layout()), ("image", tm20_image_layout())):
        frames = worker_batches(layout, args.batches, args.rows)
        best = {"without": float("inf"), "with": float("inf")}
        for round_ in range(args.repeats):  # alternate which side goes first: load from other processes drifts
            sides = [("without", None), ("with", ValueBounds())]
            for side, bounds in sides if round_ % 2 == 0 else sides[::-1]:
                best[side] = min(best[side], ingest_once(layout, frames, bounds))
        rate = {side: args.batches * args.rows / seconds for side, seconds in best.items()}
        print(f"{name:<8} {rate['without']:>10,.0f} rows/s {rate['with']:>10,.0f} rows/s "
              f"{rate['with'] / rate['without']:>14.3f}x")


if __name__ == "__main__":
    main()
