"""Race tracks: a centre line with a constant width, walls on both borders.

A track is designed as a sequence of straights and circular arcs (:class:`TrackDesign`), sampled into a centre line
every metre. Closed tracks are circuits (one lap from the start line back to it); open tracks run from a start to a
finish and have a wall across each end.

Built-in tracks (:data:`BUILTIN_TRACKS`): ``oval`` (two straights, two wide bends), ``hairpins`` (open: long
straights joined by tight 180° hairpins, the track where braking pays off), ``circuit`` (closed, mixed corners and an
S-bend). :func:`generate_track` draws a closed or open track from a seed; :func:`load_track` understands the
built-in names plus ``random:SEED`` (closed) and ``random-open:SEED``, and ``file:PATH`` for a track of your own
(:class:`TrackFile`: a TOML file of pieces or of centre-line points).

Units are metres; headings are radians counter-clockwise from +x.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tmrl_common.config import validation_problems

from tmrl_worker.reward import resample_path

#: Distance between centre-line samples (metres).
CENTRE_LINE_SPACING = 1.0


class TrackError(ValueError):
    """A track name is unknown or a track design is unusable (walls overlap, turns tighter than the track is wide)."""


@dataclass(frozen=True)
class Straight:
    length: float


@dataclass(frozen=True)
class Arc:
    """A circular bend of ``radius`` turning by ``degrees`` (positive: left, negative: right)."""

    radius: float
    degrees: float


@dataclass(frozen=True)
class TrackDesign:
    """A track described as pieces driven one after another from the origin, heading +x."""

    name: str
    pieces: tuple[Straight | Arc, ...]
    width: float
    closed: bool
    point_symmetric: bool = False
    """Closed designs only: ``pieces`` are the first half (turning by +180° in total); the second half is the first
    rotated by 180° about the midpoint, which closes the circuit exactly."""


def _drive(pieces: tuple[Straight | Arc, ...], step: float = 0.25) -> tuple[np.ndarray, float]:
    """Dense polyline of ``pieces`` and the final heading."""
    x, y, heading = 0.0, 0.0, 0.0
    points = [(x, y)]
    for piece in pieces:
        if isinstance(piece, Straight):
            n = max(1, math.ceil(piece.length / step))
            for _ in range(n):
                x += math.cos(heading) * piece.length / n
                y += math.sin(heading) * piece.length / n
                points.append((x, y))
        else:
            turn = math.radians(piece.degrees)
            n = max(2, math.ceil(abs(turn) * piece.radius / step))
            side = 1.0 if turn > 0 else -1.0
            cx, cy = x - side * math.sin(heading) * piece.radius, y + side * math.cos(heading) * piece.radius
            start = math.atan2(y - cy, x - cx)
            for k in range(1, n + 1):
                angle = start + turn * k / n
                points.append((cx + piece.radius * math.cos(angle), cy + piece.radius * math.sin(angle)))
            x, y = points[-1]
            heading += turn
    return np.asarray(points, dtype=np.float64), heading


@dataclass
class Track:
    """A centre line sampled every :data:`CENTRE_LINE_SPACING` metres, a width, and derived wall geometry.

    ``centre`` has shape ``(N, 2)``; for a closed track the last point is not repeated (segment ``N-1`` joins point
    ``N-1`` to point 0). ``left_wall`` / ``right_wall`` are the borders as polylines (closed tracks: closed loops).
    """

    name: str
    centre: np.ndarray
    width: float
    closed: bool
    directions: np.ndarray = field(init=False, repr=False)
    lengths: np.ndarray = field(init=False, repr=False)
    normals: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        centre = np.asarray(self.centre, dtype=np.float64)
        if centre.ndim == 2 and centre.shape[1] == 2 and len(centre) < 3:  # a probe's 0.5 m straight said "shape"
            raise TrackError(f"track {self.name!r} is too short: its centre line, sampled about every "
                             f"{CENTRE_LINE_SPACING:g} m, has {len(centre)} point(s), where a track needs 3")
        if centre.ndim != 2 or centre.shape[1] != 2:
            raise TrackError(f"track {self.name!r}: centre line must have shape (N>=3, 2), got {centre.shape}")
        self.centre = centre
        ends = np.roll(centre, -1, axis=0) if self.closed else centre[1:]
        starts = centre if self.closed else centre[:-1]
        deltas = ends - starts
        self.lengths = np.linalg.norm(deltas, axis=1)
        if (self.lengths < 1e-9).any():
            raise TrackError(f"track {self.name!r}: centre line has repeated points")
        self.directions = deltas / self.lengths[:, None]
        self.normals = np.stack([-self.directions[:, 1], self.directions[:, 0]], axis=1)  # left of travel
        self.segment_starts = starts
        # Python lists for the per-physics-tick projection (scalar maths is faster on lists than on NumPy arrays).
        self._sx, self._sy = starts[:, 0].tolist(), starts[:, 1].tolist()
        self._dx, self._dy = self.directions[:, 0].tolist(), self.directions[:, 1].tolist()
        self._len = self.lengths.tolist()

    # ------------------------------------------------------------------------------------------------ geometry

    @property
    def half_width(self) -> float:
        return self.width / 2.0

    @property
    def segment_count(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> float:
        """Length of the centre line (one lap for a closed track)."""
        return float(self.lengths.sum())

    @property
    def start_heading(self) -> float:
        return float(math.atan2(self.directions[0, 1], self.directions[0, 0]))

    def lap_path(self) -> np.ndarray:
        """The centre line from the start to the finish (closed: back to the start line), shape ``(M, 2)``."""
        return np.concatenate([self.centre, self.centre[:1]]) if self.closed else self.centre.copy()

    def vertex_normals(self) -> np.ndarray:
        """Unit normals (left of travel) at the centre-line points, averaged over the adjacent segments."""
        if self.closed:
            summed = self.normals + np.roll(self.normals, 1, axis=0)
        else:
            summed = np.concatenate([self.normals[:1], self.normals[1:] + self.normals[:-1], self.normals[-1:]])
        summed /= np.linalg.norm(summed, axis=1, keepdims=True)
        # Keep the border parallel to the segments: scale by 1 / cos(half the turn angle) at each vertex.
        segment_normals = self.normals if self.closed else np.concatenate([self.normals, self.normals[-1:]])
        cos_half = np.clip((summed * segment_normals).sum(axis=1), 0.5, 1.0)
        return summed / cos_half[:, None]

    def walls(self) -> tuple[np.ndarray, np.ndarray]:
        """Left and right border polylines; closed tracks repeat the first point at the end."""
        offsets = self.vertex_normals() * self.half_width
        left, right = self.centre + offsets, self.centre - offsets
        if self.closed:
            left, right = np.concatenate([left, left[:1]]), np.concatenate([right, right[:1]])
        return left, right

    def wall_segments(self, tolerance: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """Every wall as line segments ``(starts (S, 2), ends (S, 2))``, borders simplified within ``tolerance``.

        Open tracks get a wall across the start and one across the finish.
        """
        left, right = self.walls()
        pieces = [_simplify(left, tolerance), _simplify(right, tolerance)]
        starts = [p[:-1] for p in pieces]
        ends = [p[1:] for p in pieces]
        if not self.closed:
            starts += [left[:1], left[-1:]]
            ends += [right[:1], right[-1:]]
        return np.concatenate(starts), np.concatenate(ends)

    def bounds(self, margin: float = 0.0) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of everything the walls enclose, grown by ``margin``."""
        left, right = self.walls()
        every = np.concatenate([left, right])
        (xmin, ymin), (xmax, ymax) = every.min(axis=0), every.max(axis=0)
        return xmin - margin, ymin - margin, xmax + margin, ymax + margin

    # ------------------------------------------------------------------------------------ per-tick projection

    def locate(self, x: float, y: float, hint: int) -> tuple[int, float, float]:
        """Segment nearest to ``(x, y)`` searching from segment ``hint``, the distance along it and the signed lateral
        offset (positive: left of the centre line). Cheap: walks at most a few segments from ``hint``."""
        n = len(self._len)
        index = hint
        moved = 0
        for _ in range(8):  # a car moves well under a segment per tick; a reset re-seeds the hint
            along = (x - self._sx[index]) * self._dx[index] + (y - self._sy[index]) * self._dy[index]
            if along > self._len[index] and moved >= 0 and (self.closed or index < n - 1):
                index = (index + 1) % n
                moved = 1
            elif along < 0.0 and moved <= 0 and (self.closed or index > 0):
                index = (index - 1) % n
                moved = -1
            else:
                break
        else:
            along = (x - self._sx[index]) * self._dx[index] + (y - self._sy[index]) * self._dy[index]
        lateral = (y - self._sy[index]) * self._dx[index] - (x - self._sx[index]) * self._dy[index]
        return index, along, lateral

    def nearest_segment(self, x: float, y: float) -> int:
        """Segment nearest to ``(x, y)`` by a full search (for resets and tests; use :meth:`locate` per tick)."""
        rel = np.array([x, y]) - self.segment_starts
        along = np.clip((rel * self.directions).sum(axis=1), 0.0, self.lengths)
        closest = self.segment_starts + self.directions * along[:, None]
        return int(np.argmin(np.linalg.norm(closest - np.array([x, y]), axis=1)))

    # ----------------------------------------------------------------------------------------------- checks

    def check(self) -> None:
        """Raise :class:`TrackError` when parts of the track that are far apart along it come closer than the width
        plus a wall margin (the walls would overlap), or when a turn is tighter than half the width."""
        centre = self.centre
        arc = np.concatenate([[0.0], np.cumsum(self.lengths)])[: len(centre)]
        clearance = self.width + 2.0
        for first in range(0, len(centre), 512):  # in blocks of rows: memory stays O(N), not O(N^2), for long tracks
            rows = slice(first, first + 512)
            gaps = np.linalg.norm(centre[rows, None, :] - centre[None, :, :], axis=2)
            along = np.abs(arc[rows, None] - arc[None, :])
            if self.closed:
                along = np.minimum(along, self.length - along)
            too_close = (along > math.pi * self.width) & (gaps < clearance)
            if too_close.any():
                i, j = np.argwhere(too_close)[0]
                raise TrackError(
                    f"track {self.name!r}: the track passes within {gaps[i, j]:.1f} m of itself near "
                    f"({centre[first + i, 0]:.0f}, {centre[first + i, 1]:.0f}); walls need {clearance:.1f} m")
        radius = min_turn_radius(centre, self.closed)
        if radius < self.half_width + 1.0:
            raise TrackError(f"track {self.name!r}: a turn of radius {radius:.1f} m is too tight for width {self.width} m")


