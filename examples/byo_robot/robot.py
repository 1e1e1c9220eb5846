"""A simulated "robot": a cart on a 1-D rail that must stop on a target, driven through rtgym in real time.

Two parts, as with real hardware:

* :class:`CartRobot` is the machine. Its physics runs on its own thread at ``physics_hz`` against the wall clock and
  never waits for the agent: between two commands the motor keeps pushing with the last one. Replace this class
  with the driver of your robot (serial port, ROS topic, CAN bus...).
* :class:`MyRobotInterface` is the :class:`rtgym.RealTimeGymInterface` tmrl's worker runs
  (``tmrl-worker run --env examples.byo_robot.robot:MyRobotInterface``). rtgym calls ``send_control`` at the start of
  every time step and ``get_obs_rew_terminated_info`` at its end; the interface declares its
  :class:`~tmrl_common.layout.ObservationLayout` in ``layout`` so the worker sends each step's newest frame only and
  the trainer can rebuild full observations.

Observation: ``(sensor (2, 2), action (1,), action (1,))``: the last two sensor readings ``[distance to target,
velocity]`` (oldest first), then the two previous actions that rtgym appends. Action: motor force in ``[-1, 1]``.
Reward per step: ``1 - |distance| / rail_half_length`` minus a small effort penalty; an episode ends when the cart
leaves the rail (terminated) or after ``max_episode_steps`` (truncated, set in the worker config).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces
from rtgym import RealTimeGymInterface
from tmrl_common.layout import ObservationComponent, ObservationLayout

SENSOR_HISTORY = 2
"""Sensor readings stacked in each observation (like tmrl's ``IMG_HIST_LEN`` for LIDAR scans)."""
ACT_BUF_LEN = 2
"""Previous actions rtgym appends to observations; tmrl's worker runs ``module:Class`` interfaces with 2."""

LAYOUT = ObservationLayout(
    components=[ObservationComponent(name="sensor", frame_shape=[2], history=SENSOR_HISTORY)],
    action_dim=1,
    action_history=ACT_BUF_LEN,
)
"""What goes on the wire: the trainer needs the same layout (``layout_file = "examples/byo_robot/layout.json"``)."""


@dataclass
class CartState:
    position: float
    velocity: float


class CartRobot:
    """A cart of mass 1 kg on a frictional rail, pushed by a motor; simulated on a background thread.

    Thread-safe: :meth:`command` and :meth:`read` may be called from any thread.
    """

    def __init__(self, physics_hz: float = 200.0, max_force: float = 4.0, friction: float = 1.5,
                 rail_half_length: float = 2.0) -> None:
        self.period = 1.0 / physics_hz
        self.max_force = max_force
        self.friction = friction
        self.rail_half_length = rail_half_length
        self._state = CartState(0.0, 0.0)
        self._force = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    def start(self) -> None:
        """Start the physics thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cart-physics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def _run(self) -> None:
        next_tick = time.perf_counter()
        while not self._stop.is_set():
            next_tick += self.period
            with self._lock:
                state = self._state
                acceleration = self._force * self.max_force - self.friction * state.velocity
                state.velocity += acceleration * self.period
                state.position += state.velocity * self.period
            self.ticks += 1
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.perf_counter()  # starved: do not try to catch up, like a real machine

    def command(self, force: float) -> None:
        """Set the motor force, as a fraction of ``max_force`` in [-1, 1]."""
        with self._lock:
            self._force = float(np.clip(force, -1.0, 1.0))

    def place(self, position: float) -> None:
        """Put the cart at ``position``, at rest (what a human or a homing routine does between episodes)."""
        with self._lock:
            self._state = CartState(float(position), 0.0)
            self._force = 0.0

    def read(self) -> CartState:
        with self._lock:
            return CartState(self._state.position, self._state.velocity)


class MyRobotInterface(RealTimeGymInterface):
    """rtgym interface to :class:`CartRobot` (see the module docstring). Keyword arguments come from the worker's
    ``env_options`` (e.g. ``env_options = { physics_hz = 200.0, seed = 3 }``)."""

    def __init__(self, physics_hz: float = 200.0, max_force: float = 4.0, friction: float = 1.5,
                 rail_half_length: float = 2.0, effort_cost: float = 0.05, seed: int | None = None) -> None:
        self.robot = CartRobot(physics_hz, max_force, friction, rail_half_length)
        self.layout = LAYOUT
        self.effort_cost = effort_cost
        self.target = 0.0
        self.last_force = 0.0
        self.history: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    # what the agent sees ---------------------------------------------------------------------------------------
    def _reading(self) -> np.ndarray:
        state = self.robot.read()
        return np.array([self.target - state.position, state.velocity], dtype=np.float32)

    def _observe(self) -> list[np.ndarray]:
        self.history = [*self.history, self._reading()][-SENSOR_HISTORY:]
        while len(self.history) < SENSOR_HISTORY:  # an episode starts with its first reading repeated
            self.history.insert(0, self.history[0])
        return [np.stack(self.history)]

    # rtgym contract --------------------------------------------------------------------------------------------
    def get_observation_space(self) -> spaces.Tuple:
        return spaces.Tuple([spaces.Box(-np.inf, np.inf, shape=(SENSOR_HISTORY, 2), dtype=np.float32)])

    def get_action_space(self) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def get_default_action(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[list[np.ndarray], dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        half = self.robot.rail_half_length
        self.target = float(self._rng.uniform(-0.6 * half, 0.6 * half))
        self.robot.place(float(self._rng.uniform(-0.6 * half, 0.6 * half)))
        self.robot.start()
        self.history = []
        return self._observe(), {"target": self.target}

    def send_control(self, control: np.ndarray | None) -> None:
        if control is None:
            return
        force = float(np.asarray(control, dtype=np.float32).reshape(-1)[0])
        if not np.isfinite(force):
            raise ValueError(f"motor force must be finite, got {force}")
        self.last_force = force
        self.robot.command(force)

    def get_obs_rew_terminated_info(self) -> tuple[list[np.ndarray], float, bool, dict]:
        observation = self._observe()
        distance, _velocity = (float(v) for v in observation[0][-1])
        half = self.robot.rail_half_length
        off_rail = abs(self.target - distance) > half  # position = target - distance
        reward = 1.0 - abs(distance) / half - self.effort_cost * self.last_force ** 2
        if off_rail:
            reward -= 10.0
        return observation, float(reward), off_rail, {"target": self.target}

    def wait(self) -> None:
        """Between episodes: motor off (the cart coasts to a stop)."""
        self.robot.command(0.0)

    def expert_action(self, observation: tuple) -> np.ndarray:
        """A PD controller, used by ``tmrl-worker run --expert`` to send demonstrations."""
        distance, velocity = (float(v) for v in np.asarray(observation[0])[-1])
        return np.array([np.clip(2.0 * distance - 1.0 * velocity, -1.0, 1.0)], dtype=np.float32)

    def render(self) -> None:
        return None

    def close(self) -> None:
        """Stop the physics thread."""
        self.robot.stop()
