"""LIDAR on synthetic frames whose black-border geometry is known exactly (the ``radial`` variant; the default,
upstream tmrl's reading, is checked in ``test_tm20_lidar_upstream.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tmrl_worker.tm20.lidar import Lidar, LidarConfig, LidarError

H, W = 200, 300
RADIAL = LidarConfig(mode="radial")
ROAD, BORDER = 200, 0


def frame_with(*, left: int | None = None, right: int | None = None, top: int | None = None) -> np.ndarray:
    """Gray road with black areas: columns < left, columns >= right, rows < top."""
    frame = np.full((H, W), ROAD, dtype=np.uint8)
    if left is not None:
        frame[:, :left] = BORDER
    if right is not None:
        frame[:, right:] = BORDER
    if top is not None:
        frame[:top, :] = BORDER
    return frame


def expected(lidar: Lidar, *, left=None, right=None, top=None) -> np.ndarray:
    """Analytic distance from the origin to the nearest border along each beam (or to the frame edge)."""
    row0, col0 = lidar.origin(H, W)
    out = []
    for angle in np.deg2rad(lidar.angles_deg()):
        dx, dy = math.cos(angle), -math.sin(angle)  # screen: rows grow downwards
        candidates = []
        if right is not None and dx > 1e-9:
            candidates.append((right - col0) / dx)
        if left is not None and dx < -1e-9:
            candidates.append((col0 - (left - 1)) / -dx)
        if top is not None and dy < -1e-9:
            candidates.append((row0 - (top - 1)) / -dy)
        # frame edges: first sample outside the frame
        if dx > 1e-9:
            candidates.append((W - col0) / dx)
        if dx < -1e-9:
            candidates.append((col0 + 1) / -dx)
        if dy < -1e-9:
            candidates.append((row0 + 1) / -dy)
        out.append(min(candidates))
    return np.array(out)


def test_beams_fan_from_right_through_ahead_to_left():
    angles = Lidar(RADIAL).angles_deg()
    assert len(angles) == 19
    assert angles[0] == pytest.approx(0.0) and angles[9] == pytest.approx(90.0) and angles[18] == pytest.approx(180.0)


def test_straight_corridor_distances_match_geometry_within_two_pixels():
    lidar = Lidar(LidarConfig(mode="radial", origin_y=0.9))
    walls = {"left": 100, "right": 200}
    distances = lidar.measure(frame_with(**walls))
    assert distances.shape == (19,) and distances.dtype == np.float32
    np.testing.assert_allclose(distances, expected(lidar, **walls), atol=2.0)
    row0, col0 = lidar.origin(H, W)
    assert distances[0] == pytest.approx(200 - col0, abs=1)  # straight right
    assert distances[18] == pytest.approx(col0 - 99, abs=1)  # straight left
    assert distances[9] == pytest.approx(row0 + 1, abs=1)  # ahead: nothing until the top edge
    symmetric = lidar.measure(frame_with(left=2 * col0 - 199, right=200))  # both walls 50 px from the origin
    np.testing.assert_allclose(symmetric, symmetric[::-1], atol=1.0)


def test_right_turn_shortens_the_left_and_ahead_beams_only():
    lidar = Lidar(RADIAL)
    geometry = {"left": 110, "top": 60}  # road bends right: wall ahead and on the left, open to the right
    distances = lidar.measure(frame_with(**geometry))
    np.testing.assert_allclose(distances, expected(lidar, **geometry), atol=2.0)
    row0, _ = lidar.origin(H, W)
    assert distances[9] == pytest.approx(row0 - 59, abs=1)
    assert distances[:4].min() > distances[9]  # the open side is longer than straight ahead


def test_ring_of_border_at_known_radius_reads_the_radius_on_every_beam():
    lidar = Lidar(LidarConfig(mode="radial", origin_y=0.5, origin_x=0.5, beams=37, fov_deg=180))
    row0, col0 = lidar.origin(H, W)
    rows, cols = np.mgrid[0:H, 0:W]
    frame = np.full((H, W), ROAD, np.uint8)
    frame[np.hypot(rows - row0, cols - col0) >= 70] = BORDER
    np.testing.assert_allclose(lidar.measure(frame), 70.0, atol=1.5)


def test_colour_pixel_is_border_only_when_every_channel_is_below_threshold():
    lidar = Lidar(LidarConfig(mode="radial", threshold=55))
    frame = np.full((H, W, 3), ROAD, np.uint8)
    frame[:100, :] = (50, 50, 200)  # dark red/green but bright blue: not a border
    frame[:40, :] = (54, 54, 54)
    row0, _ = lidar.origin(H, W)
    assert lidar.measure(frame)[9] == pytest.approx(row0 - 39, abs=1)


def test_alpha_channel_of_bgra_frames_is_ignored():
    frame = np.full((H, W, 4), ROAD, np.uint8)
    frame[..., 3] = 0
    frame[:50] = (0, 0, 0, 255)
    lidar = Lidar(RADIAL)
    assert lidar.measure(frame)[9] == pytest.approx(lidar.origin(H, W)[0] - 49, abs=1)


def test_max_range_caps_open_beams_and_min_distance_skips_the_cars_bonnet():
    lidar = Lidar(LidarConfig(mode="radial", max_range=40, min_distance=15))
    frame = frame_with()
    row0, col0 = lidar.origin(H, W)
    frame[row0 - 10:row0 + 1, col0 - 10:col0 + 10] = BORDER  # dark bonnet right in front of the origin
    distances = lidar.measure(frame)
    assert distances.max() <= 41
    assert distances[9] == pytest.approx(41, abs=1)  # bonnet ignored, open road capped
    assert Lidar(LidarConfig(mode="radial", max_range=40)).measure(frame)[9] == 0  # without min_distance the bonnet is a wall


def test_coordinates_are_recomputed_when_the_frame_size_changes():
    lidar = Lidar(RADIAL)
    small = np.full((100, 150), ROAD, np.uint8)
    assert lidar.measure(small)[9] == pytest.approx(lidar.origin(100, 150)[0] + 1, abs=1)
    assert lidar.measure(frame_with())[9] == pytest.approx(lidar.origin(H, W)[0] + 1, abs=1)


def test_draw_marks_beams_in_red_up_to_the_measured_distance():
    lidar = Lidar(RADIAL)
    frame = frame_with(left=100, right=200)
    image = lidar.draw(frame)
    red = (image[..., 0] == 255) & (image[..., 1] == 0)
    assert image.shape == (H, W, 3) and red.any()
    assert not red[:, :100].any() and not red[:, 201:].any()  # never drawn through the walls


def test_frames_of_the_wrong_shape_are_refused_clearly():
    with pytest.raises(LidarError, match="HxW"):
        Lidar(RADIAL).measure(np.zeros(10, np.uint8))


@pytest.mark.parametrize(("frame", "message"), [
    (np.full((488, 958, 3), 0.7, np.float32), "needs uint8 frames .*got float32"),
    (np.ones((488, 958, 3), bool), "needs uint8 frames .*got bool"),
    (np.zeros((3, 488, 958), np.uint8), r"HxWx3 / HxWx4 .*\(channels first\? move them last\)"),
    (np.zeros((488, 958, 2), np.uint8), r"HxWx3 / HxWx4 colour frame, got shape \(488, 958, 2\)"),
    (np.zeros((3, 3, 3), np.uint8), "3x3 frame is too small for the LIDAR"),
])
def test_frames_the_lidar_would_read_as_all_zero_are_refused_with_the_reason(frame, message):
    with pytest.raises(LidarError, match=message):
        Lidar().measure(frame)


def reference_walk(lidar: Lidar, frame: np.ndarray) -> np.ndarray:
    """Step along each beam one pixel at a time in plain Python."""
    h, w = frame.shape[:2]
    row0, col0 = lidar.origin(h, w)
    out = []
    for angle in np.deg2rad(lidar.angles_deg()):
        r = 0
        while True:
            y, x = int(round(row0 - r * math.sin(angle))), int(round(col0 + r * math.cos(angle)))
            if not (0 <= y < h and 0 <= x < w) or frame[y, x, :3].max() < lidar.config.threshold:
                break
            r += 1
        out.append(r)
    return np.array(out, dtype=np.float32)


def test_vectorised_scan_agrees_with_a_pixel_by_pixel_walk_on_winding_roads():
    from tmrl_worker.tm20.synthetic import winding_road_frames

    lidar = Lidar(RADIAL)
    for frame in winding_road_frames(count=6, height=244, width=479):
        np.testing.assert_allclose(lidar.measure(frame), reference_walk(lidar, frame), atol=1.0)
