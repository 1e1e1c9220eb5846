"""Driving the car: ``Controller.apply([gas, brake, steer])`` with every value in [-1, 1].

Mapping (shared with the built-in simulator):

* gas   -> right trigger ``clip(gas, 0, 1)`` (non-positive: released)
* brake -> left trigger ``clip(brake, 0, 1)``
* steer -> left stick X ``clip(steer, -1, 1)`` (-1 full left, 1 full right), stick Y stays 0

Backends: :class:`GamepadController` (an emulated Xbox 360 pad through vgamepad, Windows only, analog; without the
ViGEmBus driver :func:`make_controller` says where to get it and falls back to the keyboard),
:class:`KeyboardController` (binary arrows: a value beyond ``threshold`` presses the key) over a :class:`KeySender`
(:class:`SendInputKeySender` on Windows, :class:`XdotoolKeySender` on Linux/Proton), and
:class:`RecordingController`, which drives nothing and records every call (tests, dry runs).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np

from tmrl_worker.tm20.windows_only import WindowsOnlyError, import_windows_module, is_windows, require_windows

log = logging.getLogger(__name__)
VIGEMBUS_URL = "https://github.com/nefarius/ViGEmBus/releases"
"""Where the ViGEmBus driver that vgamepad needs is published (vgamepad tests version 1.17.333)."""

# XInput button bits (XUSB_GAMEPAD_*), the values vgamepad's XUSB_BUTTON enum carries
XUSB_BUTTONS = {"DPAD_UP": 0x0001, "DPAD_DOWN": 0x0002, "DPAD_LEFT": 0x0004, "DPAD_RIGHT": 0x0008,
                "START": 0x0010, "BACK": 0x0020, "A": 0x1000, "B": 0x2000, "X": 0x4000, "Y": 0x8000}


class ControlError(ValueError):
    """An action or a controller setting cannot be used."""


class GamepadUnavailableError(RuntimeError):
    """vgamepad cannot create a virtual pad, usually because the ViGEmBus driver is missing."""


def open_virtual_pad() -> tuple[Any, Any]:
    """``(vgamepad module, VX360Gamepad)``; :class:`GamepadUnavailableError` naming what to install when the
    ViGEmBus driver is missing (vgamepad raises a bare ``Exception('VIGEM_ERROR_BUS_NOT_FOUND')`` when imported)."""
    try:
        vgamepad = import_windows_module("vgamepad", "the Xbox 360 virtual gamepad")
        return vgamepad, vgamepad.VX360Gamepad()
    except WindowsOnlyError:
        raise
    except Exception as exc:  # vgamepad reports driver problems as bare Exception / AssertionError
        text = str(exc) or type(exc).__name__
        if "VIGEM" in text.upper():
            raise GamepadUnavailableError(
                f"the ViGEmBus driver that the virtual gamepad needs is not installed or not running ({text}): "
                f"install ViGEmBus from {VIGEMBUS_URL} (vgamepad's installer normally does; 1.17.333 is the version "
                f"vgamepad tests), then restart the worker") from exc
        raise GamepadUnavailableError(f"vgamepad could not create a virtual Xbox 360 pad: {text}") from exc


class Controller(Protocol):
    """What the rtgym interfaces need to drive the car."""

    def apply(self, action: np.ndarray) -> None:
        """Hold ``[gas, brake, steer]`` (each in [-1, 1]) until the next call."""

    def respawn(self) -> None:
        """Press the game's respawn control once (restarts the run / the car at the start)."""

    def close_finish_popup(self) -> None:
        """Press the control that closes the end-of-race pop-up (gamepad A, keyboard Enter), as upstream tmrl does."""

    def release(self) -> None:
        """Release every input (car coasts)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class AnalogCommand:
    """Gamepad values for one action."""

    gas_trigger: float
    brake_trigger: float
    steer: float


def analog_command(action: Any) -> AnalogCommand:
    """The gamepad values for ``[gas, brake, steer]`` (see the module docstring)."""
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    if values.shape != (3,):
        raise ControlError(f"an action is [gas, brake, steer], got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ControlError(f"action holds NaN or infinity: {values.tolist()}")
    gas, brake, steer = values
    return AnalogCommand(float(np.clip(gas, 0.0, 1.0)), float(np.clip(brake, 0.0, 1.0)), float(np.clip(steer, -1.0, 1.0)))


class GamepadController:
    """Analog control through an emulated Xbox 360 gamepad (vgamepad ``VX360Gamepad``; Windows + ViGEmBus).

    ``pad`` may be any object with vgamepad's ``VX360Gamepad`` methods (tests pass a fake).
    """

    def __init__(self, pad: Any = None, respawn_button: str = "B", press_seconds: float = 0.05) -> None:
        if respawn_button not in XUSB_BUTTONS:
            raise ControlError(f"unknown gamepad button {respawn_button!r}: one of {sorted(XUSB_BUTTONS)}")
        self._button: Any = XUSB_BUTTONS[respawn_button]
        self._popup_button: Any = XUSB_BUTTONS["A"]
        if pad is None:
            vgamepad, pad = open_virtual_pad()
            self._button = getattr(vgamepad.XUSB_BUTTON, f"XUSB_GAMEPAD_{respawn_button}")
            self._popup_button = vgamepad.XUSB_BUTTON.XUSB_GAMEPAD_A
        self.pad = pad
        self.press_seconds = press_seconds

    def apply(self, action: np.ndarray) -> None:
        command = analog_command(action)
        self.pad.right_trigger_float(value_float=command.gas_trigger)
        self.pad.left_trigger_float(value_float=command.brake_trigger)
        self.pad.left_joystick_float(x_value_float=command.steer, y_value_float=0.0)
        self.pad.update()

    def _press(self, button: Any) -> None:
        self.pad.press_button(button=button)
        self.pad.update()
        time.sleep(self.press_seconds)
        self.pad.release_button(button=button)
        self.pad.update()

    def respawn(self) -> None:
        self._press(self._button)

    def close_finish_popup(self) -> None:
        self.pad.reset()  # upstream releases everything first: a held trigger would drive off again
        self._press(self._popup_button)

    def release(self) -> None:
        self.pad.reset()
        self.pad.update()

    def close(self) -> None:
        self.release()


class KeySender(Protocol):
    """Presses and releases named keys: ``up``, ``down``, ``left``, ``right``, ``delete``, ``enter``, ``backspace``."""

    def key_down(self, key: str) -> None: ...

    def key_up(self, key: str) -> None: ...


# (scan code, extended) of each key, set 1 — games read scan codes, not virtual keys
_SCAN_CODES = {"up": (0x48, True), "down": (0x50, True), "left": (0x4B, True), "right": (0x4D, True),
               "delete": (0x53, True), "enter": (0x1C, False), "backspace": (0x0E, False)}
_XDOTOOL_NAMES = {"up": "Up", "down": "Down", "left": "Left", "right": "Right", "delete": "Delete",
                  "enter": "Return", "backspace": "BackSpace"}


def _check_key(key: str) -> None:
    if key not in _SCAN_CODES:
        raise ControlError(f"unknown key {key!r}: one of {sorted(_SCAN_CODES)}")


class SendInputKeySender:
    """Keys through Win32 ``SendInput`` with hardware scan codes (what DirectInput games such as TM read)."""

    _INPUT_KEYBOARD = 1
    _KEYEVENTF_EXTENDEDKEY = 0x0001
    _KEYEVENTF_KEYUP = 0x0002
    _KEYEVENTF_SCANCODE = 0x0008

    def __init__(self) -> None:
        require_windows("keyboard control through SendInput")
        from ctypes import wintypes

        class KEYBDINPUT(ctypes.Structure):
            _fields_ = [("wVk", wintypes.WORD), ("wScan", wintypes.WORD), ("dwFlags", wintypes.DWORD),
                        ("time", wintypes.DWORD), ("dwExtraInfo", ctypes.c_size_t)]

        class MOUSEINPUT(ctypes.Structure):  # the largest union member: sets sizeof(INPUT)
            _fields_ = [("dx", wintypes.LONG), ("dy", wintypes.LONG), ("mouseData", wintypes.DWORD),
                        ("dwFlags", wintypes.DWORD), ("time", wintypes.DWORD), ("dwExtraInfo", ctypes.c_size_t)]

        class INPUTUNION(ctypes.Union):
            _fields_ = [("ki", KEYBDINPUT), ("mi", MOUSEINPUT)]

        class INPUT(ctypes.Structure):
            _fields_ = [("type", wintypes.DWORD), ("u", INPUTUNION)]

        self._input_cls, self._keybd_cls, self._union_cls = INPUT, KEYBDINPUT, INPUTUNION
        self._user32 = ctypes.windll.user32

    def _send(self, key: str, up: bool) -> None:
        _check_key(key)
        scan, extended = _SCAN_CODES[key]
        flags = self._KEYEVENTF_SCANCODE | (self._KEYEVENTF_EXTENDEDKEY if extended else 0)
        flags |= self._KEYEVENTF_KEYUP if up else 0
        event = self._input_cls(type=self._INPUT_KEYBOARD,
                                u=self._union_cls(ki=self._keybd_cls(wVk=0, wScan=scan, dwFlags=flags, time=0, dwExtraInfo=0)))
        if self._user32.SendInput(1, ctypes.byref(event), ctypes.sizeof(event)) != 1:
            raise ControlError(f"SendInput refused the {key} key (another program may block input)")

    def key_down(self, key: str) -> None:
        self._send(key, up=False)

    def key_up(self, key: str) -> None:
        self._send(key, up=True)


class XdotoolKeySender:
    """Keys through the ``xdotool`` command (Linux/X11, e.g. TrackMania under Proton; the game window needs focus)."""

    def __init__(self, run: Callable[[list[str]], object] | None = None) -> None:
        if run is None:
            if shutil.which("xdotool") is None:
                raise ControlError("keyboard control on Linux needs xdotool (apt install xdotool)")
            run = lambda args: subprocess.run(args, check=True, timeout=2)  # noqa: E731
        self._run = run

    def key_down(self, key: str) -> None:
        _check_key(key)
        self._run(["xdotool", "keydown", _XDOTOOL_NAMES[key]])

    def key_up(self, key: str) -> None:
        _check_key(key)
        self._run(["xdotool", "keyup", _XDOTOOL_NAMES[key]])


class KeyboardController:
    """Binary arrows: gas > threshold holds up, brake > threshold down, steer < -threshold left, > threshold right.

    Only changes are sent (a key held over several steps is pressed once).
    """

    def __init__(self, sender: KeySender | None = None, threshold: float = 0.5, respawn_key: str = "delete",
                 press_seconds: float = 0.05) -> None:
        _check_key(respawn_key)
        if sender is None:
            sender = SendInputKeySender() if is_windows() else XdotoolKeySender()
        self.sender = sender
        self.threshold = threshold
        self.respawn_key = respawn_key
        self.press_seconds = press_seconds
        self.held: set[str] = set()

    def keys_for(self, action: Any) -> set[str]:
        """The arrow keys held for ``[gas, brake, steer]``."""
        command = analog_command(action)
        keys = set()
        if command.gas_trigger > self.threshold:
            keys.add("up")
        if command.brake_trigger > self.threshold:
            keys.add("down")
        if command.steer < -self.threshold:
            keys.add("left")
        elif command.steer > self.threshold:
            keys.add("right")
        return keys

    def _hold(self, keys: set[str]) -> None:
        for key in sorted(self.held - keys):
            self.sender.key_up(key)
        for key in sorted(keys - self.held):
            self.sender.key_down(key)
        self.held = keys

    def apply(self, action: np.ndarray) -> None:
        self._hold(self.keys_for(action))

    def _tap(self, key: str) -> None:
        self.sender.key_down(key)
        time.sleep(self.press_seconds)
        self.sender.key_up(key)

    def respawn(self) -> None:
        self._tap(self.respawn_key)

    def close_finish_popup(self) -> None:
        self.release()
        self._tap("enter")

    def release(self) -> None:
        self._hold(set())

    def close(self) -> None:
        self.release()


class RecordingController:
    """Drives nothing; records ``calls`` as ``(name, value)`` and the applied ``actions`` (tests, dry runs).

    ``on_respawn`` / ``on_close_popup`` are called on those presses, so a fake game can react to them.
    """

    def __init__(self, on_respawn: Callable[[], None] | None = None,
                 on_close_popup: Callable[[], None] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.actions: list[np.ndarray] = []
        self.respawns = 0
        self.on_respawn = on_respawn
        self.on_close_popup = on_close_popup

    def apply(self, action: np.ndarray) -> None:
        analog_command(action)  # same validation as the real backends
        array = np.array(action, dtype=np.float32)
        self.actions.append(array)
        self.calls.append(("apply", array))

    def respawn(self) -> None:
        self.respawns += 1
        self.calls.append(("respawn", None))
        if self.on_respawn is not None:
            self.on_respawn()

    def close_finish_popup(self) -> None:
        self.calls.append(("close_finish_popup", None))
        if self.on_close_popup is not None:
            self.on_close_popup()

    def release(self) -> None:
        self.calls.append(("release", None))

    def close(self) -> None:
        self.calls.append(("close", None))


ControllerKind = Literal["auto", "gamepad", "keyboard", "none"]


CONTROLLER_KINDS: tuple[str, ...] = get_args(ControllerKind)


def check_controller_kind(kind: object, setting: str = "") -> ControllerKind:
    """``kind`` when it is one of :data:`CONTROLLER_KINDS`; else :class:`ControlError` naming them (and the
    ``setting`` it came from), so that a typo is refused where it is read, before the plugin or the window is
    reached."""
    if not isinstance(kind, str) or kind not in CONTROLLER_KINDS:
        source = f" ({setting})" if setting else ""
        raise ControlError(f"unknown controller {kind!r}{source}: use one of {', '.join(CONTROLLER_KINDS)}")
    return kind  # type: ignore[return-value]


def make_controller(kind: ControllerKind = "auto") -> Controller:
    """``gamepad`` (analog, Windows), ``keyboard`` (binary arrows), ``none`` (records only), ``auto`` (gamepad on
    Windows, keyboard elsewhere). A gamepad that vgamepad cannot create (ViGEmBus missing) falls back to the
    keyboard with a warning that says what to install."""
    kind = check_controller_kind(kind)
    if kind == "auto":
        kind = "gamepad" if is_windows() else "keyboard"
    if kind == "gamepad":
        try:
            return GamepadController()
        except GamepadUnavailableError as exc:
            log.warning("%s. Falling back to the keyboard controller: binary arrow keys instead of analog control, "
                        "and the game window must keep the focus", exc)
            return KeyboardController()
    if kind == "keyboard":
        return KeyboardController()
    return RecordingController()  # "none"
