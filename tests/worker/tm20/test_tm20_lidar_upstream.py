"""The default LIDAR reads what upstream tmrl 0.7 reads, checked against an independent pixel-by-pixel
implementation of upstream's published algorithm on the same frames (issue 15, item 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tmrl_worker.tm20.lidar import Lidar, LidarConfig
from tmrl_worker.tm20.synthetic import winding_road_frames


def upstream_reading(frame: np.ndarray, threshold: int = 55) -> np.ndarray:
    """Upstream's algorithm as published, one pixel at a time: origin (44*h//49, w//2); 19 beams at 90, 100, ...,
    270 degrees walking (row, col) += d * (cos, sin); d from 20; int() truncation; stop before a sample on row 0,
    column 0 or column w-1; value = index of the first sample with every RGB channel below ``threshold``, counted
    from the first sample, else the number of samples minus one."""
    h, w = frame.shape[:2]
    row0, col0 = 44 * h // 49, w // 2
    readings = []
    for angle in range(90, 280, 10):
        d_row, d_col = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        samples, d = [], 20
        while True:
            row, col = int(row0 + d * d_row), int(col0 + d * d_col)
            if row <= 0 or col <= 0 or col >= w - 1:
                break
            samples.append((row, col))
            d += 1
        dark = [i for i, (r, c) in enumerate(samples) if all(int(frame[r, c, k]) < threshold for k in range(3))]
        readings.append(dark[0] if dark else len(samples) - 1)
    return np.array(readings, dtype=np.float32)


def cockpit_frame(height: int = 488, width: int = 958, seed: int = 0) -> np.ndarray:
    """Grey road narrowing towards the horizon between black borders, a dark bonnet just above the LIDAR origin,
    and dark speckles (shadows) scattered over the road."""
    rng = np.random.default_rng(seed)
    frame = np.full((height, width, 3), 120, np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    half_width = width * (0.08 + 0.4 * rows / height)
    centre = width * (0.5 + 0.1 * rng.uniform(-1, 1) * (1 - rows / height))
    frame[np.abs(cols - centre) > half_width] = 0
    frame[: height // 3] = (90, 140, 200)  # sky: bright, never a border
    row0, col0 = 44 * height // 49, width // 2
    frame[row0 - 12:row0 + 1, col0 - 60:col0 + 60] = 20  # the car's bonnet: dark, right at the origin
    speckles = rng.random((height, width)) < 0.002
    frame[speckles] = 30
    return frame


def test_default_lidar_equals_upstreams_reading_on_winding_roads_and_cockpit_frames():
    lidar = Lidar()
    assert lidar.config.mode == "tmrl"
    frames = [*winding_road_frames(count=4), *(cockpit_frame(seed=s) for s in range(3)),
              *winding_road_frames(count=2, height=128, width=256)]
    for frame in frames:
        np.testing.assert_allclose(lidar.measure(frame), upstream_reading(frame), atol=1.0)


def test_default_lidar_skips_the_bonnet_that_drives_the_radial_variant_to_zero():
    frame = cockpit_frame()
    upstream = Lidar().measure(frame)
    radial = Lidar(LidarConfig(mode="radial")).measure(frame)
    assert radial[9] == 0 and upstream[9] > 50  # straight ahead: the bonnet is a wall for the radial variant only
    np.testing.assert_array_equal(upstream, upstream_reading(frame))


def test_radial_variant_reads_about_20_px_more_than_upstream_on_a_plain_road():
    frame = winding_road_frames(count=1)[0]
    difference = Lidar(LidarConfig(mode="radial")).measure(frame) - Lidar().measure(frame)
    assert np.median(difference) == pytest.approx(20, abs=2)


def test_edge_pixels_are_never_read():
    frame = np.full((100, 200, 3), 120, np.uint8)
    frame[0, :] = frame[:, 0] = frame[:, -1] = 0  # a black frame border one pixel wide
    readings = Lidar().measure(frame)
    np.testing.assert_array_equal(readings, upstream_reading(frame))
    lidar = Lidar()
    rows, cols, in_frame = lidar.beam_pixels(100, 200)
    assert rows[in_frame].min() >= 1 and cols[in_frame].min() >= 1 and cols[in_frame].max() <= 198
    assert readings[0] == in_frame[0].sum() - 1  # no border met: the last sample's index
