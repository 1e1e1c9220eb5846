"""How an environment's observation is split into per-step frames on the wire and rebuilt afterwards.

A worker sends only what is new at each step (the newest LIDAR scan, the speed, the action just applied).
The trainer's replay memory stores each frame once and rebuilds full observations from an
:class:`ObservationLayout`: history components are stacked oldest to newest, then the last
``action_history`` actions follow, oldest to newest, exactly like rtgym's ``act_buf``.

Rule at episode starts: history entries that would fall before the first row of an episode repeat that first
row (its frame, and its action, which is the environment's default action).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tmrl_common.errors import NonFiniteValue

if TYPE_CHECKING:
    import numpy as np

_COMPONENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class ObservationComponent(BaseModel):
    """One named part of the observation tuple (e.g. ``speed``, ``lidar``, ``image``)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: str
    frame_shape: list[int] = Field(min_length=1, max_length=4)
    dtype: str = "float32"
    history: int = Field(default=1, ge=1, le=64)
    """Frames stacked in the observation. 1: the observation part has ``frame_shape``;
    more: it has ``(history, *frame_shape)``."""
    low: float | None = None
    """Smallest value a frame may hold (the env's observation space); ``None``: not declared. The trainer refuses a
    batch with a value outside ``[low, high]`` (reason ``observation_out_of_bounds``); for an undeclared bound it
    applies its own ``max_abs_observation``."""
    high: float | None = None
    """Largest value a frame may hold; ``None``: not declared (see ``low``)."""
    scale: float | None = Field(default=None, gt=0)
    """The networks multiply the component by this before their first layer (``None``: as it is), so that inputs in
    large units (TrackMania's LIDAR counts hundreds of pixels) do not saturate an untrained policy. Data on the wire
    and in the replay memory stay in the env's units."""

    wire_optional: ClassVar[frozenset[str]] = frozenset({"low", "high", "scale"})
    """Added to protocol version 1 after it was published: left off the wire while undeclared (``None``)."""

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not _COMPONENT_NAME.fullmatch(value):
            raise ValueError(f"component name {value!r} must match {_COMPONENT_NAME.pattern}")
        return value

    @field_validator("frame_shape")
    @classmethod
    def _positive_dims(cls, value: list[int]) -> list[int]:
        if any(d <= 0 for d in value):
            raise ValueError(f"frame_shape {value} must have positive dimensions")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ("float32", "uint8"):
            raise ValueError(f"observation dtype {value!r} must be float32 or uint8")
        return value

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ObservationComponent:
        for bound in (self.low, self.high):
            if bound is not None and not math.isfinite(bound):
                raise NonFiniteValue(f"component {self.name!r}: bounds must be finite (leave one out for none), got "
                                     f"{bound}")
        if self.low is not None and self.high is not None and not self.low <= self.high:
            raise ValueError(f"component {self.name!r}: low {self.low} must not exceed high {self.high}")
        return self

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return tuple(self.frame_shape) if self.history == 1 else (self.history, *self.frame_shape)

    @property
    def frame_size(self) -> int:
        return math.prod(self.frame_shape)


class ObservationLayout(BaseModel):
    """The contract between an environment, the worker that sends its samples and the trainer that stores them."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    components: list[ObservationComponent] = Field(min_length=1, max_length=16)
    action_dim: int = Field(ge=1, le=64)
    action_history: int = Field(default=0, ge=0, le=16)
    """Previous actions appended to the observation (rtgym ``act_buf_len``; 0 when ``act_in_obs`` is off)."""

    @field_validator("components")
    @classmethod
    def _unique_names(cls, value: list[ObservationComponent]) -> list[ObservationComponent]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")
        return value

    def observation_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the observation tuple the environment returns, in order."""
        return [c.observation_shape for c in self.components] + [(self.action_dim,)] * self.action_history

    def observation_dtypes(self) -> list[str]:
        """Dtypes of the observation tuple's parts, in order: each component's, then float32 for the action buffer."""
        return [c.dtype for c in self.components] + ["float32"] * self.action_history

    def flat_size(self) -> int:
        """Length of the observation once every part is flattened and concatenated (the MLP input size)."""
        return sum(math.prod(shape) for shape in self.observation_shapes())

    def without_bounds(self) -> ObservationLayout:
        """This layout with no component's ``low`` or ``high``: what the networks and the replay memory's arrays
        depend on (bounds only decide which values are accepted; ``scale`` changes the networks' inputs and stays)."""
        return self.model_copy(update={"components": [c.model_copy(update={"low": None, "high": None})
                                                      for c in self.components]})

    def bounds_changes(self, other: ObservationLayout) -> list[str]:
        """``"name [low, high] -> [low, high]"`` for each component whose bounds differ in ``other`` (a layout
        equal to this one :meth:`without_bounds`)."""
        return [f"{mine.name} [{mine.low}, {mine.high}] -> [{theirs.low}, {theirs.high}]"
                for mine, theirs in zip(self.components, other.components, strict=True)
                if (mine.low, mine.high) != (theirs.low, theirs.high)]


