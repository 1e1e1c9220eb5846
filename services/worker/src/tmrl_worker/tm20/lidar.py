"""LIDAR measured on screenshots: distances from the car to the black borders of the track.

Beams fan out over ``fov_deg`` (180 by default) from a fixed origin near the bottom centre of the frame. Beam ``i``
points at ``i * fov / (beams - 1)`` degrees counter-clockwise from the frame's right-hand side (+x) when the fan
spans 180: **beam 0 points right, the middle beam straight ahead (up the frame), the last beam left** — the order
the original TrackMania LIDAR uses and the built-in simulator mirrors. A pixel is a border when every colour channel
is below ``threshold``.

Two ways to walk a beam (``LidarConfig.mode``):

* ``tmrl`` (default) reads what upstream tmrl 0.7 reads, so policies and settings carry over: the origin is the
  pixel ``(44 * h // 49, w // 2)`` (row, column); a beam's samples start ``start_distance`` (20) pixels out, one
  per pixel of length, at ``int()``-truncated coordinates; the beam stops before the first sample on the top row,
  the left column or the right column (edge pixels are never read); the value is the index of the first dark
  sample counted from that start, or the number of samples minus one when the beam meets none. The 20 pixels
  skipped are where the car's own dark bonnet is.
* ``radial`` (this project's first variant): origin at the rounded fractions ``origin_y``/``origin_x`` (0.9, 0.5)
  of the frame, samples from the origin itself at rounded coordinates, value = distance in pixels from the origin
  to the first dark sample (about 20 px more than ``tmrl``), or to where the beam leaves the frame; pixels nearer
  than ``min_distance`` are ignored.

All beam pixel coordinates are computed once per frame size, so measuring one frame is a single fancy-indexing
gather, a comparison and an ``argmax``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class LidarError(ValueError):
    """A frame or a LIDAR setting cannot be used."""


class LidarConfig(BaseModel):
    """Where the beams start, how many there are, and what counts as a border."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["tmrl", "radial"] = "tmrl"
    """``tmrl``: upstream tmrl's reading (see the module docstring); ``radial``: distances from the origin."""
    beams: int = Field(default=19, ge=1, le=361)
    fov_deg: float = Field(default=180.0, gt=0.0, le=360.0)
    """Angle covered by the fan, centred on straight ahead (up the frame)."""
    origin_x: float | None = Field(default=None, ge=0.0, le=1.0)
    """Origin column as a fraction of the frame width. None: ``w // 2`` (tmrl), 0.5 of ``w - 1`` rounded (radial)."""
    origin_y: float | None = Field(default=None, ge=0.0, le=1.0)
    """Origin row as a fraction of the frame height. None: ``44 * h // 49`` (tmrl), 0.9 of ``h - 1`` rounded
    (radial): near the bottom, just above the car's nose."""
    threshold: int = Field(default=55, ge=1, le=256)
    """A pixel is a border when every channel is strictly below this value (TM's borders are black)."""
    start_distance: int = Field(default=20, ge=0)
    """``tmrl`` mode: beams start this many pixels out and distances count from there (upstream: 20)."""
    min_distance: int = Field(default=0, ge=0)
    """``radial`` mode: pixels nearer than this to the origin are ignored (e.g. the car's own dark bonnet)."""
    max_range: int | None = Field(default=None, ge=1)
    """Most samples read per beam beyond the first (None: until the beam leaves the frame)."""


