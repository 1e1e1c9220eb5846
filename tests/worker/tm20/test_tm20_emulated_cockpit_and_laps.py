"""The emulated game's cockpit frames (each ground pixel shows the track map where its camera ray meets the ground)
and its scripted laps timed in simulated time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tmrl_worker.sim.camera import ROAD, WALL, rasterize_track
from tmrl_worker.sim.track import load_track
from tmrl_worker.tm20.emulated_game import BONNET, ROAD_RGB, SCENERY, SKY, CockpitRenderer
from tmrl_worker.tm20.lidar import Lidar


def expected_colour(track_map, x0, y0, x, y, heading, row, col, height, width):
    """A pinhole camera 1.6 m above the road, 90 degrees across, horizon at 35 % of the height: one pixel, by hand."""
    focal, horizon = width / 2.0, int(0.35 * height)
    ahead = 1.6 * focal / (row - horizon)
    right = (col - width / 2.0) / focal * ahead
    wx = x + ahead * math.cos(heading) + right * math.sin(heading)
    wy = y + ahead * math.sin(heading) - right * math.cos(heading)
    ix = min(max(int((wx - x0) / 0.25), 0), track_map.shape[0] - 1)  # past the map's margin: its edge
    iy = min(max(int((wy - y0) / 0.25), 0), track_map.shape[1] - 1)
    cell = track_map[ix, iy]
    return {ROAD: ROAD_RGB, WALL: (0, 0, 0)}.get(int(cell), SCENERY)


@pytest.mark.parametrize("size", [(488, 958), (128, 256)])
def test_every_ground_pixel_shows_the_map_where_its_ray_meets_the_ground(size):
    height, width = size
    track = load_track("hairpins")
    renderer = CockpitRenderer(track, height, width)
    track_map, x0, y0 = rasterize_track(track, 0.25, margin=150.0)
    rng = np.random.default_rng(0)
    first_row = int(0.35 * height) + math.ceil(1.6 * width / 2.0 / 150.0)
    bonnet_rows = 44 * height // 49 - max(2, height // 80)
    checked = wrong = 0
    for index in range(0, len(track.centre), 37):
        x, y = (float(v) for v in track.centre[index])
        heading = float(rng.uniform(-math.pi, math.pi))
        frame = renderer.frame(x, y, heading)
        assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
        assert tuple(frame[0, 0]) == SKY
        for row, col in zip(rng.integers(first_row, bonnet_rows, 300), rng.integers(0, width, 300), strict=True):
            checked += 1
            wrong += tuple(frame[row, col]) != expected_colour(track_map, x0, y0, x, y, heading, row, col, height, width)
    # a ray that lands within rounding of a cell boundary may take the neighbouring cell: rare
    assert wrong <= checked // 200, f"{wrong} of {checked} pixels differ from the hand projection"


def test_the_bonnet_and_the_finish_popup_are_drawn_over_the_road():
    track = load_track("hairpins")
    renderer = CockpitRenderer(track, 488, 958)
    x, y = (float(v) for v in track.centre[5])
    plain = renderer.frame(x, y, track.start_heading)
    assert tuple(plain[480, 479]) == BONNET
    assert tuple(plain[300, 479]) == ROAD_RGB  # straight ahead on the first straight
    with_popup = renderer.frame(x, y, track.start_heading, popup=True)
    assert tuple(with_popup[250, 479]) != tuple(plain[250, 479])
    assert Lidar().measure(plain)[9] > 200  # the road ahead is long and clear


def test_the_scripted_driver_laps_the_emulated_game_in_simulated_time():
    from tmrl_worker.tm20.emulated_game import EmulatedGame

    game = EmulatedGame({"track": "hairpins", "port": 0})  # not started: no threads, no plugin, no wall clock
    lap = game.scripted_lap_time()
    # the simulator's expert needs 508 steps of 50 ms on hairpins (docs/tuning.md): the same car, the same lap
    assert lap is not None and 23.0 < lap < 28.0
    assert game.finishes == 1 and game.lap_times == [lap] and game.popup_open
    assert game.scripted_lap_time() == pytest.approx(lap)  # deterministic: the respawn starts it over
