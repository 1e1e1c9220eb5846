"""Observation layouts, newest-frame extraction and SampleBatchBuilder; the documented row semantics hold on rtgym."""

from __future__ import annotations

import warnings
from collections import deque

import gymnasium
import numpy as np
import pytest
import rtgym
from gymnasium import spaces
from pydantic import ValidationError
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import (
    ObservationComponent,
    ObservationLayout,
    clipped_into_bounds,
    layout_for_box,
    newest_frames,
    tm20_image_layout,
    tm20_lidar_layout,
    tm20_lidar_progress_layout,
)
from tmrl_common.protocol import SampleBatch, decode, encode

from .wire_samples import SENDER, assert_same_message, lidar_observation


def test_tm20_layouts_have_the_tmrl_observation_shapes():
    assert tm20_lidar_layout().observation_shapes() == [(1,), (4, 19), (3,), (3,)]
    assert tm20_lidar_progress_layout().observation_shapes() == [(1,), (1,), (4, 19), (3,), (3,)]
    assert tm20_image_layout().observation_shapes() == [(1,), (4, 64, 64), (3,), (3,)]
    assert tm20_image_layout().components[1].dtype == "uint8"


def test_flat_size_counts_every_part_of_the_observation():
    assert tm20_lidar_layout().flat_size() == 1 + 4 * 19 + 3 + 3
    assert tm20_lidar_progress_layout(img_hist_len=1, act_buf_len=0).flat_size() == 1 + 1 + 19
    assert layout_for_box(3, 1).flat_size() == 3


def test_layout_for_box_is_one_component_without_history():
    layout = layout_for_box(observation_size=3, action_dim=1)
    assert [c.name for c in layout.components] == ["obs"]
    assert layout.observation_shapes() == [(3,)] and layout.action_history == 0


def test_layout_round_trips_through_json_like_data():
    layout = tm20_image_layout(height=8, width=16)
    assert ObservationLayout.model_validate(layout.model_dump()) == layout


@pytest.mark.parametrize("kwargs", [
    {"name": "Speed", "frame_shape": [1]},
    {"name": "speed\n", "frame_shape": [1]},
    {"name": "speed", "frame_shape": [0]},
    {"name": "speed", "frame_shape": []},
    {"name": "speed", "frame_shape": [1, 1, 1, 1, 1]},
    {"name": "speed", "frame_shape": [1], "dtype": "float64"},
    {"name": "speed", "frame_shape": [1], "history": 0},
    {"name": "speed", "frame_shape": [1], "history": 65},
    {"name": "speed", "frame_shape": ["1"]},
], ids=["upper", "newline", "zero-dim", "no-dims", "five-dims", "float64", "history-0", "history-65", "str-dim"])
def test_invalid_components_are_refused(kwargs):
    with pytest.raises(ValidationError):
        ObservationComponent(**kwargs)


def test_duplicate_component_names_are_refused():
    speed = ObservationComponent(name="speed", frame_shape=[1])
    with pytest.raises(ValidationError, match="unique"):
        ObservationLayout(components=[speed, speed], action_dim=3)


@pytest.mark.parametrize("kwargs", [{"action_dim": 0}, {"action_dim": 65}, {"action_dim": 3, "action_history": 17}])
def test_action_sizes_out_of_range_are_refused(kwargs):
    with pytest.raises(ValidationError):
        ObservationLayout(components=[ObservationComponent(name="speed", frame_shape=[1])], **kwargs)


def test_newest_frames_takes_the_last_history_entry_and_whole_plain_components():
    layout = tm20_lidar_layout()
    lidar = np.arange(4 * 19, dtype=np.float32).reshape(4, 19)
    frames = newest_frames(layout, (np.array([5.0]), lidar, np.zeros(3), np.ones(3)))
    assert set(frames) == {"speed", "lidar"}
    np.testing.assert_array_equal(frames["lidar"], lidar[-1])
    np.testing.assert_array_equal(frames["speed"], [5.0])
    assert frames["speed"].dtype == np.float32 and frames["lidar"].shape == (19,)


def test_newest_frames_converts_to_the_component_dtype():
    layout = tm20_image_layout(height=2, width=2)
    images = np.arange(16).reshape(4, 2, 2)
    frames = newest_frames(layout, ([1.0], images, [0, 0, 0], [0, 0, 0]))
    assert frames["image"].dtype == np.uint8
    np.testing.assert_array_equal(frames["image"], [[12, 13], [14, 15]])


