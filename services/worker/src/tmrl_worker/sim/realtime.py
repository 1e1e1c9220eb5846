"""Real-time mode: the physics runs on its own thread at a fixed rate driven by the wall clock, and the agent reaches
it through an rtgym :class:`~rtgym.RealTimeGymInterface`, exactly as it reaches TrackMania.

The simulation never pauses for the agent: while the policy thinks, the car keeps moving with the last controls.
rtgym's elastic clock (20 Hz by default) decides when the observation is captured and when the next action is sent.

    env = make_realtime_env(track="hairpins")            # gymnasium.make("real-time-gym-v1", config=...)
    obs, info = env.reset()
    ...
    close_realtime_env(env)                              # stops the physics thread
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import gymnasium
import numpy as np
import rtgym  # noqa: F401  (registers "real-time-gym-v1")
from rtgym import DEFAULT_CONFIG_DICT, RealTimeGymInterface
from tmrl_common.layout import ObservationLayout
from tmrl_common.log_limit import RateLimitedLog

from tmrl_worker.sim.car import Car, CarPose
from tmrl_worker.sim.config import SimConfig
from tmrl_worker.sim.env import sim_config
from tmrl_worker.sim.episode import RaceEpisode, action_space, default_action
from tmrl_worker.sim.track import load_track
from tmrl_worker.sim.track_pool import TrackPool

logger = logging.getLogger(__name__)

#: Longest stretch of wall-clock time the physics catches up on in one go; beyond it time is dropped (and counted).
MAX_CATCH_UP_S = 0.25


class PhysicsLoop:
    """Ticks a :class:`Car` ``hz`` times per wall-clock second on a daemon thread. Thread-safe accessors."""

    def __init__(self, car: Car, hz: float) -> None:
        self.car = car
        self.period = 1.0 / hz
        self.lock = threading.Lock()
        self.ticks = 0
        self.dropped_ticks = 0
        """Ticks skipped because the thread was starved for more than :data:`MAX_CATCH_UP_S`."""
        self._starved_log = RateLimitedLog(logger, interval_s=30.0)
        """A line per 30 s at most, with the count held back (a soak on a loaded 2-core machine logged 9 in 30
        minutes, one per starvation)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="race-physics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        period = self.period
        max_catch_up = max(1, int(MAX_CATCH_UP_S / period))
        next_tick = time.perf_counter() + period
        while not self._stop.is_set():
            now = time.perf_counter()
            if now < next_tick:
                time.sleep(next_tick - now)
                continue
            due = int((now - next_tick) / period) + 1
            if due > max_catch_up:
                self.dropped_ticks += due - max_catch_up
                self._starved_log.warning("starved", "physics thread starved for %.3f s; dropping %d ticks (the "
                                          "machine is short of CPU: the car's time then lags the wall clock)",
                                          now - next_tick, due - max_catch_up)
                next_tick = now
                due = max_catch_up
            with self.lock:
                for _ in range(due):
                    self.car.tick(period)
            self.ticks += due
            next_tick += due * period

    def pose(self) -> CarPose:
        with self.lock:
            return self.car.pose()

    def set_controls(self, gas: float, brake: float, steer: float) -> None:
        with self.lock:
            self.car.set_controls(gas, brake, steer)

    def place(self, x: float, y: float, heading: float, car: Car | None = None) -> None:
        """Put the car (``car``: this one from now on, e.g. on another track) at ``(x, y)`` facing ``heading``."""
        with self.lock:
            if car is not None:
                self.car = car
            self.car.place(x, y, heading)


