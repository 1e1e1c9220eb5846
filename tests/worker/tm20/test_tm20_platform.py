"""Windows-only backends fail on other systems with a message that says what to use instead."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from tmrl_worker.tm20.capture import CaptureError, DxcamCapture, MssCapture, RecordedFrames, downscale, to_gray
from tmrl_worker.tm20.control import GamepadController, SendInputKeySender
from tmrl_worker.tm20.window import (
    ClientArea,
    Win32GameWindow,
    WindowNotFoundError,
    XdotoolGameWindow,
    make_process_dpi_aware,
)
from tmrl_worker.tm20.windows_only import WindowsOnlyError

not_windows = pytest.mark.skipif(sys.platform == "win32", reason="checks the error raised on other systems")


@not_windows
def test_dxcam_capture_off_windows_points_to_mss():
    with pytest.raises(WindowsOnlyError, match=r"dxcam screen capture needs Windows and the 'dxcam' package.*mss"):
        DxcamCapture(ClientArea(0, 0, 64, 64))


@not_windows
def test_gamepad_off_windows_points_to_the_keyboard_backend():
    with pytest.raises(WindowsOnlyError, match=r"virtual gamepad needs Windows and the 'vgamepad' package.*keyboard"):
        GamepadController()


@not_windows
def test_win32_window_sendinput_and_dpi_awareness_off_windows_raise_windows_only_error():
    for build in (lambda: Win32GameWindow("Trackmania"), SendInputKeySender, make_process_dpi_aware):
        with pytest.raises(WindowsOnlyError, match=f"this is {sys.platform}"):
            build()


def test_windows_only_error_is_a_runtime_error_carrying_the_package():
    error = WindowsOnlyError("dxcam screen capture", "dxcam")
    assert isinstance(error, RuntimeError) and error.package == "dxcam"


def test_xdotool_window_reads_the_client_area_and_sizes_the_window():
    commands = []

    def run(args):
        commands.append(args)
        if args[1] == "search":
            return "81788929\n"
        if args[1] == "getwindowgeometry":
            return "WINDOW=81788929\nX=12\nY=34\nWIDTH=958\nHEIGHT=488\nSCREEN=0\n"
        return ""

    window = XdotoolGameWindow("Trackmania", run=run)
    assert window.client_area() == ClientArea(12, 34, 958, 488)
    assert ClientArea(12, 34, 958, 488).as_ltrb() == (12, 34, 970, 522)
    window.place(0, 0, 256, 128)
    assert commands[-1] == ["xdotool", "windowsize", "81788929", "256", "128", "windowmove", "81788929", "0", "0"]


def test_missing_window_names_the_title_and_where_to_set_it():
    """A TrackMania-docs probe: `tmrl-worker run` was told to pass --window-title, a flag it does not have."""
    with pytest.raises(WindowNotFoundError, match=r"no window titled 'Trackmania'.*env_options.window_title in "
                                                  r"\[worker\], --window-title for check-env"):
        XdotoolGameWindow("Trackmania", run=lambda args: "")


def test_a_missing_xdotool_is_named_as_the_cause_not_a_missing_window(monkeypatch):
    """A TrackMania-docs probe: without xdotool, check-env on Linux said no game window was open."""
    monkeypatch.setattr("tmrl_worker.tm20.window.shutil.which", lambda name: None)
    with pytest.raises(WindowNotFoundError) as caught:
        XdotoolGameWindow("Trackmania")
    message = str(caught.value)
    assert message.startswith("cannot look for the game window: the xdotool command is not installed")
    assert "apt install xdotool" in message and "no window titled" not in message


def test_recorded_frames_replay_in_order_and_loop(tmp_path):
    frames = np.arange(3 * 4 * 5 * 3, dtype=np.uint8).reshape(3, 4, 5, 3)
    capture = RecordedFrames(frames)
    grabbed = [capture.grab() for _ in range(4)]
    np.testing.assert_array_equal(grabbed[3], frames[0])
    np.testing.assert_array_equal(grabbed[1], frames[1])
    once = RecordedFrames(frames, loop=False)
    for _ in range(3):
        once.grab()
    with pytest.raises(CaptureError, match="no more frames"):
        once.grab()


def test_recorded_frames_from_png_folder_and_npy_file(tmp_path):
    from PIL import Image

    frames = np.random.default_rng(0).integers(0, 255, (2, 8, 10, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame_{i:03d}.png")
    np.save(tmp_path / "frames.npy", frames)
    np.testing.assert_array_equal(RecordedFrames(tmp_path).grab(), frames[0])
    gray = RecordedFrames(tmp_path / "frames.npy", color="gray").grab()
    assert gray.shape == (8, 10) and gray.dtype == np.uint8
    with pytest.raises(CaptureError, match="neither a folder"):
        RecordedFrames(tmp_path / "missing.bin")


def test_recorded_frames_that_are_not_uint8_pixels_are_refused_instead_of_cast(tmp_path):
    with pytest.raises(CaptureError, match=r"the recorded frames must be uint8 pixels \(0-255\).*got float32"):
        RecordedFrames(np.full((2, 8, 10, 3), 0.5, np.float32))  # cast, 0-1 values would all read black
    np.save(tmp_path / "wide.npy", np.full((2, 8, 10, 3), 300, np.int32))
    with pytest.raises(CaptureError, match=r"wide.npy must be uint8 pixels.*got int32"):
        RecordedFrames(tmp_path / "wide.npy")


def test_gray_conversion_and_box_downscale():
    frame = np.zeros((128, 256, 3), np.uint8)
    frame[:, :128] = (255, 255, 255)
    gray = to_gray(frame)
    assert gray[0, 0] == 255 and gray[0, 200] == 0
    small = downscale(gray, 64, 64)
    assert small.shape == (64, 64) and small[:, :32].min() == 255 and small[:, 32:].max() == 0


def test_mss_without_a_display_gives_a_capture_error(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if sys.platform != "linux":
        pytest.skip("checks the X11 error path")
    with pytest.raises(CaptureError, match="DISPLAY"):
        MssCapture(ClientArea(0, 0, 64, 64)).grab()


class FakeCamera:
    """dxcam.DXCamera's surface: width/height of the output, channel_size, grab(region=...), release()."""

    def __init__(self, output_idx, output_color: str, width: int = 1920, height: int = 1080) -> None:
        self.output_idx, self.width, self.height = output_idx, width, height
        self.channel_size = 1 if output_color == "GRAY" else len(output_color)
        self.released = False
        self.grabs = 0

    def grab(self, region):
        self.grabs += 1
        left, top, right, bottom = region
        if not (self.width >= right > left >= 0 and self.height >= bottom > top >= 0):
            raise ValueError(f"Invalid Region: Region should be in {self.width}x{self.height}")
        frame = np.zeros((bottom - top, right - left, self.channel_size), np.uint8)
        frame[..., 0] = 200  # reddish: gray = 0.299 * 200
        return frame

    def release(self) -> None:
        self.released = True


