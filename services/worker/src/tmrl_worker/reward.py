"""TrackMania's trajectory reward, shared by the built-in simulator and the real game.

A demonstration path (positions recorded while driving the track once) is resampled into points spaced
``spacing`` apart along the path (:func:`resample_path`). During an episode the car "owns" one of those points,
starting at the first; at each step :class:`TrajectoryReward` looks forward from the owned point, within a bounded
window, for the point nearest to the car, moves there and pays the number of points passed. The index never moves
backwards, so reversing a little pays 0, never a negative reward.

The episode terminates when

* the car makes no progress for ``no_progress_steps`` consecutive steps (counted only once
  ``grace_steps`` steps have passed, so a standing start is not punished), or
* the car reaches the last point (the finish): ``finish_bonus`` is added to that step's reward, or
* the car strays further than ``max_stray`` from the nearest point in the window (optional): that step pays
  nothing, since where the car is says nothing about progress along the path.

Points are stored as safetensors (never pickle): :func:`save_points` / :func:`load_points`; ``.npy`` files are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tmrl_common.errors import ProtocolError
from tmrl_common.weights import tensors_from_bytes, tensors_to_bytes

POINTS_TENSOR = "points"


class RewardPathError(ValueError):
    """A demonstration path or a reward-points file cannot be used."""


class TrajectoryRewardConfig(BaseModel):
    """Parameters of :class:`TrajectoryReward` (all distances in the units of the positions: metres in TM and sim)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    search_window: int = Field(default=100, ge=1)
    """How many points ahead of the owned one are examined at each step (bounds the cost and the jump)."""
    patience: int = Field(default=20, ge=1)
    """The forward search stops after this many points in a row that are not nearer than the best so far,
    so the part of the path that comes back close to the car later (a hairpin's other side) is not chosen."""
    no_progress_steps: int = Field(default=10, ge=1)
    """Consecutive steps without progress that terminate the episode."""
    grace_steps: int = Field(default=70, ge=0)
    """Steps at the start of an episode during which no-progress steps are not counted."""
    finish_bonus: float = 100.0
    """Added to the reward of the step that reaches the last point."""
    reward_per_point: float = 1.0
    """Reward for each point passed (1.0: reward = number of points passed)."""
    step_penalty: float = 0.0
    """Subtracted from every step's reward (0: TrackMania default)."""
    max_stray: float | None = Field(default=None, gt=0)
    """Terminate when the car is further than this from the nearest point in the search window (None: never)."""


def _as_positions(positions: Any, what: str) -> np.ndarray:
    array = np.asarray(positions, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] not in (2, 3):
        raise RewardPathError(f"{what} must have shape (N, 2) or (N, 3), got {array.shape}")
    if not np.isfinite(array).all():
        raise RewardPathError(f"{what} holds NaN or infinite coordinates")
    return array


def path_length(positions: Any) -> float:
    """Length of the polyline through ``positions``."""
    array = _as_positions(positions, "path")
    return float(np.linalg.norm(np.diff(array, axis=0), axis=1).sum())


MIN_PATH_LENGTH = 1e-3
"""Shortest demonstration path accepted (same unit as the positions): anything shorter is a car standing still."""


def resample_path(positions: Any, spacing: float) -> np.ndarray:
    """Points every ``spacing`` along the polyline through ``positions`` (shape ``(N, 2)`` or ``(N, 3)``).

    The first point is the path's start and the last its end; every gap (measured along the path) is exactly
    ``spacing`` except the last one, which is in ``(0, spacing]``. Repeated positions (a car standing still
    while recording) are ignored. Returns float32 points with the input's dimension.
    """
    if not spacing > 0 or not np.isfinite(spacing):
        raise RewardPathError(f"spacing must be a positive finite distance, got {spacing}")
    array = _as_positions(positions, "demonstration path")
    if len(array) < 2:
        raise RewardPathError(f"a demonstration path needs at least 2 positions, got {len(array)}")
    steps = np.linalg.norm(np.diff(array, axis=0), axis=1)
    keep = np.concatenate([[True], steps > 1e-9])
    array, steps = array[keep], steps[steps > 1e-9]
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    total = arc[-1]
    if len(array) < 2 or total < MIN_PATH_LENGTH:
        raise RewardPathError(f"the demonstration path never moves (it covers {total:.3g}, less than {MIN_PATH_LENGTH})")
    targets = np.arange(0.0, total, spacing)
    if total - targets[-1] > 1e-6 * spacing:
        targets = np.append(targets, total)
    else:
        targets[-1] = total
    points = np.stack([np.interp(targets, arc, array[:, d]) for d in range(array.shape[1])], axis=1)
    return points.astype(np.float32)


def save_points(path: str | Path, points: Any, spacing: float | None = None) -> None:
    """Write reward points to a safetensors file (``spacing`` is kept as metadata)."""
    array = np.ascontiguousarray(_as_positions(points, "reward points").astype(np.float32))
    metadata = {"format": "tmrl-reward-points-v1"}
    if spacing is not None:
        metadata["spacing"] = repr(float(spacing))
    Path(path).write_bytes(tensors_to_bytes({POINTS_TENSOR: array}, metadata))