SPEED_BOUND = 1000.0
"""Speeds are in km/h within ``[-SPEED_BOUND, SPEED_BOUND]`` (TrackMania clips to it; the simulator stays below)."""
LIDAR_BOUND = 10_000.0
"""LIDAR distances lie in ``[0, LIDAR_BOUND]``: pixels of a 958-pixel-wide window in TrackMania, metres up to the
beam range (80 by default) in the simulator; any larger value is not a measurement."""


def _speed() -> ObservationComponent:
    return ObservationComponent(name="speed", frame_shape=[1], low=-SPEED_BOUND, high=SPEED_BOUND)


TM20_LIDAR_SCALE = 0.01
"""The networks' factor for TrackMania's LIDAR (pixels: about 170 to 490 on a 958 x 488 frame, 1.7 to 4.9 once
scaled). Unscaled, an untrained actor's pre-tanh means on such inputs are so large that every action saturates:
a policy entropy of -38 to -161 against -3 to -10 on the simulator's LIDAR in metres (5 seeds), which drives the
learned entropy coefficient up and the Q-values far below zero (measured: alpha 1.8, Q -186), until ending
episodes early by standing still pays best. See docs/trackmania.md, "A learning run to the finish"."""


def _lidar(beams: int, history: int, scale: float | None = None) -> ObservationComponent:
    return ObservationComponent(name="lidar", frame_shape=[beams], history=history, low=0.0, high=LIDAR_BOUND,
                                scale=scale)


def tm20_lidar_layout(img_hist_len: int = 4, beams: int = 19, act_buf_len: int = 2,
                      lidar_scale: float | None = None) -> ObservationLayout:
    """LIDAR observation: ``(speed (1,), lidar (4, 19), action (3,), action (3,))``; the simulator's (metres) as it
    is, TrackMania's (pixels) with ``lidar_scale=TM20_LIDAR_SCALE`` (:func:`tm20_pixel_lidar_layout`)."""
    return ObservationLayout(components=[_speed(), _lidar(beams, img_hist_len, lidar_scale)], action_dim=3,
                             action_history=act_buf_len)


def tm20_lidar_progress_layout(img_hist_len: int = 4, beams: int = 19, act_buf_len: int = 2,
                               lidar_scale: float | None = None) -> ObservationLayout:
    """LIDAR + progress: ``(speed (1,), progress (1,), lidar (4, 19), action (3,), action (3,))``; ``lidar_scale`` as
    in :func:`tm20_lidar_layout`."""
    return ObservationLayout(
        components=[_speed(), ObservationComponent(name="progress", frame_shape=[1], low=0.0, high=1.0),
                    _lidar(beams, img_hist_len, lidar_scale)],
        action_dim=3,
        action_history=act_buf_len,
    )


def tm20_pixel_lidar_layout(img_hist_len: int = 4, beams: int = 19, act_buf_len: int = 2) -> ObservationLayout:
    """TrackMania 2020's LIDAR env (``tm20-lidar``): :func:`tm20_lidar_layout` with the pixel distances scaled by
    :data:`TM20_LIDAR_SCALE` in the networks."""
    return tm20_lidar_layout(img_hist_len, beams, act_buf_len, lidar_scale=TM20_LIDAR_SCALE)


def tm20_pixel_lidar_progress_layout(img_hist_len: int = 4, beams: int = 19, act_buf_len: int = 2) -> ObservationLayout:
    """TrackMania 2020's ``tm20-lidar-progress``: :func:`tm20_lidar_progress_layout` with :data:`TM20_LIDAR_SCALE`."""
    return tm20_lidar_progress_layout(img_hist_len, beams, act_buf_len, lidar_scale=TM20_LIDAR_SCALE)


def tm20_image_layout(img_hist_len: int = 4, height: int = 64, width: int = 64, act_buf_len: int = 2) -> ObservationLayout:
    """Grayscale images and speed: ``(speed (1,), images (4, 64, 64) uint8, action (3,), action (3,))`` (the
    simulator's image env; the TrackMania full env adds gear and rpm: :func:`tm20_full_layout`)."""
    return ObservationLayout(
        components=[
            _speed(),
            ObservationComponent(name="image", frame_shape=[height, width], dtype="uint8", history=img_hist_len),
        ],
        action_dim=3,
        action_history=act_buf_len,
    )


def tm20_full_layout(img_hist_len: int = 4, height: int = 64, width: int = 64, act_buf_len: int = 2) -> ObservationLayout:
    """TrackMania 2020 full env, as upstream tmrl's: ``(speed (1,), gear (1,), rpm (1,), images (4, 64, 64) uint8,
    action (3,), action (3,))``."""
    return ObservationLayout(
        components=[
            _speed(),
            # gear and rpm: the trainer's max_abs_observation; scaled in the networks as upstream's preprocessor
            # does (gear / 10, rpm / 10000): an rpm of 11000 unscaled saturates an untrained policy
            ObservationComponent(name="gear", frame_shape=[1], scale=0.1),
            ObservationComponent(name="rpm", frame_shape=[1], scale=1e-4),
            ObservationComponent(name="image", frame_shape=[height, width], dtype="uint8", history=img_hist_len),
        ],
        action_dim=3,
        action_history=act_buf_len,
    )