def min_turn_radius(centre: np.ndarray, closed: bool, window: int = 3) -> float:
    """Smallest radius of curvature along a centre line, measured over chords of ``window`` samples."""
    points = np.concatenate([centre[-window:], centre, centre[:window]]) if closed else centre
    a, b, c = points[:-2 * window], points[window:-window], points[2 * window:]
    ab, bc, ca = (np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1), np.linalg.norm(a - c, axis=1))
    cross = np.abs((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0])
    with np.errstate(divide="ignore"):
        radii = np.where(cross > 1e-9, ab * bc * ca / (2.0 * np.maximum(cross, 1e-12)), np.inf)
    return float(radii.min()) if len(radii) else math.inf


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker simplification of a polyline (iterative)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        a, b = points[first], points[last]
        chord = b - a
        norm = np.hypot(*chord)
        inner = points[first + 1:last]
        if norm < 1e-12:
            dist = np.linalg.norm(inner - a, axis=1)
        else:
            dist = np.abs(chord[0] * (inner[:, 1] - a[1]) - chord[1] * (inner[:, 0] - a[0])) / norm
        worst = int(np.argmax(dist))
        if dist[worst] > tolerance:
            split = first + 1 + worst
            keep[split] = True
            stack += [(first, split), (split, last)]
    return points[keep]


