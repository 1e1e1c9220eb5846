"""LIDAR: geometry on a straight, and the grid-pruned scan equals a brute-force scan over every wall."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tmrl_worker.sim.lidar import Lidar
from tmrl_worker.sim.track import load_track


def brute_force(track, x, y, heading, beams, max_range):
    starts, ends = track.wall_segments()
    out = []
    for angle in np.linspace(-math.pi / 2, math.pi / 2, beams):  # beam 0 right, like TrackMania
        u = np.array([math.cos(heading + angle), math.sin(heading + angle)])
        best = max_range
        for p, q in zip(starts, ends, strict=True):
            e = q - p
            den = u[0] * e[1] - u[1] * e[0]
            if abs(den) < 1e-12:
                continue
            w = p - np.array([x, y])
            t = (w[0] * e[1] - w[1] * e[0]) / den
            s = (w[0] * u[1] - w[1] * u[0]) / den
            if t > 0 and 0 <= s <= 1:
                best = min(best, t)
        out.append(best)
    return np.array(out)


def test_beams_fan_from_right_to_left_like_trackmania_and_measure_metres():
    track = load_track("oval")  # width 12, first straight along +x from (0, 0)
    lidar = Lidar(track, beams=19, max_range=80.0)
    scan = lidar.scan(20.0, 0.0, 0.0)
    assert scan.dtype == np.float32 and scan.shape == (19,)
    assert scan[0] == pytest.approx(6.0, abs=0.05)  # right wall
    assert scan[-1] == pytest.approx(6.0, abs=0.05)  # left wall
    assert scan[3] == pytest.approx(6.0 / math.cos(math.radians(30)), abs=0.05)
    offset = lidar.scan(20.0, 2.0, 0.0)  # 2 m left of the centre line
    assert offset[0] == pytest.approx(8.0, abs=0.05) and offset[-1] == pytest.approx(4.0, abs=0.05)  # beam 0 right


def test_distances_are_capped_at_the_range():
    lidar = Lidar(load_track("oval"), max_range=10.0)
    scan = lidar.scan(20.0, 0.0, 0.0)
    assert scan.max() == pytest.approx(10.0) and scan.min() == pytest.approx(6.0, abs=0.05)


@pytest.mark.parametrize("name", ["hairpins", "circuit", "random:2"])
def test_grid_pruned_scan_matches_brute_force(name):
    track = load_track(name)
    lidar = Lidar(track, beams=19, max_range=60.0)
    rng = np.random.default_rng(0)
    for index in rng.integers(0, track.segment_count, 8):
        point = track.centre[index] + track.normals[index] * rng.uniform(-3, 3)
        heading = math.atan2(*track.directions[index][::-1]) + rng.uniform(-0.5, 0.5)
        expected = brute_force(track, point[0], point[1], heading, 19, 60.0)
        np.testing.assert_allclose(lidar.scan(point[0], point[1], heading), expected, atol=1e-3)


def test_scan_tests_only_walls_near_the_car():
    track = load_track("random:1")
    lidar = Lidar(track, max_range=60.0)
    x, y = track.centre[0]
    assert lidar.segments_near(x, y) < lidar.segment_count / 2