class FakeDxcam:
    """dxcam's module surface: create() caches one camera per output and returns it whatever colour is asked."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.created: list[dict] = []
        self.cache: dict = {}
        self.fail = fail

    def create(self, device_idx=0, output_idx=None, region=None, output_color="RGB", max_buffer_len=8):
        self.created.append({"output_idx": output_idx, "output_color": output_color})
        if self.fail is not None:
            raise self.fail
        cached = self.cache.get(output_idx)
        if cached is not None and not cached.released:
            return cached  # dxcam: "returning existing instance", old parameters kept
        self.cache[output_idx] = FakeCamera(output_idx, output_color)
        return self.cache[output_idx]


@pytest.fixture
def fake_dxcam(monkeypatch):
    from tmrl_worker.tm20 import windows_only

    fake = FakeDxcam()
    monkeypatch.setattr(windows_only, "is_windows", lambda: True)
    monkeypatch.setitem(sys.modules, "dxcam", fake)
    return fake


def test_dxcam_defaults_to_the_primary_output_and_gray_is_not_lost_to_a_cached_rgb_camera(fake_dxcam):
    rgb = DxcamCapture(ClientArea(10, 20, 64, 32))
    assert fake_dxcam.created[0] == {"output_idx": None, "output_color": "RGB"}  # None: dxcam's primary output
    assert rgb.grab().shape == (32, 64, 3)
    gray = DxcamCapture(ClientArea(10, 20, 64, 32), color="gray")  # dxcam hands back the cached RGB camera
    frame = gray.grab()
    assert frame.shape == (32, 64) and frame[0, 0] == int(0.299 * 200)
    fake_dxcam.cache[None] = FakeCamera(None, "GRAY")  # a camera another part of the process made in GRAY
    replaced = DxcamCapture(ClientArea(0, 0, 8, 8), color="rgb")
    assert fake_dxcam.cache[None].channel_size == 3 and replaced.grab().shape == (8, 8, 3)


def test_dxcam_region_off_the_output_and_create_failures_are_capture_errors_with_advice(fake_dxcam):
    with pytest.raises(CaptureError, match=r"not inside the primary display \(1920x1080\).*move the game"):
        DxcamCapture(ClientArea(1900, 0, 958, 488))
    fake_dxcam.fail = RuntimeError("No primary output found for device index 0")
    with pytest.raises(CaptureError, match=r"could not open display output 1 \(RuntimeError: No primary output.*primary monitor"):
        DxcamCapture(ClientArea(0, 0, 64, 64), output_idx=1)


def test_dxcam_grab_errors_become_capture_errors(fake_dxcam):
    capture = DxcamCapture(ClientArea(0, 0, 64, 64))
    capture.region = ClientArea(0, 0, 4000, 64)  # the output shrank under the window (display mode change)
    with pytest.raises(CaptureError, match="dxcam could not capture.*Invalid Region"):
        capture.grab()
