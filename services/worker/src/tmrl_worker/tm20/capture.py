"""Screen capture of the game: ``FrameCapture.grab() -> uint8 frame`` (``HxWx3`` RGB or ``HxW`` gray).

Backends:

* :class:`DxcamCapture` — Windows, Desktop Duplication through dxcam (fast; the primary display by default).
* :class:`MssCapture` — anywhere with a screen (Linux/X11 under Proton), through mss.
* :class:`RecordedFrames` — replays frames from an array, a ``.npy`` file or a folder of PNGs; used in tests and
  to re-run the LIDAR on a recording.

:func:`make_capture` finds the game window, optionally gives its client area the requested size, and captures
exactly that client area. A backend name is checked (:func:`check_capture_backend`) where a setting or an option is
read, and again by :func:`make_capture` before it looks for the window.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np

from tmrl_worker.tm20.window import DEFAULT_WINDOW_TITLE, ClientArea, find_game_window
from tmrl_worker.tm20.windows_only import import_windows_module

ColorMode = Literal["rgb", "gray"]
CaptureBackend = Literal["auto", "dxcam", "mss"]
CAPTURE_BACKENDS: tuple[str, ...] = get_args(CaptureBackend)
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class CaptureError(RuntimeError):
    """The screen (or a recording) cannot be captured."""


def check_capture_backend(backend: object, setting: str = "") -> CaptureBackend:
    """``backend`` when it is one of :data:`CAPTURE_BACKENDS`; else :class:`CaptureError` naming them (and the
    ``setting`` it came from, e.g. ``--capture``), so that a typo is refused where it is read, before any window
    search or game connection."""
    if not isinstance(backend, str) or backend not in CAPTURE_BACKENDS:
        source = f" ({setting})" if setting else ""
        raise CaptureError(f"unknown capture backend {backend!r}{source}: use one of {', '.join(CAPTURE_BACKENDS)}")
    return backend  # type: ignore[return-value]


class FrameCapture(Protocol):
    """One screenshot per call."""

    def grab(self) -> np.ndarray:
        """The newest frame, ``uint8``: ``(H, W, 3)`` RGB or ``(H, W)`` gray."""

    def close(self) -> None: ...


def to_gray(frame: np.ndarray) -> np.ndarray:
    """``uint8`` luminance of an RGB(A) frame (a gray frame is returned unchanged)."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        return frame
    if frame.ndim == 3 and frame.shape[2] == 1:
        return frame[..., 0]
    return (frame[..., :3].astype(np.float32) @ _GRAY_WEIGHTS).clip(0, 255).astype(np.uint8)


def downscale(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """``frame`` resized to ``height x width`` by box averaging (Pillow), keeping its dtype and channels."""
    from PIL import Image

    frame = np.ascontiguousarray(frame)
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BOX))


def _convert(frame: np.ndarray, color: ColorMode) -> np.ndarray:
    return to_gray(frame) if color == "gray" else frame


class DxcamCapture:
    """Desktop Duplication capture of a screen region (Windows only; ``pip install dxcam``).

    ``output_idx=None`` is dxcam's own default, the primary display. dxcam keeps one camera per output and returns
    that cached camera, with the colour mode it was first created with, to every later ``create()``: this class
    therefore always asks for RGB, converts to gray itself, and replaces a cached camera of another colour mode.
    Failures to open the output, a region off the output and failed grabs are :class:`CaptureError` with advice.
    """

    def __init__(self, region: ClientArea, color: ColorMode = "rgb", output_idx: int | None = None) -> None:
        dxcam = import_windows_module("dxcam", "dxcam screen capture")
        self.region = region
        self.color = color
        self.output_idx = output_idx
        self._camera = self._open(dxcam)
        self._check_region()
        self._last: np.ndarray | None = None
        self.last_new_frame_at: float | None = None
        """``time.monotonic()`` of the last grab that brought a new frame (dxcam gives None while nothing on the
        display changed): the interface's stale-screen check reads it."""

    def _output_name(self) -> str:
        return "the primary display" if self.output_idx is None else f"display output {self.output_idx}"

    def _create(self, dxcam: Any) -> Any:
        try:
            camera = dxcam.create(output_idx=self.output_idx, output_color="RGB")
        except Exception as exc:  # dxcam raises RuntimeError, IndexError or COM errors from DXGI
            raise CaptureError(
                f"dxcam could not open {self._output_name()} ({type(exc).__name__}: {exc}): run the game on the "
                f"primary monitor (or pick its output), close other screen-duplication programs (OBS display "
                f"capture, another worker on this output), and update the graphics driver") from exc
        if camera is None:
            raise CaptureError(f"dxcam could not open {self._output_name()} (another process may hold it)")
        return camera

    def _open(self, dxcam: Any) -> Any:
        camera = self._create(dxcam)
        if getattr(camera, "channel_size", 3) != 3:  # a cached camera made with another output_color
            camera.release()
            del camera
            gc.collect()  # dxcam's cache holds cameras weakly: drop ours so create() builds a new one
            camera = self._create(dxcam)
            if getattr(camera, "channel_size", 3) != 3:
                raise CaptureError(f"dxcam keeps a camera of {self._output_name()} in another colour mode (made "
                                   f"elsewhere in this process); capture it from one place only")
        return camera

    def _check_region(self) -> None:
        width, height = getattr(self._camera, "width", None), getattr(self._camera, "height", None)
        if width is None or height is None:
            return
        left, top, right, bottom = self.region.as_ltrb()
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise CaptureError(
                f"the game window's client area {self.region} is not inside {self._output_name()} ({width}x{height}): "
                f"move the game onto that monitor (the worker places its window at the top-left corner), and check "
                f"that Windows display scaling did not resize it")

    def _grab(self) -> Any:
        try:
            return self._camera.grab(region=self.region.as_ltrb())
        except Exception as exc:  # dxcam: ValueError for a bad region, COM errors when the display mode changes
            raise CaptureError(f"dxcam could not capture {self.region}: {type(exc).__name__}: {exc}") from exc

    def grab(self) -> np.ndarray:
        frame = self._grab()
        if frame is None:  # dxcam returns None when the screen has not changed since the last grab
            if self._last is None:
                frame = self._wait_first_frame()
            else:
                return self._last
        self.last_new_frame_at = time.monotonic()
        frame = np.asarray(frame)
        self._last = frame[..., 0] if frame.ndim == 3 and frame.shape[2] == 1 else _convert(frame[..., :3], self.color)
        return self._last

    def _wait_first_frame(self) -> np.ndarray:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            frame = self._grab()
            if frame is not None:
                return frame
            time.sleep(0.01)
        raise CaptureError(f"dxcam returned no frame of region {self.region} in 2 s: is the game window visible "
                           f"on {self._output_name()}?")

    def close(self) -> None:
        release = getattr(self._camera, "release", None)
        if release is not None:
            release()


