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


def test_missing_window_names_the_title():
    with pytest.raises(WindowNotFoundError, match="no window titled 'Trackmania'"):
        XdotoolGameWindow("Trackmania", run=lambda args: "")


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