def build_track(design: TrackDesign) -> Track:
    """Sample ``design`` into a :class:`Track` and check it."""
    dense, heading = _drive(design.pieces)
    if design.point_symmetric:
        if not design.closed:
            raise TrackError(f"track {design.name!r}: point_symmetric designs must be closed")
        if abs(math.remainder(heading - math.pi, 2 * math.pi)) > 1e-6:
            raise TrackError(f"track {design.name!r}: the first half must turn by 180°, it turns {math.degrees(heading):.1f}°")
        middle = (dense[0] + dense[-1]) / 2.0
        dense = np.concatenate([dense, (2.0 * middle - dense)[1:]])
    if design.closed:
        gap = float(np.linalg.norm(dense[-1] - dense[0]))
        if gap > 1e-3:
            raise TrackError(f"track {design.name!r}: a closed design must end at its start, it ends {gap:.2f} m away")
    if design.closed:  # spacing that divides the lap evenly; drop the end point (it is the start)
        centre = resample_path(dense, dense_spacing(dense)).astype(np.float64)[:-1]
    else:
        centre = resample_path(dense, CENTRE_LINE_SPACING).astype(np.float64)
    track = Track(design.name, centre, design.width, design.closed)
    track.check()
    return track


def dense_spacing(dense: np.ndarray) -> float:
    """Spacing closest to :data:`CENTRE_LINE_SPACING` that divides a closed polyline's length evenly."""
    total = float(np.linalg.norm(np.diff(dense, axis=0), axis=1).sum())
    return total / max(3, round(total / CENTRE_LINE_SPACING))