def test_newest_frames_refuses_observations_that_do_not_fit_the_layout():
    layout = tm20_lidar_layout()
    good = (np.zeros(1), np.zeros((4, 19)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="parts"):
        newest_frames(layout, good[:3])
    with pytest.raises(ValueError, match="lidar"):
        newest_frames(layout, (np.zeros(1), np.zeros((3, 19)), np.zeros(3), np.zeros(3)))


def test_builder_rows_follow_the_documented_semantics():
    layout = tm20_lidar_layout()
    rng = np.random.default_rng(5)
    builder = SampleBatchBuilder(layout)
    reset_obs = lidar_observation(rng, layout)
    builder.add_reset(reset_obs)
    step_obs = lidar_observation(rng, layout)
    builder.add_step([0.5, -0.5, 1.0], step_obs, 2.5, True, False)
    assert len(builder) == 2
    batch = builder.build(seq=1, weights_version=9)
    assert len(builder) == 0
    assert (batch.seq, batch.weights_version, batch.steps) == (1, 9, 2)
    np.testing.assert_array_equal(batch.first.array, [True, False])
    np.testing.assert_array_equal(batch.actions.array, [[0, 0, 0], [0.5, -0.5, 1.0]])  # reset row: default action
    np.testing.assert_array_equal(batch.rewards.array, [0.0, 2.5])
    np.testing.assert_array_equal(batch.terminated.array, [False, True])
    np.testing.assert_array_equal(batch.truncated.array, [False, False])
    np.testing.assert_array_equal(batch.observations["lidar"].array, [reset_obs[1][-1], step_obs[1][-1]])
    np.testing.assert_array_equal(batch.observations["speed"].array, [reset_obs[0], step_obs[0]])
    batch.check_layout(layout)


def test_builder_uses_the_given_default_action_on_reset():
    layout = layout_for_box(2, 2)
    builder = SampleBatchBuilder(layout)
    builder.add_reset((np.zeros(2),), default_action=[0.25, -1.0])
    np.testing.assert_array_equal(builder.build(0, 0).actions.array, [[0.25, -1.0]])


def test_building_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="no rows"):
        SampleBatchBuilder(tm20_lidar_layout()).build(seq=0, weights_version=0)


@pytest.mark.parametrize("codec", ["raw", "zlib"])
def test_built_batches_round_trip_and_match_their_layout(codec):
    layout = tm20_image_layout(height=6, width=5)
    rng = np.random.default_rng(2)
    builder = SampleBatchBuilder(layout, codec=codec)
    for _episode in range(2):
        observation = (rng.uniform(size=1), rng.integers(0, 256, (4, 6, 5)), np.zeros(3), np.zeros(3))
        builder.add_reset(observation)
        for step in range(3):
            builder.add_step(rng.uniform(-1, 1, 3), observation, 1.0, step == 2, False)
    batch = builder.build(seq=4, weights_version=1)
    assert batch.observations["image"].codec == codec and batch.observations["image"].dtype == "uint8"
    _, received = decode(encode(batch, SENDER))
    assert_same_message(received, batch)
    received.check_layout(layout)
    np.testing.assert_array_equal(received.first.array, [True, False, False, False] * 2)


# ----------------------------------------------------------------------- the row semantics, checked on rtgym


def rebuild_observations(batch: SampleBatch, layout: ObservationLayout) -> list[tuple[np.ndarray, ...]]:
    """Full observations from the newest-frame rows, following docs/protocol.md "Row semantics" literally.

    For row t: a history component of length H stacks the frames of rows t-H+1 .. t, oldest first; the action
    buffer of length L lists the actions of rows t-L+1 .. t, oldest first. Rows before the episode's first row
    (the last row with first=True at or before t) are replaced by that first row.
    """
    first = batch.first.array
    rebuilt = []
    for t in range(batch.steps):
        start = max(i for i in range(t + 1) if first[i])

        def window(length: int, t: int = t, start: int = start) -> list[int]:
            return [max(i, start) for i in range(t - length + 1, t + 1)]

        parts = []
        for component in layout.components:
            frames = batch.observations[component.name].array
            parts.append(frames[t] if component.history == 1 else frames[window(component.history)])
        parts.extend(batch.actions.array[i] for i in window(layout.action_history))
        rebuilt.append(tuple(parts))
    return rebuilt


class ScriptedLidarInterface(rtgym.RealTimeGymInterface):
    """A tiny rtgym interface with a TrackMania-like LIDAR history: reset fills the history with its first scan."""

    def __init__(self, history: int = 4, beams: int = 5):
        self.history, self.beams = history, beams
        self.scans: deque = deque(maxlen=history)
        self.clock = 0

    def _scan(self):
        self.clock += 1
        return np.full(self.beams, self.clock, dtype=np.float32) + np.arange(self.beams, dtype=np.float32) / 10

    def get_observation_space(self):
        return spaces.Tuple((spaces.Box(0, np.inf, (1,)), spaces.Box(0, np.inf, (self.history, self.beams))))

    def get_action_space(self):
        return spaces.Box(-1.0, 1.0, (3,))

    def get_default_action(self):
        return np.zeros(3, dtype=np.float32)

    def send_control(self, control):
        pass

    def reset(self, seed=None, options=None):
        scan = self._scan()
        for _ in range(self.history):
            self.scans.append(scan)
        return [np.array([self.clock], dtype=np.float32), np.stack(self.scans)], {}

    def get_obs_rew_terminated_info(self):
        self.scans.append(self._scan())
        return [np.array([self.clock], dtype=np.float32), np.stack(self.scans)], float(self.clock), self.clock % 5 == 0, {}


