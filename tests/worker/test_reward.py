"""TrackMania trajectory reward: resampling, points passed per step, countdown, finish, storage without pickle."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from tmrl_worker.reward import (
    MIN_PATH_LENGTH,
    RewardPathError,
    TrajectoryReward,
    TrajectoryRewardConfig,
    load_points,
    path_length,
    resample_path,
    save_points,
)


def straight(length: float = 10.0, spacing: float = 0.5, **config) -> TrajectoryReward:
    return TrajectoryReward.from_path([[0.0, 0.0], [length, 0.0]], spacing, TrajectoryRewardConfig(**config))


def test_resample_spaces_points_equally_along_the_path_and_keeps_both_ends():
    path = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 4.2, 0.0]])  # 7.2 long, with a corner
    points = resample_path(path, 0.5)
    gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    assert points.dtype == np.float32 and points.shape[1] == 3
    np.testing.assert_allclose(points[0], path[0])
    np.testing.assert_allclose(points[-1], path[-1], atol=1e-6)
    assert len(points) == 16  # 0, 0.5, ..., 7.0 and the end at 7.2
    # points lie on the path: the gap across the corner is a chord, every other gap is the spacing
    assert np.allclose(np.delete(gaps, [5, 14]), 0.5, atol=1e-5)
    assert gaps[-1] == pytest.approx(0.2, abs=1e-5)
    assert path_length(path) == pytest.approx(7.2)


def test_resample_ignores_repeated_positions_of_a_standing_car():
    path = [[0, 0], [0, 0], [0, 0], [2, 0], [2, 0]]
    points = resample_path(path, 0.5)
    np.testing.assert_allclose(points[:, 0], [0, 0.5, 1.0, 1.5, 2.0])


@pytest.mark.parametrize(
    "path, spacing",
    [([[0, 0]], 0.5), ([[0, 0], [0, 0]], 0.5), ([[0, 0], [1, 1]], 0.0), ([[0, 0], [np.nan, 1]], 0.5), ([0, 1, 2], 0.5)],
)
def test_resample_rejects_unusable_paths_with_a_clear_error(path, spacing):
    with pytest.raises(RewardPathError):
        resample_path(path, spacing)


def test_reward_counts_points_passed_since_last_step():
    reward = straight()  # points every 0.5 m on x in [0, 10]
    assert reward.compute([1.0, 0.1])[0] == 2.0
    assert reward.compute([1.0, 0.0])[0] == 0.0
    value, terminated, info = reward.compute([3.6, 0.3])
    assert value == 5.0 and not terminated
    assert info["path_index"] == 7 and info["progress"] == pytest.approx(7 / 20)


def test_moving_backwards_pays_zero_not_a_negative_reward():
    reward = straight()
    reward.compute([5.0, 0.0])
    value, terminated, info = reward.compute([4.0, 0.0])
    assert value == 0.0 and not terminated
    assert info["path_index"] == 10


def test_no_progress_countdown_terminates_after_the_grace_period():
    reward = straight(no_progress_steps=3, grace_steps=5)
    outcomes = [reward.compute([0.0, 0.0])[1] for _ in range(7)]
    assert outcomes == [False] * 7  # 5 grace steps, then 2 steps without progress
    assert reward.compute([0.0, 0.0])[1] is True


def test_progress_resets_the_no_progress_countdown():
    reward = straight(no_progress_steps=2, grace_steps=0)
    assert reward.compute([0.0, 0.0])[1] is False
    assert reward.compute([0.6, 0.0])[2]["no_progress_steps"] == 0
    assert reward.compute([0.6, 0.0])[1] is False
    assert reward.compute([0.6, 0.0])[1] is True


def test_reaching_the_last_point_terminates_with_the_finish_bonus_once():
    reward = straight(length=2.0, finish_bonus=50.0, grace_steps=0, no_progress_steps=100)
    value, terminated, info = reward.compute([2.1, 0.0])
    assert value == 4.0 + 50.0 and terminated and info["finished"]
    value, _, _ = reward.compute([2.1, 0.0])
    assert value == 0.0


def test_search_is_bounded_to_a_window_ahead():
    reward = straight(length=100.0, search_window=10)
    value, _, info = reward.compute([50.0, 0.0])  # far ahead: only 10 points are looked at
    assert value == 10.0 and info["path_index"] == 10


def test_search_does_not_jump_to_the_other_side_of_a_hairpin():
    # out 10 m along y=0, U-turn, back along y=2: the return leg passes close to the car's start region
    out = np.stack([np.linspace(0, 10, 21), np.zeros(21)], axis=1)
    back = np.stack([np.linspace(10, 0, 21), np.full(21, 2.0)], axis=1)
    points = resample_path(np.concatenate([out, back]), 0.5)
    reward = TrajectoryReward(points, TrajectoryRewardConfig(search_window=len(points), patience=5))
    value, _, info = reward.compute([2.0, 0.9])  # nearer to the outbound leg's x=2 than to the return leg
    assert info["path_index"] == 4 and value == 4.0
    reward.reset()
    _, _, info = reward.compute([2.0, 1.1])  # nearer to the return leg, but patience stops the search first
    assert info["path_index"] == 4
    greedy = TrajectoryReward(points, TrajectoryRewardConfig(search_window=len(points), patience=len(points)))
    assert greedy.compute([2.0, 1.1])[2]["path_index"] > 21  # without patience it would skip the hairpin


def test_step_penalty_and_reward_per_point_scale_the_reward():
    reward = straight(reward_per_point=0.1, step_penalty=0.05)
    assert reward.compute([1.0, 0.0])[0] == pytest.approx(0.2 - 0.05)


def test_straying_too_far_terminates_when_enabled():
    reward = straight(max_stray=3.0)
    value, terminated, info = reward.compute([0.0, 5.0])
    assert terminated and info["strayed"]


def test_the_straying_step_pays_nothing_for_the_points_nearest_to_the_car():
    reward = straight(length=100.0, max_stray=3.0)
    value, terminated, info = reward.compute([40.0, 10.0])  # 10 m beside the path, 40 m down it
    assert terminated and info["strayed"] and value == 0.0
    assert info["points_passed"] == 0 and reward.index == 0


def test_repeated_reward_points_are_refused_since_they_would_pay_a_standing_car():
    with pytest.raises(RewardPathError, match=r"points 1 and 2 are the same point.*record-reward"):
        TrajectoryReward([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    with pytest.raises(RewardPathError, match=r"points 0 and 1 are the same point"):
        TrajectoryReward(np.zeros((5, 3)))


def test_reset_starts_again_at_the_first_point():
    reward = straight()
    reward.compute([5.0, 0.0])
    reward.reset()
    assert reward.index == 0 and reward.compute([1.0, 0.0])[0] == 2.0


def test_points_round_trip_through_safetensors_file(tmp_path):
    points = resample_path([[0, 0, 0], [4, 3, 1]], 0.5)
    save_points(tmp_path / "reward.safetensors", points, spacing=0.5)
    loaded = load_points(tmp_path / "reward.safetensors")
    np.testing.assert_array_equal(loaded, points)
    reward = TrajectoryReward.from_file(tmp_path / "reward.safetensors")
    assert reward.points.shape == points.shape


def test_plain_npy_points_load_but_pickled_files_are_refused(tmp_path):
    points = resample_path([[0, 0], [3, 0]], 0.5)
    np.save(tmp_path / "plain.npy", points)
    np.testing.assert_array_equal(load_points(tmp_path / "plain.npy"), points)
    np.save(tmp_path / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RewardPathError, match="pickle"):
        load_points(tmp_path / "pickled.npy")


def test_corrupt_or_missing_points_files_raise_reward_path_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RewardPathError, match="not a reward points file"):
        load_points(tmp_path / "junk.safetensors")
    with pytest.raises(RewardPathError, match="does not exist"):
        load_points(tmp_path / "missing.safetensors")


def test_position_dimension_must_match_the_points():
    with pytest.raises(RewardPathError, match="coordinates"):
        straight().compute([1.0, 2.0, 3.0])


@settings(max_examples=60, deadline=None)
@given(
    steps=arrays(np.float64, st.tuples(st.integers(1, 12), st.just(2)), elements=st.floats(-20, 20)),
    spacing=st.floats(0.1, 3.0),
)
def test_resampled_points_lie_on_the_path_spacing_apart(steps, spacing):
    path = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, axis=0)])
    if path_length(path) < MIN_PATH_LENGTH:
        with pytest.raises(RewardPathError):
            resample_path(path, spacing)
        return
    points = resample_path(path, spacing).astype(np.float64)
    np.testing.assert_allclose(points[0], path[0], atol=1e-4)
    np.testing.assert_allclose(points[-1], path[-1], atol=1e-3)
    gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    assert (gaps <= spacing + 1e-3).all()  # a chord is never longer than the arc between two points
    assert len(points) == int(np.ceil(path_length(path) / spacing - 1e-6)) + 1


def test_a_path_that_barely_moves_is_rejected_as_standing_still():
    with pytest.raises(RewardPathError, match="never moves"):
        resample_path([[0.0, 0.0], [5.96e-8, 5.96e-8]], 1.0)
