"""Car physics: pedals, steering direction, grip-limited turning, walls and crashes."""

from __future__ import annotations

import math

import pytest
from tmrl_worker.sim.car import Car
from tmrl_worker.sim.config import CarParams
from tmrl_worker.sim.track import load_track

DT = 0.01


def run(car: Car, seconds: float) -> None:
    for _ in range(round(seconds / DT)):
        car.tick(DT)


@pytest.fixture
def oval_car() -> Car:
    return Car(load_track("oval"))  # starts on a 120 m straight heading +x


def test_full_throttle_accelerates_and_brake_stops_the_car(oval_car):
    oval_car.set_controls(1.0, 0.0, 0.0)
    run(oval_car, 2.0)
    fast = oval_car.speed
    assert 12.0 < fast < oval_car.params.top_speed
    oval_car.set_controls(0.0, 1.0, 0.0)
    run(oval_car, fast / oval_car.params.brake_decel * 0.9)
    assert 0.0 <= oval_car.speed < fast * 0.2


def test_negative_pedal_values_count_as_released(oval_car):
    oval_car.set_controls(-1.0, -1.0, 0.0)
    run(oval_car, 1.0)
    assert oval_car.speed == 0.0 and oval_car.x == pytest.approx(0.0)


def test_braking_at_a_standstill_reverses(oval_car):
    oval_car.set_controls(0.0, 1.0, 0.0)
    run(oval_car, 1.0)
    assert oval_car.speed < 0.0 and oval_car.x < 0.0


def test_positive_steering_turns_right(oval_car):
    oval_car.set_controls(0.5, 0.0, 0.5)
    run(oval_car, 0.5)
    assert oval_car.heading < 0.0 and oval_car.y < 0.0


def test_lateral_acceleration_is_capped_by_grip_so_fast_cars_understeer():
    params = CarParams()
    slow, fast = Car(load_track("oval"), params), Car(load_track("oval"), params)
    slow.place(0.0, 0.0, 0.0, speed=5.0)
    fast.place(0.0, 0.0, 0.0, speed=30.0)
    for car in (slow, fast):
        car.set_controls(0.0, 0.0, -1.0)
        car.tick(DT)
    slow_yaw, fast_yaw = slow.heading / DT, fast.heading / DT
    assert slow_yaw == pytest.approx(5.0 * math.tan(math.radians(params.max_steer_deg)) / params.wheelbase, rel=0.05)
    assert abs(fast_yaw * fast.speed) == pytest.approx(params.grip, rel=0.05)  # lateral acceleration = grip
    assert fast.speed < 30.0  # scrubbing tyres cost speed


def test_walls_keep_the_car_on_the_track_and_cost_speed(oval_car):
    oval_car.place(60.0, 0.0, math.radians(10), speed=20.0)  # aimed at the left wall at 10°
    run(oval_car, 2.0)
    _, _, lateral = oval_car.track.locate(oval_car.x, oval_car.y, oval_car.segment)
    assert abs(lateral) <= oval_car.track.half_width - oval_car.params.half_width + 1e-6
    assert oval_car.wall_hits >= 1
    assert oval_car.speed < 20.0 * math.cos(math.radians(10)) - 2.0
    assert abs(oval_car.heading) < 1e-6  # turned along the wall


def test_a_hard_hit_stalls_the_engine_for_a_while(oval_car):
    oval_car.place(60.0, 0.0, math.radians(60), speed=25.0)
    oval_car.set_controls(1.0, 0.0, 0.0)
    run(oval_car, 0.3)
    assert oval_car.crashes == 1
    stalled_speed = oval_car.speed
    run(oval_car, 0.4)  # still within crash_stall: no engine power
    assert oval_car.speed <= stalled_speed
    run(oval_car, oval_car.params.crash_stall)
    assert oval_car.speed > stalled_speed + 3.0


def test_open_track_end_walls_stop_the_car():
    car = Car(load_track("hairpins"))
    car.set_controls(0.0, 1.0, 0.0)  # reverse towards the start wall
    run(car, 5.0)
    assert car.x > -car.track.half_width