class RaceTrackInterface(RealTimeGymInterface):
    """rtgym interface to the simulated race track (same observations as :class:`~tmrl_worker.sim.env.RaceTrackEnv`).

    rtgym builds it from ``interface_kwargs``: ``config`` is a :class:`SimConfig` or its dict form.
    The physics thread starts at the first ``reset()``; call :meth:`close` to stop it.
    """

    def __init__(self, config: SimConfig | dict[str, Any] | None = None, seed: int | None = None) -> None:
        self.config = sim_config(config)
        self.track_pool = TrackPool(self.config.episode_tracks) if self.config.episode_tracks else None
        self.track = load_track(self.config.track)
        self.car = Car(self.track, self.config.car)
        self.episode = RaceEpisode(self.config, self.track)
        self.layout: ObservationLayout = self.episode.layout
        self.loop = PhysicsLoop(self.car, self.config.physics_hz)
        self._rng = np.random.default_rng(seed)
        self._renderer = None
        self.controls_sent = 0
        self.rejected_controls = 0
        """Controls that were not 3 finite numbers (replaced by the default action)."""

    def get_observation_space(self):
        return self.episode.observation_space()

    def get_action_space(self):
        return action_space()

    def get_default_action(self):
        return default_action()

    def reset(self, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        new_car = None
        if self.track_pool is not None:  # a new track per episode: the physics thread gets the new car at place()
            track = self.track_pool.track(self.track_pool.draw(self._rng))
            if track is not self.track:
                self.track, new_car = track, Car(track, self.config.car)
                self.car, self.episode, self._renderer = new_car, RaceEpisode(self.config, track), None
        x, y, heading = self.episode.start_pose(self._rng)
        self.loop.place(x, y, heading, car=new_car)
        self.loop.start()
        parts, info = self.episode.start(self.loop.pose())
        return parts, info

    def get_obs_rew_terminated_info(self):
        parts, reward, terminated, info = self.episode.observe(self.loop.pose())
        return parts, reward, terminated, info

    def send_control(self, control):
        if control is None:
            return
        try:
            control = np.asarray(control, dtype=np.float32).reshape(3)
            if not np.isfinite(control).all():
                raise ValueError("non-finite values")
        except (TypeError, ValueError) as exc:
            # this runs on rtgym's time-step thread: an exception would stall the env, so release the pedals instead
            self.rejected_controls += 1
            logger.warning("control %r rejected (%s); pedals released, steering centred (%d rejected so far)",
                           control, exc, self.rejected_controls)
            control = default_action()
        self.loop.set_controls(float(control[0]), float(control[1]), float(control[2]))
        self.controls_sent += 1

    def wait(self):
        """Between episodes the simulation keeps running; the car just coasts with the pedals released."""
        self.loop.set_controls(0.0, 0.0, 0.0)

    def render(self):
        from tmrl_worker.sim.render import TrackFrameRenderer

        if self._renderer is None:
            self._renderer = TrackFrameRenderer(self.track)
        return self._renderer.frame(self.loop.pose())

    def close(self) -> None:
        """Stop the physics thread."""
        self.loop.stop()


def realtime_config(config: SimConfig | dict[str, Any] | None = None, benchmark: bool = False,
                    **overrides: Any) -> dict[str, Any]:
    """The rtgym config dict for the simulator: a copy of ``rtgym.DEFAULT_CONFIG_DICT`` with the interface, the time
    step (observation captured at its end, like tmrl's TrackMania setup), the episode length and the action buffer."""
    sim = sim_config(config, **overrides)
    rt = dict(DEFAULT_CONFIG_DICT)
    rt.update(
        interface=RaceTrackInterface,
        interface_args=(),
        interface_kwargs={"config": sim.model_dump()},
        time_step_duration=sim.time_step_duration,
        start_obs_capture=sim.time_step_duration,
        time_step_timeout_factor=1.0,
        ep_max_length=sim.max_episode_steps,
        act_in_obs=sim.act_buf_len > 0,
        act_buf_len=max(sim.act_buf_len, 1),
        reset_act_buf=True,
        benchmark=benchmark,
        wait_on_done=True,
    )
    return rt


def make_realtime_env(config: SimConfig | dict[str, Any] | None = None, benchmark: bool = False, **overrides: Any):
    """``gymnasium.make("real-time-gym-v1", config=realtime_config(...))``; ``env.unwrapped.layout`` is set."""
    env = gymnasium.make("real-time-gym-v1", config=realtime_config(config, benchmark=benchmark, **overrides))
    env.unwrapped.layout = env.unwrapped.interface.layout
    return env


def close_realtime_env(env) -> None:
    """Stop the physics thread of an env built by :func:`make_realtime_env`, then close it."""
    env.unwrapped.interface.close()
    env.close()