BUILTIN_DESIGNS: dict[str, TrackDesign] = {
    "oval": TrackDesign(
        "oval",
        (Straight(120), Arc(30, 180), Straight(120), Arc(30, 180)),
        width=12.0, closed=True),
    "hairpins": TrackDesign(
        "hairpins",
        (Straight(110), Arc(9, -180), Straight(100), Arc(9, 180), Straight(100), Arc(9, -180), Straight(70)),
        width=10.0, closed=False),
    "circuit": TrackDesign(
        "circuit",
        (Straight(70), Arc(25, 90), Arc(14, -90), Straight(30), Arc(12, 90), Straight(15), Arc(30, 90),
         Arc(16, 45), Arc(16, -45), Straight(25)),
        width=11.0, closed=True, point_symmetric=True),
}

#: Names accepted by :func:`load_track` besides ``random:SEED`` and ``random-open:SEED``.
BUILTIN_TRACKS = tuple(BUILTIN_DESIGNS)

#: Seeds of the procedural tracks kept for evaluation (``random:0`` ... ``random:19``): training with a new track per
#: episode (``SimConfig.episode_tracks``) never draws them, so they measure how a policy drives tracks it never saw.
HELD_OUT_TRACK_SEEDS = range(20)


def generate_track(seed: int, closed: bool = True, width: float = 11.0, attempts: int = 200) -> Track:
    """A random track from ``seed`` (same seed, same track). Closed: a loop through random points around a circle,
    roughly 400-800 m long; open: about 500 m of random straights and bends. Invalid candidates (walls overlapping,
    turns too tight for the width) are redrawn; :class:`TrackError` if ``attempts`` draws all fail."""
    rng = np.random.default_rng(seed)
    name = f"random:{seed}" if closed else f"random-open:{seed}"
    last_error: TrackError | None = None
    for _ in range(attempts):
        try:
            track = _random_loop(rng, name, width) if closed else _random_open(rng, name, width)
            track.check()
            return track
        except TrackError as exc:
            last_error = exc
    raise TrackError(f"no valid track found for seed {seed} in {attempts} attempts (last problem: {last_error})")


