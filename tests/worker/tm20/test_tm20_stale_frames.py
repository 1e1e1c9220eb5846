"""Stale frames: a picture that stops changing while the car drives (a hung renderer, a minimised or covered window)
ends the episode as truncated and the next reset waits for live frames; a car that legitimately stands still (the
countdown, a standing start) never trips it.

Checked on the detector's rules alone, through :class:`DxcamCapture`'s code path with a fake dxcam camera that stops
presenting (dxcam returns None then), and against the emulated game with its screen frozen while its plugin goes on.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from test_tm20_interfaces import straight_reward
from test_tm20_platform import FakeCamera, fake_dxcam  # noqa: F401  (fake_dxcam is a fixture)
from tmrl_worker.envs import make_env
from tmrl_worker.tm20.capture import DxcamCapture
from tmrl_worker.tm20.control import RecordingController
from tmrl_worker.tm20.interfaces import TM20ConfigError, TM20LidarInterface
from tmrl_worker.tm20.openplanet import Telemetry, TelemetryClient
from tmrl_worker.tm20.replay_server import TelemetryReplayServer
from tmrl_worker.tm20.stale_frames import StaleFrameConfig, StaleFrameDetector, StaleFrameError
from tmrl_worker.tm20.synthetic import StraightDrive
from tmrl_worker.tm20.window import ClientArea

FAST_RECOVERY = {"first_retry_s": 0.2, "max_retry_s": 1.0, "probe_timeout_s": 0.5, "step_telemetry_timeout_s": 0.5}
GAS = np.array([1.0, 0.0, 0.0], np.float32)
STILL = np.zeros(3, np.float32)


def packet(at: float, speed: float) -> Telemetry:
    return Telemetry(sequence=0, speed=speed, distance=0.0, position=(0.0, 0.0, 0.0), steer=0.0, gas=0.0, brake=0.0,
                     finished=False, gear=1.0, rpm=2000.0, received_at=at)


def frame(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


# the rules ---------------------------------------------------------------------------------------------------------
def test_a_picture_frozen_while_packets_say_the_car_moves_is_stale_after_frozen_picture_s():
    detector = StaleFrameDetector(StaleFrameConfig(frozen_picture_s=0.5, moving_speed_mps=1.0))
    for step in range(10):  # 0.45 s of identical pictures at 10 m/s: not yet
        detector.check(frame(1), packet(100.0 + 0.05 * step, 10.0))
    with pytest.raises(StaleFrameError, match=r"has not changed for 0.5 s while the car drives at 10.0 m/s"):
        detector.check(frame(1), packet(100.5, 10.0))


def test_a_still_car_shows_the_same_picture_for_ever_and_the_count_starts_when_it_moves():
    detector = StaleFrameDetector(StaleFrameConfig(frozen_picture_s=0.5, moving_speed_mps=1.0))
    for step in range(200):  # 10 s of countdown and standing start: one picture, speed 0
        detector.check(frame(1), packet(100.0 + 0.05 * step, 0.0))
    for step in range(10):  # then it drives and the picture still has not changed: 0.45 s of evidence, not more
        detector.check(frame(1), packet(110.0 + 0.05 * step, 5.0))
    detector.check(frame(2), packet(110.5, 5.0))  # the picture moves with the car: the count starts again
    for step in range(9):
        detector.check(frame(2), packet(110.55 + 0.05 * step, 5.0))
    with pytest.raises(StaleFrameError):
        detector.check(frame(2), packet(111.0, 5.0))


def test_a_slow_packet_restarts_the_count_and_repeated_packets_add_no_evidence():
    detector = StaleFrameDetector(StaleFrameConfig(frozen_picture_s=0.5, moving_speed_mps=1.0))
    for step in range(31):  # the car creeps: every other packet under the moving speed
        detector.check(frame(1), packet(100.0 + 0.05 * step, 2.0 if step % 2 else 0.5))
    detector.check(frame(1), packet(102.0, 10.0))
    for _ in range(50):  # a hung game: the plugin's last packet over and over (the telemetry timeout's case)
        detector.check(frame(1), packet(102.0, 10.0))
    with pytest.raises(StaleFrameError):  # while a live plugin's next packets do add evidence
        detector.check(frame(1), packet(102.5, 10.0))


def test_no_new_frame_from_the_backend_is_stale_whatever_the_car_does_and_unknown_backends_never_are():
    detector = StaleFrameDetector(StaleFrameConfig(no_new_frame_s=3.0))
    started = time.monotonic()
    detector.check(frame(1), packet(started, 0.0), last_new_frame_at=started, now=started + 2.9)
    with pytest.raises(StaleFrameError, match=r"no new frame from the screen capture for 3.0 s"):
        detector.check(frame(1), packet(started, 0.0), last_new_frame_at=started, now=started + 3.0)
    detector.check(frame(1), packet(started, 0.0), last_new_frame_at=None, now=started + 60.0)
    off = StaleFrameDetector(StaleFrameConfig(enabled=False))
    for step in range(100):
        off.check(frame(1), packet(100.0 + 0.05 * step, 10.0), last_new_frame_at=0.0)


def test_stale_frames_settings_from_a_toml_table_are_validated():
    interface_kwargs = {"capture": None, "telemetry": TelemetryClient(1, start=False), "controller": RecordingController(),
                        "reward": straight_reward(), "stale_frames": {"frozen_picture_s": 0}}
    with pytest.raises(TM20ConfigError, match=r"(?s)env_options.stale_frames.*frozen_picture_s"):
        TM20LidarInterface(**interface_kwargs)


# through DxcamCapture ----------------------------------------------------------------------------------------------
class PresentingCamera(FakeCamera):
    """A dxcam camera over a game that presents a new picture every grab until ``presenting`` is cleared; then, like
    dxcam when nothing on the display changed, ``grab`` returns None."""

    def __init__(self) -> None:
        super().__init__(None, "RGB")
        self.presenting = True

    def grab(self, region):
        if not self.presenting:
            return None
        frame = super().grab(region)
        frame[:4, :4, 1] = self.grabs % 256  # a corner that changes with every presented frame
        return frame


@pytest.fixture
def camera(fake_dxcam):  # noqa: F811
    fake_dxcam.cache[None] = PresentingCamera()  # dxcam.create() hands back the cached camera of the output
    return fake_dxcam.cache[None]


def test_dxcam_capture_keeps_its_last_frame_and_the_time_of_the_last_new_one_while_dxcam_returns_none(camera):
    capture = DxcamCapture(ClientArea(0, 0, 64, 32))
    first = capture.grab()
    delivered = capture.last_new_frame_at
    assert delivered is not None and not np.array_equal(capture.grab(), first)
    camera.presenting = False
    time.sleep(0.01)
    repeated = capture.grab()
    assert repeated is capture.grab() and capture.last_new_frame_at > delivered
    stalled_at = capture.last_new_frame_at
    time.sleep(0.01)
    capture.grab()
    assert capture.last_new_frame_at == stalled_at  # no new frame: the time does not move


def plugin_interface(drive: StraightDrive, server: TelemetryReplayServer, **stale) -> TM20LidarInterface:
    return TM20LidarInterface(capture=DxcamCapture(ClientArea(0, 0, 958, 488)),
                              telemetry=TelemetryClient(server.port, timeout=2.0),
                              controller=RecordingController(on_respawn=drive.respawn), reward=straight_reward(),
                              sleep_time_at_reset=0.0, recovery=FAST_RECOVERY, stale_frames=stale or None)


def test_dxcam_frames_stopping_while_the_car_drives_truncate_and_reset_waits_for_new_ones(camera, caplog):
    caplog.set_level(logging.INFO, logger="tmrl_worker.tm20.interfaces")
    drive = StraightDrive(10.0, 100.0, z=5.0)
    with TelemetryReplayServer(drive.packet, rate_hz=100.0) as server:
        interface = plugin_interface(drive, server)
        try:
            interface.reset()
            for _ in range(5):
                time.sleep(0.05)
                assert not interface.get_obs_rew_terminated_info()[2]
            camera.presenting = False  # the window is minimised: dxcam returns None, the capture its last frame
            stopped = time.monotonic()
            for _ in range(40):
                time.sleep(0.05)
                _, reward, terminated, info = interface.get_obs_rew_terminated_info()
                if terminated:
                    break
            assert terminated and reward == 0.0
            assert info["truncated_reason"].startswith("stale: the picture has not changed for 0.5 s")
            assert 0.45 <= time.monotonic() - stopped < 3.0 and interface.faults == {"stale": 1}  # 0.5 s, not minutes
            threading.Timer(1.0, setattr, (camera, "presenting", True)).start()  # the window is restored
            started = time.monotonic()
            interface.wait()
            interface.reset()
            assert time.monotonic() - started >= 0.9  # reset waited for live frames
            waits = [r.getMessage() for r in caplog.records if "waiting for the game (attempt" in r.getMessage()]
            assert waits and "stale: still no new frame" in waits[0]
            for _ in range(15):  # and the next episode runs on live frames
                time.sleep(0.05)
                assert not interface.get_obs_rew_terminated_info()[2]
            assert interface.status == "running" and interface.faults == {"stale": 1}
        finally:
            interface.close()


def test_dxcam_presenting_the_same_picture_of_a_still_car_is_not_stale_but_no_frame_at_all_is(camera):
    drive = StraightDrive(0.0, 100.0, z=5.0)  # the car stands at the start
    with TelemetryReplayServer(drive.packet, rate_hz=100.0) as server:
        interface = plugin_interface(drive, server, no_new_frame_s=0.5)
        try:
            camera.grab = lambda region: FakeCamera.grab(camera, region)  # identical pictures, still presented
            interface.reset()
            for _ in range(30):  # 1.5 s of one picture
                time.sleep(0.05)
                assert not interface.get_obs_rew_terminated_info()[2]
            camera.grab = lambda region: None  # the game stops presenting at all
            for _ in range(30):
                time.sleep(0.05)
                _, _, terminated, info = interface.get_obs_rew_terminated_info()
                if terminated:
                    break
            assert terminated and info["truncated_reason"].startswith("stale: no new frame from the screen capture")
        finally:
            interface.close()


# against the emulated game -----------------------------------------------------------------------------------------
def emulated_env(**game):
    options = {"emulated_game": {"port": 0, **game}, "sleep_time_at_reset": 0.0, "recovery": FAST_RECOVERY}
    handle = make_env("tm20-lidar", max_episode_steps=10_000, options=options)
    return handle, handle.env.unwrapped.interface


def test_emulated_screen_frozen_while_the_plugin_sends_truncates_and_the_run_resumes_when_it_thaws(caplog):
    caplog.set_level(logging.INFO, logger="tmrl_worker.tm20.interfaces")
    handle, interface = emulated_env(countdown_s=0.3)
    game = interface.controller.game
    try:
        handle.reset()
        for _ in range(20):  # 1 s: the countdown, then driving
            _, _, terminated, truncated, _ = handle.step(GAS)
            assert not (terminated or truncated)
        game.freeze_screen()
        frozen_at, packets_before = time.monotonic(), interface.telemetry.stats.packets
        for _ in range(40):
            _, _, terminated, truncated, info = handle.step(GAS)
            if terminated or truncated:
                break
        assert truncated and not terminated and info["truncated_reason"].startswith("stale: the picture")
        assert time.monotonic() - frozen_at < 3.0 and interface.faults["stale"] == 1  # 0.5 s, not minutes
        assert interface.telemetry.stats.packets > packets_before + 20  # the plugin kept sending all along
        threading.Timer(1.5, game.freeze_screen, (False,)).start()
        started = time.monotonic()
        handle.reset()
        assert time.monotonic() - started >= 1.3
        assert any("stale: still no new frame" in r.getMessage() for r in caplog.records)
        for _ in range(40):
            _, _, terminated, truncated, _ = handle.step(GAS)
            assert not (terminated or truncated)
        assert interface.faults == {"stale": 1} and interface.status == "running" and game.distance > 3.0
    finally:
        handle.close()


def test_emulated_countdown_and_standing_start_show_one_picture_and_are_not_stale():
    handle, interface = emulated_env(countdown_s=2.5)  # a long 3-2-1, so that a loaded machine still sees it
    game = interface.controller.game
    try:
        handle.reset()
        countdown_pictures = []
        for step in range(60):
            # gas held through the countdown (released 0.8 s before its end: steps run late on a busy machine),
            # then a standing start: no input at all
            holding = step < 40 and game._countdown > 0.8
            _, _, terminated, truncated, info = handle.step(GAS if holding else STILL)
            assert not (terminated or truncated), info
            if game.race_time == 0.0:
                countdown_pictures.append(interface.last_frame)
        assert len(countdown_pictures) >= 10  # at least 0.5 s of the countdown was watched
        assert all(np.array_equal(countdown_pictures[0], p) for p in countdown_pictures)  # one picture all along
        assert game.distance < 0.1 and not interface.faults  # the car never moved, nothing was stale
        for _ in range(30):  # then it drives off: the picture follows, still nothing stale
            _, _, terminated, truncated, info = handle.step(GAS)
            assert not (terminated or truncated), info
        assert game.distance > 3.0 and not interface.faults
    finally:
        handle.close()
