"""rtgym interfaces for TrackMania 2020, and the rtgym configuration that runs them.

Three observation spaces, each the tuple of :mod:`tmrl_common.layout` (rtgym appends the ``act_buf_len`` previous
actions itself):

* :class:`TM20LidarInterface` — ``(speed (1,), lidar (img_hist_len, beams))`` float32 (``tm20_pixel_lidar_layout``:
  the networks scale the pixel distances by ``TM20_LIDAR_SCALE``)
* :class:`TM20LidarProgressInterface` — ``(speed (1,), progress (1,), lidar (img_hist_len, beams))``
  (``tm20_pixel_lidar_progress_layout``); progress is the fraction of the reward path covered, in [0, 1]
* :class:`TM20FullInterface` — ``(speed (1,), gear (1,), rpm (1,), image (img_hist_len, 64, 64) uint8)``:
  grayscale screenshots plus the engine state from telemetry, as upstream tmrl's full env (``tm20_full_layout``)

With ``img_hist_len = 1`` the LIDAR or image has no history axis (``(beams,)``, ``(64, 64)``), as the layout's
component with history 1 has its frame shape. The layout is known from the settings alone
(:meth:`TM20Interface.layout_for`: ``tmrl-worker layout`` prints it on any OS, without the game).

Telemetry values enter the observation inside the observation space's bounds: speed in ``[-SPEED_LIMIT,
SPEED_LIMIT]``, gear in :data:`GEAR_BOUNDS`, rpm in :data:`RPM_BOUNDS`. A finite value outside them (a plugin that
misreports) is clipped into them, counted in :attr:`TM20Interface.clipped` and logged the first time for each field,
so that no batch is refused by the trainer (which holds gear and rpm to its ``max_abs_observation``) nor trains on
nonsense; a packet holding NaN or infinity never gets here (the telemetry reader drops it as garbage).

Actions are ``[gas, brake, steer]`` in [-1, 1] (see :mod:`tmrl_worker.tm20.control`). The reward is
:class:`tmrl_worker.reward.TrajectoryReward` on the car position from telemetry; an episode also terminates when the
game reports the finish line (the finish bonus is paid once, even if the recorded path ends a little before or after).

Every device is injected: ``capture`` (:class:`~tmrl_worker.tm20.capture.FrameCapture`), ``telemetry``
(:class:`~tmrl_worker.tm20.openplanet.TelemetryClient`), ``controller``
(:class:`~tmrl_worker.tm20.control.Controller`), ``reward``. Left out, the real ones are built (game window
capture, plugin on ``telemetry_port``, gamepad on Windows / keyboard elsewhere, reward points from ``reward_path``).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import gymnasium
import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from rtgym import DEFAULT_CONFIG_DICT, RealTimeGymInterface
from tmrl_common.config import MAX_DURATION_S, did_you_mean, validation_problems
from tmrl_common.layout import (
    ObservationLayout,
    tm20_full_layout,
    tm20_pixel_lidar_layout,
    tm20_pixel_lidar_progress_layout,
)

from tmrl_worker.envs import TRUNCATED_REASON, EnvFailure, EnvInterrupted
from tmrl_worker.reward import RewardPathError, TrajectoryReward, TrajectoryRewardConfig
from tmrl_worker.tm20.capture import (
    CaptureError,
    FrameCapture,
    check_capture_backend,
    downscale,
    make_capture,
    to_gray,
)
from tmrl_worker.tm20.control import ControlError, Controller, check_controller_kind, make_controller
from tmrl_worker.tm20.lidar import Lidar, LidarConfig, LidarError
from tmrl_worker.tm20.openplanet import DEFAULT_PORT, Telemetry, TelemetryClient, TelemetryError, position_jump
from tmrl_worker.tm20.stale_frames import StaleFrameConfig, StaleFrameDetector, StaleFrameError
from tmrl_worker.tm20.window import GameWindow, WindowNotFoundError, find_game_window

log = logging.getLogger(__name__)

Variant = Literal["lidar", "lidar-progress", "full"]
LIDAR_WINDOW_SIZE = (958, 488)
"""Client-area size (width, height) the game window gets for the LIDAR variants."""
FULL_WINDOW_SIZE = (256, 128)
"""Client-area size (width, height) for the image variant (frames are then reduced to 64x64 gray)."""
SPEED_LIMIT = 1000.0
GEAR_BOUNDS = (0.0, 10.0)
"""The gears a car reports (the game's ``EngineCurGear``, an unsigned count of a handful of gears), with room to spare:
the networks scale gear by 0.1 (``tm20_full_layout``), so the bounds give inputs in [0, 1]."""
RPM_BOUNDS = (0.0, 20_000.0)
"""Engine rpm (the game's ``EngineRpm``, up to about 11 000), with room to spare; scaled by 1e-4 in the networks."""

_BOUNDS: dict[str, tuple[float, float]] = {
    "speed": (-SPEED_LIMIT, SPEED_LIMIT),
    "progress": (0.0, 1.0),
    "gear": GEAR_BOUNDS,
    "rpm": RPM_BOUNDS,
    "lidar": (0.0, np.inf),
    "image": (0, 255),
}


class TM20ConfigError(ValueError):
    """A TrackMania environment cannot be built from these settings."""


class RaceRestartError(EnvFailure):
    """After a respawn, telemetry never showed the race restarted (the game paused in a menu, the respawn control not
    bound, a pop-up that stays open). :meth:`TM20Interface.reset` retries it, under ``recovery.give_up_after_s``."""


class RaceRestartedError(TelemetryError):
    """Mid-episode, telemetry shows a new run (the distance driven went back): the race was restarted outside the
    worker (by hand, by the game, by a plugin reload), so the episode ends before it mixes two runs."""


class PositionJumpError(TelemetryError):
    """Mid-episode, the car's position moved further between two steps than it drove and than its speed allows (a
    respawn at a checkpoint, a teleport, a plugin sending a wrong position): the trajectory reward would pay the jump
    as progress (up to its whole search window at every step until the car caught up), so the episode ends."""


BLIND_SCANS = 40
"""LIDAR scans in a row (2 s at 20 Hz) that met no border, or met one at every beam's first sample, before the worker
warns that the picture is not the track (:meth:`TM20LidarInterface._check_feature`)."""
BLIND_WARNING_EVERY_S = 60.0
DARK_SCREEN_SHARE = 0.9
"""The share of a frame's pixels that must read as border for beams all at 0 to count as a dark screen."""

SIZE_CHECKS_BEFORE_ADOPTING = 3
"""The game probe's checks in a row that must see one new frame size before it is measured at (a window resized for
good, or a first frame taken at a transient size); episodes never mix sizes."""

RUN_DISTANCE_SLACK_M = 1.0
"""Within a run the distance driven never decreases; a packet more than this below the previous one is a new run."""


class TM20GameLostError(EnvFailure):
    """The game (plugin or window) did not come back within ``recovery.give_up_after_s``."""


class RewardPathMismatchError(EnvFailure):
    """The restarted car is far from the reward path's first point: the points were recorded on another map or from
    another start, and would pay for nothing."""


DEVICE_ERRORS = (TelemetryError, CaptureError, WindowNotFoundError, LidarError)
"""What the game's devices raise when the plugin, the window or a frame goes away or goes wrong: each ends the
episode (truncated) instead of escaping rtgym's observation thread."""


def _fault_kind(exc: BaseException) -> str:
    kinds = ((RaceRestartedError, "restarted"), (PositionJumpError, "jumped"), (TelemetryError, "telemetry"),
             (StaleFrameError, "stale"), (CaptureError, "capture"),
             (WindowNotFoundError, "window"), (LidarError, "frame"))
    return next((name for cls, name in kinds if isinstance(exc, cls)), "unexpected")


class RecoveryConfig(BaseModel):
    """How a TrackMania interface notices a lost game, waits for it, and restarts the race (``env_options.recovery``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    step_telemetry_timeout_s: float = Field(default=1.0, gt=0, le=MAX_DURATION_S)
    """During a step, a newest packet older than this ends the episode as truncated (the step does not wait for a
    fresh one: it would hold rtgym's clock)."""
    probe_timeout_s: float = Field(default=1.0, gt=0, le=MAX_DURATION_S)
    """While waiting for the game, how long one attempt waits for a fresh packet."""
    first_retry_s: float = Field(default=0.5, gt=0, le=MAX_DURATION_S)
    """Delay after the first failed attempt; it doubles after each one, up to ``max_retry_s``."""
    max_retry_s: float = Field(default=8.0, gt=0, le=MAX_DURATION_S)
    give_up_after_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    """Raise :class:`TM20GameLostError` after waiting this long for a lost game, or :class:`RaceRestartError` after
    failing to restart the race this long (None: wait and retry for ever, logging why)."""
    restart_timeout_s: float = Field(default=10.0, gt=0, le=MAX_DURATION_S)
    """After the respawn, how long telemetry may take to show the race restarted before the attempt counts as failed
    (logged; the respawn is tried again)."""
    restart_distance_m: float = Field(default=1.0, ge=0)
    """The race counts as restarted when a packet read after the respawn has ``distance`` within this of 0."""
    start_tolerance_m: float | None = Field(default=20.0, gt=0)
    """After each restart the car must be within this of the reward path's first point (None: not checked); further
    away, :class:`RewardPathMismatchError` stops the worker (points recorded on another map or from another start)."""
    popup_delay_s: float = Field(default=0.5, ge=0, le=MAX_DURATION_S)
    """After a finish, wait this long after the respawn before closing the end-of-race pop-up (as upstream does)."""
    focus_window: bool = True
    """Bring the game window to the front when the env starts and at every reset."""


Model = TypeVar("Model", bound=BaseModel)


def validated_settings(model: type[Model], value: Model | dict[str, Any] | None, name: str) -> Model:
    """``value`` as a ``model``: a TOML table is validated (a bad field raises :class:`TM20ConfigError`, one line
    naming it: ``env_options.recovery.first_retry_s = -1: ...``, or an unknown one with the closest known name)."""
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if not isinstance(value, Mapping):
        raise TM20ConfigError(f"env_options.{name} must be a table of {model.__name__} settings, not "
                              f"{type(value).__name__} {value!r}")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise TM20ConfigError(validation_problems(model, exc, f"env_options.{name}")) from exc


def _setting_tables() -> dict[str, type[BaseModel]]:
    from tmrl_worker.tm20.emulated_game import EmulatedGameConfig

    return {"recovery": RecoveryConfig, "stale_frames": StaleFrameConfig, "lidar": LidarConfig,
            "reward_config": TrajectoryRewardConfig, "emulated_game": EmulatedGameConfig}


WORKER_SET_OPTIONS = {"time_step_duration": "worker.time_step_duration", "ep_max_length": "worker.max_episode_steps"}
EMULATED_GAME_DEVICE_OPTIONS = {
    "telemetry_port": "set emulated_game.port (the emulated plugin listens there and the worker connects to it)",
    "window_title": "set emulated_game.window_title",
    "window_pid": "the emulated window has no process",
    "window_position": "the emulated window is placed by the worker",
    "capture_backend": "the emulated game renders its frames, nothing is captured from the screen",
    "capture_output": "the emulated game renders its frames, nothing is captured from the screen",
    "controller_kind": "the emulated game is driven through its own controller",
}
"""``env_options`` that name the real game's devices, which ``emulated_game`` replaces: with it they would be ignored
(``telemetry_port`` worse: the worker would connect to another port than the emulated plugin's), so they are refused."""
SCALAR_OPTIONS: dict[str, Any] = {
    "telemetry_port": Annotated[int, Field(ge=1, le=65535)],
    "telemetry_timeout": Annotated[float, Field(gt=0)],
    "sleep_time_at_reset": Annotated[float, Field(ge=0)],
    "start_obs_capture": Annotated[float, Field(ge=0)],
    "time_step_timeout_factor": Annotated[float, Field(gt=0)],
    "img_hist_len": Annotated[int, Field(ge=1)],
    "act_buf_len": Annotated[int, Field(ge=1)],
    "image_height": Annotated[int, Field(ge=1)],
    "image_width": Annotated[int, Field(ge=1)],
    "window_title": str,
    "window_pid": Annotated[int, Field(ge=1)] | None,
    "window_position": tuple[int, int],
    "wait_on_done": bool,
    "allow_non_windows": bool,
}
"""The plain (non-table) ``env_options`` a worker config may set, with their types and ranges: checked as the config
is read (:func:`check_options`), so a port of 70000 or a reset sleep of ``"long"`` is one line at start, not a wait
for ever or a traceback at the first reset."""
"""rtgym settings of a TrackMania env that come from the worker's own config, not from ``env_options``."""


def option_names(variant: str) -> set[str]:
    """Every ``env_options`` key a TrackMania env of ``variant`` takes: its interface's keyword arguments (the
    subclass's and :class:`TM20Interface`'s), :func:`tm20_rtgym_config`'s rtgym settings (but those the worker's own
    config sets, :data:`WORKER_SET_OPTIONS`), and the worker's ``emulated_game`` and ``allow_non_windows``."""
    names = {"emulated_game", "allow_non_windows"}
    for cls in interface_class(variant).__mro__:
        if "__init__" in vars(cls) and issubclass(cls, TM20Interface):
            names.update(name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                         if name != "self" and parameter.kind is inspect.Parameter.KEYWORD_ONLY)
    names.update(name for name, parameter in inspect.signature(tm20_rtgym_config).parameters.items()
                 if parameter.kind is inspect.Parameter.KEYWORD_ONLY)
    return names - set(WORKER_SET_OPTIONS)


def check_options(variant: str, options: Mapping[str, Any], prefix: str = "env_options.",
                  time_step_duration: float | None = None) -> None:
    """Raise :class:`TM20ConfigError` (one line) unless ``options`` can configure a TrackMania env of ``variant``:
    every key is one it takes (an unknown one is named with the closest known one), the settings tables
    (``recovery``, ``stale_frames``, ``lidar``, ``reward_config``, ``emulated_game``) validate, none of the real
    game's devices is set beside ``emulated_game`` (:data:`EMULATED_GAME_DEVICE_OPTIONS`), and the device names
    are known (:func:`check_device_names`). From the settings alone, nothing started: the worker runs it as its config
    is read, so that a typo is reported before the plugin, the game window or the relay is reached. Given the step
    (``time_step_duration``), a ``start_obs_capture`` past its end is refused too: rtgym would take each screenshot
    in the next step, and every step would overrun."""
    known = option_names(variant)
    for name in options:
        if name in WORKER_SET_OPTIONS:
            raise TM20ConfigError(f"{prefix}{name} is not an env option: set {WORKER_SET_OPTIONS[name]}")
        if name not in known:
            raise TM20ConfigError(f"{prefix}{name}: unknown option for env tm20-{variant.removeprefix('tm20-')}"
                                  f"{did_you_mean(name, known)}")
    for name, model in _setting_tables().items():
        if options.get(name) is not None:
            validated_settings(model, options[name], name)
    for name, kind in SCALAR_OPTIONS.items():
        if name in options:
            try:
                TypeAdapter(kind).validate_python(options[name])
            except ValidationError as exc:
                problem = "two integers, [x, y]" if name == "window_position" else exc.errors()[0]["msg"]
                raise TM20ConfigError(f"{prefix}{name} = {options[name]!r}: {problem}") from exc
    capture = options.get("start_obs_capture")
    if time_step_duration is not None and capture is not None and capture > time_step_duration:
        raise TM20ConfigError(f"{prefix}start_obs_capture = {capture!r} is after the end of the step "
                              f"(worker.time_step_duration = {time_step_duration!r}): the screenshot must be taken "
                              f"within the step; use at most {time_step_duration!r} (left out: 0.8 x the step)")
    check_device_names(options, prefix)
    if options.get("emulated_game") is not None:
        for name, instead in EMULATED_GAME_DEVICE_OPTIONS.items():
            if name in options:
                raise TM20ConfigError(f"{prefix}{name} has no use with {prefix}emulated_game: {instead}")


def check_device_names(settings: Mapping[str, Any], prefix: str = "") -> None:
    """Raise :class:`TM20ConfigError` unless ``settings``' ``capture_backend`` and ``controller_kind`` (``auto`` when
    absent) name a capture backend and a controller: the one check of both names wherever settings are read (the
    worker config, ``make_env``, :func:`tm20_rtgym_config`, the interface), before the plugin, the controller or the
    game window is reached. ``prefix`` goes before the setting's name in the message (``env_options.``)."""
    try:
        check_capture_backend(settings.get("capture_backend", "auto"), f"{prefix}capture_backend")
        check_controller_kind(settings.get("controller_kind", "auto"), f"{prefix}controller_kind")
    except (CaptureError, ControlError) as exc:
        raise TM20ConfigError(str(exc)) from exc


def observation_space_for(layout: ObservationLayout) -> spaces.Tuple:
    """The rtgym interface observation space of ``layout`` (without the action buffer)."""
    parts = []
    for component in layout.components:
        low, high = _BOUNDS.get(component.name, (-np.inf, np.inf))
        parts.append(spaces.Box(low=low, high=high, shape=component.observation_shape, dtype=np.dtype(component.dtype)))
    return spaces.Tuple(parts)


class TM20Interface(RealTimeGymInterface):
    """Shared logic of the TrackMania interfaces; subclasses say what a frame becomes and what the layout is.

    A device failure during a step (telemetry lost, capture failed, window gone) never escapes the observation
    method: rtgym runs it in its own thread under a lock that an exception would never release, so the worker would
    hang. Instead the step ends the episode with ``info["truncated_reason"]`` (the worker records it as truncated,
    not terminated), and the next :meth:`reset` waits for the game with backoff, logging a status line per attempt,
    before it restarts the race.
    """

    window_size: tuple[int, int] = LIDAR_WINDOW_SIZE
    capture_color = "rgb"

    def __init__(self, *, capture: FrameCapture | None = None, telemetry: TelemetryClient | None = None,
                 controller: Controller | None = None, reward: TrajectoryReward | None = None,
                 window: GameWindow | None = None,
                 reward_path: str | Path | None = None,
                 reward_config: TrajectoryRewardConfig | dict[str, Any] | None = None,
                 img_hist_len: int = 4, act_buf_len: int = 2, lidar: LidarConfig | dict[str, Any] | None = None,
                 telemetry_port: int = DEFAULT_PORT, telemetry_timeout: float = 5.0,
                 window_title: str = "Trackmania", window_pid: int | None = None,
                 window_position: tuple[int, int] = (0, 0),
                 capture_backend: str = "auto", capture_output: int | None = None,
                 controller_kind: str = "auto",
                 sleep_time_at_reset: float = 1.5, recovery: RecoveryConfig | dict[str, Any] | None = None,
                 stale_frames: StaleFrameConfig | dict[str, Any] | None = None) -> None:
        check_device_names({"capture_backend": capture_backend, "controller_kind": controller_kind})
        self.recovery = validated_settings(RecoveryConfig, recovery, "recovery")
        self.stale_frames = StaleFrameDetector(validated_settings(StaleFrameConfig, stale_frames, "stale_frames"))
        self._stale_frame: np.ndarray | None = None
        """The frozen picture of the last stale-screen fault, until live frames come back."""
        if reward is None:
            if reward_path is None:
                raise TM20ConfigError("a TrackMania environment needs reward points: record them with `tmrl-worker "
                                      "record-reward --output points.safetensors`, then give the file (reward_path "
                                      "in [worker.env_options], --reward FILE for benchmark; reward= in Python)")
            try:
                reward = TrajectoryReward.from_file(reward_path, validated_settings(TrajectoryRewardConfig, reward_config,
                                                                            "reward_config"))
            except RewardPathError as exc:
                raise TM20ConfigError(str(exc)) from exc
        if reward.points.shape[1] != 3:
            raise TM20ConfigError(f"the reward points{f' in {reward_path}' if reward_path is not None else ''} are "
                                  f"{reward.points.shape[1]}-D; TrackMania positions are (x, y, z): record them with "
                                  "`tmrl-worker record-reward`")
        self.reward = reward
        self.img_hist_len = img_hist_len
        self.act_buf_len = act_buf_len
        self.sleep_time_at_reset = sleep_time_at_reset
        # From a TOML config the LIDAR settings arrive as a table: validate them into a LidarConfig.
        self.lidar = Lidar(validated_settings(LidarConfig, lidar, "lidar"))
        self.layout = self._make_layout()
        self._open_capture: Callable[[], FrameCapture] | None = None
        built: list[Any] = []  # devices built here are closed again if a later one fails
        try:
            if telemetry is None:
                telemetry = TelemetryClient(telemetry_port, timeout=telemetry_timeout)
                built.append(telemetry)
            if controller is None:
                controller = make_controller(controller_kind)  # type: ignore[arg-type]
                built.append(controller)
            self.window = window
            if len(window_position) != 2:
                raise TM20ConfigError(f"window_position is [x, y] (screen pixels of the client area's top-left "
                                      f"corner), got {window_position!r}")
            if capture is None:
                self._open_capture = self._capture_opener(lambda: find_game_window(window_title, pid=window_pid),
                                                          tuple(window_position), capture_backend, capture_output)
                capture = self._open_capture()
        except BaseException:
            for device in reversed(built):
                device.close()
            raise
        self.telemetry, self.controller, self.capture = telemetry, controller, capture
        self.history: deque[np.ndarray] = deque(maxlen=img_hist_len)
        self.last_frame: np.ndarray | None = None
        self.last_telemetry: Telemetry | None = None
        self.faults: Counter[str] = Counter()
        """Device failures that ended an episode, by kind (``telemetry``, ``stale``, ``capture``, ``window``,
        ``frame``...)."""
        self.clipped: Counter[str] = Counter()
        """Telemetry values that were outside the observation space's bounds and clipped into them, by field
        (``speed``, ``gear``, ``rpm``); the first of each field is logged."""
        self.status = "starting"
        """What the interface is doing now, e.g. ``waiting for the game: ... (attempt 3)``; also logged."""
        self._pending_fault: str | None = None
        self._restart_failing_since: float | None = None
        self._last_respawn_at = 0.0
        """When the respawn of the first of the race restarts failing in a row came (None: the last one worked)."""
        self._restart_failures = 0
        self._frame_shape: tuple[int, ...] | None = None
        """The shape of the first frame measured: a later frame of another size (a resized window) is refused until
        the game probe has seen the new size :data:`SIZE_CHECKS_BEFORE_ADOPTING` times in a row."""
        self._new_size_checks: tuple[tuple[int, ...] | None, int] = (None, 0)
        self.repeated_packets = 0
        """Steps that got the same telemetry packet as the step before (no new game frame in between)."""
        self._blind_kind: str | None = None
        self._blind_scans = 0
        self._blind_warned_at = -math.inf
        self._repeated_logged_at = float("-inf")
        self.stop_event: threading.Event | None = None
        """Set by the worker (``EnvHandle.attach_stop``): waiting for the game then ends with EnvInterrupted."""
        self._default_action = np.zeros(3, dtype=np.float32)
        self.bring_to_front()

    def _capture_opener(self, find_window: Callable[[], GameWindow], position: tuple[int, int], backend: str,
                        output: int | None) -> Callable[[], FrameCapture]:
        """How to (re)open capture of the game window's client area, placed at ``position`` and sized for this
        variant; the window is looked for again when the one we had is gone (a restarted game has a new one)."""
        def open_capture() -> FrameCapture:
            if self.window is not None:
                try:
                    self.window.client_area()
                except WindowNotFoundError:
                    self.window = None
            if self.window is None:
                self.window = find_window()
            self.window.place(*position, *self.window_size)
            return make_capture(backend, self.capture_color, region=self.window.client_area(),  # type: ignore[arg-type]
                                output_idx=output)
        return open_capture

    # what subclasses define ------------------------------------------------------------------------------------
    @classmethod
    def layout_for(cls, *, img_hist_len: int = 4, act_buf_len: int = 2,
                   lidar: LidarConfig | dict[str, Any] | None = None, **settings: Any) -> ObservationLayout:
        """The observation layout this interface has with these keyword arguments (those that do not shape it are
        ignored), from the settings alone: nothing is built or started, so no game, window or Windows-only package
        is needed. The interface builds its own :attr:`layout` with it."""
        raise NotImplementedError

    def _make_layout(self) -> ObservationLayout:
        return self.layout_for(img_hist_len=self.img_hist_len, act_buf_len=self.act_buf_len, lidar=self.lidar.config)

    def frame_feature(self, frame: np.ndarray) -> np.ndarray:
        """What one screenshot contributes to the history (a LIDAR scan, a small gray image)."""
        raise NotImplementedError

    def _check_feature(self, feature: np.ndarray, frame: np.ndarray) -> None:
        """Look at a feature entering the history (measured on ``frame``) for signs that the picture is not the track
        (logged only)."""

    def _telemetry_part(self, name: str) -> np.ndarray:
        """Telemetry field ``name`` of the newest packet as a 1-value float32 observation part, clipped into
        ``_BOUNDS[name]`` (see the module docstring); a clipped value is counted in :attr:`clipped`, the first of
        each field logged."""
        value = float(getattr(self.last_telemetry, name))
        low, high = _BOUNDS[name]
        if value < low or value > high:
            self.clipped[name] += 1
            if self.clipped[name] == 1:
                log.warning("tm20: the plugin on port %d sent %s %g, outside [%g, %g]: clipped into them (further "
                            "values out of range are counted in `clipped`, not logged)",
                            getattr(self.telemetry, "port", -1), name, value, low, high)
        return np.array([min(max(value, low), high)], dtype=np.float32)

    def _observation(self) -> list[np.ndarray]:
        speed = self._telemetry_part("speed")
        # a history of 1 has no history axis: the layout's (and the observation space's) shape is the frame's
        frames = np.stack(self.history) if self.img_hist_len > 1 else self.history[-1].copy()
        return [speed, frames]

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

    def _new_frame_at(self) -> float | None:
        """When the capture backend last delivered a new frame (None: the backend cannot tell)."""
        return getattr(self.capture, "last_new_frame_at", None)

    def _capture(self, step_telemetry_timeout: float | None = None) -> None:
        """The next frame and telemetry into the history: in a step, telemetry at most ``step_telemetry_timeout``
        old, without waiting longer than that for it (:meth:`TelemetryClient.current`); at a reset, the client's
        waiting read."""
        frame = self._checked_frame(self.capture.grab())
        if step_telemetry_timeout is None:
            telemetry = self.telemetry.latest()
        else:
            telemetry = self.telemetry.current(step_telemetry_timeout)
            self._check_same_run(telemetry)
        try:
            self.stale_frames.check(frame, telemetry, self._new_frame_at())
        except StaleFrameError:
            self._stale_frame = frame
            raise
        feature = self.frame_feature(frame)
        self._check_feature(feature, frame)
        self.last_frame, self.last_telemetry = frame, telemetry
        self.history.append(feature)

    def _checked_frame(self, frame: Any) -> np.ndarray:
        """``frame``, unless capture returned nothing or a frame of another size than the first one measured (the
        window was resized: the LIDAR's beams would change scale mid-history): :class:`CaptureError` then."""
        if not isinstance(frame, np.ndarray) or frame.ndim not in (2, 3):
            got = "nothing" if frame is None else f"a {type(frame).__name__}" if not isinstance(frame, np.ndarray) \
                else f"an array of shape {frame.shape}"
            raise CaptureError(f"the screen capture returned {got} instead of a frame")
        if self._frame_shape is None:
            self._warn_of_another_size_than_the_window(frame)
            self._frame_shape = frame.shape
        elif frame.shape != self._frame_shape:
            raise CaptureError(f"the captured frame is {frame.shape[1]}x{frame.shape[0]} pixels, the first ones were "
                               f"{self._frame_shape[1]}x{self._frame_shape[0]}: the game window was resized (or the "
                               f"screen's resolution or scaling changed); set it back, or the worker measures at the "
                               f"new size after {SIZE_CHECKS_BEFORE_ADOPTING} checks in a row")
        return frame

    def _warn_of_another_size_than_the_window(self, frame: np.ndarray) -> None:
        """Warn when the first frame of a window this interface sized is of another size: the LIDAR's distances in
        pixels (the images' proportions) then differ from those of a policy trained at :attr:`window_size` (the
        window's placement is not checked on Windows: display scaling, or a game that keeps its own size)."""
        width, height = self.window_size
        if self.window is not None and frame.shape[:2] != (height, width):
            log.warning("tm20: the game window was sized to %dx%d but its frames are %dx%d (Windows display scaling "
                        "other than 100 %%, or the game kept its own size?): the LIDAR measures at this size, so its "
                        "distances in pixels differ from a policy's trained at %dx%d", width, height, frame.shape[1],
                        frame.shape[0], width, height)

    def _adopt_a_lasting_size(self, frame: Any) -> bool:
        """Count the game probe's frames of one new size in a row; True at the :data:`SIZE_CHECKS_BEFORE_ADOPTING`-th
        (a worker started while the window had another size must not wait for that size for ever)."""
        shape = getattr(frame, "shape", None)
        if not isinstance(frame, np.ndarray) or self._frame_shape is None or shape == self._frame_shape:
            self._new_size_checks = (None, 0)
            return False
        seen, count = self._new_size_checks
        self._new_size_checks = (shape, count + 1 if shape == seen else 1)
        return self._new_size_checks[1] >= SIZE_CHECKS_BEFORE_ADOPTING

    def _check_same_run(self, telemetry: Telemetry) -> None:
        """Raise :class:`RaceRestartedError` when ``telemetry`` belongs to another run than the step before's, and
        :class:`PositionJumpError` when the car got there by a jump rather than by driving."""
        previous = self.last_telemetry
        if previous is None or telemetry is previous:
            return
        if telemetry.distance < previous.distance - RUN_DISTANCE_SLACK_M:
            raise RaceRestartedError(f"the race restarted outside the worker (distance driven {previous.distance:.1f} m,"
                                     f" then {telemetry.distance:.1f} m): a respawn by hand, the game, or a plugin "
                                     "reload; the episode ends here")
        jump = position_jump(previous, telemetry)
        if jump is not None:
            raise PositionJumpError(f"{jump}: a jump is no progress, so the episode ends here")

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[list[np.ndarray], dict]:
        """Wait for the game if a device failed, bring its window to the front, restart the race and wait until
        telemetry shows it restarted (again and again while it does not: a paused game), then capture the first
        observation."""
        while True:
            if self._pending_fault is not None:
                self.wait_for_game(self._pending_fault)
            try:
                self.bring_to_front()
                self._restart_race()
                self._restart_failing_since = None
                if self.sleep_time_at_reset > 0:
                    time.sleep(self.sleep_time_at_reset)
                self.reward.reset()
                self.history.clear()
                self.stale_frames.reset()
                self._capture()
                break
            except DEVICE_ERRORS as exc:
                self._pending_fault = self._fault(exc)
            except RaceRestartError as exc:
                self._restart_failed(exc)
        while len(self.history) < self.img_hist_len:  # an episode starts with its first frame repeated
            self.history.append(self.history[-1])
        self.status = "running"
        return self._observation(), {}

    def get_obs_rew_terminated_info(self) -> tuple[list[np.ndarray], float, bool, dict[str, Any]]:
        # rtgym calls this in its own thread while holding a lock that an exception would never release
        try:
            return self._step_result()
        except DEVICE_ERRORS as exc:
            return self._truncated(self._fault(exc))
        except Exception as exc:  # a bug here must end the episode loudly, not hang the worker
            log.exception("tm20: unexpected error while reading the game")
            return self._truncated(self._fault(exc, kind="unexpected"))

    def _step_result(self) -> tuple[list[np.ndarray], float, bool, dict[str, Any]]:
        previous = self.last_telemetry
        self._capture(self.recovery.step_telemetry_timeout_s)
        if self.last_telemetry is previous:  # no new game frame since the last step: no progress can be measured
            self._note_repeated_packet()
            reward, terminated, info = self.reward.hold(self.last_telemetry.position)
        else:
            reward, terminated, info = self.reward.compute(self.last_telemetry.position)
        # a finish flag within restart_distance_m of the start is the last run's, not yet cleared (record-reward
        # ignores it likewise); an outside probe was paid the finish bonus 0.1 m into a run for one
        finished_by_game = self.last_telemetry.finished and self.last_telemetry.distance > self.recovery.restart_distance_m
        info["finished_by_game"] = finished_by_game
        if finished_by_game and not self.reward.finished:
            self.reward.finished = True
            reward += self.reward.config.finish_bonus
            terminated = True
            info["finished"] = True  # the game's finish is a finish, even where the recorded path ends later
        if self.reward.finished:  # which of the two: an emulated-game probe saw a bonus the game never confirmed
            log.info("tm20: finish line reached at step %d of the episode (%s)", self.reward.steps,
                     "the game's finish" if finished_by_game else
                     "the reward path's last point; the game has not shown its finish yet")
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

    # failures and recovery -------------------------------------------------------------------------------------
    def _fault(self, exc: BaseException, kind: str | None = None) -> str:
        """Count and log a device failure; the reason text that ends the episode and starts the recovery."""
        kind = kind or _fault_kind(exc)
        self.faults[kind] += 1
        reason = f"{kind}: {exc}"
        log.warning("tm20: %s (%s failures so far: %d)", reason, kind, self.faults[kind])
        return reason

    def _note_repeated_packet(self) -> None:
        """Count a step that got the step before's packet; say so once in a while (a plugin sending slower than the
        step rate, or a game hitching), since those steps neither pay nor count towards ``no_progress_steps``."""
        self.repeated_packets += 1
        now = time.monotonic()
        if now - self._repeated_logged_at >= 30.0:
            self._repeated_logged_at = now
            log.warning("tm20: %d step(s) so far got no new telemetry packet since the step before (a game hitch, "
                        "or the plugin sends slower than the steps come): they pay nothing and do not count as "
                        "steps without progress", self.repeated_packets)

    def _restart_failed(self, exc: RaceRestartError) -> None:
        """A respawn did not restart the race: log it (the whole advice once per streak, then one short line) and
        let the reset press respawn again, unless the attempts have taken ``recovery.give_up_after_s`` (counted from
        the first failing attempt's respawn; ``exc`` then stops the worker, saying how long it tried)."""
        now = time.monotonic()
        first = self._restart_failing_since is None
        if first:
            self._restart_failing_since = self._last_respawn_at  # when that attempt's respawn came
        trying = now - self._restart_failing_since
        give_up = self.recovery.give_up_after_s
        if give_up is not None and trying >= give_up:
            raise RaceRestartError(f"{exc} (gave up after {trying:.0f} s of respawns, recovery.give_up_after_s = "
                                   f"{give_up:g})") from exc
        self.faults["restart"] += 1
        self._restart_failures = 1 if first else self._restart_failures + 1
        if first:
            log.warning("tm20: restart: %s; pressing respawn again", exc)
        else:
            log.warning("tm20: the race has not restarted for %.0f s (%d respawns): is the game paused or a menu "
                        "open? pressing respawn again", trying, self._restart_failures)

    def _truncated(self, reason: str) -> tuple[list[np.ndarray], float, bool, dict[str, Any]]:
        """The step that ends an episode on a device failure: the last good observation, no reward, and the reason
        (the worker turns ``truncated_reason`` into ``truncated=True``)."""
        self._pending_fault = reason
        self.status = f"episode truncated: {reason}"
        return self._observation(), 0.0, True, {TRUNCATED_REASON: reason}

    def _probe(self) -> str | None:
        """None when a fresh packet arrives and a live frame can be grabbed and measured; else what is wrong."""
        try:
            self.telemetry.latest(timeout=self.recovery.probe_timeout_s)
        except TelemetryError as exc:
            return f"telemetry: {exc}"
        problem = self._probe_window() or self._probe_frame()
        if problem is not None and self._open_capture is not None:
            try:  # the window may have moved, been resized, minimised or restarted: find it and open capture again
                if self._stale_frame is not None:
                    self.bring_to_front()  # a minimised window shows nothing until it is restored
                self.capture.close()
                self.capture = self._open_capture()
            except DEVICE_ERRORS as exc:
                return f"{_fault_kind(exc)}: {exc}"
            problem = self._probe_frame()
        if problem is None:
            self._stale_frame = None
        return problem

    def _probe_window(self) -> str | None:
        """None when the game window (if we know it) is still there; else what is wrong."""
        if self.window is None:
            return None
        try:
            self.window.client_area()
        except WindowNotFoundError as exc:
            return f"window: {exc}"
        return None

    def _probe_frame(self) -> str | None:
        """None when a frame can be grabbed and measured and, after a stale screen, is live again."""
        try:
            frame = self.capture.grab()
            if self._adopt_a_lasting_size(frame):
                log.warning("tm20: the captured frames have been %dx%d pixels for %d checks in a row (the first ones "
                            "were %dx%d): measuring at this size from the next episode on, so the LIDAR's distances "
                            "in pixels change scale with it", frame.shape[1], frame.shape[0], SIZE_CHECKS_BEFORE_ADOPTING,
                            self._frame_shape[1], self._frame_shape[0])
                self._frame_shape = frame.shape
            frame = self._checked_frame(frame)  # a frame of another size is no game back
            self.frame_feature(frame)
        except DEVICE_ERRORS as exc:
            return f"{_fault_kind(exc)}: {exc}"
        if self._stale_frame is None:
            return None
        return self.stale_frames.is_live(frame, self._new_frame_at(), self._stale_frame)

    def wait_for_game(self, reason: str) -> None:
        """Block until telemetry and capture work again after ``reason`` (already logged), retrying with exponential
        backoff and logging a status line at every attempt; raise :class:`TM20GameLostError` after
        ``recovery.give_up_after_s`` (None: never)."""
        settings = self.recovery
        started, attempt, delay = time.monotonic(), 0, settings.first_retry_s
        while True:
            problem = self._probe()
            waited = time.monotonic() - started
            if problem is None:
                self._pending_fault = None
                self.status = "game back"
                log.info("tm20: the game is back after %.1f s (%d attempt(s)); resuming", waited, attempt + 1)
                return
            attempt += 1
            if settings.give_up_after_s is not None and waited >= settings.give_up_after_s:
                raise TM20GameLostError(f"the game did not come back in {waited:.0f} s: {problem}")
            self.status = (f"waiting for the game (attempt {attempt}, {waited:.0f} s so far, next try in {delay:.1f} s):"
                           f" {problem}")
            log.warning("tm20: %s", self.status)
            if settings.give_up_after_s is not None:  # the last wait ends when giving up is due, not up to
                delay = min(delay, max(settings.give_up_after_s - waited, 0.01))  # max_retry_s past it
            if self.stop_event is not None and self.stop_event.wait(delay):
                raise EnvInterrupted(f"stopped while waiting for the game ({problem})")
            if self.stop_event is None:
                time.sleep(delay)
            delay = min(delay * 2.0, settings.max_retry_s)

    def bring_to_front(self) -> None:
        """Give the game window the keyboard focus, so keyboard input reaches it; warn when it stays behind."""
        if self.window is None or not self.recovery.focus_window:
            return
        self.window.focus()
        if not self.window.is_foreground():
            log.warning("tm20: the game window %r is not in front after focusing it: keyboard input goes to the "
                        "window that has the focus", self.window.title)

    def _restart_race(self) -> None:
        """Respawn (closing the finish pop-up first as the game needs) and wait until telemetry shows the race
        restarted: not finished and distance near 0, in a packet read after the respawn."""
        settings = self.recovery
        finished = self.last_telemetry is not None and self.last_telemetry.finished
        self.controller.apply(self._default_action)
        pressed = self._last_respawn_at = time.monotonic()
        self.controller.respawn()
        if finished:  # the end-of-race pop-up takes a moment to accept input
            time.sleep(settings.popup_delay_s)
            self.controller.close_finish_popup()
        deadline = pressed + settings.restart_timeout_s
        if settings.give_up_after_s is not None:  # a shorter give-up is not held up by the attempt's own timeout
            streak_started = pressed if self._restart_failing_since is None else self._restart_failing_since
            deadline = min(deadline, streak_started + settings.give_up_after_s)
        while True:
            if self.stop_event is not None and self.stop_event.is_set():
                raise EnvInterrupted("stopped while waiting for the race to restart")
            packet = self.telemetry.latest(timeout=settings.probe_timeout_s)
            if packet.received_at >= pressed and not packet.finished and abs(packet.distance) <= settings.restart_distance_m:
                self.last_telemetry = packet
                x, y, z = packet.position
                # one line per episode: where the respawn put the car (the start line, not a checkpoint?), and
                # which plugin said so (several games on one machine)
                log.info("tm20: race restarted: the plugin on port %d puts the car at (%.1f, %.1f, %.1f)",
                         getattr(self.telemetry, "port", -1), x, y, z)
                self._check_start(packet.position)
                return
            if time.monotonic() >= deadline:
                raise RaceRestartError(
                    f"the race did not restart within {deadline - pressed:.0f} s of the respawn (last packet: "
                    f"finished={int(packet.finished)}, distance {packet.distance:.1f} m): is the game paused or a menu "
                    f"open? Otherwise check that the respawn control (gamepad B, keyboard Delete) restarts the run "
                    f"from the start line in the game's settings and that the finish pop-up closes with gamepad A / "
                    f"Enter")
            time.sleep(0.01)


    def _check_start(self, position: tuple[float, float, float]) -> None:
        """Raise :class:`RewardPathMismatchError` when the restarted car is further than
        ``recovery.start_tolerance_m`` from the reward path's first point."""
        tolerance = self.recovery.start_tolerance_m
        start = self.reward.points[0]
        offset = float(np.linalg.norm(np.asarray(position, dtype=np.float64) - start))
        if tolerance is not None and offset > tolerance:
            raise RewardPathMismatchError(
                f"the car starts {offset:.0f} m from the reward path's first point ({start[0]:.1f}, {start[1]:.1f}, "
                f"{start[2]:.1f}), more than recovery.start_tolerance_m = {tolerance:g}: the reward points were "
                "recorded on another map or from another start; record this map's with `tmrl-worker record-reward`")


class TM20LidarInterface(TM20Interface):
    """LIDAR history + speed (``tm20_pixel_lidar_layout``)."""

    @classmethod
    def layout_for(cls, *, img_hist_len: int = 4, act_buf_len: int = 2,
                   lidar: LidarConfig | dict[str, Any] | None = None, **settings: Any) -> ObservationLayout:
        return tm20_pixel_lidar_layout(img_hist_len, validated_settings(LidarConfig, lidar, "lidar").beams, act_buf_len)

    def frame_feature(self, frame: np.ndarray) -> np.ndarray:
        return self.lidar.measure(frame)

    def _check_feature(self, feature: np.ndarray, frame: np.ndarray) -> None:
        """Warn (at most every :data:`BLIND_WARNING_EVERY_S`) when :data:`BLIND_SCANS` scans in a row met no border
        on any beam, or a border at the first sample of every beam in a frame that is dark nearly all over: a menu, a
        white or black screen, another window, or a ``lidar.threshold`` that does not fit the picture. Such scans look
        like numbers all the same (an outside probe's white, black and border-less frames ran without a word while
        the picture changed). A car against a wall also meets it at every beam's first sample, in a frame of road and
        sky: no warning then (a re-check saw one for a car reversed behind the start line's wall)."""
        borders = self.lidar.last_borders_met
        blind = "none" if borders == 0 else "all-at-once" if borders == len(feature) and not feature.any() else None
        if blind == "all-at-once" and self._dark_share(frame) < DARK_SCREEN_SHARE:
            blind = None
        count = self._blind_scans + 1 if blind is not None and blind == self._blind_kind else int(blind is not None)
        self._blind_kind, self._blind_scans = blind, count
        if count < BLIND_SCANS or time.monotonic() - self._blind_warned_at < BLIND_WARNING_EVERY_S:
            return
        self._blind_warned_at = time.monotonic()
        seen = ("no beam met a track border (a menu or a white screen, another window in front, or lidar.threshold "
                f"{self.lidar.config.threshold} too low: borders are pixels darker than it in every channel)"
                if blind == "none" else "every beam met a border at its first sample (a black or dark screen, or "
                f"lidar.threshold {self.lidar.config.threshold} too high for this picture)")
        log.warning("tm20: for %d LIDAR scans in a row %s; `tmrl-worker check-env --save-frames DIR` shows what the "
                    "beams see", count, seen)

    def _dark_share(self, frame: np.ndarray) -> float:
        """The share of ``frame``'s pixels (one in 16 on each axis) that the LIDAR reads as border."""
        sample = np.asarray(frame)[::16, ::16]
        dark = sample < self.lidar.config.threshold
        return float((dark[..., :3].all(axis=-1) if dark.ndim == 3 else dark).mean())

    def render(self) -> np.ndarray | None:
        return None if self.last_frame is None else self.lidar.draw(self.last_frame)


class TM20LidarProgressInterface(TM20LidarInterface):
    """LIDAR history + speed + progress along the reward path (``tm20_pixel_lidar_progress_layout``)."""

    @classmethod
    def layout_for(cls, *, img_hist_len: int = 4, act_buf_len: int = 2,
                   lidar: LidarConfig | dict[str, Any] | None = None, **settings: Any) -> ObservationLayout:
        beams = validated_settings(LidarConfig, lidar, "lidar").beams
        return tm20_pixel_lidar_progress_layout(img_hist_len, beams, act_buf_len)

    def _observation(self) -> list[np.ndarray]:
        speed, lidar = super()._observation()
        return [speed, np.array([self.reward.progress], dtype=np.float32), lidar]


class TM20FullInterface(TM20Interface):
    """Grayscale screenshot history + speed, gear and rpm (``tm20_full_layout``, as upstream tmrl's full env)."""

    window_size = FULL_WINDOW_SIZE
    capture_color = "gray"

    def __init__(self, *, image_height: int = 64, image_width: int = 64, **kwargs: Any) -> None:
        self.image_height, self.image_width = image_height, image_width
        super().__init__(**kwargs)
        width, height = self.window_size
        if image_height > height or image_width > width:  # a probe: 300 x 500 was enlarged from 128 x 256 unsaid
            log.warning("tm20-full: image_height x image_width = %d x %d is larger than the %d x %d pixels captured "
                        "from the game window: frames are enlarged, which adds no detail and costs the networks "
                        "memory and time (at most %d x %d keeps every captured pixel)", image_height, image_width,
                        height, width, height, width)

    @classmethod
    def layout_for(cls, *, img_hist_len: int = 4, act_buf_len: int = 2, image_height: int = 64, image_width: int = 64,
                   **settings: Any) -> ObservationLayout:
        return tm20_full_layout(img_hist_len, image_height, image_width, act_buf_len)

    def _make_layout(self) -> ObservationLayout:
        return self.layout_for(img_hist_len=self.img_hist_len, act_buf_len=self.act_buf_len,
                               image_height=self.image_height, image_width=self.image_width)

    def frame_feature(self, frame: np.ndarray) -> np.ndarray:
        return downscale(to_gray(frame), self.image_height, self.image_width)

    def _observation(self) -> list[np.ndarray]:
        speed, images = super()._observation()
        return [speed, self._telemetry_part("gear"), self._telemetry_part("rpm"), images]


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
    interface = interface_class(variant)
    check_device_names(interface_kwargs)
    if start_obs_capture is None:
        start_obs_capture = round(0.8 * time_step_duration, 6)
    config = dict(DEFAULT_CONFIG_DICT)
    config.update({
        "interface": interface,
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