def _random_loop(rng: np.random.Generator, name: str, width: float) -> Track:
    """A closed loop through 8-14 random control points around a circle, smoothed by a periodic Catmull-Rom spline:
    pulled-in points make tight bends and chicanes, pushed-out ones long sweepers."""
    count = int(rng.integers(8, 15))
    radius = rng.uniform(80.0, 130.0)
    angles = (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * (2 * math.pi / count)
    radii = radius * rng.uniform(0.45, 1.0, count)
    controls = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    dense = _catmull_rom_loop(controls, samples_per_span=60)
    dense = np.concatenate([dense, dense[:1]])
    centre = resample_path(dense, dense_spacing(dense)).astype(np.float64)[:-1]
    start = int(rng.integers(len(centre)))
    return Track(name, np.roll(centre, -start, axis=0), width, closed=True)


def _catmull_rom(controls: np.ndarray, closed: bool, spacing: float = 0.25) -> np.ndarray:
    """Points about ``spacing`` metres apart on the centripetal Catmull-Rom spline through ``controls``: closed, the
    first point is not repeated at the end; open, the line runs from the first control point to the last."""
    if closed:
        return _catmull_rom_loop(controls, 0, spacing)
    phantoms = np.concatenate([[2 * controls[0] - controls[1]], controls, [2 * controls[-1] - controls[-2]]])
    pieces = [_catmull_rom_span(*phantoms[i : i + 4], None, spacing) for i in range(len(controls) - 1)]
    return np.concatenate([*pieces, controls[-1:]])


def _catmull_rom_loop(controls: np.ndarray, samples_per_span: int, spacing: float | None = None) -> np.ndarray:
    """Points on the closed centripetal Catmull-Rom spline through ``controls`` (the first point is not repeated):
    ``samples_per_span`` per span, or, when it is 0, about ``spacing`` metres apart."""
    n = len(controls)
    pieces = []
    for i in range(n):
        p0, p1, p2, p3 = (controls[(i + k) % n] for k in (-1, 0, 1, 2))
        pieces.append(_catmull_rom_span(p0, p1, p2, p3, samples_per_span or None, spacing))
    return np.concatenate(pieces)


def _catmull_rom_span(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, samples: int | None,
                      spacing: float | None) -> np.ndarray:
    """The span from ``p1`` to ``p2`` (``p2`` excluded): ``samples`` points, or one about every ``spacing`` metres."""
    if samples is None:
        samples = max(2, math.ceil(float(np.linalg.norm(p2 - p1)) / float(spacing or 0.25)))
    t0 = 0.0
    t1 = t0 + np.linalg.norm(p1 - p0) ** 0.5
    t2 = t1 + np.linalg.norm(p2 - p1) ** 0.5
    t3 = t2 + np.linalg.norm(p3 - p2) ** 0.5
    t = np.linspace(t1, t2, samples, endpoint=False)[:, None]
    a1 = (t1 - t) / (t1 - t0) * p0 + (t - t0) / (t1 - t0) * p1
    a2 = (t2 - t) / (t2 - t1) * p1 + (t - t1) / (t2 - t1) * p2
    a3 = (t3 - t) / (t3 - t2) * p2 + (t - t2) / (t3 - t2) * p3
    b1 = (t2 - t) / (t2 - t0) * a1 + (t - t0) / (t2 - t0) * a2
    b2 = (t3 - t) / (t3 - t1) * a2 + (t - t1) / (t3 - t1) * a3
    return (t2 - t) / (t2 - t1) * b1 + (t - t1) / (t2 - t1) * b2


def _random_open(rng: np.random.Generator, name: str, width: float) -> Track:
    pieces: list[Straight | Arc] = [Straight(float(rng.uniform(30, 60)))]
    length = pieces[0].length
    while length < 500.0:
        if rng.random() < 0.4:
            piece: Straight | Arc = Straight(float(rng.uniform(20, 90)))
            length += piece.length
        else:
            radius = float(rng.uniform(width / 2 + 4.0, 40.0))
            degrees = float(rng.uniform(30, 150) * rng.choice([-1.0, 1.0]))
            piece = Arc(radius, degrees)
            length += radius * math.radians(abs(degrees))
        pieces.append(piece)
    pieces.append(Straight(30.0))
    dense, _ = _drive(tuple(pieces))
    return Track(name, resample_path(dense, CENTRE_LINE_SPACING).astype(np.float64), width, closed=False)


TRACK_FILE_PREFIX = "file:"
"""``file:PATH``: a track of your own, read from the TOML file at ``PATH`` (:class:`TrackFile`)."""
MAX_TRACK_FILE_BYTES = 1024 * 1024
MAX_TRACK_LENGTH_M = 5_000.0
"""Longest track a file may describe (the built-in and procedural ones are 300-800 m)."""
MAX_TRACK_EXTENT_M = 1_000.0
"""Largest side of a track file's bounding box: the image observations draw the whole track on a grid of 0.25 m
cells, so the extent bounds that grid's memory."""

_Metres = Annotated[float, Field(gt=0, le=MAX_TRACK_LENGTH_M)]


class StraightPiece(BaseModel):
    """``{straight = 110}``: a straight of 110 m."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    straight: _Metres


class ArcPiece(BaseModel):
    """``{radius = 9, degrees = -180}``: a bend of radius 9 m turning 180° to the right (positive: left)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    radius: _Metres
    degrees: float = Field(ge=-360, le=360)

    @field_validator("degrees")
    @classmethod
    def _turns(cls, value: float) -> float:
        if value == 0:
            raise ValueError("a bend must turn: degrees is 0 (use a straight)")
        return value


class TrackFile(BaseModel):
    """A track of your own (``track = "file:my-track.toml"``), described by ``pieces`` driven one after another from
    the origin heading +x (as the built-in tracks are), or by ``centre``, the centre line's points in metres (resampled
    every metre; a closed track's last point joins its first). The track is checked like the built-in ones: walls
    that overlap or turns tighter than half the width plus a metre are refused, naming where."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    width: float = Field(gt=2, le=100)
    """Metres between the walls."""
    closed: bool
    """True: a circuit (laps); False: a start and a finish, with a wall across each end."""
    pieces: list[StraightPiece | ArcPiece] | None = Field(default=None, min_length=1, max_length=10_000)
    centre: list[tuple[float, float]] | None = Field(default=None, min_length=3, max_length=100_000)
    point_symmetric: bool = False
    """Closed ``pieces`` only: they are the first half (turning by 180° in all); the second half is the first turned
    by 180° about the midpoint, which closes the circuit exactly."""

    @model_validator(mode="after")
    def _one_shape(self) -> TrackFile:
        if (self.pieces is None) == (self.centre is None):
            raise ValueError("give either pieces or centre (not both)")
        if self.point_symmetric and self.pieces is None:
            raise ValueError("point_symmetric needs pieces")
        return self

    def build(self, name: str) -> Track:
        """The :class:`Track` named ``name``, checked; :class:`TrackError` for one too long, too large or unusable."""
        if self.pieces is not None:
            pieces = tuple(Straight(p.straight) if isinstance(p, StraightPiece) else Arc(p.radius, p.degrees)
                           for p in self.pieces)
            length = sum(p.length if isinstance(p, Straight) else p.radius * math.radians(abs(p.degrees)) for p in pieces)
            _check_size(name, length * (2 if self.point_symmetric else 1))  # before the check's N x N work
            track = build_track(TrackDesign(name, pieces, self.width, self.closed, self.point_symmetric))
            _check_size(name, track.length, track.centre)
            return track
        points = np.asarray(self.centre, dtype=np.float64)
        if self.closed and len(points) > 3 and np.array_equal(points[0], points[-1]):
            points = points[:-1]  # the loop written back to its start
        joined = np.concatenate([points, points[:1]]) if self.closed else points
        steps = np.linalg.norm(np.diff(joined, axis=0), axis=1)
        _check_size(name, float(steps.sum()), points)
        if (steps < 1e-9).any():
            raise TrackError(f"track {name!r}: the centre line has the same point twice in a row")
        dense = _catmull_rom(points, self.closed)  # a smooth line through the points, not a polygon's corners
        if self.closed:
            dense = np.concatenate([dense, dense[:1]])
            centre = resample_path(dense, dense_spacing(dense)).astype(np.float64)[:-1]
        else:
            centre = resample_path(dense, CENTRE_LINE_SPACING).astype(np.float64)
        _check_size(name, float(np.linalg.norm(np.diff(dense, axis=0), axis=1).sum()), dense,
                    what="the smooth line through its points (which swings out past them at sharp turns)")
        track = Track(name, centre, self.width, self.closed)
        track.check()
        return track


def _check_size(name: str, length: float, points: np.ndarray | None = None, what: str = "its points") -> None:
    if length > MAX_TRACK_LENGTH_M:
        raise TrackError(f"track {name!r} is {length:.0f} m long; a track file may describe at most "
                         f"{MAX_TRACK_LENGTH_M:.0f} m")
    if points is None:
        return
    extent = float((points.max(axis=0) - points.min(axis=0)).max())
    if extent > MAX_TRACK_EXTENT_M:
        raise TrackError(f"track {name!r}: {what} span {extent:.0f} m; a track file's track must fit in "
                         f"{MAX_TRACK_EXTENT_M:.0f} m x {MAX_TRACK_EXTENT_M:.0f} m")


def read_track_file(name: str) -> Track:
    """The track of ``name`` = ``file:PATH``; :class:`TrackError` (one line, naming the file) for a file that is
    missing, too big, not TOML, not a :class:`TrackFile`, or whose track is unusable."""
    path = Path(name[len(TRACK_FILE_PREFIX):]).expanduser()
    try:
        with path.open("rb") as file:
            data = file.read(MAX_TRACK_FILE_BYTES + 1)
    except OSError as exc:
        raise TrackError(f"track {name!r}: cannot read the file: {exc.strerror or exc}") from exc
    if len(data) > MAX_TRACK_FILE_BYTES:
        raise TrackError(f"track {name!r}: the file is larger than {MAX_TRACK_FILE_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TrackError(f"track {name!r}: not a TOML file: {exc}") from exc
    try:
        design = TrackFile.model_validate(table)
    except ValidationError as exc:
        raise TrackError(f"track {name!r}: {validation_problems(TrackFile, exc)}") from exc
    return design.build(name)


def parse_seed(name: str, prefix: str) -> int:
    """The seed of ``name`` = ``prefix`` + ASCII digits (``random:`` + ``1234``); :class:`TrackError` for anything
    else (no digits, a sign, spaces, non-ASCII digits such as ``²`` or ``١٢``, more digits than Python converts)."""
    text = name[len(prefix):]
    if not (text.isascii() and text.isdigit()):
        raise TrackError(f"track {name!r}: the seed after {prefix!r} must be a non-negative integer written in "
                         "the digits 0-9")
    try:
        return int(text)
    except ValueError as exc:  # beyond sys.get_int_max_str_digits()
        raise TrackError(f"track {name!r}: the seed has {len(text)} digits, too many to read") from exc


def check_track_name(name: str) -> str:
    """``name`` when :func:`load_track` accepts it (a built-in track, ``random:SEED``, ``random-open:SEED``, or
    ``file:PATH`` whose file holds a usable track, which is read and built to know), without building a built-in
    or generated track; :class:`TrackError` otherwise."""
    if name in BUILTIN_DESIGNS:
        return name
    if name.startswith(TRACK_FILE_PREFIX):
        read_track_file(name)
        return name
    for prefix in ("random:", "random-open:"):
        if name.startswith(prefix):
            parse_seed(name, prefix)
            return name
    raise TrackError(f"unknown track {name!r}; use one of {', '.join(BUILTIN_TRACKS)}, random:SEED, random-open:SEED "
                     "or file:PATH")


def load_track(name: str) -> Track:
    """A built-in track by name, ``random:SEED`` / ``random-open:SEED`` for a generated one, or ``file:PATH`` for one
    of your own (:class:`TrackFile`)."""
    if name.startswith(TRACK_FILE_PREFIX):
        return read_track_file(name)
    check_track_name(name)
    if name in BUILTIN_DESIGNS:
        return build_track(BUILTIN_DESIGNS[name])
    closed = name.startswith("random:")
    return generate_track(parse_seed(name, "random:" if closed else "random-open:"), closed=closed)
