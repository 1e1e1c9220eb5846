"""Several games on one machine: a worker names its game window by title or by the game's process id, places it
where it asks (not every window at the top-left corner), and finds it again after the game restarted."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_tm20_interfaces import corridor_frames, straight_reward
from tmrl_worker.tm20 import interfaces
from tmrl_worker.tm20.capture import RecordedFrames
from tmrl_worker.tm20.control import RecordingController
from tmrl_worker.tm20.interfaces import TM20ConfigError, TM20LidarInterface
from tmrl_worker.tm20.openplanet import TelemetryClient
from tmrl_worker.tm20.replay_server import TelemetryReplayServer
from tmrl_worker.tm20.synthetic import StraightDrive
from tmrl_worker.tm20.window import ClientArea, WindowNotFoundError, XdotoolGameWindow

FAST_RECOVERY = {"first_retry_s": 0.1, "max_retry_s": 0.2, "probe_timeout_s": 0.5, "step_telemetry_timeout_s": 0.5}


def test_xdotool_finds_the_window_of_a_process_id_and_reads_its_title():
    commands = []

    def run(args):
        commands.append(args)
        if args[1] == "search":
            return "81788929\n81788930\n" if args[-1] == "4242" else ""
        return "Trackmania\n" if args[1] == "getwindowname" else ""

    window = XdotoolGameWindow("ignored", run=run, pid=4242)
    assert commands[0] == ["xdotool", "search", "--onlyvisible", "--pid", "4242"]
    assert window.window_id == "81788929" and window.title == "Trackmania"
    with pytest.raises(WindowNotFoundError, match=r"no visible window belongs to process 77.*restarted game"):
        XdotoolGameWindow("ignored", run=run, pid=77)


class GameWindowStandIn:
    """A game window that can close (a crashed game), numbered by how many were found."""

    def __init__(self, number: int) -> None:
        self.number, self.title, self.closed = number, "Trackmania", False
        self.placed: list[tuple[int, int, int, int]] = []

    def client_area(self) -> ClientArea:
        if self.closed:
            raise WindowNotFoundError(self.title, "the window closed")
        x, y, w, h = self.placed[-1]
        return ClientArea(x, y, w, h)

    def place(self, x: int, y: int, width: int, height: int) -> None:
        self.placed.append((x, y, width, height))

    def focus(self) -> None:
        if self.closed:
            raise WindowNotFoundError(self.title, "the window closed")

    def is_foreground(self) -> bool:
        return True


@pytest.fixture
def game_windows(monkeypatch):
    """``find_game_window`` and ``make_capture`` of the interfaces module, recording what they were asked."""
    found: list[tuple[GameWindowStandIn, str, int | None]] = []
    regions: list[ClientArea] = []

    def find_game_window(title, pid=None):
        found.append((GameWindowStandIn(len(found) + 1), title, pid))
        return found[-1][0]

    def make_capture(backend, color, region, output_idx=None):
        regions.append(region)
        return RecordedFrames(corridor_frames())

    monkeypatch.setattr(interfaces, "find_game_window", find_game_window)
    monkeypatch.setattr(interfaces, "make_capture", make_capture)
    return found, regions


def test_a_worker_names_its_window_by_process_id_and_places_it_where_asked(game_windows):
    found, regions = game_windows
    drive = StraightDrive(10.0, 100.0, z=5.0)
    with TelemetryReplayServer(drive.packet, rate_hz=100.0) as server:
        interface = TM20LidarInterface(telemetry=TelemetryClient(server.port), controller=RecordingController(),
                                       reward=straight_reward(), sleep_time_at_reset=0.0, window_pid=4242,
                                       window_position=[0, 540])
        try:
            assert [(title, pid) for _, title, pid in found] == [("Trackmania", 4242)]
            assert found[0][0].placed == [(0, 540, 958, 488)] and regions == [ClientArea(0, 540, 958, 488)]
        finally:
            interface.close()
        with pytest.raises(TM20ConfigError, match="window_position is"):
            TM20LidarInterface(telemetry=TelemetryClient(server.port, start=False), controller=RecordingController(),
                               reward=straight_reward(), window_position=[5])


def test_after_the_game_restarted_the_worker_finds_its_new_window_and_captures_it(game_windows):
    found, regions = game_windows
    drive = StraightDrive(10.0, 100.0, z=5.0)
    with TelemetryReplayServer(drive.packet, rate_hz=100.0) as server:
        interface = TM20LidarInterface(telemetry=TelemetryClient(server.port), reward=straight_reward(),
                                       controller=RecordingController(on_respawn=drive.respawn),
                                       sleep_time_at_reset=0.0, recovery=FAST_RECOVERY, window_position=(960, 0))
        try:
            interface.reset()
            found[0][0].closed = True  # the game crashed and was started again: the old window is gone
            interface.wait()
            interface.reset()  # bring_to_front fails, the wait finds the new window and reopens capture on it
            assert len(found) == 2 and interface.window is found[1][0] and interface.faults["window"] == 1
            assert found[1][0].placed == [(960, 0, 958, 488)] and regions[-1] == ClientArea(960, 0, 958, 488)
            _, _, terminated, _ = interface.get_obs_rew_terminated_info()
            assert not terminated and np.isfinite(interface.history[-1]).all()
        finally:
            interface.close()


class MinimisableCapture(RecordedFrames):
    """Live frames, except while its window is minimised: then the same black picture (what capture shows of a
    minimised game window, over and over)."""

    def __init__(self, window: GameWindowStandIn) -> None:
        super().__init__(corridor_frames())
        self.window, self.black = window, np.zeros_like(corridor_frames()[0])

    def grab(self) -> np.ndarray:
        return self.black if self.window.minimised else super().grab()


def test_a_minimised_window_is_a_stale_screen_and_the_wait_restores_it(monkeypatch):
    windows: list[GameWindowStandIn] = []

    def find_game_window(title, pid=None):
        windows.append(GameWindowStandIn(len(windows) + 1))
        windows[-1].minimised = False

        def focus() -> None:
            windows[-1].minimised = False  # as SW_RESTORE does

        windows[-1].focus = focus
        return windows[-1]

    monkeypatch.setattr(interfaces, "find_game_window", find_game_window)
    monkeypatch.setattr(interfaces, "make_capture", lambda *args, **kwargs: MinimisableCapture(windows[-1]))
    drive = StraightDrive(10.0, 100.0, z=5.0)
    with TelemetryReplayServer(drive.packet, rate_hz=100.0) as server:
        interface = TM20LidarInterface(telemetry=TelemetryClient(server.port), reward=straight_reward(),
                                       controller=RecordingController(on_respawn=drive.respawn),
                                       sleep_time_at_reset=0.0, recovery={**FAST_RECOVERY, "give_up_after_s": 5.0})
        try:
            interface.reset()
            windows[0].minimised = True  # the user minimised the game; the car drives on
            for _ in range(30):
                time.sleep(0.05)
                _, _, terminated, info = interface.get_obs_rew_terminated_info()
                if terminated:
                    break
            assert info["truncated_reason"].startswith("stale: the picture has not changed")
            interface.wait()
            interface.reset()  # the wait restores the window and captures it again
            assert not windows[0].minimised and len(windows) == 1 and interface.faults == {"stale": 1}
            time.sleep(0.05)
            assert not interface.get_obs_rew_terminated_info()[2]
        finally:
            interface.close()
