"""The car: pedals and analog steering, grip-limited turning (understeer when too fast), walls that cost speed.

Model, per physics tick of ``dt`` seconds (pure-Python scalar maths: it runs 100 times per simulated second):

* Longitudinal: throttle accelerates with ``engine_accel * (1 - v / top_speed)``; the brake decelerates with
  ``brake_decel`` and, at a standstill, reverses (up to ``reverse_speed``); ``coast_decel`` slows a free-rolling car.
* Turning: the steering angle asks for a yaw rate ``v * tan(angle) / wheelbase`` (bicycle model). The lateral
  acceleration that needs, ``v * yaw_rate``, is capped at ``grip``: a car that is too fast for a bend turns less
  than asked (understeer) and loses some speed to scrubbing tyres, so it runs wide into the outside wall.
* Walls: the car is kept between the walls. Touching one pushes the car back onto the track and turns it along the
  wall; the speed across the wall is lost and friction takes ``wall_friction`` times as much again from the speed
  along it (a head-on hit stops the car, scraping along a wall slows it down). A hit faster than ``crash_speed``
  across the wall is a crash: the engine gives no power for ``crash_stall`` seconds (the car spins and bounces in
  TrackMania), which is what makes braking before a tight bend pay off.

Controls follow TrackMania's gamepad: ``gas`` and ``brake`` are the pressed amounts (action values above 0),
``steer`` in [-1, 1] with positive values turning right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tmrl_worker.sim.config import CarParams
from tmrl_worker.sim.track import Track


@dataclass(frozen=True)
class CarPose:
    """What sensors and the reward read: position, heading and signed speed (m/s, negative when reversing)."""

    x: float
    y: float
    heading: float
    speed: float
    wall_hits: int
    time: float


class Car:
    """One car on one track. Not thread-safe: the real-time loop guards it with a lock."""

    def __init__(self, track: Track, params: CarParams | None = None) -> None:
        self.track = track
        self.params = params or CarParams()
        p = self.params
        self._tan_max_steer = math.tan(math.radians(p.max_steer_deg))
        self._limit = track.half_width - p.half_width
        if self._limit <= 0:
            raise ValueError(f"track {track.name!r} ({track.width} m wide) is too narrow for a car {2 * p.half_width} m wide")
        self.place(float(track.centre[0, 0]), float(track.centre[0, 1]), track.start_heading)

    def place(self, x: float, y: float, heading: float, speed: float = 0.0) -> None:
        """Put the car at a pose, pedals released."""
        self.x, self.y, self.heading, self.speed = float(x), float(y), float(heading), float(speed)
        self.segment = self.track.nearest_segment(self.x, self.y)
        self.gas = self.brake = self.steer = 0.0
        self.wall_hits = 0
        self.crashes = 0
        self.stalled = 0.0
        self.time = 0.0

    def set_controls(self, gas: float, brake: float, steer: float) -> None:
        """Pedal amounts are clipped to [0, 1] (negative: released), steering to [-1, 1]."""
        self.gas = min(max(float(gas), 0.0), 1.0)
        self.brake = min(max(float(brake), 0.0), 1.0)
        self.steer = min(max(float(steer), -1.0), 1.0)

    def pose(self) -> CarPose:
        return CarPose(self.x, self.y, self.heading, self.speed, self.wall_hits, self.time)

    def tick(self, dt: float) -> None:
        """Advance the car by ``dt`` seconds."""
        p = self.params
        v, gas, brake = self.speed, self.gas, self.brake
        if self.stalled > 0.0:  # after a crash the engine gives nothing for a while
            self.stalled -= dt
            gas = 0.0
        if v > 0.0:
            v = max(v + (gas * p.engine_accel * max(1.0 - v / p.top_speed, 0.0) - brake * p.brake_decel - p.coast_decel) * dt, 0.0)
        elif v < 0.0:  # reversing: the gas pedal brakes
            v = min(v + (gas * p.brake_decel - brake * p.reverse_accel + p.coast_decel) * dt, 0.0)
            v = max(v, -p.reverse_speed)
        elif gas >= brake:
            v = gas * p.engine_accel * dt
        else:
            v = -brake * p.reverse_accel * dt

        yaw_rate = -v * self.steer * self._tan_max_steer / p.wheelbase
        lateral = abs(v * yaw_rate)
        if lateral > p.grip:  # understeer: the tyres cannot hold the bend asked for
            yaw_rate *= p.grip / lateral
            scrub = p.scrub_decel * min(lateral - p.grip, p.grip) * dt
            v = max(v - scrub, 0.0) if v > 0 else min(v + scrub, 0.0)

        heading = self.heading + yaw_rate * dt
        x = self.x + v * math.cos(heading) * dt
        y = self.y + v * math.sin(heading) * dt

        track = self.track
        segment, along, lateral_offset = track.locate(x, y, self.segment)
        dx, dy = track._dx[segment], track._dy[segment]
        limit = self._limit
        if lateral_offset > limit or lateral_offset < -limit:
            excess = lateral_offset - math.copysign(limit, lateral_offset)
            x += dy * excess  # back along the inward normal (-dy, dx) * -excess
            y -= dx * excess
            alignment = math.cos(heading) * dx + math.sin(heading) * dy
            direction = 1.0 if alignment >= 0.0 else -1.0
            heading = math.atan2(direction * dy, direction * dx)
            across = math.sqrt(max(1.0 - alignment * alignment, 0.0))
            if abs(v) * across > p.crash_speed:
                self.stalled = p.crash_stall
                self.crashes += 1
            v = math.copysign(max(abs(v) * (abs(alignment) - p.wall_friction * across), 0.0), v)
            self.wall_hits += 1
        if not track.closed:  # end walls of an open track
            if segment == 0 and along < -limit:
                x, y = x + dx * (-limit - along), y + dy * (-limit - along)
                v = 0.0
            elif segment == track.segment_count - 1 and along > track._len[segment] + limit:
                back = along - track._len[segment] - limit
                x, y = x - dx * back, y - dy * back
                v = 0.0

        self.x, self.y, self.speed, self.segment = x, y, v, segment
        self.heading = math.remainder(heading, math.tau)
        self.time += dt