def test_rebuilt_observations_equal_what_rtgym_returned_across_episode_boundaries():
    history, beams, act_buf_len = 4, 5, 2
    config = dict(rtgym.DEFAULT_CONFIG_DICT)
    config.update(interface=ScriptedLidarInterface, interface_kwargs={"history": history, "beams": beams},
                  time_step_duration=0.002, start_obs_capture=0.002, time_step_timeout_factor=50.0,
                  act_buf_len=act_buf_len, ep_max_length=7, wait_on_done=True)
    layout = ObservationLayout(
        components=[ObservationComponent(name="speed", frame_shape=[1]),
                    ObservationComponent(name="lidar", frame_shape=[beams], history=history)],
        action_dim=3, action_history=act_buf_len)
    assert layout.observation_shapes() == [(1,), (history, beams), (3,), (3,)]
    rng = np.random.default_rng(11)
    builder = SampleBatchBuilder(layout)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rtgym warns when a shared CI machine misses a 2 ms deadline
        env = gymnasium.make("real-time-gym-v1", config=config, disable_env_checker=True)
        try:
            for _ in range(3):
                observation, _ = env.reset()
                builder.add_reset(observation)
                seen.append(observation)
                done = False
                while not done:
                    action = rng.uniform(-1, 1, 3).astype(np.float32)
                    observation, reward, terminated, truncated, _ = env.step(action)
                    builder.add_step(action, observation, reward, terminated, truncated)
                    seen.append(observation)
                    done = terminated or truncated
        finally:
            env.unwrapped.wait()
            env.close()
    batch = builder.build(seq=0, weights_version=0)
    assert int(batch.first.array.sum()) == 3 and batch.steps == len(seen) > 6
    assert batch.terminated.array.any()
    for t, (rebuilt, original) in enumerate(zip(rebuild_observations(batch, layout), seen, strict=True)):
        assert len(rebuilt) == len(original) == 4, t
        for part_rebuilt, part_original in zip(rebuilt, original, strict=True):
            np.testing.assert_array_equal(part_rebuilt, np.asarray(part_original, dtype=np.float32), err_msg=f"row {t}")


def test_clipped_into_bounds_clips_only_parts_outside_their_declared_bounds():
    both = ObservationComponent(name="speed", frame_shape=[3], low=-1.0, high=1.0)
    assert clipped_into_bounds(both, np.array([-1.0, 0.0, 1.0], dtype=np.float32)) is None
    clipped = clipped_into_bounds(both, np.array([-3.0, 0.5, 2.0], dtype=np.float32))
    assert clipped.dtype == np.float32 and clipped.tolist() == [-1.0, 0.5, 1.0]
    above_only = ObservationComponent(name="lidar", frame_shape=[2], low=0.0)
    assert clipped_into_bounds(above_only, np.array([5e9, 1.0], dtype=np.float32)) is None
    assert clipped_into_bounds(above_only, np.array([-2.0, 1.0], dtype=np.float32)).tolist() == [0.0, 1.0]
    undeclared = ObservationComponent(name="obs", frame_shape=[1])
    assert clipped_into_bounds(undeclared, np.array([1e30], dtype=np.float32)) is None
    assert clipped_into_bounds(both, np.zeros(0, dtype=np.float32)) is None


def test_batch_steps_problem_says_the_largest_batch_that_builds_and_it_does():
    """An image probe's worker (3x256x256 frames, batch_steps 400: 78.6 MB) stopped a few seconds in on a traceback
    from the batch builder, losing its samples; compression does not help (the limits are on decoded sizes)."""
    from tmrl_common.batching import batch_steps_problem

    camera = ObservationLayout(components=[ObservationComponent(name="camera", frame_shape=[3, 256, 256],
                                                                dtype="uint8")], action_dim=2)
    problem = batch_steps_problem(camera, 400, compressed=True)
    assert problem == ("batch_steps = 400 would make batches of 78,649,200 bytes (196,623 per row of this env's "
                       "layout), its observations['camera'] array past the 67108864-byte limit of one array: set "
                       "batch_steps to at most 341")
    assert batch_steps_problem(camera, 341, compressed=True) is None
    assert "at most 340" in batch_steps_problem(camera, 341, compressed=False)  # the raw body's 64 MiB and its map
    assert batch_steps_problem(tm20_lidar_layout(), 100_000, compressed=False) is None

    frame = np.zeros((3, 256, 256), np.uint8)
    builder = SampleBatchBuilder(camera, codec="zlib")
    builder.add_reset((frame,))
    for _ in range(340):
        builder.add_step(np.zeros(2, np.float32), (frame,), 0.0, False, False)
    assert builder.build(seq=0, weights_version=0).steps == 341  # the largest it names builds
    builder.add_reset((frame,))
    for _ in range(341):
        builder.add_step(np.zeros(2, np.float32), (frame,), 0.0, False, False)
    with pytest.raises(ValueError, match="oversized"):  # one more row does not
        builder.build(seq=1, weights_version=0)
