"""The emulated game's cockpit frames: ms per frame of the renderer beside the earlier two-gather one, same run.

At the LIDAR window size (958 x 488) and the full env's (256 x 128), on poses along the ``hairpins`` centre line:

(a) ``two gathers`` (the peer, the renderer this project shipped first, re-implemented here): per frame each
    ground pixel's map cell from float32 rays, a gather of the cell's class (road, border, scenery), then a gather
    of the class's RGB colour into the frame;
(b) ``tmrl``: :class:`tmrl_worker.tm20.emulated_game.CockpitRenderer` — the map stored in colour with one 3-byte
    element per cell, so a frame is one gather of whole pixels; its frames are checked against (a) first (they may
    differ in a few pixels where float32 and float64 round a ray to different map cells).

A real-time worker renders one frame per 50 ms step inside rtgym's observation capture, so what rendering costs
is time the step does not have. Each variant runs ``--repeats`` interleaved blocks; the best block is kept.

    .venv/bin/python benchmarks/tm20_emulated_render.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
from tmrl_worker.sim.camera import ROAD, WALL, rasterize_track
from tmrl_worker.sim.track import Track, load_track
from tmrl_worker.tm20.emulated_game import BONNET, ROAD_RGB, SCENERY, CockpitRenderer


class TwoGatherRenderer:
    """The first renderer: class per pixel, then colour per class (no bonnet or pop-up differences matter here)."""

    def __init__(self, track: Track, height: int, width: int, reference: CockpitRenderer) -> None:
        self._map, self._x0, self._y0 = rasterize_track(track, 0.25, margin=150.0)
        self._flat_map, self._scale = self._map.ravel(), 4.0
        focal, horizon_row = width / 2.0, int(0.35 * height)
        self._first_row = max(horizon_row + 1, horizon_row + math.ceil(1.6 * focal / 150.0))
        rows, cols = np.mgrid[self._first_row:height, 0:width].astype(np.float32)
        self._ahead = (1.6 * focal / (rows - horizon_row)).ravel()
        self._right = ((cols - width / 2.0) / focal).ravel() * self._ahead
        self._palette = np.zeros((256, 3), np.uint8)
        self._palette[:] = SCENERY
        self._palette[ROAD] = ROAD_RGB
        self._palette[WALL] = (0, 0, 0)
        self._background = reference._background
        self._bonnet = reference._bonnet

    def frame(self, x: float, y: float, heading: float) -> np.ndarray:
        ch, sh = math.cos(heading), math.sin(heading)
        ix = ((x - self._x0 + self._ahead * ch + self._right * sh) * self._scale).astype(np.intp)
        iy = ((y - self._y0 + self._ahead * sh - self._right * ch) * self._scale).astype(np.intp)
        np.clip(ix, 0, self._map.shape[0] - 1, out=ix)
        np.clip(iy, 0, self._map.shape[1] - 1, out=iy)
        ix *= self._map.shape[1]
        ix += iy
        image = self._background.copy()
        ground = image[self._first_row:].reshape(-1, 3)
        np.take(self._palette, np.take(self._flat_map, ix), axis=0, out=ground)
        for part in self._bonnet:
            image[part] = BONNET
        return image


def best_ms(render, poses: list[tuple[float, float, float]]) -> float:
    started = time.perf_counter()
    for pose in poses:
        render(*pose)
    return 1000 * (time.perf_counter() - started) / len(poses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--track", default="hairpins")
    args = parser.parse_args()
    track = load_track(args.track)
    poses = [(float(x), float(y), 0.37 * i) for i, (x, y) in enumerate(track.centre[::4])]
    print(f"cockpit frames on {args.track!r}, {len(poses)} poses, best of {args.repeats} interleaved blocks; "
          f"load average {os.getloadavg()[0]:.2f}")
    for height, width in ((488, 958), (128, 256)):
        ours = CockpitRenderer(track, height, width)
        peer = TwoGatherRenderer(track, height, width, ours)
        worst = max(int((ours.frame(*pose) != peer.frame(*pose)).any(axis=2).sum()) for pose in poses)
        if worst > height * width // 1000:
            raise SystemExit(f"the renderers disagree on {worst} pixels of a {width}x{height} frame: fix that first")
        times = {"two gathers (peer)": math.inf, "tmrl": math.inf}
        for _ in range(args.repeats):
            times["two gathers (peer)"] = min(times["two gathers (peer)"], best_ms(peer.frame, poses))
            times["tmrl"] = min(times["tmrl"], best_ms(ours.frame, poses))
        base = times["two gathers (peer)"]
        print(f" {width}x{height} (frames equal but for at most {worst} pixels)")
        for name, ms in times.items():
            print(f"  {name:22s} {ms:7.3f} ms/frame   {base / ms:5.2f}x the peer's speed")


if __name__ == "__main__":
    main()
