"""An emulated TrackMania 2020, built on the simulator: the whole TrackMania path runs without the game.

:class:`EmulatedGame` runs a simulated car (:mod:`tmrl_worker.sim`) on its own thread at ``physics_hz`` and offers
the game's four faces to the real TrackMania interface, each behind the same interface as the real device:

* **the OpenPlanet plugin**: a :class:`~tmrl_worker.tm20.replay_server.TelemetryReplayServer` on ``127.0.0.1:port``
  that greets each client and writes one packet per game frame in the exact plugin protocol
  (:mod:`tmrl_worker.tm20.openplanet`), from the simulated car: speed, distance driven since the start, position
  (the simulator's ``(x, y)`` plane is the game's ``(x, z)``, at a constant height ``y``), inputs, the finish flag,
  and a gear and rpm derived from the speed. Like the plugin, it sends nothing while no car is on track;
* **the window**: :class:`EmulatedWindow` (title, client area, focus) — a :class:`~tmrl_worker.tm20.window.GameWindow`;
* **the screen**: :class:`EmulatedCapture` — a :class:`~tmrl_worker.tm20.capture.FrameCapture` whose frames are
  rendered from the car's pose like the game's cockpit view at the window's size (958 x 488 or 256 x 128): sky
  above the horizon, a grey road, black borders and black scenery, the car's dark bonnet at the bottom centre, the
  HUD's race clock (:func:`draw_race_clock`) and the end-of-race pop-up while it is open;
* **the gamepad**: :class:`EmulatedController` — a :class:`~tmrl_worker.tm20.control.Controller` whose analog
  ``[gas, brake, steer]`` drive the simulated car; the respawn button puts the car back at the start, the pop-up
  button closes the end-of-race pop-up.

The race behaves like the game's: after a respawn the car waits ``countdown_s`` at the start (distance 0); crossing
the finish raises the finish flag and opens the pop-up, which stays open (and covers part of the picture) until the
pop-up button is pressed; respawning restarts the race and clears the flag.

Failures can be injected, as the failure tests do: :meth:`EmulatedGame.kill_plugin` / :meth:`~EmulatedGame.start_plugin`
(the plugin unloaded and reloaded on the same port), :meth:`~EmulatedGame.close_window` / :meth:`~EmulatedGame.open_window`
(capture then fails with :class:`~tmrl_worker.tm20.capture.CaptureError`), :meth:`~EmulatedGame.freeze` (the game
hangs: no packets, the screen does not change), :meth:`~EmulatedGame.freeze_screen` (the picture stops changing while
the car drives on and the plugin keeps sending: a minimised or covered window, a hung renderer).

Several games run side by side, each with its own window title and plugin port (:class:`EmulatedGameConfig`).
:meth:`EmulatedGame.start_autodrive` lets the simulator's scripted driver drive laps, so ``tmrl-worker
record-reward`` records a reward path from the emulated plugin exactly as from the game
(``tmrl-worker emulate-game --autodrive``). :meth:`EmulatedGame.scripted_lap_time` times that driver's lap in
simulated time, on the caller's thread, whatever the load; every finish's race time is kept in ``lap_times``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tmrl_common.config import MAX_DURATION_S

from tmrl_worker.sim.camera import ROAD, WALL, rasterize_track
from tmrl_worker.sim.car import Car
from tmrl_worker.sim.config import CarParams
from tmrl_worker.sim.track import Track, check_track_name, load_track
from tmrl_worker.tm20.capture import CaptureError, ColorMode, to_gray
from tmrl_worker.tm20.control import analog_command
from tmrl_worker.tm20.openplanet import DEFAULT_PORT, encode_packet
from tmrl_worker.tm20.replay_server import TelemetryReplayServer
from tmrl_worker.tm20.window import ClientArea, WindowNotFoundError

log = logging.getLogger(__name__)

SKY = (90, 140, 200)
ROAD_RGB = (120, 120, 125)
SCENERY = (25, 35, 25)  # dark, like the black borders: the LIDAR stops at the edge of the road either way
BONNET = (30, 30, 35)
POPUP = (225, 225, 225)
POPUP_TITLE = (20, 20, 60)
_PIXEL = np.dtype("V3")
"""One RGB pixel as a single 3-byte element, so that a gather moves whole pixels."""


class EmulatedGameConfig(BaseModel):
    """One emulated game instance (``env_options.emulated_game`` of a ``tm20-*`` worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    track: str = "hairpins"
    """A simulator track: ``oval``, ``hairpins``, ``circuit``, ``random:SEED``, ``random-open:SEED``, ``file:PATH``."""

    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Plugin port on 127.0.0.1 (0: a free one, see :attr:`EmulatedGame.port`)."""
    window_title: str = "Trackmania"
    physics_hz: float = Field(default=100.0, gt=0, le=1000)
    speedup: int = Field(default=1, ge=1, le=50)
    """Simulated seconds per wall-clock second (1: real time; more for scripted laps, e.g. recording a path)."""
    frame_hz: float = Field(default=100.0, gt=0, le=1000)
    """Game frames (telemetry packets) per second."""
    countdown_s: float = Field(default=1.5, ge=0, le=MAX_DURATION_S)
    """After a respawn the car stands at the start this long (the game's 3-2-1)."""
    height_m: float = 9.0
    """The track's constant height: the ``y`` of every position packet."""
    camera_height_m: float = Field(default=1.6, gt=0)
    horizon: float = Field(default=0.35, gt=0, lt=0.8)
    """Horizon row as a fraction of the frame height."""
    car: CarParams = CarParams()

    @field_validator("track")
    @classmethod
    def _known_track(cls, value: str) -> str:
        return check_track_name(value)  # when the config is read, not when the game is built


class CockpitRenderer:
    """Frames of the view from the car, at one frame size: a pinhole camera looking along the car's heading.

    Ground pixel ``(row, col)`` below the horizon is ``f = h * focal / (row - horizon)`` metres ahead and
    ``(col - w / 2) * f / focal`` to the right; it takes the colour of the track map there (road, border, scenery).
    Everything that does not depend on the car's pose is computed once: each ground pixel's ray (in map cells), the
    map already in colour, one RGB triple per cell, and the picture above the ground. A frame is then a handful of
    vectorised operations and one gather of 3-byte pixels from the map (about 2.5 ms at 958 x 488, against 7–8 ms
    for gathering a class per pixel and then its colour: ``benchmarks/tm20_emulated_render.py``).
    """

    def __init__(self, track: Track, height: int, width: int, camera_height: float = 1.6, horizon: float = 0.35,
                 map_resolution: float = 0.25, view_m: float = 150.0) -> None:
        self.height, self.width = height, width
        classes, self._x0, self._y0 = rasterize_track(track, map_resolution, margin=view_m)
        palette = np.zeros((256, 3), np.uint8)
        palette[:] = SCENERY
        palette[ROAD] = ROAD_RGB
        palette[WALL] = (0, 0, 0)
        # one 3-byte element per map cell: a frame is a single gather of whole pixels
        self._map = np.ascontiguousarray(palette[classes]).view(_PIXEL).reshape(classes.shape)
        self._flat_map = self._map.ravel()
        self._map_columns = classes.shape[1]
        self._scale = 1.0 / map_resolution
        focal = width / 2.0  # 90 degrees across
        horizon_row = int(horizon * height)
        # rows nearer than view_m: every pixel of them is ground (the rows above show the far scenery)
        self._first_row = max(horizon_row + 1, horizon_row + math.ceil(camera_height * focal / view_m))
        rows, cols = np.mgrid[self._first_row:height, 0:width].astype(np.float64)
        ahead = camera_height * focal / (rows - horizon_row)
        right = (cols - width / 2.0) / focal * ahead
        self._ahead_cells = (ahead * self._scale).ravel()  # each ground pixel's ray, in map cells
        self._right_cells = (right * self._scale).ravel()
        self._background = np.empty((height, width, 3), np.uint8)
        self._background[:] = SKY
        self._background[horizon_row + 1:] = SCENERY
        # the car's bonnet: wide below the LIDAR origin (44 * h // 49), a narrow nose up to a few pixels above it,
        # inside the 20 pixels upstream's LIDAR skips
        origin_row, centre = 44 * height // 49, width // 2
        nose, half = max(2, width // 64), max(3, width // 16)
        self._bonnet = [(slice(origin_row + 2, height), slice(centre - half, centre + half)),
                        (slice(origin_row - max(2, height // 80), origin_row + 2), slice(centre - nose, centre + nose))]
        self._popup = (slice(int(0.3 * height), int(0.62 * height)), slice(int(0.3 * width), int(0.7 * width)))
        self._popup_title = (slice(int(0.3 * height), int(0.36 * height)), self._popup[1])

    def frame(self, x: float, y: float, heading: float, popup: bool = False) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` seen from a car at ``(x, y)`` heading ``heading`` (radians from +x)."""
        ch, sh = math.cos(heading), math.sin(heading)
        ahead, right = self._ahead_cells, self._right_cells
        ix = ((x - self._x0) * self._scale + ahead * ch + right * sh).astype(np.intp)
        iy = ((y - self._y0) * self._scale + ahead * sh - right * ch).astype(np.intp)
        ix *= self._map_columns
        ix += iy
        image = self._background.copy()
        ground = image[self._first_row:].reshape(-1).view(_PIXEL)  # a view: rows below first_row are contiguous
        # mode="clip": indices off the map (only past its margin, never from the track) read its edge, and the
        # gather writes straight into the frame (numpy buffers ``out`` in the default mode)
        np.take(self._flat_map, ix, out=ground, mode="clip")
        for part in self._bonnet:
            image[part] = BONNET
        if popup:
            image[self._popup] = POPUP
            image[self._popup_title] = POPUP_TITLE
        return image


CLOCK_ON, CLOCK_OFF = (250, 250, 250), (170, 190, 215)  # light: the LIDAR (dark pixels) never stops on the clock


def draw_race_clock(image: np.ndarray, race_time: float) -> np.ndarray:
    """The HUD's race clock in the top-left corner of ``image``: the race time in hundredths of a second as 16
    binary cells. Like the game's chrono it changes every frame while the race runs (a still car's picture too),
    shows 0 during the countdown and stops at the finish, so a picture that stops changing while the car drives is
    a frozen screen here as in the game, even on a straight road of flat colour."""
    ticks, cell = int(race_time * 100), max(2, image.shape[1] // 120)
    for bit in range(16):
        left = (bit + 1) * cell
        image[cell:2 * cell, left:left + cell] = CLOCK_ON if ticks >> bit & 1 else CLOCK_OFF
    return image


class EmulatedGame:
    """A simulated car behind the game's faces: plugin over TCP, window, screen, gamepad (see the module docstring).

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, config: EmulatedGameConfig | dict[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, EmulatedGameConfig) else EmulatedGameConfig.model_validate(config or {})
        self.track = load_track(self.config.track)
        self.car = Car(self.track, self.config.car)
        self._cumulative = np.concatenate([[0.0], np.cumsum(self.track.lengths)])
        self.finish_progress = self.track.length - (0.0 if self.track.closed else 2.0)
        self.lock = threading.Lock()
        self.distance = 0.0
        self.finished = False
        self.popup_open = False
        self.respawns = 0
        self.finishes = 0
        self.lap_times: list[float] = []
        """Race time of every finish (simulated seconds from the end of the countdown to the finish line)."""
        self._countdown = self.config.countdown_s
        self.race_time = 0.0
        """Seconds since the countdown ended (stops at the finish), shown by the HUD's race clock."""
        self._lap_progress = 0.0
        self._inputs = (0.0, 0.0, 0.0)
        self.frozen = False
        self.screen_frozen = False
        self.window_open = True
        self.focused = True
        self.port = self.config.port
        self._plugin: TelemetryReplayServer | None = None
        self._renderers: dict[tuple[int, int], CockpitRenderer] = {}
        self._stop = threading.Event()
        self._driver_thread: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name=f"emulated-game-{self.config.window_title}", daemon=True)

    # lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> EmulatedGame:
        self._thread.start()
        self.start_plugin()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self._driver_thread is not None:
            self._driver_thread.join(timeout=2.0)
        self.kill_plugin()

    def __enter__(self) -> EmulatedGame:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_autodrive(self) -> None:
        """Let the simulator's scripted driver drive laps: respawn after each finish and go again (what a person
        does while ``tmrl-worker record-reward`` records the reward path)."""
        if self._driver_thread is None:
            self._driver_thread = threading.Thread(target=self._autodrive, name="emulated-driver", daemon=True)
            self._driver_thread.start()

    def _autodrive(self) -> None:
        from tmrl_worker.sim.driver import PurePursuitDriver

        driver = PurePursuitDriver(self.track, self.config.car)
        while not self._stop.wait(0.01 / self.config.speedup):
            if self.finished:
                self._stop.wait(0.5)
                self.respawn()
                driver.reset()
                continue
            with self.lock:
                pose = self.car.pose()
            command = analog_command(driver.act(pose))
            self.set_inputs(command.gas_trigger, command.brake_trigger, command.steer)

    # failure injection -----------------------------------------------------------------------------------------
    def kill_plugin(self) -> None:
        """Unload the plugin: its socket closes, nothing listens on the port."""
        if self._plugin is not None:
            self._plugin.close()
            self._plugin = None

    def start_plugin(self) -> None:
        """(Re)load the plugin on the same port."""
        if self._plugin is None:
            self._plugin = TelemetryReplayServer(self._packet, rate_hz=self.config.frame_hz, port=self.port).start()
            self.port = self._plugin.port

    def close_window(self) -> None:
        self.window_open = False

    def open_window(self) -> None:
        self.window_open = True

    def freeze(self, frozen: bool = True) -> None:
        """A hung game: the car stops moving, the plugin sends nothing, the screen stays as it was."""
        self.frozen = frozen

    def freeze_screen(self, frozen: bool = True) -> None:
        """Stale frames: capture keeps returning the last picture (no new frame) while the car drives on and the
        plugin keeps sending, as dxcam does for a minimised window or a renderer that stopped presenting."""
        self.screen_frozen = frozen

    # the race --------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        period = 1.0 / self.config.physics_hz
        next_tick = time.perf_counter()
        while not self._stop.is_set():
            next_tick += period
            delay = next_tick - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -0.25:  # starved: drop the backlog rather than fast-forward the race
                next_tick = time.perf_counter()
            if not self.frozen:
                with self.lock:
                    for _ in range(self.config.speedup):
                        self._tick(period)

    def _tick(self, dt: float) -> None:
        if self._countdown > 0.0:
            self._countdown -= dt
            return
        if not self.finished:
            self.race_time += dt
        car = self.car
        gas, brake, steer = self._inputs if not self.finished else (0.0, 1.0, 0.0)
        car.set_controls(gas, brake, steer)
        x, y = car.x, car.y
        car.tick(dt)
        self.distance += math.hypot(car.x - x, car.y - y)
        segment, along, _ = self.track.locate(car.x, car.y, car.segment)
        progress = float(self._cumulative[segment]) + along
        if self.track.closed:  # count laps: progress jumps back by a lap length at the start line
            step = progress - self._lap_progress % self.track.length
            if step < -self.track.length / 2:
                step += self.track.length
            elif step > self.track.length / 2:
                step -= self.track.length
            self._lap_progress += step
        else:
            self._lap_progress = progress
        if not self.finished and self._lap_progress >= self.finish_progress:
            self.finished = self.popup_open = True
            self.finishes += 1
            self.lap_times.append(self.race_time)  # what the race clock shows from now on
            log.info("emulated game %r: finish %d, race time %.2f s", self.config.window_title, self.finishes,
                     self.race_time)

    def advance(self, seconds: float) -> None:
        """Run the race for ``seconds`` of simulated time at once, on the caller's thread (for a game that was not
        started: scripted laps timed without the wall clock, tests)."""
        period = 1.0 / self.config.physics_hz
        with self.lock:
            for _ in range(round(seconds * self.config.physics_hz)):
                self._tick(period)

    def scripted_lap_time(self, control_hz: float = 20.0, max_seconds: float = 300.0) -> float | None:
        """Race time of one lap by the simulator's scripted driver (pure pursuit on the true pose), its command
        renewed ``control_hz`` times per simulated second and applied at once: from the respawn to the finish,
        independent of the machine's load. None when it does not finish within ``max_seconds``."""
        from tmrl_worker.sim.driver import PurePursuitDriver

        driver = PurePursuitDriver(self.track, self.config.car)
        self.respawn()
        finishes, elapsed = self.finishes, 0.0
        while self.finishes == finishes and elapsed < max_seconds + self.config.countdown_s:
            with self.lock:
                pose = self.car.pose()
            command = analog_command(driver.act(pose))
            self.set_inputs(command.gas_trigger, command.brake_trigger, command.steer)
            self.advance(1.0 / control_hz)
            elapsed += 1.0 / control_hz
        return self.lap_times[-1] if self.finishes > finishes else None

    def respawn(self) -> None:
        """The respawn button: back to the start line, countdown, race restarted (a pop-up stays open)."""
        with self.lock:
            self.car.place(float(self.track.centre[0, 0]), float(self.track.centre[0, 1]), self.track.start_heading)
            self.distance = self._lap_progress = 0.0
            self.finished = False
            self._countdown = self.config.countdown_s
            self.race_time = 0.0
            self.respawns += 1

    def close_popup(self) -> None:
        with self.lock:
            self.popup_open = False

    def set_inputs(self, gas: float, brake: float, steer: float) -> None:
        with self.lock:
            self._inputs = (gas, brake, steer)

    def position(self, x: float, y: float) -> tuple[float, float, float]:
        """Game coordinates of a simulator point: ``(x, height, y)``."""
        return (x, self.config.height_m, y)

    def _packet(self, tick: int) -> bytes | None:
        if self.frozen:
            return None
        with self.lock:
            car, (gas, brake, steer) = self.car, self._inputs
            speed = abs(car.speed)
            gear = min(1 + int(speed // 10.0), 5)
            rpm = 2000.0 + 9000.0 * min((speed % 10.0) / 10.0, 1.0)
            return encode_packet(tick, speed=speed, distance=self.distance, position=self.position(car.x, car.y),
                                 steer=steer, gas=gas, brake=1.0 if brake > 0 else 0.0, finished=self.finished,
                                 gear=float(gear), rpm=rpm)

    def render(self, height: int, width: int) -> np.ndarray:
        """The cockpit view at this size (RGB)."""
        renderer = self._renderers.get((height, width))
        if renderer is None:
            renderer = self._renderers[(height, width)] = CockpitRenderer(
                self.track, height, width, self.config.camera_height_m, self.config.horizon)
        with self.lock:
            x, y, heading, popup, race_time = self.car.x, self.car.y, self.car.heading, self.popup_open, self.race_time
        return draw_race_clock(renderer.frame(x, y, heading, popup), race_time)

    def reward_path(self) -> np.ndarray:
        """The track's centre line from start to finish in game coordinates (what driving it once would record)."""
        path = self.track.lap_path()
        return np.array([self.position(float(px), float(py)) for px, py in path])

    # the faces ---------------------------------------------------------------------------------------------------
    def devices(self, window_size: tuple[int, int], color: ColorMode = "rgb") -> dict[str, Any]:
        """Interface keyword arguments: ``window``, ``capture``, ``controller`` and ``telemetry_port``."""
        window = EmulatedWindow(self)
        window.place(0, 0, *window_size)
        return {"window": window, "capture": EmulatedCapture(self, window, color),
                "controller": EmulatedController(self), "telemetry_port": self.port}


class EmulatedWindow:
    """The emulated game's window: a client area of the size it was given, focus tracked by the game."""

    def __init__(self, game: EmulatedGame) -> None:
        self.game = game
        self.title = game.config.window_title
        self.area = ClientArea(0, 0, 958, 488)

    def _check(self) -> None:
        if not self.game.window_open:
            raise WindowNotFoundError(self.title, "the window closed")

    def client_area(self) -> ClientArea:
        self._check()
        return self.area

    def place(self, x: int, y: int, width: int, height: int) -> None:
        self._check()
        self.area = ClientArea(x, y, width, height)

    def focus(self) -> None:
        self._check()
        self.game.focused = True

    def is_foreground(self) -> bool:
        return self.game.window_open and self.game.focused


class EmulatedCapture:
    """Screenshots of the emulated game's client area: rendered cockpit frames (a frozen game or screen repeats its
    last, and then, like dxcam, reports no new frame in :attr:`last_new_frame_at`)."""

    def __init__(self, game: EmulatedGame, window: EmulatedWindow, color: ColorMode = "rgb") -> None:
        self.game, self.window, self.color = game, window, color
        self.grabs = 0
        self._last: np.ndarray | None = None
        self.last_new_frame_at: float | None = None

    def grab(self) -> np.ndarray:
        if not self.game.window_open:
            raise CaptureError(f"the window {self.window.title!r} is gone (closed or minimised)")
        if (self.game.frozen or self.game.screen_frozen) and self._last is not None:
            return self._last  # what screen capture returns when the picture does not change
        area = self.window.area
        frame = self.game.render(area.height, area.width)
        self._last = to_gray(frame) if self.color == "gray" else frame
        self.last_new_frame_at = time.monotonic()
        self.grabs += 1
        return self._last

    def close(self) -> None:
        pass


class EmulatedController:
    """The virtual gamepad of the emulated game: analog triggers and stick drive the simulated car."""

    def __init__(self, game: EmulatedGame) -> None:
        self.game = game

    def apply(self, action: np.ndarray) -> None:
        command = analog_command(action)
        self.game.set_inputs(command.gas_trigger, command.brake_trigger, command.steer)

    def respawn(self) -> None:
        self.game.respawn()

    def close_finish_popup(self) -> None:
        self.game.close_popup()

    def release(self) -> None:
        self.game.set_inputs(0.0, 0.0, 0.0)

    def close(self) -> None:
        self.release()
