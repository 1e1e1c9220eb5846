"""LIDAR measured on screenshots: distances from the car to the black borders of the track.

Beams fan out over ``fov_deg`` (180 by default) from a fixed origin near the bottom centre of the frame. Beam ``i``
points at ``i * fov / (beams - 1)`` degrees counter-clockwise from the frame's right-hand side (+x) when the fan
spans 180: **beam 0 points right, the middle beam straight ahead (up the frame), the last beam left** — the order
the original TrackMania LIDAR uses and the built-in simulator mirrors. Each value is the distance in pixels from
the origin to the first sampled pixel darker than ``threshold`` (every colour channel below it), or, when the beam
meets no dark pixel, to where it leaves the frame or reaches ``max_range``.

All beam pixel coordinates are computed once per frame size (one sample per pixel of beam length), so measuring
one frame is a single fancy-indexing gather, a comparison and an ``argmax``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class LidarError(ValueError):
    """A frame or a LIDAR setting cannot be used."""


class LidarConfig(BaseModel):
    """Where the beams start, how many there are, and what counts as a border."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    beams: int = Field(default=19, ge=1, le=361)
    fov_deg: float = Field(default=180.0, gt=0.0, le=360.0)
    """Angle covered by the fan, centred on straight ahead (up the frame)."""
    origin_x: float = Field(default=0.5, ge=0.0, le=1.0)
    """Origin column as a fraction of the frame width (0.5: centre)."""
    origin_y: float = Field(default=0.9, ge=0.0, le=1.0)
    """Origin row as a fraction of the frame height (0.9: near the bottom, just above the car's nose)."""
    threshold: int = Field(default=55, ge=1, le=256)
    """A pixel is a border when every channel is strictly below this value (TM's borders are black)."""
    min_distance: int = Field(default=0, ge=0)
    """Pixels nearer than this to the origin are ignored (e.g. the car's own dark bonnet)."""
    max_range: int | None = Field(default=None, ge=1)
    """Longest distance measured, in pixels (None: until the beam leaves the frame)."""


class Lidar:
    """Vectorised LIDAR: ``Lidar(config).measure(frame) -> float32 (beams,)`` distances in pixels."""

    def __init__(self, config: LidarConfig | None = None) -> None:
        self.config = config or LidarConfig()
        self._shape: tuple[int, int] | None = None
        self._rows = self._cols = self._flat = self._in_frame = self._exit = None

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
        row = min(int(round(self.config.origin_y * (height - 1))), height - 1)
        col = min(int(round(self.config.origin_x * (width - 1))), width - 1)
        return row, col

    def _prepare(self, height: int, width: int) -> None:
        row0, col0 = self.origin(height, width)
        reach = int(np.ceil(np.hypot(height, width))) + 1
        if self.config.max_range is not None:
            reach = min(reach, self.config.max_range + 1)
        theta = np.deg2rad(self.angles_deg())[:, None]
        radius = np.arange(reach, dtype=np.float64)[None, :]
        rows = np.rint(row0 - radius * np.sin(theta)).astype(np.intp)
        cols = np.rint(col0 + radius * np.cos(theta)).astype(np.intp)
        in_frame = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        # a straight ray leaves a rectangle once: in_frame is a prefix of each beam
        exits = in_frame.sum(axis=1)
        samples = max(int(exits.max()), 1)  # no beam needs more samples than the longest stays in the frame
        self._exit = exits.astype(np.float32)
        in_frame = in_frame[:, :samples]
        in_frame[:, : self.config.min_distance] = False
        self._rows = np.clip(rows[:, :samples], 0, height - 1)
        self._cols = np.clip(cols[:, :samples], 0, width - 1)
        self._flat = self._rows * width + self._cols
        self._in_frame = in_frame
        self._shape = (height, width)

    def beam_pixels(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sampled ``(rows, cols, in_frame)`` of every beam, each ``(beams, samples)``; sample ``k`` is ``k`` px out."""
        if self._shape != (height, width):
            self._prepare(height, width)
        return self._rows, self._cols, self._in_frame

    def measure(self, frame: np.ndarray) -> np.ndarray:
        """Distances in pixels (float32, shape ``(beams,)``) for an ``HxW`` gray or ``HxWxC`` colour frame."""
        frame = np.asarray(frame)
        if frame.ndim not in (2, 3) or frame.shape[0] < 2 or frame.shape[1] < 2:
            raise LidarError(f"LIDAR needs an HxW or HxWxC frame, got shape {frame.shape}")
        _, _, in_frame = self.beam_pixels(frame.shape[0], frame.shape[1])
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
        return np.where(hits.any(axis=1), first, self._exit)

    def draw(self, frame: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """A copy of ``frame`` (as RGB) with each beam drawn in red up to its measured distance, for ``check-env``."""
        frame = np.asarray(frame)
        if distances is None:
            distances = self.measure(frame)
        image = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame[..., :3].copy()
        rows, cols, in_frame = self.beam_pixels(frame.shape[0], frame.shape[1])
        steps = np.arange(rows.shape[1])[None, :]
        mask = (steps < np.asarray(distances)[:, None]) & (steps < self._exit[:, None])
        image[rows[mask], cols[mask]] = (255, 0, 0)
        return image
