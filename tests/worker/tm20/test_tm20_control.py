"""Action -> gamepad / keyboard mapping, checked against recording fakes."""

from __future__ import annotations

import numpy as np
import pytest
from tmrl_worker.tm20.control import (
    XUSB_BUTTONS,
    ControlError,
    GamepadController,
    KeyboardController,
    RecordingController,
    XdotoolKeySender,
    analog_command,
)


class FakePad:
    """Records calls with vgamepad.VX360Gamepad's method names and keywords."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def right_trigger_float(self, value_float: float) -> None:
        self.calls.append(("right_trigger", value_float))

    def left_trigger_float(self, value_float: float) -> None:
        self.calls.append(("left_trigger", value_float))

    def left_joystick_float(self, x_value_float: float, y_value_float: float) -> None:
        self.calls.append(("left_stick", x_value_float, y_value_float))

    def press_button(self, button: int) -> None:
        self.calls.append(("press", button))

    def release_button(self, button: int) -> None:
        self.calls.append(("release", button))

    def reset(self) -> None:
        self.calls.append(("reset",))

    def update(self) -> None:
        self.calls.append(("update",))


class FakeKeys:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def key_down(self, key: str) -> None:
        self.events.append(("down", key))

    def key_up(self, key: str) -> None:
        self.events.append(("up", key))


@pytest.mark.parametrize(("action", "expected"), [
    ([1.0, 0.0, 0.0], (1.0, 0.0, 0.0)),
    ([0.3, 0.7, -0.4], (0.3, 0.7, -0.4)),
    ([-1.0, -1.0, 1.0], (0.0, 0.0, 1.0)),  # negative pedals are released
    ([2.0, 5.0, -3.0], (1.0, 1.0, -1.0)),  # clipped to the device range
])
def test_gamepad_maps_gas_brake_steer_to_triggers_and_left_stick(action, expected):
    pad = FakePad()
    GamepadController(pad).apply(np.array(action, dtype=np.float32))
    gas, brake, steer = expected
    assert pad.calls[0] == ("right_trigger", pytest.approx(gas))
    assert pad.calls[1] == ("left_trigger", pytest.approx(brake))
    assert pad.calls[2] == ("left_stick", pytest.approx(steer), 0.0)
    assert pad.calls[3] == ("update",)  # one report per action


def test_gamepad_respawn_presses_and_releases_the_button():
    pad = FakePad()
    GamepadController(pad, respawn_button="B", press_seconds=0.0).respawn()
    b = XUSB_BUTTONS["B"]
    assert pad.calls == [("press", b), ("update",), ("release", b), ("update",)]


def test_gamepad_release_resets_every_input():
    pad = FakePad()
    GamepadController(pad).release()
    assert pad.calls == [("reset",), ("update",)]


def test_unknown_button_and_malformed_actions_are_refused():
    with pytest.raises(ControlError, match="unknown gamepad button"):
        GamepadController(FakePad(), respawn_button="Z")
    with pytest.raises(ControlError, match="gas, brake, steer"):
        analog_command([1.0, 0.0])
    with pytest.raises(ControlError, match="NaN"):
        GamepadController(FakePad()).apply(np.array([np.nan, 0, 0]))


def test_keyboard_holds_arrows_beyond_threshold_and_sends_only_changes():
    keys = FakeKeys()
    control = KeyboardController(keys, threshold=0.5)
    control.apply(np.array([1.0, 0.0, -0.9]))
    assert sorted(keys.events) == [("down", "left"), ("down", "up")]
    keys.events.clear()
    control.apply(np.array([0.8, 0.0, -0.6]))  # same keys: nothing sent
    assert keys.events == []
    control.apply(np.array([0.2, 0.9, 0.7]))
    assert keys.events == [("up", "left"), ("up", "up"), ("down", "down"), ("down", "right")]
    keys.events.clear()
    control.release()
    assert sorted(keys.events) == [("up", "down"), ("up", "right")]


def test_keyboard_respawn_taps_delete():
    keys = FakeKeys()
    KeyboardController(keys, press_seconds=0.0).respawn()
    assert keys.events == [("down", "delete"), ("up", "delete")]


def test_xdotool_sender_uses_x11_key_names():
    commands = []
    sender = XdotoolKeySender(run=commands.append)
    sender.key_down("up")
    sender.key_up("delete")
    assert commands == [["xdotool", "keydown", "Up"], ["xdotool", "keyup", "Delete"]]
    with pytest.raises(ControlError, match="unknown key"):
        sender.key_down("space")


def test_recording_controller_records_actions_and_respawns():
    control = RecordingController()
    control.apply(np.array([0.5, 0.0, 0.1]))
    control.respawn()
    control.release()
    assert [name for name, _ in control.calls] == ["apply", "respawn", "release"]
    np.testing.assert_allclose(control.actions[0], [0.5, 0.0, 0.1])
    assert control.respawns == 1


def test_missing_vigembus_names_the_driver_link_and_falls_back_to_the_keyboard(tmp_path, monkeypatch, caplog):
    """vgamepad connects to ViGEmBus when imported and raises a bare Exception('VIGEM_ERROR_BUS_NOT_FOUND')."""
    import sys

    from tmrl_worker.tm20 import control, windows_only

    (tmp_path / "vgamepad.py").write_text("raise Exception('VIGEM_ERROR_BUS_NOT_FOUND')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vgamepad", raising=False)
    monkeypatch.setattr(windows_only, "is_windows", lambda: True)
    monkeypatch.setattr(control, "is_windows", lambda: True)
    sent: list[tuple[str, str]] = []

    class FakeSendInput:
        def key_down(self, key: str) -> None:
            sent.append(("down", key))

        def key_up(self, key: str) -> None:
            sent.append(("up", key))

    monkeypatch.setattr(control, "SendInputKeySender", FakeSendInput)
    with pytest.raises(control.GamepadUnavailableError, match=r"ViGEmBus .*VIGEM_ERROR_BUS_NOT_FOUND.*github.com/nefarius/ViGEmBus"):
        GamepadController()
    for kind in ("auto", "gamepad"):
        controller = control.make_controller(kind)
        assert isinstance(controller, KeyboardController)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("Falling back to the keyboard" in w and control.VIGEMBUS_URL in w for w in warnings)
    controller.apply(np.array([1.0, 0.0, -1.0]))
    assert sent == [("down", "left"), ("down", "up")]
