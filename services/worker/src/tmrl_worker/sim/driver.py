"""A scripted expert: pure-pursuit steering along the centre line and a speed plan that brakes before bends.

Steering aims at a point ``lookahead`` metres ahead on the centre line (pure pursuit on the bicycle model).
The speed plan gives, at every centre-line point, the fastest speed the tyres hold there (``sqrt(margin * grip *
radius)``), then lowers it backwards along the track so the car can brake down in time. The driver presses the gas
below the planned speed and the brake above it. With ``brake=False`` it never brakes (the full-throttle baseline).
"""

from __future__ import annotations

import math

import numpy as np

from tmrl_worker.sim.car import CarPose
from tmrl_worker.sim.config import CarParams
from tmrl_worker.sim.track import Track


def speed_plan(track: Track, car: CarParams, grip_margin: float = 0.9, brake_margin: float = 0.85) -> np.ndarray:
    """Planned speed (m/s) at each centre-line point: bends taken within the grip, braking started in time."""
    centre = track.centre
    n = len(centre)
    window = 3
    idx = np.arange(n)
    if track.closed:
        a, b, c = centre[(idx - window) % n], centre, centre[(idx + window) % n]
    else:
        a, b, c = centre[np.clip(idx - window, 0, n - 1)], centre, centre[np.clip(idx + window, 0, n - 1)]
    ab, bc, ca = (np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1), np.linalg.norm(a - c, axis=1))
    cross = np.abs((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0])
    radius = np.where(cross > 1e-9, ab * bc * ca / (2.0 * np.maximum(cross, 1e-12)), np.inf)
    plan = np.minimum(np.sqrt(grip_margin * car.grip * radius), car.top_speed)
    decel = brake_margin * car.brake_decel
    spacing = track.lengths
    for _ in range(2 if track.closed else 1):  # a second sweep carries braking across the start line of a circuit
        for i in range(n - 2, -1, -1) if not track.closed else range(n - 1, -1, -1):
            nxt = (i + 1) % n
            plan[i] = min(plan[i], math.sqrt(plan[nxt] ** 2 + 2.0 * decel * spacing[i]))
    return plan


class PurePursuitDriver:
    """Drives a car around ``track`` from its pose. ``act(pose)`` returns ``[gas, brake, steer]`` (float32)."""

    def __init__(self, track: Track, car: CarParams | None = None, lookahead: float = 7.0, brake: bool = True,
                 anticipation: float = 0.15) -> None:
        self.track = track
        self.car = car or CarParams()
        self.lookahead = lookahead
        self.brake = brake
        self.anticipation = anticipation
        """Seconds ahead at which the planned speed is read (covers the one-step action delay)."""
        self.plan = speed_plan(track, self.car)
        self._segment = 0

    def reset(self) -> None:
        self._segment = 0

    def act(self, pose: CarPose) -> np.ndarray:
        track = self.track
        self._segment, along, _ = track.locate(pose.x, pose.y, self._segment)
        speed = max(pose.speed, 0.0)
        ahead = self.lookahead + 0.25 * speed
        target = self._point_ahead(self._segment, along, ahead)
        angle = math.atan2(target[1] - pose.y, target[0] - pose.x) - pose.heading
        angle = math.remainder(angle, math.tau)
        curvature = 2.0 * math.sin(angle) / ahead
        steer_angle = math.atan(curvature * self.car.wheelbase)
        steer = -steer_angle / math.radians(self.car.max_steer_deg)
        steer = min(max(steer, -1.0), 1.0)
        if not self.brake:
            return np.array([1.0, 0.0, steer], dtype=np.float32)
        preview = int(round((speed * self.anticipation + 1.0) / 1.0))
        index = self._segment + preview
        index = index % len(self.plan) if track.closed else min(index, len(self.plan) - 1)
        wanted = float(self.plan[index])
        if speed < wanted - 0.5:
            return np.array([1.0, 0.0, steer], dtype=np.float32)
        if speed > wanted + 0.5:
            return np.array([0.0, min(1.0, (speed - wanted) / 3.0), steer], dtype=np.float32)
        return np.array([0.3, 0.0, steer], dtype=np.float32)

    def _point_ahead(self, segment: int, along: float, distance: float) -> tuple[float, float]:
        track = self.track
        remaining = distance + max(along, 0.0)
        n = track.segment_count
        while remaining > track.lengths[segment]:
            remaining -= track.lengths[segment]
            if segment + 1 >= n and not track.closed:
                remaining = track.lengths[segment]
                break
            segment = (segment + 1) % n
        point = track.segment_starts[segment] + track.directions[segment] * remaining
        return float(point[0]), float(point[1])
