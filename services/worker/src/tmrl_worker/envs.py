"""Environment factory: one spec string → a running environment, its observation layout and how to drive it.

Specs (``[worker] env``):

========================  ===========================================================================================
``sim``                   built-in race track, real time (rtgym ``RaceTrackInterface``, ``time_step_duration`` s/step)
``sim-fast``              the same track as a plain synchronous gymnasium env (``RaceTrackEnv``): as fast as the CPU
``tm20-lidar``            TrackMania 2020, LIDAR observations (Windows, game running)
``tm20-lidar-progress``   TrackMania 2020, LIDAR + track progress (Windows)
``tm20-full``             TrackMania 2020, grayscale images (Windows)
``module:Class``          your :class:`rtgym.RealTimeGymInterface` subclass, imported by path, run by rtgym in real time
``gym:<id>``              any registered gymnasium env with Box actions, synchronous (e.g. ``gym:Pendulum-v1``)
========================  ===========================================================================================

:class:`EnvHandle` hides the differences from the rollout loop: observations are always a tuple of parts in layout
order (then the action buffer), actions are always in ``[-1, 1]`` (rescaled to the env's bounds when they differ).

The action buffer is the handle's own, in policy units: rtgym appends the *env*-unit action to its buffer (and its
``get_default_action()`` at reset), while batches carry the policy-unit action the actor chose (clipped to
``[-1, 1]``) and the reset row carries the default action converted to policy units. The handle therefore replaces
the env's buffer parts with the last ``action_history`` policy-unit actions (the converted default action at reset),
so the actor sees exactly the history the trainer rebuilds from the batches, whatever the env's action bounds.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from tmrl_common.config import short_repr
from tmrl_common.layout import (
    ObservationComponent,
    ObservationLayout,
    box_bounds,
    clipped_into_bounds,
    empty_space_problem,
    image_shape_problem,
    layout_for_box,
)
from tmrl_common.log_limit import RateLimitedLog

log = logging.getLogger(__name__)
_clip_log = RateLimitedLog(log, interval_s=30.0)
FLOAT32_EXACT_INTEGERS = 2**24
"""The largest magnitude up to which float32 holds every integer: an int observation beyond it is rounded."""

SIM_SPECS = ("sim", "sim-fast")
TM20_SPECS = ("tm20-lidar", "tm20-lidar-progress", "tm20-full")
SIM_GYM_ID = "tmrl_worker.sim:tmrl/RaceTrack-v0"
RTGYM_ID = "real-time-gym-v1"
TRUNCATED_REASON = "truncated_reason"
"""``info`` key an rtgym interface sets (with the reason) when its ``terminated`` means "truncated"."""

ExpertPolicy = Callable[[tuple], np.ndarray]

_odd_finished_flags: set[str] = set()
"""Types of ``info["finished"]`` values already warned of (once per type and process)."""


def finished_flag(info: Mapping[str, Any]) -> bool | None:
    """``info["finished"]``: the env's word on whether the episode completed its task (the simulator's and
    TrackMania's finish line), as ``True``/``False`` for a bool, a numpy bool, or 0 and 1; ``None`` when absent. Any
    other value counts as not reported, with a warning once per type: a BYO probe's ``"no"`` was read as true, so
    its unfinished episodes outranked every other as the best policy and were scored as finished laps."""
    if "finished" not in info:
        return None
    value = info["finished"]
    if isinstance(value, bool | np.bool_) or (isinstance(value, int | np.integer) and value in (0, 1)):
        return bool(value)
    kind = type(value).__name__
    if kind not in _odd_finished_flags:
        _odd_finished_flags.add(kind)
        log.warning("the env's info[\"finished\"] is %s (a %s): only True or False say whether an episode finished its "
                    "task, so such values count as not reported (episodes are then ranked by return alone)",
                    short_repr(value), kind)
    return None


class EnvInterrupted(RuntimeError):
    """An env gave up waiting (e.g. for a lost game) because the worker is stopping; the rollout ends cleanly."""


class EnvFailure(RuntimeError):
    """The environment cannot go on (a game that does not restart, does not come back, or does not fit its reward
    path): the worker flushes the samples it sent and stops with this message, without a traceback."""


class EnvSpecError(ValueError):
    """An ``env`` spec cannot be turned into an environment; the message says which specs exist and what failed."""


class ReturnedValueError(TypeError):
    """A reward or a ``terminated``/``truncated`` an env returned is not of a type tmrl takes; the message names the
    value, its type and what to return instead."""


def _kind(value: Any) -> str:
    """``value``'s type name, with its shape when it is an array."""
    return f"numpy array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def _one_number(reward: Any) -> float:
    """``reward`` as a float when it is one real number: a Python or numpy int or float, or a 0-d numpy array of
    one; else :class:`ReturnedValueError`. A string, a bool, a complex, an array of values (even of one: a
    vectorised env's reward, wrongly unwrapped) or ``None`` is refused rather than converted (``float`` would read
    ``"1.5"``, and a bool reward is a bug more often than a choice)."""
    if isinstance(reward, np.ndarray) and reward.ndim == 0 and reward.dtype.kind in "iuf":
        reward = reward[()]
    if isinstance(reward, (bool, np.bool_)) or not isinstance(reward, (int, float, np.integer, np.floating)):
        raise ReturnedValueError(f"reward {short_repr(reward)}, which is not one number (a {_kind(reward)}): "
                                 "return a float")
    return float(reward)