def newest_frames(layout: ObservationLayout, observation: tuple | list) -> dict[str, np.ndarray]:
    """The per-step frames of an observation tuple: the newest frame of each history component, the others whole.

    ``observation`` is what the environment returned (components in layout order, then the action buffer).
    """
    import numpy as np

    expected = len(layout.components) + layout.action_history
    if len(observation) != expected:
        raise ValueError(f"observation has {len(observation)} parts, layout expects {expected}")
    frames: dict[str, np.ndarray] = {}
    for component, part in zip(layout.components, observation, strict=False):
        array = np.asarray(part, dtype=component.dtype)
        if array.shape != component.observation_shape:
            raise ValueError(f"observation part {component.name!r} has shape {array.shape}, layout expects {component.observation_shape}")
        frames[component.name] = array[-1] if component.history > 1 else array
    return frames


def clipped_into_bounds(component: ObservationComponent, values: np.ndarray) -> np.ndarray | None:
    """``values`` (one observation part) clipped into the component's declared ``low``/``high``, in its dtype; ``None``
    when they already lie within, or the component declares no bound. The trainer refuses a batch holding a value
    outside them (``observation_out_of_bounds``), so the worker clips its env's observations, and train-local does
    the same to learn from what a worker would send; each logs in its own way."""
    import numpy as np

    if (component.low is None and component.high is None) or not values.size or values.dtype.kind not in "fiu":
        return None
    low = -np.inf if component.low is None else component.low
    high = np.inf if component.high is None else component.high
    if values.min() >= low and values.max() <= high:
        return None
    return np.clip(values, low, high).astype(values.dtype, copy=False)


DIGEST_BYTES = 8


def observation_digest(layout: ObservationLayout, observation: tuple | list) -> bytes:
    """An 8-byte BLAKE2b digest of a full observation tuple (components in layout order, each cast to its dtype,
    then the action buffer as float32). Workers in verification mode send one per row; the trainer digests the
    observation it rebuilds for that row and counts any mismatch (``SampleBatch.digests``)."""
    import hashlib

    import numpy as np

    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    dtypes = layout.observation_dtypes()
    if len(observation) != len(dtypes):
        raise ValueError(f"observation has {len(observation)} parts, layout expects {len(dtypes)}")
    for part, dtype in zip(observation, dtypes, strict=True):
        digest.update(np.ascontiguousarray(part, dtype=dtype).tobytes())
    return digest.digest()


def empty_space_problem(observation_shape: tuple[int, ...], action_shape: tuple[int, ...]) -> str | None:
    """Why Box spaces of these shapes cannot be learned from (one holds no values), or None: a zero-size space ended
    the trainer's commands in a traceback (pydantic's ``action_dim >= 1``, numpy's zero-size reduction)."""
    if math.prod(action_shape) == 0:
        return f"the action space (a Box of shape {tuple(action_shape)}) holds no values; tmrl's SAC needs at least one action"
    if math.prod(observation_shape) == 0:
        return f"the observation space (a Box of shape {tuple(observation_shape)}) holds no values"
    return None


def image_shape_problem(layout: ObservationLayout) -> str | None:
    """Why a uint8 part of ``layout`` cannot be the image the networks take, or None: 4 dimensions (the CNN takes
    ``[H, W]`` or ``[C, H, W]`` frames; such a part went to the MLP without a word, an image probe's ``[2, 3, 64, 64]``
    stacked camera frames), or an ``[H, W, C]`` frame (read as H channels of W x C pixels)."""
    for component in layout.components:
        shape = component.frame_shape
        if component.dtype != "uint8":
            continue
        if len(shape) == 4:
            return (f"observation part {component.name!r} has uint8 frames of 4 dimensions {shape}: the CNN takes "
                    f"[H, W] or [C, H, W] frames; a stack of frames is the part's history (frame_shape {shape[1:]}, "
                    f"history {shape[0]} in the env's declared layout), and data that is no image goes as float32")
        if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] > 4:
            return (f"observation part {component.name!r} has uint8 frames {shape}, whose last dimension looks like "
                    "the channels of an [H, W, C] camera frame: frames are [C, H, W] (np.transpose(frame, (2, 0, 1)))")
    return None


def box_bounds(low, high) -> tuple[float | None, float | None]:
    """Scalar bounds of a Box space (its smallest ``low``, its largest ``high``), ``None`` where infinite."""
    import numpy as np

    smallest, largest = float(np.min(low)), float(np.max(high))
    return (smallest if math.isfinite(smallest) else None), (largest if math.isfinite(largest) else None)


def layout_for_box(observation_size: int, action_dim: int, low: float | None = None,
                   high: float | None = None) -> ObservationLayout:
    """Layout of a plain vector-observation environment (e.g. Pendulum-v1): one component ``obs``, no history;
    ``low``/``high`` are its declared bounds (:func:`box_bounds` of the observation space)."""
    return ObservationLayout(components=[ObservationComponent(name="obs", frame_shape=[observation_size], low=low,
                                                              high=high)], action_dim=action_dim)
