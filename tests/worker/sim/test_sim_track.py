"""Tracks: built-in designs, seeded generation, wall geometry, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from tmrl_worker.sim.track import (
    BUILTIN_TRACKS,
    Arc,
    Straight,
    TrackDesign,
    TrackError,
    build_track,
    generate_track,
    load_track,
    min_turn_radius,
)


@pytest.mark.parametrize("name", BUILTIN_TRACKS)
def test_builtin_tracks_are_valid_and_evenly_sampled(name):
    track = load_track(name)
    track.check()
    even = track.lengths if track.closed else track.lengths[:-1]  # an open track's last gap may be shorter
    assert np.allclose(even, even.mean(), atol=0.02)
    assert 0.9 < even.mean() <= 1.01
    assert track.length > 300


def test_there_are_at_least_three_builtin_tracks_one_open_with_hairpins():
    assert len(BUILTIN_TRACKS) >= 3
    hairpins = load_track("hairpins")
    assert not hairpins.closed
    assert min_turn_radius(hairpins.centre, hairpins.closed) < 10.0  # sharp turns
    assert load_track("oval").closed and load_track("circuit").closed


def test_closed_track_lap_path_returns_to_the_start():
    track = load_track("circuit")
    lap = track.lap_path()
    np.testing.assert_allclose(lap[0], lap[-1])
    assert np.linalg.norm(track.centre[-1] - track.centre[0]) < 1.1  # no seam jump


@pytest.mark.parametrize("closed", [True, False])
def test_generated_tracks_depend_only_on_the_seed(closed):
    first, again, other = generate_track(3, closed), generate_track(3, closed), generate_track(4, closed)
    np.testing.assert_array_equal(first.centre, again.centre)
    assert first.centre.shape != other.centre.shape or not np.allclose(first.centre, other.centre)
    first.check()
    assert first.closed == closed


@pytest.mark.parametrize("seed", range(6))
def test_generated_tracks_pass_the_clearance_check(seed):
    generate_track(seed, closed=True).check()
    generate_track(seed, closed=False).check()


def test_load_track_names_random_tracks_and_rejects_unknown_names():
    assert load_track("random:5").name == "random:5"
    assert not load_track("random-open:5").closed
    with pytest.raises(TrackError, match="unknown track"):
        load_track("monza")
    with pytest.raises(TrackError, match="seed"):
        load_track("random:abc")


@pytest.mark.parametrize("name", ["random:²", "random:١٢", "random-open:１２", "random:+5", "random: 5", "random:"])
def test_load_track_accepts_only_ascii_digit_seeds(name):
    with pytest.raises(TrackError, match="digits 0-9"):
        load_track(name)


def test_a_seed_too_long_for_python_to_read_is_a_track_error():
    with pytest.raises(TrackError, match="too many to read"):
        load_track("random:" + "7" * 5000)


def test_designs_whose_walls_would_overlap_are_refused():
    spiral = TrackDesign("tight", (Straight(20), Arc(8, 180), Straight(20)), width=20.0, closed=False)
    with pytest.raises(TrackError):
        build_track(spiral)
    crossing = TrackDesign("cross", (Straight(50), Arc(10, 270), Straight(50)), width=8.0, closed=False)
    with pytest.raises(TrackError, match="passes within"):
        build_track(crossing)


def test_open_track_walls_include_both_end_caps():
    track = load_track("hairpins")
    starts, ends = track.wall_segments()
    left, right = track.walls()
    caps = {tuple(np.round(s, 6)) + tuple(np.round(e, 6)) for s, e in zip(starts, ends, strict=True)}
    assert tuple(np.round(left[0], 6)) + tuple(np.round(right[0], 6)) in caps
    assert tuple(np.round(left[-1], 6)) + tuple(np.round(right[-1], 6)) in caps


def test_walls_are_half_the_width_from_the_centre_line():
    track = load_track("oval")
    left, right = track.walls()
    assert np.allclose(np.linalg.norm(left - right, axis=1), track.width, atol=0.05)


def test_locate_follows_the_car_from_a_hint():
    track = load_track("circuit")
    for index in (0, 100, 300, track.segment_count - 1):
        start = track.segment_starts[index] + track.directions[index] * 0.5 + track.normals[index] * 2.0
        segment, along, lateral = track.locate(float(start[0]), float(start[1]), max(index - 2, 0))
        assert segment == index
        assert along == pytest.approx(0.5) and lateral == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["monza", "random:²", "random:١٢", "HAIRPINS"])
def test_sim_config_refuses_a_track_it_could_not_load_when_read(name):
    from pydantic import ValidationError
    from tmrl_worker.sim import RaceTrackInterface, SimConfig

    with pytest.raises(ValidationError, match="track"):
        SimConfig(track=name)
    with pytest.raises(ValidationError, match="track"):  # the real-time env builds its track in the interface
        RaceTrackInterface({"track": name})


def test_the_fast_env_drives_a_custom_track_object_and_records_its_name():
    from tmrl_worker.sim import RaceTrackEnv

    design = TrackDesign("my_straight", (Straight(60),), width=10, closed=False)
    env = RaceTrackEnv(track=build_track(design), max_episode_steps=5)
    env.reset(seed=0)
    assert env.track.name == "my_straight" and env.config.track == "my_straight"


# track files ----------------------------------------------------------------------------------------------------
HAIRPINS_FILE = """width = 10.0
closed = false
pieces = [
  {straight = 110}, {radius = 9, degrees = -180}, {straight = 100}, {radius = 9, degrees = 180},
  {straight = 100}, {radius = 9, degrees = -180}, {straight = 70},
]
"""


def test_a_track_file_of_pieces_builds_the_same_track_as_the_same_built_in_design(tmp_path):
    path = tmp_path / "my-hairpins.toml"
    path.write_text(HAIRPINS_FILE)
    track = load_track(f"file:{path}")
    assert track.name == f"file:{path}" and not track.closed and track.width == 10.0
    np.testing.assert_array_equal(track.centre, load_track("hairpins").centre)


@pytest.mark.parametrize("closed", [True, False])
def test_a_track_file_of_points_is_a_smooth_line_through_them_sampled_every_metre(tmp_path, closed):
    points = [[0, 0], [100, 0], [150, 50], [100, 100], [0, 100], [-50, 50]]
    path = tmp_path / "points.toml"
    path.write_text(f"width = 12\nclosed = {str(closed).lower()}\ncentre = {points}\n")
    track = load_track(f"file:{path}")
    assert track.closed is closed
    gaps = [np.linalg.norm(track.centre - point, axis=1).min() for point in points]
    assert max(gaps) < 0.6  # it passes through every given point
    assert min_turn_radius(track.centre, closed) > 10  # rounded (16 m here), not the polygon's corners (about 2 m)
    spans = track.lengths if closed else track.lengths[:-1]  # an open line ends with what is left of a metre
    assert np.allclose(spans, 1.0, rtol=0.02)
    if not closed:
        np.testing.assert_allclose(track.centre[[0, -1]], [points[0], points[-1]], atol=1e-9)


def test_a_closed_track_file_may_repeat_its_first_point_at_the_end(tmp_path):
    points = [[0, 0], [100, 0], [150, 50], [100, 100], [0, 100], [-50, 50]]
    (tmp_path / "a.toml").write_text(f"width = 12\nclosed = true\ncentre = {points}\n")
    (tmp_path / "b.toml").write_text(f"width = 12\nclosed = true\ncentre = {[*points, points[0]]}\n")
    np.testing.assert_array_equal(load_track(f"file:{tmp_path / 'a.toml'}").centre,
                                  load_track(f"file:{tmp_path / 'b.toml'}").centre)


BAD_TRACK_FILES = [
    (None, "cannot read"),
    ("width = 10\nclosed = false\npieces = [{straight = 50}\n", "not a TOML file"),
    ("width = 10\nclosed = false\n", "bad.toml': give either pieces or centre"),
    ("width = 10\nclosed = false\npieces = [{straigth = 50}]\n", "pieces.0"),
    ("width = 10\nclosd = false\npieces = [{straight = 50}]\n", "closed: Field required; closd: unknown field (did you mean closed?)"),
    ("width = 10\nclosed = false\npieces = [{straight = 50}, {radius = 9, degrees = 0}]\n", "a bend must turn"),
    ("width = 10\nclosed = false\npieces = [{straight = 50}, {radius = 3, degrees = 90}, {straight = 50}]\n",
     "too tight for width"),
    ("width = 10\nclosed = true\npieces = [{straight = 50}, {radius = 20, degrees = 90}]\n", "must end at its start"),
    ("width = 10\nclosed = false\ncentre = [[0, 0], [50, 0], [50, 0], [100, 0]]\n", "the same point twice in a row"),
    ("width = 10\nclosed = false\ncentre = [[0, 0], [2000, 0], [4000, 0]]\n",
     "its points span 4000 m; a track file's track must fit in 1000 m x 1000 m"),
    # the tracks probe: these points fit, the curve through them does not, and the message said the points did not
    ("width = 10\nclosed = false\ncentre = [[0, 0], [999, 0], [999, 999]]\n",
     "the smooth line through its points (which swings out past them at sharp turns) span"),
    # the tracks probe: a 0.5 m track was refused with "centre line must have shape (N>=3, 2), got (2, 2)"
    ("width = 10\nclosed = false\npieces = [{straight = 0.5}]\n", "is too short: its centre line, sampled about every 1 m, "
     "has 2 point(s), where a track needs 3"),
    ("width = 10\nclosed = false\npieces = [" + ", ".join(["{straight = 1000}"] * 6) + "]\n",
     "a track file may describe at most 5000 m"),
    ("width = 10\nclosed = false\npieces = [{straight = 100}, {radius = 20, degrees = 270}, {straight = 100}]\n",
     "passes within"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TRACK_FILES,
                         ids=["missing", "not-toml", "no-shape", "bad-piece", "unknown-field", "bend-of-0-degrees",
                              "turn-too-tight", "closed-not-closing", "repeated-point", "too-large", "curve-too-large",
                              "too-short", "too-long", "walls-overlap"])
def test_a_bad_track_file_is_a_one_line_track_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TrackError) as caught:
        load_track(f"file:{path}")
    assert message in str(caught.value) and "\n" not in str(caught.value) and "bad.toml" in str(caught.value)


def test_a_track_file_is_read_when_the_sim_config_is_and_drives_like_a_built_in_track(tmp_path):
    from pydantic import ValidationError
    from tmrl_worker.sim import RaceTrackEnv, SimConfig
    from tmrl_worker.sim.track_pool import parse_episode_tracks

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(HAIRPINS_FILE)
    bad.write_text("width = 10\nclosed = false\npieces = [{straight = 50}, {radius = 3, degrees = 90}]\n")
    with pytest.raises(ValidationError, match="too tight for width"):
        SimConfig(track=f"file:{bad}")
    with pytest.raises(TrackError, match="too tight for width"):  # its own reason, not "is not a track"
        parse_episode_tracks(f"hairpins,file:{bad}")
    assert parse_episode_tracks(f"hairpins,file:{good}") == ("hairpins", f"file:{good}")
    env = RaceTrackEnv(track=f"file:{good}", max_episode_steps=5)
    observation, _ = env.reset(seed=0)
    assert env.track.name == f"file:{good}" and env.track.length == pytest.approx(load_track("hairpins").length)
    env.close()