class MssCapture:
    """Screenshot of a screen region with mss (Linux/X11 — e.g. TrackMania under Proton — macOS, Windows)."""

    def __init__(self, region: ClientArea, color: ColorMode = "rgb") -> None:
        import mss

        self.region = region
        self.color = color
        try:
            self._sct = mss.MSS() if hasattr(mss, "MSS") else mss.mss()
        except Exception as exc:  # mss raises its own ScreenShotError, or XError without a display
            raise CaptureError(f"mss cannot open the screen ({exc}): is $DISPLAY set and the game visible?") from exc

    def grab(self) -> np.ndarray:
        try:
            shot = np.asarray(self._sct.grab(self.region.as_mss_monitor()))  # BGRA
        except Exception as exc:  # mss.exception.ScreenShotError: region off screen, display gone
            raise CaptureError(f"mss could not capture {self.region}: {exc}") from exc
        return _convert(np.ascontiguousarray(shot[..., 2::-1]), self.color)

    def close(self) -> None:
        self._sct.close()


class RecordedFrames:
    """Replays recorded frames in order (looping by default): an array ``(N, H, W[, C])``, a list of frames,
    a ``.npy`` file (no pickle) or a folder of ``.png`` files read in name order."""

    def __init__(self, frames: np.ndarray | Sequence[np.ndarray] | str | Path, color: ColorMode | None = None,
                 loop: bool = True) -> None:
        self.frames = self._load(frames)
        if not self.frames:
            raise CaptureError(f"no recorded frames in {frames!r}")
        self.color = color
        self.loop = loop
        self.grabs = 0
        self._order: Iterator[int] = itertools.cycle(range(len(self.frames))) if loop else iter(range(len(self.frames)))

    @staticmethod
    def _load(frames: np.ndarray | Sequence[np.ndarray] | str | Path) -> list[np.ndarray]:
        if isinstance(frames, (str, Path)):
            path = Path(frames)
            if path.is_dir():
                from PIL import Image

                return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.glob("*.png"))]
            if path.suffix == ".npy" and path.is_file():
                return RecordedFrames._checked(list(np.load(path, allow_pickle=False)), str(path))
            raise CaptureError(f"{path} is neither a folder of .png frames nor a .npy file")
        return RecordedFrames._checked([np.asarray(f) for f in frames], "the recorded frames")

    @staticmethod
    def _checked(frames: list[np.ndarray], what: str) -> list[np.ndarray]:
        """The frames, refused unless they are uint8 pixels as a screen capture delivers them (a cast would turn
        0-1 floats black, and wrap larger values)."""
        dtypes = {str(frame.dtype) for frame in frames}
        if dtypes - {"uint8"}:
            raise CaptureError(f"{what} must be uint8 pixels (0-255), as captured; got {', '.join(sorted(dtypes))}")
        return frames

    def grab(self) -> np.ndarray:
        try:
            index = next(self._order)
        except StopIteration:
            raise CaptureError(f"the recording has no more frames (all {len(self.frames)} replayed)") from None
        self.grabs += 1
        frame = self.frames[index]
        return _convert(frame, self.color) if self.color else frame

    def close(self) -> None:
        pass


def make_capture(backend: CaptureBackend = "auto", color: ColorMode = "rgb", window_title: str = DEFAULT_WINDOW_TITLE,
                 region: ClientArea | None = None, window_size: tuple[int, int] | None = None,
                 output_idx: int | None = None) -> FrameCapture:
    """Capture of the game window's client area.

    ``backend``: ``dxcam`` (Windows), ``mss`` (any OS), ``auto`` (dxcam on Windows, mss elsewhere).
    ``region``: capture this rectangle instead of looking for the window. ``window_size``: ``(width, height)`` the
    window's client area is given first (at the top-left corner of the screen), e.g. ``(958, 488)`` for LIDAR.
    ``output_idx``: dxcam's display output (None: the primary display, dxcam's default).
    """
    from tmrl_worker.tm20.windows_only import is_windows

    backend = check_capture_backend(backend)
    if backend == "auto":
        backend = "dxcam" if is_windows() else "mss"
    if region is None:
        window = find_game_window(window_title)
        if window_size is not None:
            window.place(0, 0, *window_size)
        region = window.client_area()
    if backend == "dxcam":
        return DxcamCapture(region, color, output_idx)
    return MssCapture(region, color)