def load_points(path: str | Path) -> np.ndarray:
    """Read reward points written by :func:`save_points` (safetensors) or a plain ``.npy`` array (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise RewardPathError(f"reward points file {path} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise RewardPathError(f"{path} is not a plain .npy array (pickled files are refused): {exc}") from exc
    else:
        try:
            tensors = tensors_from_bytes(path.read_bytes())
        except ProtocolError as exc:
            raise RewardPathError(f"{path} is not a reward points file: {exc.detail}") from exc
        if POINTS_TENSOR not in tensors:
            raise RewardPathError(f"{path} has no {POINTS_TENSOR!r} tensor (found {sorted(tensors)})")
        array = tensors[POINTS_TENSOR]
    array = _as_positions(array, f"reward points in {path}")
    if len(array) < 2:
        raise RewardPathError(f"{path} holds {len(array)} reward point(s), at least 2 are needed")
    return array.astype(np.float32)


class TrajectoryReward:
    """Reward for following a demonstration: points passed per step, no-progress countdown, finish bonus.

    ``points`` are already resampled (see :func:`resample_path`); use :meth:`from_path` to resample a raw recording.
    Call :meth:`reset` at the start of each episode and :meth:`compute` once per step with the car's position.
    """

    def __init__(self, points: Any, config: TrajectoryRewardConfig | None = None) -> None:
        self.points = _as_positions(points, "reward points").astype(np.float64)
        if len(self.points) < 2:
            raise RewardPathError(f"a trajectory reward needs at least 2 points, got {len(self.points)}")
        gaps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        if not (gaps > 0).all():  # the forward search walks over equal points for free: a car would be paid standing
            first = int(np.argmin(gaps > 0))
            raise RewardPathError(f"reward points {first} and {first + 1} are the same point: reward points must be "
                                  "spaced along the path (resample a recording with resample_path, or record it with "
                                  "`tmrl-worker record-reward`)")
        self.config = config or TrajectoryRewardConfig()
        self.last_index = len(self.points) - 1
        self._columns = [column.tolist() for column in self.points.T]  # scalar loop below is faster on lists
        self.reset()

    @classmethod
    def from_path(cls, positions: Any, spacing: float = 0.5, config: TrajectoryRewardConfig | None = None) -> TrajectoryReward:
        """Resample ``positions`` every ``spacing`` and build the reward on the result."""
        return cls(resample_path(positions, spacing), config)

    @classmethod
    def from_file(cls, path: str | Path, config: TrajectoryRewardConfig | None = None) -> TrajectoryReward:
        """Build the reward on points saved by :func:`save_points`."""
        return cls(load_points(path), config)

    def reset(self) -> None:
        """Start a new episode at the first point."""
        self.index = 0
        self.steps = 0
        self.no_progress = 0
        self.finished = False

    @property
    def progress(self) -> float:
        """Fraction of the path covered so far, in [0, 1]."""
        return self.index / self.last_index

    def _nearest_ahead(self, position: tuple[float, ...]) -> tuple[int, float]:
        """Walk forward from the owned point: keep the nearest point seen, stop after ``patience`` points in a row
        that are not nearer, or at the end of the search window. Few points are visited per step, so a plain loop
        beats vectorised NumPy here."""
        columns = self._columns
        patience = self.config.patience
        stop = min(self.index + self.config.search_window, self.last_index)

        if len(columns) == 2:
            (xs, ys), (px, py) = columns, position

            def squared_distance(i: int) -> float:
                return (xs[i] - px) ** 2 + (ys[i] - py) ** 2
        else:
            (xs, ys, zs), (px, py, pz) = columns, position

            def squared_distance(i: int) -> float:
                return (xs[i] - px) ** 2 + (ys[i] - py) ** 2 + (zs[i] - pz) ** 2

        best, best_distance, since = self.index, squared_distance(self.index), 0
        for i in range(self.index + 1, stop + 1):
            distance = squared_distance(i)
            if distance <= best_distance:
                best, best_distance, since = i, distance, 0
            else:
                since += 1
                if since >= patience:
                    break
        return best, best_distance ** 0.5

    def hold(self, position: Any) -> tuple[float, bool, dict[str, Any]]:
        """A step without a new position (the game sent no new frame; ``position`` is the step before's): the car is
        where it was, so it neither passes points nor counts towards ``no_progress_steps``; ``step_penalty`` applies as
        on every step. ``distance_to_path`` is the distance to the owned point."""
        self.steps += 1
        distance = float(np.linalg.norm(np.asarray(position, dtype=np.float64).ravel() - self.points[self.index]))
        return -self.config.step_penalty, False, self._info(0, distance, strayed=False)

    def compute(self, position: Any) -> tuple[float, bool, dict[str, Any]]:
        """Reward, termination flag and info for the car now at ``position`` (same dimension as the points)."""
        position = tuple(float(c) for c in np.ravel(position)) if isinstance(position, np.ndarray) else tuple(map(float, position))
        if len(position) != self.points.shape[1]:
            raise RewardPathError(f"position has {len(position)} coordinates, reward points have {self.points.shape[1]}")
        if not all(math.isfinite(c) for c in position):
            raise RewardPathError(f"position {position} is not finite")
        self.steps += 1
        config = self.config
        best, distance = self._nearest_ahead(position)
        strayed = config.max_stray is not None and distance > config.max_stray
        if strayed:  # off the path, the nearest point ahead says nothing about progress: pay nothing
            best = self.index
        passed = best - self.index
        self.index = best
        reward = passed * config.reward_per_point - config.step_penalty
        terminated = False
        if passed > 0:
            self.no_progress = 0
        elif self.steps > config.grace_steps:
            self.no_progress += 1
            terminated = self.no_progress >= config.no_progress_steps
        if self.index == self.last_index and not self.finished:
            self.finished = True
            reward += config.finish_bonus
            terminated = True
        terminated = terminated or strayed
        return float(reward), terminated, self._info(passed, distance, strayed)

    def _info(self, passed: int, distance: float, strayed: bool) -> dict[str, Any]:
        return {
            "points_passed": passed,
            "progress": self.progress,
            "path_index": self.index,
            "distance_to_path": distance,
            "no_progress_steps": self.no_progress,
            "finished": self.finished,
            "strayed": strayed,
        }