def _one_flag(name: str, value: Any) -> bool:
    """``value`` (``terminated`` or ``truncated``) as a bool when it is one (Python's or numpy's) or an int 0 or 1:
    envs written for the old gym API return ``done`` as 0/1 (gymnasium's own checker only warns), and 0/1 cannot
    mean anything but False/True. Anything else is :class:`ReturnedValueError`: ``bool(None)`` is False and
    ``bool("False")`` True, so converting would hide the bug, and an array of flags has no truth value."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ReturnedValueError(f"{name} {short_repr(value)} (a {_kind(value)}), which is not a bool: return True or False")


def _observation_list(method: str, observation: Any) -> Any:
    """An rtgym interface's observation as rtgym needs it: a list of arrays, one per part (a tuple, as a Tuple
    space's sample() gives it, becomes a list: rtgym appends a list to it). One numpy array is refused
    (:class:`InterfaceReturnError`): rtgym would add the action buffer to it as numbers at a reset and split it
    into its rows at a step (a BYO probe's `return o[0], ...` for `[o[0]]` was told of 5 parts where it had 1)."""
    if isinstance(observation, np.ndarray):
        raise InterfaceReturnError(f"{method} returned the observation as one numpy array of shape "
                                   f"{observation.shape}: return a list of arrays, one per part of the observation "
                                   "space's Tuple (e.g. [obs] for one part)")
    return list(observation) if isinstance(observation, tuple) else observation


def _spec_help() -> str:
    return "valid specs: " + ", ".join((*SIM_SPECS, *TM20_SPECS, "module:Class", "gym:<gymnasium id>"))


@dataclass
class EnvHandle:
    """A built environment plus what the worker needs to know about it."""

    spec: str
    env: gymnasium.Env
    layout: ObservationLayout
    realtime: bool
    """True for rtgym envs: ``step`` paces itself to the time step; False: synchronous, as fast as possible."""
    expert: ExpertPolicy | None = None
    """A scripted driver (observation tuple → action in [-1, 1]) when the env offers one (the simulator does)."""
    wrap_observation: bool = False
    """True when the env returns one array (plain gymnasium Box envs): it is wrapped into a 1-tuple."""
    closer: Callable[[], None] | None = None
    """Replaces ``env.close()`` when the env needs more (the real-time simulator stops its physics thread)."""
    reset_hooks: list[Callable[[], None]] = field(default_factory=list)
    """Called before every reset (e.g. the expert forgets where the car was)."""
    step_seconds: float | None = None
    """Seconds of env time per step (the rtgym time step, the simulator's ``time_step_duration``, a gymnasium env's
    ``dt``); ``None`` when the env does not say."""
    in_call: str | None = field(default=None, init=False)
    """``"reset"`` or ``"step"`` while the env is in that call (read by the worker's stop watchdog, which names the
    call an env is stuck in); ``None`` between calls."""
    in_call_since: float = field(default=0.0, init=False)
    """When (``time.monotonic()``) the current call began; meaningful while :attr:`in_call` is set."""

    def __post_init__(self) -> None:
        space = self.env.action_space
        if not isinstance(space, spaces.Box):
            raise EnvSpecError(f"env {self.spec!r} has action space {space}; tmrl's SAC needs a continuous Box")
        low = np.asarray(space.low, dtype=np.float64).reshape(-1)
        high = np.asarray(space.high, dtype=np.float64).reshape(-1)
        self._action_shape = space.shape
        half_open = np.isfinite(low) != np.isfinite(high)
        if half_open.any():
            raise EnvSpecError(f"env {self.spec!r} has action space {space} with one infinite bound in dimension(s) "
                               f"{np.flatnonzero(half_open).tolist()}: the policy's actions lie in [-1, 1] and are "
                               "rescaled to each dimension's finite bounds, which such a dimension does not have; give "
                               "it both bounds (e.g. [0, max_thrust])")
        flat = np.isfinite(low) & (high <= low)
        if flat.any():
            raise EnvSpecError(f"env {self.spec!r} has action space {space} whose dimension(s) "
                               f"{np.flatnonzero(flat).tolist()} have high <= low: no action there could be learned; "
                               "leave such a dimension out of the action space")
        self._rescaled = np.isfinite(low) & ~(np.isclose(low, -1.0) & np.isclose(high, 1.0))
        """Dimensions mapped from [-1, 1] to their bounds; the others (bounds [-1, 1], or none) take [-1, 1] as is."""
        self._rescale = bool(self._rescaled.any())
        self._low = np.where(self._rescaled, low, -1.0)
        self._span = np.where(self._rescaled, high - low, 2.0)
        """``low`` and ``high - low`` of the rescaled dimensions, -1 and 2 (the identity) for the others."""
        image_problem = image_shape_problem(self.layout)
        if image_problem is not None:  # the trainer refuses such a layout: its samples could never be learned from
            raise EnvSpecError(f"env {self.spec!r}: {image_problem}")
        if low.size != self.layout.action_dim:
            raise EnvSpecError(f"env {self.spec!r} has an action space of {low.size} value(s) {space}, but its layout "
                               f"declares action_dim {self.layout.action_dim}: make the two agree")
        env_default = getattr(self.env.unwrapped, "default_action", None)  # rtgym's get_default_action(), env units
        if env_default is not None and np.size(env_default) != low.size:
            raise EnvSpecError(f"env {self.spec!r}'s default action has {np.size(env_default)} value(s), its action "
                               f"space {space} has {low.size}: make get_default_action() return one value per action")
        if env_default is not None:
            values = np.asarray(env_default, dtype=np.float64).reshape(-1)
            outside = ~np.isfinite(values) | (np.isfinite(low) & ((values < low) | (values > high)))
            if outside.any():  # clipped, the reset rows and action buffer would hold an action the env never applied
                raise EnvSpecError(f"env {self.spec!r}'s default action {values.tolist()} lies outside its action "
                                   f"space {space} in dimension(s) {np.flatnonzero(outside).tolist()}: the policy's "
                                   "action buffer and the reset rows would hold the bound instead; make "
                                   "get_default_action() return an action within the bounds")
        self._default_action = (np.zeros(self.layout.action_dim, dtype=np.float32) if env_default is None
                                else self.to_policy_action(env_default))
        self._action_buffer: deque = deque(maxlen=self.layout.action_history)
        self._part_names = [component.name for component in self.layout.components]
        """The observation parts :meth:`_checked` checks, by name (the action buffer's parts follow them)."""
        self._histories = [index for index, component in enumerate(self.layout.components) if component.history > 1]
        """The parts that hold a history of frames, whose shifting :meth:`_check_histories` checks."""
        self._previous_histories: dict[int, np.ndarray] = {}
        """Those parts as the last reset or step returned them."""
        self._interface = getattr(self.env.unwrapped, "interface", None)
        """The rtgym interface (``None`` for other envs), whose guard :meth:`step` asks after every step."""
        self.clipped_observations = 0
        """Observations that held a value outside their component's declared ``low``/``high``, clipped into them."""

    @property
    def action_dim(self) -> int:
        return self.layout.action_dim

    @property
    def default_action(self) -> np.ndarray:
        """The env's default action (rtgym's ``get_default_action()``, else zeros) in policy units: what the action
        buffer holds at reset, recorded as the reset row's action."""
        return self._default_action

    @staticmethod
    def policy_action(action: np.ndarray) -> np.ndarray:
        """The action as applied and recorded: float32, clipped to [-1, 1]."""
        return np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """Policy action in [-1, 1] → the env's action (clipped, rescaled to the Box bounds when they differ)."""
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if self._rescale:
            action = self._low + (action + 1.0) * 0.5 * self._span
        return action.astype(self.env.action_space.dtype, copy=False).reshape(self._action_shape)

    def to_policy_action(self, env_action: np.ndarray) -> np.ndarray:
        """The env's action → policy units (the inverse of :meth:`to_env_action`, clipped to [-1, 1])."""
        action = np.asarray(env_action, dtype=np.float64).reshape(-1)
        if self._rescale:
            action = 2.0 * (action - self._low) / self._span - 1.0
        return self.policy_action(action)

    def _observation(self, observation: Any) -> tuple:
        parts = (observation,) if self.wrap_observation else tuple(observation)
        # a scalar part (a Box of shape ()) is the layout's 1-value component (layout_from_spaces)
        parts = tuple(np.reshape(part, (1,)) if np.ndim(part) == 0 else part for part in parts)
        history = self.layout.action_history
        if not history or len(parts) != len(self.layout.components) + history:
            return parts
        return (*parts[:-history], *(action.copy() for action in self._action_buffer))

    def reset(self, seed: int | None = None) -> tuple:
        for hook in self.reset_hooks:
            hook()
        observation, _info = self._unpacked("reset", self._call_env("reset", self.env.reset, seed=seed),
                                            "(observation, info)")
        self._action_buffer.extend([self._default_action] * self.layout.action_history)
        return self._checked(self._env_observation(observation, "the reset"), 0.0, "the reset")

    def _env_observation(self, observation: Any, when: str) -> tuple:
        """:meth:`_observation`, or :class:`EnvFailure` when what the env returned is not a sequence of arrays."""
        try:
            return self._observation(observation)
        except Exception as exc:  # noqa: BLE001 - whatever the env returned
            raise EnvFailure(f"env {self.spec!r} returned an observation that is not a tuple of arrays at {when} "
                             f"({type(exc).__name__}: {one_line_message(exc)})") from exc

    def _call_env(self, call: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)``, the env's ``call`` (``"reset"`` or ``"step"``, in :attr:`in_call` meanwhile),
        with any exception out of it but :class:`EnvFailure` and :class:`EnvInterrupted` turned into an
        :class:`EnvFailure` naming it (its traceback goes to the log, as the rtgym thread guard logs one): the worker
        then stops with one line, not a traceback."""
        self.in_call_since = time.monotonic()
        self.in_call = call
        try:
            return method(*args, **kwargs)
        except (EnvFailure, EnvInterrupted):
            raise
        except (InterfaceReturnError, InterfaceCallError) as exc:  # its message says it all
            raise EnvFailure(f"env {self.spec!r}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the env's own code: anything may go wrong in it
            log.error("env %r: its %s raised", self.spec, call, exc_info=exc)
            raise EnvFailure(f"env {self.spec!r}: its {call} raised {type(exc).__name__}: "
                             f"{one_line_message(exc)}") from exc
        finally:
            self.in_call = None

    def _checked(self, observation: tuple, reward: float, when: str, ends_episode: bool = False) -> tuple:
        """``observation``, after checking that it has the layout's parts and shapes, and that it and ``reward``
        hold no NaN or infinity: a value that breaks either would make every batch holding it be refused, so the env
        cannot go on (:class:`EnvFailure`, naming the part). Parts holding a history of frames are checked to follow
        the layout's rule (:meth:`_check_histories`), except in the observation that ends an episode."""
        expected = len(self.layout.components) + self.layout.action_history
        if len(observation) != expected:
            raise EnvFailure(f"env {self.spec!r} returned an observation of {len(observation)} part(s) at {when}; its "
                             f"layout has {expected} ({', '.join(self._part_names)}"
                             f"{f', then {self.layout.action_history} action(s)' if self.layout.action_history else ''})")
        for component, part in zip(self.layout.components, observation, strict=False):
            if np.shape(part) != component.observation_shape:
                raise EnvFailure(f"env {self.spec!r} returned observation part {component.name!r} of shape "
                                 f"{np.shape(part)} at {when}; its layout declares {component.observation_shape}")
        if not math.isfinite(reward):
            raise EnvFailure(f"env {self.spec!r} returned reward {reward} at {when}: NaN and infinite rewards cannot "
                             "be learned from; fix or clip the env's reward")
        for name, part in zip(self._part_names, observation, strict=False):
            values = np.asarray(part)
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise EnvFailure(f"env {self.spec!r} returned NaN or infinite values in observation part "
                                 f"{name!r} at {when}: fix or clip the env's observation")
        observation = self._as_layout_dtypes(observation, when)
        if not ends_episode:  # no action is taken on a last observation (a lost game's repeats the one before)
            self._check_histories(observation, when)
        return observation

    def _as_layout_dtypes(self, observation: tuple, when: str) -> tuple:
        """The observation's parts in the layout's dtypes: the trainer stores them so, and the policy must act on the
        same values. A ``uint8`` part (an image) returned as another dtype must hold whole numbers in 0..255, else
        :class:`EnvFailure`: frames normalised to [0, 1] would all be stored as 0 (and the policy, fed the floats,
        would act on other inputs than the trainer learns from). A ``float32`` part of another dtype (float64, int,
        bool, a list) is cast, as a float32 Box's values are."""
        parts = list(observation)
        for index, component in enumerate(self.layout.components):
            values = np.asarray(parts[index])
            if values.dtype == component.dtype:
                parts[index] = values
                continue
            if component.dtype == "uint8":
                lossless = values.dtype.kind in "biuf" and bool(
                    values.size == 0 or (values.min() >= 0 and values.max() <= 255 and (values == np.round(values)).all()))
                if not lossless:
                    low, high = (values.min(), values.max()) if values.size and values.dtype.kind in "biuf" else ("?", "?")
                    raise EnvFailure(f"env {self.spec!r} returned observation part {component.name!r} as {values.dtype} "
                                     f"with values in [{low}, {high}] at {when}; its layout declares uint8 (an image, "
                                     "stored as whole numbers 0..255): return np.uint8 frames (e.g. (frame * 255)"
                                     ".astype(np.uint8) for frames in [0, 1]), or declare the part a float32 Box")
            elif values.dtype.kind in "iu" and values.size:
                largest = max(abs(int(values.min())), abs(int(values.max())))
                if largest > FLOAT32_EXACT_INTEGERS:
                    _clip_log.warning(("inexact", self.spec, component.name), "env %r returned observation part %r "
                                      "as %s with values up to %d at %s: as float32 (what the layout stores and the "
                                      "policy reads) integers above 2**24 are rounded; rescale or offset them (a count "
                                      "since the episode's start, not since 1970)", self.spec, component.name,
                                      values.dtype, largest, when)
            parts[index] = values.astype(component.dtype)
        return self._within_bounds(parts, when)

    def _within_bounds(self, parts: list, when: str) -> tuple:
        """``parts`` with the values outside a component's declared ``low``/``high`` clipped into them, counted and
        logged (at most a line per part every 30 s). The trainer refuses a whole batch holding such a value
        (``observation_out_of_bounds``), so one sensor glitch would lose every step of its batch; clipped here, the
        policy acts on what the trainer stores."""
        clipped = False
        for index, component in enumerate(self.layout.components):
            values = parts[index]
            within = clipped_into_bounds(component, values)
            if within is not None:
                _clip_log.warning(("clip", self.spec, component.name), "env %r returned observation part %r with "
                                  "values in [%.6g, %.6g] at %s, outside its layout's [%s, %s]: clipped into them "
                                  "(%d observation(s) clipped so far); widen the bounds if such values are real",
                                  self.spec, component.name, values.min(), values.max(), when, component.low,
                                  component.high, self.clipped_observations + 1)
                parts[index] = within
                clipped = True
        self.clipped_observations += clipped
        return tuple(parts)

    def _check_histories(self, observation: tuple, when: str) -> None:
        """Check the layout's rule for a part holding a history of frames, oldest first: at a reset every frame is
        the reset's, and each step drops the oldest and appends one. Only the newest frame of a step is sent, and the
        trainer rebuilds each history by that rule, so a part that breaks it (frames skipped, stacked otherwise,
        padded with zeros) would be learned from as other observations than the policy acted on:
        :class:`EnvFailure`, naming the part."""
        reset = when == "the reset"
        for index in self._histories:
            frames = np.asarray(observation[index])
            follows = (frames[:-1] == frames[-1]).all() if reset else (
                index in self._previous_histories and (frames[:-1] == self._previous_histories[index][1:]).all())
            if not follows:
                rule = ("every frame the reset's (its first frame repeated)" if reset
                        else "the previous step's frames shifted by one, the new frame last")
                raise EnvFailure(f"env {self.spec!r} returned observation part {self._part_names[index]!r} at {when} "
                                 f"with frames that are not {rule}: the layout declares it a history of "
                                 f"{len(frames)} frames, which the trainer rebuilds by that rule from the newest "
                                 "frame of each step; keep the history that way, or declare history 1 and the "
                                 "whole stack as its frame")
            self._previous_histories[index] = frames.copy()

    def step(self, action: np.ndarray) -> tuple[tuple, float, bool, bool, dict]:
        """Apply a policy action in [-1, 1]; return ``(observation tuple, reward, terminated, truncated, info)``.

        An rtgym interface can only end an episode through ``terminated``; one that ends it for a reason outside the
        task (the game's plugin or window went away) also sets ``info[TRUNCATED_REASON]``, and the step is then
        reported as truncated, so the trainer bootstraps through it instead of learning a false terminal state.
        An action of another size than the action space's, or holding a NaN or an infinity, is an
        :class:`EnvFailure`, and nothing reaches the env."""
        values = np.asarray(action, dtype=np.float64).reshape(-1)
        if values.size != self.action_dim or not np.isfinite(values).all():
            raise EnvFailure(f"env {self.spec!r}: an action of {values.size} value(s) {values[:8].tolist()} was not "
                             f"applied: the action space takes {self.action_dim} finite value(s)")
        observation, reward, terminated, truncated, info = self._unpacked(
            "step", self._call_env("step", self.env.step, self.to_env_action(action)),
            "(observation, reward, terminated, truncated, info)")
        failure = getattr(self._interface, "rtgym_thread_failure", None)
        if failure is not None:  # the interface failed on rtgym's thread (_guarded_interface): it cannot go on
            raise EnvFailure(f"env {self.spec!r}: {failure}")
        try:  # before anything tests them: `if terminated` raises on an array of flags, and is True for "False"
            reward = _one_number(reward)
            terminated, truncated = _one_flag("terminated", terminated), _one_flag("truncated", truncated)
        except ReturnedValueError as exc:
            raise EnvFailure(f"env {self.spec!r}: its step returned {exc}") from exc
        if terminated and isinstance(info, dict) and info.get(TRUNCATED_REASON):
            terminated, truncated = False, True
        self._action_buffer.append(self.policy_action(action))
        observation = self._env_observation(observation, "a step")
        return (self._checked(observation, reward, "a step", ends_episode=terminated or truncated), reward, terminated,
                truncated, info)

    def _unpacked(self, call: str, result: Any, expected: str) -> tuple:
        """``result`` of the env's ``call`` when it is a tuple (or list) of as many values as ``expected`` names;
        else :class:`EnvFailure`: unpacking it would raise out of the rollout loop with a traceback (an env written
        for the old gym API returns the observation alone from reset, four values from step)."""
        try:
            return _returned(f"its {call}", result, expected, expecting="gymnasium")
        except InterfaceReturnError as exc:
            raise EnvFailure(f"env {self.spec!r}: {exc}") from exc

    def attach_stop(self, stop: threading.Event) -> None:
        """Let an rtgym interface that may wait a long time (TrackMania waiting for the game) see ``stop``: it then
        raises :class:`EnvInterrupted` instead of waiting on after the worker was asked to stop."""
        interface = getattr(self.env.unwrapped, "interface", None)
        if interface is not None and hasattr(interface, "stop_event"):
            interface.stop_event = stop

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
        else:
            self.env.close()


# ------------------------------------------------------------------------------------------------------- layouts


def layout_from_spaces(observation_space: spaces.Space, action_space: spaces.Space, action_history: int = 0) -> ObservationLayout:
    """A layout for envs that do not declare one: each observation part is a component ``part<i>`` (no history
    stacking, so the whole part is sent every step). ``action_history`` trailing parts are the rtgym action buffer."""
    if not isinstance(action_space, spaces.Box):
        raise EnvSpecError(f"action space {action_space} is not a Box; tmrl's SAC needs continuous actions")
    action_dim = math.prod(action_space.shape)
    no_action = empty_space_problem((1,), action_space.shape)  # a probe's Box(shape=(0,)): a pydantic traceback
    if no_action is not None:
        raise EnvSpecError(no_action)
    if isinstance(observation_space, spaces.Box):
        _check_not_empty("the observation space", observation_space)
        return layout_for_box(math.prod(observation_space.shape), action_dim,
                              *box_bounds(observation_space.low, observation_space.high)) if len(observation_space.shape) <= 1 else \
            ObservationLayout(components=[_component("obs", observation_space)], action_dim=action_dim)
    if isinstance(observation_space, spaces.Tuple):
        parts = list(observation_space.spaces)
        if action_history:
            parts = parts[:-action_history]
        if not parts or not all(isinstance(p, spaces.Box) for p in parts):
            raise EnvSpecError(f"observation space {observation_space} must be a Box or a Tuple of Boxes")
        return ObservationLayout(components=[_component(f"part{i}", p) for i, p in enumerate(parts)],
                                 action_dim=action_dim, action_history=action_history)
    raise EnvSpecError(f"observation space {observation_space} must be a Box or a Tuple of Boxes")


def _check_not_empty(what: str, box: spaces.Box) -> None:
    if box.low.size == 0:  # numpy's "zero-size array to reduction operation" traceback otherwise (a probe)
        raise EnvSpecError(f"{what} (a Box of shape {box.shape}) holds no values; drop it or give it a shape with "
                           "no zero in it")


def _component(name: str, box: spaces.Box) -> ObservationComponent:
    _check_not_empty(f"observation part {name!r}", box)
    shape = [int(d) for d in box.shape] or [1]
    dtype = "uint8" if box.dtype == np.uint8 else "float32"
    low, high = box_bounds(box.low, box.high)
    return ObservationComponent(name=name, frame_shape=shape, dtype=dtype, low=low, high=high)


def _declared_layout(spec: str, *candidates: Any) -> ObservationLayout | None:
    """The :class:`ObservationLayout` the first of ``candidates`` (an env, an rtgym interface) declares as its
    ``layout`` attribute or method; ``None`` when none declares one. A declared layout of another type (a dict, a
    JSON string...) is an :class:`EnvSpecError`: ignoring it would train silently without its histories and bounds."""
    for candidate in candidates:
        owner = type(candidate).__name__
        declared = f"{owner}.layout"
        try:  # a property may raise (an AttributeError out of it reads as "not declared", as getattr has it)
            layout = getattr(candidate, "layout", None)
            if callable(layout):
                declared = f"{owner}.layout()"
                layout = layout()
        except Exception as exc:  # noqa: BLE001 - the env's own code
            raise EnvSpecError(f"env {spec!r}: {declared} raised {type(exc).__name__}: {one_line_message(exc)}") from exc
        if layout is None:
            continue
        if not isinstance(layout, ObservationLayout):
            got = "returned" if declared.endswith("()") else "is"
            raise EnvSpecError(f"env {spec!r}: {declared} {got} a {_kind(layout)}, not a "
                               "tmrl_common.layout.ObservationLayout (build one, e.g. ObservationLayout.model_validate("
                               "...), or remove it to derive the layout from the observation space)")
        return layout
    return None


def _expert_of(*candidates: Any) -> ExpertPolicy | None:
    for candidate in candidates:
        expert = getattr(candidate, "expert_action", None)
        if callable(expert):
            return expert
    return None


# ----------------------------------------------------------------------------------------------------- factories


def rtgym_config(interface: type, time_step_duration: float = 0.05, max_episode_steps: int = 1000,
                 act_buf_len: int = 2, interface_kwargs: dict | None = None) -> dict:
    """An rtgym config dict for ``interface`` (a :class:`rtgym.RealTimeGymInterface` subclass)."""
    from rtgym import DEFAULT_CONFIG_DICT

    config = dict(DEFAULT_CONFIG_DICT)
    config.update(
        interface=interface,
        interface_kwargs=dict(interface_kwargs or {}),
        time_step_duration=time_step_duration,
        start_obs_capture=time_step_duration,
        time_step_timeout_factor=1.0,
        ep_max_length=max_episode_steps,
        act_in_obs=True,
        act_buf_len=act_buf_len,
        reset_act_buf=True,
        wait_on_done=True,
    )
    return config


NOT_A_SPACE = "does not inherit from `gymnasium.Space`"
"""gymnasium's TypeError when rtgym builds its Tuple from an observation space that is no Tuple (a Dict's keys)."""
GYMNASIUM_REWRAPPED = " was raised from the environment creator for "
"""How ``gymnasium.make`` extends the message of a ``TypeError`` out of an env's constructor (then the whole config)."""


def _creator_type_error(exc: TypeError) -> str:
    """The message of the ``TypeError`` an env's constructor raised, on one line, without what ``gymnasium.make``
    appends to it (the env id and every keyword argument with its value: for rtgym, the whole config)."""
    original = exc.__cause__ if isinstance(exc.__cause__, TypeError) else exc
    return one_line_message(TypeError(str(original).split(GYMNASIUM_REWRAPPED)[0]))


class InterfaceReturnError(TypeError):
    """An rtgym interface method returned something rtgym cannot unpack (the message names the method)."""


class InterfaceCallError(RuntimeError):
    """An rtgym interface method that rtgym calls from inside the env's ``step`` or ``reset`` (``wait``) raised; the
    message names the method, which the env's own call would not."""


def _returned(method: str, result: Any, expected: str, expecting: str = "rtgym") -> tuple:
    """``result`` when it is a tuple (or list) of as many values as ``expected`` names; else
    :class:`InterfaceReturnError` saying what ``method`` returned and what ``expecting`` expects: for an rtgym
    interface method, rtgym would fail unpacking it, on its own thread for a step, and leave the worker waiting."""
    count = expected.count(",") + 1
    if not isinstance(result, (tuple, list)) or len(result) != count:
        got = f"{len(result)} value(s)" if isinstance(result, (tuple, list)) else f"a {_kind(result)}"
        raise InterfaceReturnError(f"{method} returned {got}; {expecting} expects {count}: {expected}")
    return tuple(result)


def _guarded_interface(interface: type) -> type:
    """``interface`` with what rtgym calls on its own thread guarded: an exception there would end that thread and
    leave the worker waiting for an observation for ever. Instead the first failure is logged with its traceback
    and kept (``rtgym_thread_failure``), the step ends the episode, and :meth:`EnvHandle.step` raises :class:`EnvFailure`."""
    if getattr(interface, "guards_rtgym_thread", False):
        return interface

    class Guarded(interface):  # type: ignore[misc, valid-type]
        guards_rtgym_thread = True
        rtgym_thread_failure: str | None = None
        """``"Class.method raised Error: message"`` once a guarded method failed (a name no interface uses)."""
        _guard_last_observation: Any = None

        def _failed(self, method: str, exc: Exception) -> None:
            if isinstance(exc, InterfaceReturnError):  # its message says it all
                log.error("%s", exc)
            else:
                log.error("%s.%s raised on rtgym's thread", interface.__name__, method, exc_info=exc)
            if self.rtgym_thread_failure is None:
                self.rtgym_thread_failure = (str(exc) if isinstance(exc, InterfaceReturnError)
                                             else f"{interface.__name__}.{method} raised {type(exc).__name__}: {exc}")

        def reset(self, *args: Any, **kwargs: Any) -> Any:
            method = f"{interface.__name__}.reset"
            observation, info = _returned(method, super().reset(*args, **kwargs), "(observation list, info dict)")
            observation = _observation_list(method, observation)
            self._guard_last_observation = observation
            return observation, info

        def wait(self) -> None:
            try:
                super().wait()
            except Exception as exc:  # rtgym calls it from its step and reset: name it, or they get the blame
                log.error("%s.wait raised", interface.__name__, exc_info=exc)
                raise InterfaceCallError(f"{interface.__name__}.wait raised {type(exc).__name__}: "
                                         f"{one_line_message(exc)}") from exc

        def send_control(self, control: Any) -> None:
            if self.rtgym_thread_failure is None:
                try:
                    super().send_control(control)
                except Exception as exc:  # noqa: BLE001 - any error of the interface, reported by EnvHandle.step
                    self._failed("send_control", exc)

        def get_obs_rew_terminated_info(self) -> Any:
            if self.rtgym_thread_failure is None:
                try:
                    method = f"{interface.__name__}.get_obs_rew_terminated_info"
                    result = _returned(method, super().get_obs_rew_terminated_info(),
                                       "(observation list, reward, terminated, info dict)")
                    try:  # rtgym tests `terminated` in its step: an array of flags would raise there, unnamed
                        _one_number(result[1])
                        _one_flag("terminated", result[2])
                    except ReturnedValueError as exc:
                        raise InterfaceReturnError(f"{method} returned {exc}") from exc
                    result = (_observation_list(method, result[0]), *result[1:])
                    self._guard_last_observation = result[0]
                    return result
                except Exception as exc:  # noqa: BLE001 - any error of the interface, reported by EnvHandle.step
                    self._failed("get_obs_rew_terminated_info", exc)
            return self._guard_last_observation, 0.0, True, {}

    Guarded.__name__, Guarded.__qualname__, Guarded.__module__ = interface.__name__, interface.__qualname__, interface.__module__
    return Guarded


def _rtgym_env(spec: str, config: dict, setup_errors: tuple[type[BaseException], ...] = ()) -> gymnasium.Env:
    """``gymnasium.make`` of rtgym with ``config``'s interface guarded (:func:`_guarded_interface`); whatever building
    the interface raises becomes an :class:`EnvSpecError` naming it: ``setup_errors`` (whose messages say what to
    fix) by their message, anything else with its type (and its traceback at debug level)."""
    config = {**config, "interface": _guarded_interface(config["interface"])}
    try:
        return gymnasium.make(RTGYM_ID, config=config, disable_env_checker=True)
    except EnvSpecError:
        raise
    except setup_errors as exc:
        raise EnvSpecError(f"env {spec!r}: {exc}") from exc
    except Exception as exc:  # the interface's own code: anything may go wrong in it
        log.debug("building env %r failed", spec, exc_info=exc)
        hint = ""
        tuple_of_boxes = (" (an rtgym interface's get_observation_space returns a gymnasium.spaces.Tuple of Boxes: a "
                          "single Box goes in a 1-tuple, a Dict's Boxes in a Tuple, in a fixed order)")
        if isinstance(exc, AttributeError) and "spaces" in str(exc):
            hint = tuple_of_boxes
        if isinstance(exc, TypeError) and NOT_A_SPACE in str(exc):
            # rtgym joins the observation space's .spaces with the action space's into a Tuple: a Dict gives its keys
            raise EnvSpecError(f"env {spec!r}: building it failed: TypeError: {_creator_type_error(exc)}"
                               f"{tuple_of_boxes}") from exc
        if isinstance(exc, TypeError) and GYMNASIUM_REWRAPPED in str(exc):
            # the interface refused its keyword arguments (the worker's env_options): gymnasium re-raised its TypeError
            # with the whole rtgym config; say what the interface said, and the names of the arguments it was given
            given = ", ".join(sorted(config.get("interface_kwargs") or {})) or "none"
            raise EnvSpecError(f"env {spec!r}: building interface {config['interface'].__name__} raised TypeError: "
                               f"{_creator_type_error(exc)} (its keyword arguments, from env_options: {given})") from exc
        given = config.get("interface_kwargs") or {}
        if given and not hint:  # a BYO probe's float(gain) of "abc" was not traced back to the env_options it came from
            hint = f" (its keyword arguments, from env_options: {', '.join(sorted(given))})"
        raise EnvSpecError(f"env {spec!r}: building it failed: {type(exc).__name__}: {one_line_message(exc)}"
                           f"{hint}") from exc


def _make_rtgym(spec: str, config: dict, setup_errors: tuple[type[BaseException], ...] = ()) -> EnvHandle:
    env = _rtgym_env(spec, config, setup_errors)
    interface = env.unwrapped.interface
    action_history = config["act_buf_len"] if config["act_in_obs"] else 0
    layout = _declared_layout(spec, interface, env.unwrapped)
    if layout is None:
        layout = layout_from_spaces(env.observation_space, env.action_space, action_history=action_history)
    else:
        _check_declared_layout(spec, layout, env.observation_space, action_history)
    return EnvHandle(spec=spec, env=env, layout=layout, realtime=True, expert=_expert_of(interface),
                     step_seconds=float(config["time_step_duration"]))


def _check_declared_layout(spec: str, layout: ObservationLayout, space: spaces.Space, action_history: int) -> None:
    """An :class:`EnvSpecError` now, when the env is built, for a declared layout that the env's observations can
    never match (else the first reset fails with a count that mixes the interface's parts and rtgym's actions)."""
    if layout.action_history != action_history:
        raise EnvSpecError(f"env {spec!r}: its layout declares action_history {layout.action_history}, but rtgym "
                           f"appends the last {action_history} actions to every observation of a module:Class "
                           f"interface (act_buf_len): declare action_history = {action_history}")
    parts = list(space.spaces) if isinstance(space, spaces.Tuple) else [space]
    ours = parts[:len(parts) - action_history]
    if len(ours) != len(layout.components):
        raise EnvSpecError(f"env {spec!r}: get_observation_space has {len(ours)} part(s), its layout declares "
                           f"{len(layout.components)} component(s) ({', '.join(c.name for c in layout.components)})")
    for component, part in zip(layout.components, ours, strict=True):
        shape, declared = tuple(getattr(part, "shape", None) or ()), tuple(component.observation_shape)
        if shape != declared and not (shape == () and declared == (1,)):  # a scalar Box is a 1-value component
            raise EnvSpecError(f"env {spec!r}: observation part {component.name!r} has shape {shape} in "
                               f"get_observation_space, its layout declares {declared}")


def _import_interface(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name or not class_name.isidentifier():
        raise EnvSpecError(f"env {spec!r}: a plugged interface is written 'package.module:ClassName'; {_spec_help()}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing and not (module_name == missing or module_name.startswith(f"{missing}.")):
            # the module was found; something it imports was not
            raise EnvSpecError(f"env {spec!r}: importing module {module_name!r} failed: {exc} (install {missing!r} "
                               "in this worker's Python environment)") from exc
        raise EnvSpecError(f"env {spec!r}: cannot import module {module_name!r} ({exc}); "
                           "is it installed or on PYTHONPATH?") from exc
    except Exception as exc:  # the module's own code failed while importing (a syntax error, an error at import)
        log.debug("importing %r failed", module_name, exc_info=exc)
        raise EnvSpecError(f"env {spec!r}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise EnvSpecError(f"env {spec!r}: module {module_name!r} has no attribute {class_name!r}")
    from rtgym import RealTimeGymInterface

    if not (isinstance(cls, type) and issubclass(cls, RealTimeGymInterface)):
        raise EnvSpecError(f"env {spec!r}: {module_name}.{class_name} is not a subclass of rtgym.RealTimeGymInterface")
    return cls


def _gym_step_seconds(env: gymnasium.Env) -> float | None:
    """A gymnasium env's seconds per step: its ``dt`` (classic control, MuJoCo), else ``1 / render_fps``."""
    dt = getattr(env.unwrapped, "dt", None)
    if isinstance(dt, (int, float)) and dt > 0:
        return float(dt)
    fps = (env.metadata or {}).get("render_fps")
    return 1.0 / float(fps) if isinstance(fps, (int, float)) and fps > 0 else None


def _make_gym(spec: str, gym_id: str, max_episode_steps: int | None, options: dict,
              render_mode: str | None = None) -> EnvHandle:
    if not gym_id:
        raise EnvSpecError(f"env {spec!r}: write the gymnasium id after 'gym:', e.g. gym:Pendulum-v1")
    if max_episode_steps:
        options = {"max_episode_steps": max_episode_steps, **options}
    if render_mode is not None:
        options = {"render_mode": render_mode, **options}
    try:
        env = gymnasium.make(gym_id, **options)
    except gymnasium.error.Error as exc:
        raise EnvSpecError(f"env {spec!r}: gymnasium cannot make {gym_id!r}: {exc}") from exc
    except ImportError as exc:
        raise EnvSpecError(f"env {spec!r}: {gym_id!r} needs a package that is not installed: {exc}") from exc
    except TypeError as exc:
        raise EnvSpecError(f"env {spec!r}: {gym_id!r} does not accept the options {sorted(options)}: "
                           f"{_creator_type_error(exc)}") from exc
    layout = _declared_layout(spec, env.unwrapped)
    wrap = layout is None and isinstance(env.observation_space, spaces.Box)
    if layout is None:
        layout = layout_from_spaces(env.observation_space, env.action_space)
    return EnvHandle(spec=spec, env=env, layout=layout, realtime=False, expert=_expert_of(env.unwrapped),
                     wrap_observation=wrap, step_seconds=_gym_step_seconds(env))


def _message(error: Mapping[str, Any]) -> str:
    return str(error["msg"]).removeprefix("Value error, ")  # a validator's own ValueError: its words alone


def one_line_message(exc: Exception) -> str:
    """``exc``'s message on one line: a pydantic ValidationError's errors as ``field: message; ...``."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(map(str, e['loc']))}: {_message(e)}" if e["loc"] else _message(e)
                             for e in errors())
        except (TypeError, KeyError):
            pass
    return " ".join(str(exc).split())


def _make_sim(spec: str, time_step_duration: float, max_episode_steps: int, options: dict,
              render_mode: str | None = None) -> EnvHandle:
    """The simulator; ``options`` are :class:`~tmrl_worker.sim.SimConfig` fields (``track``, ``physics_hz``...).
    Its expert is the simulator's pure-pursuit driver, which reads the car's pose (not the observation)."""
    from tmrl_worker.sim import PurePursuitDriver, close_realtime_env, realtime_config

    settings = {"max_episode_steps": max_episode_steps, **options}
    if spec == "sim-fast":
        try:
            env = gymnasium.make(SIM_GYM_ID, config=settings, render_mode=render_mode, disable_env_checker=True)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise EnvSpecError(f"env {spec!r}: invalid simulator options {options}: {one_line_message(exc)}") from exc
        sim = env.unwrapped
        pose, car = (lambda: sim.car.pose()), sim.config.car
        current_track = lambda: sim.track  # noqa: E731  (episode_tracks: a new track per episode)
        handle = EnvHandle(spec=spec, env=env, layout=sim.layout, realtime=False,
                           step_seconds=sim.config.time_step_duration)
    else:
        # time_step_duration is a SimConfig field too: given as an option, it is the rtgym step
        step = settings.pop("time_step_duration", time_step_duration)
        try:
            config = realtime_config(None, time_step_duration=step, **settings)
        except ValueError as exc:
            raise EnvSpecError(f"env {spec!r}: invalid simulator options {options}: {one_line_message(exc)}") from exc
        env = _rtgym_env(spec, config)
        interface = env.unwrapped.interface
        pose, car = interface.loop.pose, interface.config.car
        current_track = lambda: interface.track  # noqa: E731
        handle = EnvHandle(spec=spec, env=env, layout=interface.layout, realtime=True,
                           closer=lambda: close_realtime_env(env), step_seconds=float(config["time_step_duration"]))
    drivers = [PurePursuitDriver(current_track(), car)]

    def expert(observation: tuple) -> np.ndarray:
        if drivers[0].track is not current_track():  # the episode runs on another track: plan for that one
            drivers[0] = PurePursuitDriver(current_track(), car)
        return drivers[0].act(pose())

    handle.expert = expert
    handle.reset_hooks.append(lambda: drivers[0].reset())
    return handle


def _make_tm20(spec: str, time_step_duration: float, max_episode_steps: int, options: dict) -> EnvHandle:
    """TrackMania through its rtgym interfaces; with ``emulated_game`` (a table, possibly empty) against an
    :class:`~tmrl_worker.tm20.emulated_game.EmulatedGame` started here, on any OS. The settings are checked first,
    before anything is started (an unknown option or ``capture_backend`` is refused before a window search)."""
    from tmrl_worker.tm20.control import ControlError, GamepadUnavailableError
    from tmrl_worker.tm20.interfaces import TM20ConfigError, check_options, tm20_rtgym_config

    try:
        check_options(spec, options, time_step_duration=time_step_duration)
    except TM20ConfigError as exc:
        raise EnvSpecError(f"env {spec!r}: {exc}") from exc
    emulated = options.get("emulated_game")
    if emulated is None and sys.platform != "win32" and not options.get("allow_non_windows", False):
        raise EnvSpecError(f"env {spec!r} drives TrackMania 2020 and runs on Windows only (this is {sys.platform}); "
                           "use env = \"sim\" to train on the built-in simulator, or emulated_game = {} in "
                           "env_options to run the TrackMania path against the emulated game")
    from tmrl_worker.tm20.capture import CaptureError
    from tmrl_worker.tm20.window import WindowNotFoundError
    from tmrl_worker.tm20.windows_only import WindowsOnlyError

    # what building the game's devices raises when a setting, a driver, the window or the screen is wrong: a one-line
    # EnvSpecError naming it, not a traceback
    device_setup_errors = (TM20ConfigError, ControlError, GamepadUnavailableError, WindowNotFoundError, CaptureError,
                           WindowsOnlyError)
    kwargs = {k: v for k, v in options.items() if k not in ("allow_non_windows", "emulated_game")}
    if emulated is None:
        try:
            config = tm20_rtgym_config(spec, time_step_duration=time_step_duration, ep_max_length=max_episode_steps,
                                       **kwargs)
        except device_setup_errors as exc:
            raise EnvSpecError(f"env {spec!r}: {exc}") from exc
        return _make_rtgym(spec, config, device_setup_errors)
    game = _start_emulated_game(spec, emulated, kwargs)
    try:
        config = tm20_rtgym_config(spec, time_step_duration=time_step_duration, ep_max_length=max_episode_steps, **kwargs)
        handle = _make_rtgym(spec, config, device_setup_errors)
    except device_setup_errors as exc:
        game.close()
        raise EnvSpecError(f"env {spec!r}: {exc}") from exc
    except BaseException:
        game.close()
        raise

    def close() -> None:
        try:
            handle.env.unwrapped.interface.close()
            handle.env.close()
        finally:
            game.close()

    handle.closer = close
    return handle


def tm20_layout(spec: str, options: dict[str, Any] | None = None) -> ObservationLayout:
    """The observation layout of TrackMania env ``spec`` with these ``env_options``, from the settings alone: nothing
    is started (no game, window, capture or controller, no Windows-only package), so it works on any OS. The
    interface builds its own with the same code (:meth:`~tmrl_worker.tm20.interfaces.TM20Interface.layout_for`);
    :class:`EnvSpecError` for settings that give no layout."""
    from tmrl_worker.tm20.interfaces import interface_class

    try:
        return interface_class(spec).layout_for(**dict(options or {}))
    except ValueError as exc:  # TM20ConfigError, or pydantic's ValidationError (a history or a size out of range)
        raise EnvSpecError(f"env {spec!r}: {one_line_message(exc)}") from exc


def _start_emulated_game(spec: str, settings: Any, kwargs: dict) -> Any:
    """Start the emulated game and put its devices (and, unless given, its centre line as the reward path) into
    the interface ``kwargs``."""
    from pydantic import ValidationError

    from tmrl_worker.reward import TrajectoryReward, TrajectoryRewardConfig
    from tmrl_worker.tm20.emulated_game import EmulatedGame
    from tmrl_worker.tm20.interfaces import interface_class, validated_settings

    try:
        game = EmulatedGame(settings).start()
    except (ValidationError, ValueError, OSError) as exc:
        raise EnvSpecError(f"env {spec!r}: cannot start the emulated game {settings!r}: {one_line_message(exc)}") from exc
    interface = interface_class(spec)
    for name, device in game.devices(interface.window_size, interface.capture_color).items():
        kwargs.setdefault(name, device)
    if "reward" not in kwargs and "reward_path" not in kwargs:
        config = validated_settings(TrajectoryRewardConfig, kwargs.pop("reward_config", None), "reward_config")
        kwargs["reward"] = TrajectoryReward.from_path(game.reward_path(), 0.5, config)
    return game


def make_env(spec: str, time_step_duration: float = 0.05, max_episode_steps: int = 1000,
             options: dict[str, Any] | None = None, render_mode: str | None = None) -> EnvHandle:
    """Build the environment named by ``spec`` (see the module docstring); raise :class:`EnvSpecError` when it
    cannot be built, with what to change. ``options`` go to the env: interface kwargs for rtgym interfaces
    (TrackMania's ``reward_path``, ``telemetry_port``...), keyword arguments of ``gymnasium.make`` otherwise.
    ``render_mode`` (``"rgb_array"``) is given to synchronous envs (``sim-fast``, ``gym:``), which then draw frames
    on ``env.render()``; rtgym envs draw none and refuse it."""
    spec = spec.strip()
    options = dict(options or {})
    if render_mode is not None and (spec == "sim" or spec in TM20_SPECS or (":" in spec and not spec.startswith("gym:"))):
        raise EnvSpecError(f"env {spec!r} runs through rtgym and draws no frames; rendering works with sim-fast "
                           "(what `eval --env sim` runs) and gym:<id> envs")
    if spec in SIM_SPECS:
        return _make_sim(spec, time_step_duration, max_episode_steps, options, render_mode)
    if spec in TM20_SPECS:
        return _make_tm20(spec, time_step_duration, max_episode_steps, options)
    if spec.startswith("gym:"):
        return _make_gym(spec, spec[4:], None, options, render_mode)  # a gymnasium env keeps its own time limit
    if ":" in spec:
        interface = _import_interface(spec)
        return _make_rtgym(spec, rtgym_config(interface, time_step_duration, max_episode_steps, interface_kwargs=options))
    raise EnvSpecError(f"unknown env {spec!r}; {_spec_help()}")
