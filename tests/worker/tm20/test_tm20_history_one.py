"""``img_hist_len = 1`` on TrackMania: the history axis goes, as the layout says (a component with history 1 has its
frame shape), checked through the real interfaces against the emulated game."""

from __future__ import annotations

import numpy as np
import pytest
from tmrl_common.layout import newest_frames
from tmrl_worker.envs import make_env

FAST_RECOVERY = {"first_retry_s": 0.2, "max_retry_s": 1.0, "probe_timeout_s": 0.5, "step_telemetry_timeout_s": 0.5}
GAS = np.array([1.0, 0.0, 0.0], np.float32)


def emulated_env_with_history_one(spec: str):
    options = {"emulated_game": {"port": 0, "countdown_s": 0.3}, "sleep_time_at_reset": 0.0,
               "recovery": FAST_RECOVERY, "img_hist_len": 1}
    return make_env(spec, max_episode_steps=10_000, options=options)


@pytest.mark.parametrize(("spec", "history_part", "frame_shape"),
                         [("tm20-lidar", 1, (19,)), ("tm20-lidar-progress", 2, (19,)), ("tm20-full", 3, (64, 64))])
def test_history_of_one_gives_frame_shaped_observations_that_match_layout_and_space(spec, history_part, frame_shape):
    handle = emulated_env_with_history_one(spec)
    try:
        interface_space = handle.env.unwrapped.interface.get_observation_space()
        assert interface_space.spaces[history_part].shape == frame_shape
        observation = handle.reset()
        for _ in range(5):
            observation, *_ = handle.step(GAS)
        assert [np.shape(part) for part in observation] == handle.layout.observation_shapes()
        assert np.shape(observation[history_part]) == frame_shape
        for part, space in zip(observation, interface_space.spaces, strict=False):  # the action buffer follows
            assert space.contains(np.asarray(part, dtype=space.dtype))
        assert newest_frames(handle.layout, observation)[handle.layout.components[history_part].name].shape == frame_shape
    finally:
        handle.close()

