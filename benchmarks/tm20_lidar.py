"""LIDAR on TrackMania-sized frames: tmrl's vectorised scan beside upstream tmrl's per-beam algorithm, same run.

On RGB frames of the LIDAR window size (958 x 488, a winding road between black borders), times per frame:

(a) ``upstream``: upstream tmrl 0.7's algorithm as published — beam pixel lists built once per frame size, then
    per frame one NumPy gather and ``all(< threshold)`` per beam and the first dark index (a re-implementation
    from its description, not its code);
(b) ``tmrl (default, upstream's reading)``: :class:`tmrl_worker.tm20.lidar.Lidar` in ``tmrl`` mode — one gather for
    all beams; its readings are checked equal to (a) on every frame before timing;
(c) ``tmrl radial``: the ``radial`` variant (distances from the origin).

Each variant runs ``--repeats`` blocks of ``--frames`` frames, interleaved; the best block is kept.

    .venv/bin/python benchmarks/tm20_lidar.py [--frames 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
from tmrl_worker.tm20.lidar import Lidar, LidarConfig
from tmrl_worker.tm20.synthetic import winding_road_frames


class UpstreamLidar:
    """Upstream's published algorithm: per-beam pixel lists, one gather per beam and frame."""

    def __init__(self, height: int, width: int, threshold: int = 55) -> None:
        self.threshold = np.array([threshold] * 3)
        row0, col0 = 44 * height // 49, width // 2
        self.axes = []
        for angle in range(90, 280, 10):
            d_row, d_col = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            rows, cols, d = [], [], 20
            while True:
                row, col = int(row0 + d * d_row), int(col0 + d * d_col)
                if row <= 0 or col <= 0 or col >= width - 1:
                    break
                rows.append(row)
                cols.append(col)
                d += 1
            self.axes.append((np.array(rows), np.array(cols)))

    def measure(self, frame: np.ndarray) -> np.ndarray:
        out = []
        for rows, cols in self.axes:
            dark = np.nonzero(np.all(frame[rows, cols] < self.threshold, axis=1))[0]
            out.append(dark[0] if len(dark) else len(rows) - 1)
        return np.array(out, dtype=np.float32)


def best_ms_per_frame(measure, frames: np.ndarray, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for frame in frames:
            measure(frame)
        best = min(best, (time.perf_counter() - started) / len(frames))
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    frames = winding_road_frames(count=args.frames, height=488, width=958)
    upstream, ours, radial = UpstreamLidar(488, 958), Lidar(), Lidar(LidarConfig(mode="radial"))
    for frame in frames:
        if not np.array_equal(ours.measure(frame), upstream.measure(frame)):
            raise SystemExit("tmrl's default LIDAR disagrees with upstream's reading: fix that before timing it")
    variants = {"upstream (per-beam gather)": upstream.measure, "tmrl (default, upstream's reading)": ours.measure,
                "tmrl radial": radial.measure}
    times = {name: math.inf for name in variants}
    for _ in range(args.repeats):  # interleaved blocks: a load spike hits every variant alike
        for name, measure in variants.items():
            times[name] = min(times[name], best_ms_per_frame(measure, frames, 1))
    print(f"LIDAR on {args.frames} RGB frames 958x488, best of {args.repeats} blocks; load average "
          f"{os.getloadavg()[0]:.2f}; readings of the default equal upstream's on every frame")
    base = times["upstream (per-beam gather)"]
    for name, ms in times.items():
        print(f"  {name:36s} {ms:7.3f} ms/frame   {base / ms:5.2f}x upstream's speed")


if __name__ == "__main__":
    main()
