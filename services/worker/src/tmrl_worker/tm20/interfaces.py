"""rtgym interfaces for TrackMania 2020, and the rtgym configuration that runs them.

Three observation spaces, each the tuple of :mod:`tmrl_common.layout` (rtgym appends the ``act_buf_len`` previous
actions itself):

* :class:`TM20LidarInterface` — ``(speed (1,), lidar (img_hist_len, beams))`` float32 (``tm20_lidar_layout``)
* :class:`TM20LidarProgressInterface` — ``(speed (1,), progress (1,), lidar (img_hist_len, beams))``
  (``tm20_lidar_progress_layout``); progress is the fraction of the reward path covered, in [0, 1]
* :class:`TM20FullInterface` — ``(speed (1,), image (img_hist_len, 64, 64) uint8)`` grayscale screenshots
  (``tm20_image_layout``)

Actions are ``[gas, brake, steer]`` in [-1, 1] (see :mod:`tmrl_worker.tm20.control`). The reward is
:class:`tmrl_worker.reward.TrajectoryReward` on the car position from telemetry; an episode also terminates when the
game reports the finish line (the finish bonus is paid once, even if the recorded path ends a little before or after).

Every device is injected: ``capture`` (:class:`~tmrl_worker.tm20.capture.FrameCapture`), ``telemetry``
(:class:`~tmrl_worker.tm20.openplanet.TelemetryClient`), ``controller``
(:class:`~tmrl_worker.tm20.control.Controller`), ``reward``. Left out, the real ones are built (game window
capture, plugin on ``telemetry_port``, gamepad on Windows / keyboard elsewhere, reward points from ``reward_path``).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import gymnasium
import numpy as np
from gymnasium import spaces
from rtgym import DEFAULT_CONFIG_DICT, RealTimeGymInterface
from tmrl_common.layout import ObservationLayout, tm20_image_layout, tm20_lidar_layout, tm20_lidar_progress_layout

from tmrl_worker.reward import RewardPathError, TrajectoryReward, TrajectoryRewardConfig
from tmrl_worker.tm20.capture import FrameCapture, downscale, make_capture, to_gray
from tmrl_worker.tm20.control import Controller, make_controller
from tmrl_worker.tm20.lidar import Lidar, LidarConfig
from tmrl_worker.tm20.openplanet import DEFAULT_PORT, TelemetryClient

Variant = Literal["lidar", "lidar-progress", "full"]
LIDAR_WINDOW_SIZE = (958, 488)
"""Client-area size (width, height) the game window gets for the LIDAR variants."""
FULL_WINDOW_SIZE = (256, 128)
"""Client-area size (width, height) for the image variant (frames are then reduced to 64x64 gray)."""
SPEED_LIMIT = 1000.0

_BOUNDS: dict[str, tuple[float, float]] = {
    "speed": (-SPEED_LIMIT, SPEED_LIMIT),
    "progress": (0.0, 1.0),
    "lidar": (0.0, np.inf),
    "image": (0, 255),
}


class TM20ConfigError(ValueError):
    """A TrackMania environment cannot be built from these settings."""


def observation_space_for(layout: ObservationLayout) -> spaces.Tuple:
    """The rtgym interface observation space of ``layout`` (without the action buffer)."""
    parts = []
    for component in layout.components:
        low, high = _BOUNDS.get(component.name, (-np.inf, np.inf))
        parts.append(spaces.Box(low=low, high=high, shape=component.observation_shape, dtype=np.dtype(component.dtype)))
    return spaces.Tuple(parts)


class TM20Interface(RealTimeGymInterface):
    """Shared logic of the TrackMania interfaces; subclasses say what a frame becomes and what the layout is."""

    window_size: tuple[int, int] = LIDAR_WINDOW_SIZE
    capture_color = "rgb"

    def __init__(self, *, capture: FrameCapture | None = None, telemetry: TelemetryClient | None = None,
                 controller: Controller | None = None, reward: TrajectoryReward | None = None,
                 reward_path: str | Path | None = None, reward_config: TrajectoryRewardConfig | None = None,
                 img_hist_len: int = 4, act_buf_len: int = 2, lidar: LidarConfig | dict[str, Any] | None = None,
                 telemetry_port: int = DEFAULT_PORT, telemetry_timeout: float = 5.0,
                 window_title: str = "Trackmania", capture_backend: str = "auto", controller_kind: str = "auto",
                 sleep_time_at_reset: float = 1.5) -> None:
        if reward is None:
            if reward_path is None:
                raise TM20ConfigError("a TrackMania environment needs reward points: pass reward_path (record them "
                                      "with `tmrl-worker record-reward --output points.safetensors`) or reward=")
            try:
                reward = TrajectoryReward.from_file(reward_path, reward_config)
            except RewardPathError as exc:
                raise TM20ConfigError(str(exc)) from exc
        self.reward = reward
        self.img_hist_len = img_hist_len
        self.act_buf_len = act_buf_len
        self.sleep_time_at_reset = sleep_time_at_reset
        # From a TOML config the LIDAR settings arrive as a table: validate them into a LidarConfig.
        self.lidar = Lidar(LidarConfig.model_validate(lidar) if isinstance(lidar, dict) else lidar)
        self.layout = self._make_layout()
        built: list[Any] = []  # devices built here are closed again if a later one fails
        try:
            if telemetry is None:
                telemetry = TelemetryClient(telemetry_port, timeout=telemetry_timeout)
                built.append(telemetry)
            if controller is None:
                controller = make_controller(controller_kind)  # type: ignore[arg-type]
                built.append(controller)
            if capture is None:
                capture = make_capture(capture_backend, self.capture_color, window_title,  # type: ignore[arg-type]
                                       window_size=self.window_size)
        except BaseException:
            for device in reversed(built):
                device.close()
            raise
        self.telemetry, self.controller, self.capture = telemetry, controller, capture
        self.history: deque[np.ndarray] = deque(maxlen=img_hist_len)
        self.last_frame: np.ndarray | None = None
        self.last_telemetry = None
        self._default_action = np.zeros(3, dtype=np.float32)

    # what subclasses define ------------------------------------------------------------------------------------
    def _make_layout(self) -> ObservationLayout:
        raise NotImplementedError

    def frame_feature(self, frame: np.ndarray) -> np.ndarray:
        """What one screenshot contributes to the history (a LIDAR scan, a small gray image)."""
        raise NotImplementedError

    def _observation(self) -> list[np.ndarray]:
        speed = np.array([np.clip(self.last_telemetry.speed, -SPEED_LIMIT, SPEED_LIMIT)], dtype=np.float32)
        return [speed, np.stack(self.history)]

    # rtgym contract --------------------------------------------------------------------------------------------
    def get_observation_space(self) -> spaces.Tuple:
        return observation_space_for(self.layout)

    def get_action_space(self) -> spaces.Box:
        return spaces.Box(low=-1.0, high=1.0, shape=(3,), dtype=np.float32)

    def get_default_action(self) -> np.ndarray:
        return self._default_action.copy()

    def send_control(self, control: np.ndarray | None) -> None:
        if control is not None:
            self.controller.apply(control)

    def _capture(self) -> None:
        self.last_frame = self.capture.grab()
        self.last_telemetry = self.telemetry.latest()
        self.history.append(self.frame_feature(self.last_frame))

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[list[np.ndarray], dict]:
        self.controller.apply(self._default_action)
        self.controller.respawn()
        if self.sleep_time_at_reset > 0:
            time.sleep(self.sleep_time_at_reset)
        self.reward.reset()
        self.history.clear()
        self._capture()
        while len(self.history) < self.img_hist_len:  # an episode starts with its first frame repeated
            self.history.append(self.history[-1])
        return self._observation(), {}

    def get_obs_rew_terminated_info(self) -> tuple[list[np.ndarray], float, bool, dict[str, Any]]:
        self._capture()
        reward, terminated, info = self.reward.compute(self.last_telemetry.position)
        info["finished_by_game"] = self.last_telemetry.finished
        if self.last_telemetry.finished and not self.reward.finished:
            self.reward.finished = True
            reward += self.reward.config.finish_bonus
            terminated = True
        return self._observation(), reward, terminated, info

    def wait(self) -> None:
        """Between episodes: let go of the controls and respawn, so the car waits at the start."""
        self.controller.release()
        self.controller.respawn()

    def render(self) -> np.ndarray | None:
        return self.last_frame

    def close(self) -> None:
        self.controller.close()
        self.telemetry.close()
        self.capture.close()


class TM20LidarInterface(TM20Interface):
    """LIDAR history + speed (``tm20_lidar_layout``)."""

    def _make_layout(self) -> ObservationLayout:
        return tm20_lidar_layout(self.img_hist_len, self.lidar.beams, self.act_buf_len)

    def frame_feature(self, frame: np.ndarray) -> np.ndarray:
        return self.lidar.measure(frame)

    def render(self) -> np.ndarray | None:
        return None if self.last_frame is None else self.lidar.draw(self.last_frame)


class TM20LidarProgressInterface(TM20LidarInterface):
    """LIDAR history + speed + progress along the reward path (``tm20_lidar_progress_layout``)."""

    def _make_layout(self) -> ObservationLayout:
        return tm20_lidar_progress_layout(self.img_hist_len, self.lidar.beams, self.act_buf_len)

    def _observation(self) -> list[np.ndarray]:
        speed, lidar = super()._observation()
        return [speed, np.array([self.reward.progress], dtype=np.float32), lidar]


class TM20FullInterface(TM20Interface):
    """Grayscale screenshot history + speed (``tm20_image_layout``)."""

    window_size = FULL_WINDOW_SIZE
    capture_color = "gray"

    def __init__(self, *, image_height: int = 64, image_width: int = 64, **kwargs: Any) -> None:
        self.image_height, self.image_width = image_height, image_width
        super().__init__(**kwargs)

    def _make_layout(self) -> ObservationLayout:
        return tm20_image_layout(self.img_hist_len, self.image_height, self.image_width, self.act_buf_len)

    def frame_feature(self, frame: np.ndarray) -> np.ndarray:
        return downscale(to_gray(frame), self.image_height, self.image_width)


INTERFACES: dict[str, type[TM20Interface]] = {
    "lidar": TM20LidarInterface,
    "lidar-progress": TM20LidarProgressInterface,
    "full": TM20FullInterface,
}


def interface_class(variant: str) -> type[TM20Interface]:
    """The interface for ``lidar``, ``lidar-progress`` or ``full`` (a ``tm20-`` prefix is accepted)."""
    name = variant.removeprefix("tm20-")
    if name not in INTERFACES:
        raise TM20ConfigError(f"unknown TrackMania variant {variant!r}: use one of {sorted(INTERFACES)}")
    return INTERFACES[name]


def tm20_rtgym_config(variant: str = "lidar", *, time_step_duration: float = 0.05, start_obs_capture: float | None = None,
                      time_step_timeout_factor: float = 1.0, act_buf_len: int = 2, ep_max_length: int = 1000,
                      benchmark: bool = False, wait_on_done: bool = True, **interface_kwargs: Any) -> dict[str, Any]:
    """The rtgym config dict of a TrackMania environment (20 Hz, observation captured 40 ms into each step).

    ``start_obs_capture`` defaults to 80 % of ``time_step_duration`` (0.04 s at 20 Hz).

    ``interface_kwargs`` go to the interface (``capture``, ``telemetry``, ``controller``, ``reward`` or
    ``reward_path``, ``img_hist_len``, ``lidar``, ``telemetry_port``, ``sleep_time_at_reset``, ...).
    """
    if start_obs_capture is None:
        start_obs_capture = round(0.8 * time_step_duration, 6)
    config = dict(DEFAULT_CONFIG_DICT)
    config.update({
        "interface": interface_class(variant),
        "interface_args": (),
        "interface_kwargs": {**interface_kwargs, "act_buf_len": act_buf_len},
        "time_step_duration": time_step_duration,
        "start_obs_capture": start_obs_capture,
        "time_step_timeout_factor": time_step_timeout_factor,
        "ep_max_length": ep_max_length,
        "act_in_obs": True,
        "act_buf_len": act_buf_len,
        "reset_act_buf": True,
        "benchmark": benchmark,
        "wait_on_done": wait_on_done,
    })
    return config


def make_tm20_env(variant: str = "lidar", **kwargs: Any) -> gymnasium.Env:
    """A ready TrackMania rtgym environment: ``gymnasium.make("real-time-gym-v1", config=tm20_rtgym_config(...))``.

    The interface is ``env.unwrapped.interface`` (its ``layout`` is the wire layout for this env).
    """
    return gymnasium.make("real-time-gym-v1", config=tm20_rtgym_config(variant, **kwargs), disable_env_checker=True)
