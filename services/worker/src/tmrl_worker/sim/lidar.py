"""LIDAR: distances from the car to the walls along beams fanned over 180° ahead, like tmrl's TrackMania LIDAR.

Beam 0 points to the car's right, the middle beam straight ahead, the last to the left (TrackMania's order). Distances are metres from
the car's centre, capped at ``max_range`` (TrackMania's LIDAR measures pixels on the screenshot instead; both grow
with the free distance, which is what a policy uses).

Speed: the walls are cut into segments once, and a grid over the track stores, for each cell and each of
``sectors`` heading sectors, only the segments a beam starting in that cell can reach within ``max_range``. A scan
intersects every beam with that short list at once with NumPy.
"""

from __future__ import annotations

import math

import numpy as np

from tmrl_worker.sim.track import Track


class Lidar:
    """Raycaster for one track."""

    def __init__(self, track: Track, beams: int = 19, max_range: float = 80.0, cell_size: float = 10.0,
                 sectors: int = 8) -> None:
        if beams < 2:
            raise ValueError(f"a LIDAR needs at least 2 beams, got {beams}")
        self.beams = beams
        self.max_range = float(max_range)
        angles = np.linspace(-math.pi / 2, math.pi / 2, beams)  # right to left, as in the TM20 LIDAR
        cos, sin = np.cos(angles), np.sin(angles)
        # World beam directions u = (cos a ch - sin a sh, sin a ch + cos a sh) for a heading with cosine ch, sine sh.
        # scan() needs the rows (ux, -uy) and (uy, -ux): both are linear in (ch, sh), so keep the two coefficients.
        self._across_e = (np.stack([cos, -sin], axis=1), np.stack([-sin, -cos], axis=1))  # (ux, -uy) = A ch + B sh
        self._across_w = (np.stack([sin, -cos], axis=1), np.stack([cos, sin], axis=1))  # (uy, -ux) = C ch + D sh
        starts, ends = track.wall_segments()
        self._all = _pack(starts, ends)
        self.segment_count = len(starts)
        self.cell_size = float(cell_size)
        xmin, ymin, xmax, ymax = track.bounds(margin=cell_size)
        self._x0, self._y0 = xmin, ymin
        self._nx = max(1, math.ceil((xmax - xmin) / cell_size))
        self._ny = max(1, math.ceil((ymax - ymin) / cell_size))
        centres_x = xmin + (np.arange(self._nx) + 0.5) * cell_size
        centres_y = ymin + (np.arange(self._ny) + 0.5) * cell_size
        reach = self.max_range + cell_size * math.sqrt(0.5)
        # Beams only look ahead: per cell and per heading sector keep the segments that some beam of a car in that
        # cell, heading within the sector, can reach. For a point p, origin o in the cell (|o - c| <= r) and heading
        # u within half_sector of the sector's centre direction v:  (p - o).u >= (p - c).v cos(half) - |p - c| sin(half) - r
        # is a lower bound, so keeping segments where max over endpoints of
        # (p - c).v cos(half) + |p - c| sin(half) + r >= 0 never drops a visible wall (the left side is convex in p,
        # so its maximum over a segment sits at an endpoint).
        self.sectors = sectors
        half = math.pi / sectors
        directions = np.array([[math.cos(k * 2 * half), math.sin(k * 2 * half)] for k in range(sectors)])
        cell_radius = cell_size * math.sqrt(0.5)
        self._cells: list[tuple[np.ndarray, ...]] = []
        for cx in centres_x:
            for cy in centres_y:
                centre = np.array([cx, cy])
                near = _segment_distance(centre, starts, ends) <= reach
                ahead = np.zeros((len(starts), sectors), dtype=bool)
                for points in (starts, ends):
                    rel = points - centre
                    bound = (rel @ directions.T) * math.cos(half) + (np.hypot(rel[:, 0], rel[:, 1]) * math.sin(half)
                                                                     + cell_radius)[:, None]
                    ahead |= bound >= 0.0
                for k in range(sectors):
                    keep = near & ahead[:, k]
                    self._cells.append(_pack(starts[keep], ends[keep]))

    def segments_near(self, x: float, y: float, heading: float = 0.0) -> int:
        """How many wall segments a scan from ``(x, y)`` tests (for benchmarks and tests)."""
        return self._cell(x, y, heading)[0].shape[1]

    def _cell(self, x: float, y: float, heading: float) -> tuple[np.ndarray, ...]:
        i = int((x - self._x0) // self.cell_size)
        j = int((y - self._y0) // self.cell_size)
        if 0 <= i < self._nx and 0 <= j < self._ny:
            sector = round(heading * self.sectors / math.tau) % self.sectors
            return self._cells[(i * self._ny + j) * self.sectors + sector]
        return self._all

    def scan(self, x: float, y: float, heading: float) -> np.ndarray:
        """Distances (float32, shape ``(beams,)``) from ``(x, y)`` along the beams of a car heading ``heading``.

        Beam ``b`` (unit direction ``u``) meets segment ``p + s e`` where ``x + t u = p + s e``:
        ``t = (w x e) / (u x e)`` and ``s = (w x u) / (u x e)`` with ``w = p - (x, y)``; it hits when ``t > 0`` and
        ``0 <= s <= 1``. Both cross products with ``u`` are one small matrix product each.
        """
        starts, edges_swapped, cross_t_x, cross_t_y = self._cell(x, y, heading)
        ch, sh = math.cos(heading), math.sin(heading)
        (a, b), (c, d) = self._across_e, self._across_w
        w = starts - np.array([[x], [y]])  # (2, segments)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = 1.0 / ((a * ch + b * sh) @ edges_swapped)  # 1 / (u x e), (beams, segments)
            t = (w[0] * cross_t_x + w[1] * cross_t_y) * inverse  # (w x e) / (u x e)
            s = ((c * ch + d * sh) @ w) * inverse  # (w x u) / (u x e)
        hit = (s >= 0.0) & (s <= 1.0) & (t > 0.0)
        return np.where(hit, t, self.max_range).min(axis=1, initial=self.max_range).astype(np.float32)


def _pack(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """Segment arrays in the form :meth:`Lidar.scan` uses: starts (2, S), edges as (ey, ex) rows (2, S), and the
    factors of ``w x e = wx ey - wy ex`` (ey, -ex)."""
    edges = ends - starts
    return (np.ascontiguousarray(starts.T), np.ascontiguousarray(edges[:, ::-1].T),
            np.ascontiguousarray(edges[:, 1]), np.ascontiguousarray(-edges[:, 0]))


def _segment_distance(point: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    edges = ends - starts
    squared = np.maximum((edges * edges).sum(axis=1), 1e-12)
    t = np.clip(((point - starts) * edges).sum(axis=1) / squared, 0.0, 1.0)
    return np.linalg.norm(starts + edges * t[:, None] - point, axis=1)