class Lidar:
    """Vectorised LIDAR: ``Lidar(config).measure(frame) -> float32 (beams,)`` distances in pixels."""

    def __init__(self, config: LidarConfig | None = None) -> None:
        self.config = config or LidarConfig()
        self._shape: tuple[int, int] | None = None
        self._rows = self._cols = self._flat = self._in_frame = self._exit = self._counts = None
        self.last_borders_met = 0
        """How many beams of the last :meth:`measure` met a border (the others read where they leave the frame)."""

    @property
    def beams(self) -> int:
        return self.config.beams

    def angles_deg(self) -> np.ndarray:
        """Beam directions in degrees, counter-clockwise from the frame's +x (right) axis; 90 is straight ahead."""
        c = self.config
        if c.beams == 1:
            return np.array([90.0])
        return 90.0 - c.fov_deg / 2.0 + np.arange(c.beams) * c.fov_deg / (c.beams - 1)

    def origin(self, height: int, width: int) -> tuple[int, int]:
        """Origin pixel ``(row, col)`` in a frame of this size."""
        c = self.config
        if c.mode == "tmrl":
            row = 44 * height // 49 if c.origin_y is None else int(c.origin_y * height)
            col = width // 2 if c.origin_x is None else int(c.origin_x * width)
        else:
            row = int(round((0.9 if c.origin_y is None else c.origin_y) * (height - 1)))
            col = int(round((0.5 if c.origin_x is None else c.origin_x) * (width - 1)))
        return min(row, height - 1), min(col, width - 1)

    def _beam_samples(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample ``(rows, cols, in_frame)`` of every beam before any padding, each ``(beams, reach)``."""
        row0, col0 = self.origin(height, width)
        reach = int(np.ceil(np.hypot(height, width))) + 1
        if self.config.max_range is not None:
            reach = min(reach, self.config.max_range + 1)
        if self.config.mode == "tmrl":
            # upstream walks (row, col) += d * (cos, sin) of (angle + 90) degrees and truncates with int()
            radians = [math.radians(a + 90.0) for a in self.angles_deg().tolist()]
            d_row = np.array([math.cos(r) for r in radians])[:, None]
            d_col = np.array([math.sin(r) for r in radians])[:, None]
            radius = np.arange(self.config.start_distance, self.config.start_distance + reach, dtype=np.float64)[None, :]
            rows = np.trunc(row0 + radius * d_row).astype(np.intp)
            cols = np.trunc(col0 + radius * d_col).astype(np.intp)
            inside = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
        else:
            theta = np.deg2rad(self.angles_deg())[:, None]
            radius = np.arange(reach, dtype=np.float64)[None, :]
            rows = np.rint(row0 - radius * np.sin(theta)).astype(np.intp)
            cols = np.rint(col0 + radius * np.cos(theta)).astype(np.intp)
            inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        in_frame = np.cumprod(inside, axis=1).astype(bool)  # a beam stops at its first sample outside
        return rows, cols, in_frame

    def _prepare(self, height: int, width: int) -> None:
        rows, cols, in_frame = self._beam_samples(height, width)
        counts = in_frame.sum(axis=1)
        self._counts = counts[:, None]
        samples = max(int(counts.max()), 1)  # no beam needs more samples than the longest stays in the frame
        # no dark sample: tmrl reads the last sample's index, radial the distance where the beam leaves the frame
        self._exit = (np.maximum(counts - 1, 0) if self.config.mode == "tmrl" else counts).astype(np.float32)
        in_frame = in_frame[:, :samples]
        if self.config.mode == "radial":
            in_frame[:, : self.config.min_distance] = False
        self._rows = np.clip(rows[:, :samples], 0, height - 1)
        self._cols = np.clip(cols[:, :samples], 0, width - 1)
        self._flat = self._rows * width + self._cols
        self._in_frame = in_frame
        self._shape = (height, width)

    def beam_pixels(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sampled ``(rows, cols, in_frame)`` of every beam, each ``(beams, samples)``; sample ``k`` reads as
        distance ``k``."""
        if self._shape != (height, width):
            self._prepare(height, width)
        return self._rows, self._cols, self._in_frame

    def measure(self, frame: np.ndarray) -> np.ndarray:
        """Distances in pixels (float32, shape ``(beams,)``) for an ``HxW`` gray or ``HxWxC`` colour frame."""
        frame = np.asarray(frame)
        if frame.ndim not in (2, 3) or frame.shape[0] < 2 or frame.shape[1] < 2:
            raise LidarError(f"LIDAR needs an HxW or HxWxC frame, got shape {frame.shape}")
        if frame.ndim == 3 and frame.shape[2] not in (3, 4):
            raise LidarError(f"LIDAR needs an HxW gray or HxWx3 / HxWx4 colour frame, got shape {frame.shape}"
                             + (" (channels first? move them last)" if frame.shape[0] in (3, 4) else ""))
        if frame.dtype != np.uint8:  # the threshold is on 0-255 pixel values: other dtypes would read all dark or none
            raise LidarError(f"LIDAR needs uint8 frames (pixel values 0-255), got {frame.dtype}")
        _, _, in_frame = self.beam_pixels(frame.shape[0], frame.shape[1])
        if not in_frame.any():
            raise LidarError(f"a {frame.shape[0]}x{frame.shape[1]} frame is too small for the LIDAR: no beam sample "
                             "lies inside it")
        threshold = self.config.threshold
        if frame.ndim == 2:
            hits = np.take(frame.reshape(-1), self._flat) < threshold
        else:  # dark when every colour channel is dark (a 4th, alpha, channel is ignored)
            pixels = np.take(frame.reshape(-1, frame.shape[2]), self._flat, axis=0)
            hits = pixels[..., 0] < threshold
            for channel in range(1, min(frame.shape[2], 3)):
                hits &= pixels[..., channel] < threshold
        hits &= in_frame
        first = hits.argmax(axis=1).astype(np.float32)
        met = hits.any(axis=1)
        self.last_borders_met = int(met.sum())
        return np.where(met, first, self._exit)

    def draw(self, frame: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """A copy of ``frame`` (as RGB) with each beam drawn in red up to its measured distance, for ``check-env``."""
        frame = np.asarray(frame)
        if distances is None:
            distances = self.measure(frame)
        image = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame[..., :3].copy()
        rows, cols, in_frame = self.beam_pixels(frame.shape[0], frame.shape[1])
        steps = np.arange(rows.shape[1])[None, :]
        mask = (steps < np.asarray(distances)[:, None]) & (steps < self._counts)
        image[rows[mask], cols[mask]] = (255, 0, 0)
        return image
