"""A small grayscale top-down camera that follows the car (the image observation for CNN policies).

The track is drawn once into a map (track surface mid-gray, walls white, outside black). Each frame samples that
map on a square grid that turns with the car: the car sits near the bottom centre, looking up, so most of the image
shows the road ahead (like TrackMania's chase camera). The car itself is the bright block at the bottom.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from tmrl_worker.sim.track import Track

ROAD = 110
WALL = 255
CAR = 200


def rasterize_track(track: Track, metres_per_pixel: float, margin: float) -> tuple[np.ndarray, float, float]:
    """The track drawn on a grid: array indexed ``[ix, iy]`` (x to the right, y up) and the grid origin (x0, y0)."""
    xmin, ymin, xmax, ymax = track.bounds(margin=margin)
    width = math.ceil((xmax - xmin) / metres_per_pixel) + 1
    height = math.ceil((ymax - ymin) / metres_per_pixel) + 1
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)

    def pixels(points: np.ndarray) -> list[tuple[float, float]]:
        return [((px - xmin) / metres_per_pixel, (py - ymin) / metres_per_pixel) for px, py in points]

    left, right = track.walls()
    for i in range(len(left) - 1):
        draw.polygon(pixels(np.array([left[i], left[i + 1], right[i + 1], right[i]])), fill=ROAD)
    wall_px = max(1, round(0.6 / metres_per_pixel))
    for border in (left, right):
        draw.line(pixels(border), fill=WALL, width=wall_px)
    if not track.closed:
        draw.line(pixels(np.array([left[0], right[0]])), fill=WALL, width=wall_px)
        draw.line(pixels(np.array([left[-1], right[-1]])), fill=WALL, width=wall_px)
    # PIL rows are y; transpose so the array is indexed [x, y]
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).T), xmin, ymin


class TopDownCamera:
    """Renders ``size`` × ``size`` uint8 frames of the surroundings of a car."""

    def __init__(self, track: Track, size: int = 64, metres_per_pixel: float = 0.75, map_resolution: float = 0.25) -> None:
        self.size = size
        view = size * metres_per_pixel
        self._map, self._x0, self._y0 = rasterize_track(track, map_resolution, margin=view * 1.5)
        self._scale = 1.0 / map_resolution
        car_row = size - max(2, size // 8)
        rows, cols = np.mgrid[0:size, 0:size]
        self._forward = ((car_row - rows) * metres_per_pixel).ravel().astype(np.float64)
        self._right = ((cols - (size - 1) / 2.0) * metres_per_pixel).ravel().astype(np.float64)
        car_half = max(1, round(1.2 / metres_per_pixel))
        self._car = (slice(car_row - car_half, car_row + car_half + 1),
                     slice(size // 2 - car_half // 2 - 1, size // 2 + car_half // 2 + 1))

    def frame(self, x: float, y: float, heading: float) -> np.ndarray:
        """The view from a car at ``(x, y)`` heading ``heading``: uint8, shape ``(size, size)``, row 0 ahead."""
        ch, sh = math.cos(heading), math.sin(heading)
        wx = x + self._forward * ch + self._right * sh
        wy = y + self._forward * sh - self._right * ch
        ix = ((wx - self._x0) * self._scale).astype(np.intp)
        iy = ((wy - self._y0) * self._scale).astype(np.intp)
        np.clip(ix, 0, self._map.shape[0] - 1, out=ix)
        np.clip(iy, 0, self._map.shape[1] - 1, out=iy)
        image = self._map[ix, iy].reshape(self.size, self.size)
        image[self._car] = CAR
        return image
