"""Noticing a screen that stopped showing the game: a hung renderer, a minimised or covered window, capture of the
wrong place. Screen capture does not fail then — dxcam hands back its last frame (or None) and mss the same
pixels — so the agent would go on learning from a picture that no longer follows the car.

:class:`StaleFrameDetector` watches every step's frame and telemetry packet and applies two rules
(:class:`StaleFrameConfig`, the env option ``stale_frames``):

* **frozen picture** — the frame has not changed, pixel for pixel, while the plugin kept sending packets that say
  the car moves at ``moving_speed_mps`` or more, for ``frozen_picture_s``. A moving car changes the picture every
  game frame, so a picture that stays the same is not the game's. The time is counted on the packets' arrival
  times: a game that hangs entirely stops its packets too, and that is the telemetry timeout's case, not this one.
  A car that stands still — the 3-2-1 countdown, a standing start, against a wall — legitimately shows the same
  picture and never counts: the rule restarts whenever a packet says the car is slower than ``moving_speed_mps``.
* **no new frame** — the capture backend reports that no new frame reached the screen for ``no_new_frame_s``,
  whatever the car does. Only backends that know say so (:attr:`DxcamCapture.last_new_frame_at
  <tmrl_worker.tm20.capture.DxcamCapture>`: Desktop Duplication returns no frame when nothing on the display was
  presented since the last grab). A running game presents frames continuously, a still car included, so this
  means the game stopped drawing or its window was minimised.

Either rule raises :class:`StaleFrameError` (a :class:`~tmrl_worker.tm20.capture.CaptureError`): the interface ends
the episode as truncated and waits for live frames before the next reset, as for any lost device.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tmrl_common.config import MAX_DURATION_S

from tmrl_worker.tm20.capture import CaptureError
from tmrl_worker.tm20.openplanet import Telemetry


class StaleFrameError(CaptureError):
    """The captured picture stopped following the game (frozen while the car moves, or no new frame at all)."""


class StaleFrameConfig(BaseModel):
    """When a TrackMania interface decides the screen is stale (``env_options.stale_frames``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    """False: never check (e.g. a recording replayed with a single frame)."""
    frozen_picture_s: float = Field(default=0.5, gt=0, le=MAX_DURATION_S)
    """The picture unchanged this long while every packet says the car moves: stale (10 steps at 20 Hz)."""
    moving_speed_mps: float = Field(default=1.0, gt=0)
    """A packet with a speed (m/s) at or above this says the car moves; a slower one restarts the count."""
    no_new_frame_s: float | None = Field(default=3.0, gt=0, le=MAX_DURATION_S)
    """The capture backend delivered no new frame this long, car moving or not: stale (None: never). Only backends
    that can tell (dxcam, the emulated game's screen) report it."""


class StaleFrameDetector:
    """Applies :class:`StaleFrameConfig`'s two rules to each (frame, packet) a step reads; see the module docstring."""

    def __init__(self, config: StaleFrameConfig | None = None) -> None:
        self.config = config or StaleFrameConfig()
        self.reset()

    def reset(self) -> None:
        """Forget the past frames (a new episode, or the game back after a wait)."""
        self._frame: np.ndarray | None = None
        self._unchanged_since: float | None = None
        """Arrival time of the packet read with the first frame of the current run of identical frames."""
        self._moving_since: float | None = None
        """Arrival time of the first packet of the current run of packets at moving speed."""
        self._started = time.monotonic()

    def check(self, frame: np.ndarray, packet: Telemetry, last_new_frame_at: float | None = None,
              now: float | None = None) -> None:
        """Record one step's frame and packet; raise :class:`StaleFrameError` when the screen is stale."""
        config = self.config
        if not config.enabled:
            return
        now = time.monotonic() if now is None else now
        changed = self._frame is None or not (frame is self._frame or np.array_equal(frame, self._frame))
        if changed:
            self._frame, self._unchanged_since = frame, packet.received_at
        if packet.speed >= config.moving_speed_mps:
            if self._moving_since is None:
                self._moving_since = packet.received_at
        else:
            self._moving_since = None
        if self._moving_since is not None and self._unchanged_since is not None:
            frozen_for = packet.received_at - max(self._unchanged_since, self._moving_since)
            if frozen_for >= config.frozen_picture_s:
                raise StaleFrameError(
                    f"the picture has not changed for {frozen_for:.1f} s while the car drives at {packet.speed:.1f} "
                    f"m/s: the game window is minimised, covered or not drawing, or capture reads another place; "
                    f"keep the game visible and in front")
        if last_new_frame_at is not None and config.no_new_frame_s is not None:
            silent_for = now - max(last_new_frame_at, self._started)
            if silent_for >= config.no_new_frame_s:
                raise StaleFrameError(
                    f"no new frame from the screen capture for {silent_for:.1f} s: the game stopped drawing or its "
                    f"window is minimised; restore it and keep it visible")

    def is_live(self, frame: np.ndarray, last_new_frame_at: float | None, stale_frame: np.ndarray | None,
                now: float | None = None) -> str | None:
        """While waiting for the game after a stale screen: None when ``frame`` shows the game again (a backend
        that reports frames delivered one recently, and the picture differs from ``stale_frame``, the frozen one);
        else what is still wrong."""
        now = time.monotonic() if now is None else now
        if last_new_frame_at is not None and now - last_new_frame_at > self.config.frozen_picture_s:
            return f"stale: still no new frame from the screen capture ({now - last_new_frame_at:.1f} s)"
        if stale_frame is not None and (frame is stale_frame or np.array_equal(frame, stale_frame)):
            return "stale: the picture is still the frozen one"
        return None
