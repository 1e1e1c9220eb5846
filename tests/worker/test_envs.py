"""The env factory: gymnasium envs, plugged rtgym interfaces by import path, and clear errors for bad specs."""

from __future__ import annotations

import sys
import textwrap
import time
from datetime import datetime, timedelta

import numpy as np
import pytest
from gymnasium import spaces
from tmrl_common.layout import ObservationLayout
from tmrl_worker.envs import EnvSpecError, layout_from_spaces, make_env

PLUGGED_INTERFACE = textwrap.dedent('''
    import numpy as np
    from gymnasium import spaces
    from rtgym import RealTimeGymInterface


    class PointInterface(RealTimeGymInterface):
        """A point on a line that the action pushes; reward is minus the distance to 0."""

        def __init__(self, start=3.0):
            self.start = start
            self.x = start
            self.control = 0.0

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-10.0, 10.0, (1,), np.float32),))

        def get_action_space(self):
            return spaces.Box(-1.0, 1.0, (1,), np.float32)

        def get_default_action(self):
            return np.zeros(1, dtype=np.float32)

        def send_control(self, control):
            if control is not None:
                self.control = float(control[0])

        def reset(self, seed=None, options=None):
            self.x = self.start
            return [np.array([self.x], dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            self.x += 0.5 * self.control
            return [np.array([self.x], dtype=np.float32)], -abs(self.x), abs(self.x) > 9.0, {}


    class NotAnInterface:
        pass
''')


@pytest.fixture
def plugged_module(tmp_path, monkeypatch):
    (tmp_path / "my_point_robot.py").write_text(PLUGGED_INTERFACE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_point_robot"
    sys.modules.pop("my_point_robot", None)


def test_gym_spec_builds_a_synchronous_env_with_a_box_layout_and_rescaled_actions():
    handle = make_env("gym:Pendulum-v1")
    try:
        assert handle.realtime is False
        assert handle.layout.action_dim == 1 and [c.name for c in handle.layout.components] == ["obs"]
        observation = handle.reset(seed=1)
        assert isinstance(observation, tuple) and observation[0].shape == (3,)
        np.testing.assert_allclose(handle.to_env_action(np.array([1.0])), [2.0])  # Pendulum torque is in [-2, 2]
        np.testing.assert_allclose(handle.to_env_action(np.array([-5.0])), [-2.0])  # clipped first
        next_observation, reward, terminated, truncated, _ = handle.step(np.array([0.5], dtype=np.float32))
        assert next_observation[0].shape == (3,) and isinstance(reward, float)
    finally:
        handle.close()


def test_module_class_spec_loads_the_interface_by_import_path_and_runs_it_in_real_time(plugged_module):
    handle = make_env(f"{plugged_module}:PointInterface", time_step_duration=0.01, max_episode_steps=5,
                      options={"start": 4.0})
    try:
        assert handle.realtime is True
        # one observation part plus rtgym's action buffer (2 actions)
        assert handle.layout.components[0].frame_shape == [1] and handle.layout.action_history == 2
        observation = handle.reset()
        assert len(observation) == 3 and float(observation[0][0]) == pytest.approx(4.0)
        truncated = False
        steps = 0
        while not truncated:
            observation, reward, terminated, truncated, _ = handle.step(np.array([-1.0], dtype=np.float32))
            steps += 1
            assert not terminated
        assert steps == 5
        assert reward < 0 and float(observation[0][0]) < 4.0  # the pushes moved the point towards 0
        np.testing.assert_allclose(observation[-1], [-1.0])  # newest action last in the buffer
    finally:
        handle.close()


def test_module_class_that_declares_a_layout_keeps_it(plugged_module, monkeypatch):
    import importlib

    module = importlib.import_module(plugged_module)
    declared = ObservationLayout.model_validate(
        {"components": [{"name": "position", "frame_shape": [1]}], "action_dim": 1, "action_history": 2})
    monkeypatch.setattr(module.PointInterface, "layout", declared, raising=False)
    handle = make_env(f"{plugged_module}:PointInterface", time_step_duration=0.01, max_episode_steps=2)
    try:
        assert handle.layout == declared
    finally:
        handle.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense", "unknown env 'nonsense'; valid specs: sim, sim-fast"),
        ("no_such_module_xyz:Robot", "cannot import module 'no_such_module_xyz'"),
        ("json:NoSuchClass", "module 'json' has no attribute 'NoSuchClass'"),
        ("json:JSONDecoder", "is not a subclass of rtgym.RealTimeGymInterface"),
        ("json:", "package.module:ClassName"),
        ("gym:", "write the gymnasium id after 'gym:'"),
        ("gym:NoSuchEnv-v9", "gymnasium cannot make 'NoSuchEnv-v9'"),
        ("gym:CartPole-v1", "is not a Box; tmrl.s SAC needs continuous actions"),
    ],
)
def test_bad_specs_raise_an_actionable_error(spec, message):
    with pytest.raises(EnvSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_env(spec)


def test_plugged_class_that_is_not_an_interface_is_refused(plugged_module):
    with pytest.raises(EnvSpecError, match="not a subclass of rtgym.RealTimeGymInterface"):
        make_env(f"{plugged_module}:NotAnInterface")


@pytest.mark.skipif(sys.platform == "win32", reason="checks the message given on other platforms")
def test_trackmania_specs_say_they_need_windows():
    with pytest.raises(EnvSpecError, match="Windows only"):
        make_env("tm20-lidar")


def test_a_trackmania_env_that_cannot_be_built_is_one_env_spec_error_naming_the_cause(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(EnvSpecError, match=r"env 'tm20-lidar': reward points file .*nowhere.safetensors does not exist"):
        make_env("tm20-lidar", options={"allow_non_windows": True, "reward_path": str(missing)})


@pytest.mark.parametrize("failure", ["EnvFailure", "SenderFailure"])
def test_an_env_that_gives_up_or_a_dead_sender_stops_the_worker_with_its_message_and_no_traceback(monkeypatch, failure):
    from tmrl_worker import envs, relay_link, runtime
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    error = {"EnvFailure": envs.EnvFailure, "SenderFailure": relay_link.SenderFailure}[failure]

    def give_up(config, stop=None, exit_if_stuck=False):
        raise error("the race did not restart within 10 s of the respawn")

    monkeypatch.setattr(runtime, "run_worker", give_up)
    result = CliRunner().invoke(app, ["run", "--env", "sim", "--insecure"])
    assert result.exit_code == 1
    assert result.output.strip() == "tmrl-worker: the race did not restart within 10 s of the respawn"

    def give_up_after_a_run(config, stop=None, exit_if_stuck=False):  # as run_worker does: what the run did
        exc = error("the race did not restart within 10 s of the respawn")
        exc.stats = runtime.RolloutStats(steps=60, episodes=1, batches_submitted=2, delivery={
            "steps_submitted": 60, "batches_built": 2, "spool_acked": 2, "spool_resent": 0, "spool_dropped": 0,
            "spool_batches": 0, "batches_rejected": 0, "connections": 1})
        raise exc

    monkeypatch.setattr(runtime, "run_worker", give_up_after_a_run)
    result = CliRunner().invoke(app, ["run", "--env", "sim", "--insecure", "--worker-id", "w7"])
    assert result.exit_code == 1
    summary, cause = result.output.strip().splitlines()
    stamp, summary = summary[:23], summary[24:]  # stamped as the log lines are, so teardown's length shows
    assert datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") > datetime.now() - timedelta(minutes=1)
    assert summary == ("w7: 60 steps, 1 episodes, 2 batches, weights version 0; delivery: 60 rows in 2 batches, 2 "
                       "acknowledged, 0 resent, 0 dropped, 0 unacknowledged, 0 rejected")
    assert cause == "tmrl-worker: the race did not restart within 10 s of the respawn"


def test_sim_fast_has_the_trackmania_lidar_layout_and_an_expert_that_drives():
    from tmrl_common.layout import tm20_lidar_layout

    handle = make_env("sim-fast", max_episode_steps=150)
    try:
        assert handle.realtime is False and handle.layout == tm20_lidar_layout()
        observation = handle.reset(seed=0)
        assert [np.shape(p) for p in observation] == [(1,), (4, 19), (3,), (3,)]
        expert_return = 0.0
        for _ in range(150):
            observation, reward, terminated, truncated, _ = handle.step(handle.expert(observation))
            expert_return += reward
            if terminated or truncated:
                break
        handle.reset(seed=0)
        idle_return = 0.0
        for _ in range(150):
            observation, reward, terminated, truncated, _ = handle.step(np.zeros(3, np.float32))
            idle_return += reward
            if terminated or truncated:
                break
        assert expert_return > idle_return + 50  # the pure-pursuit driver makes real progress along the track
    finally:
        handle.close()


def test_sim_runs_in_real_time_and_takes_simulator_options():
    handle = make_env("sim", time_step_duration=0.05, max_episode_steps=5, options={"track": "oval"})
    try:
        assert handle.realtime is True and handle.env.unwrapped.interface.config.track == "oval"
        handle.reset(seed=0)
        started = time.perf_counter()
        for _ in range(4):
            handle.step(np.array([1.0, 0.0, 0.0], np.float32))
        assert time.perf_counter() - started >= 0.15  # paced by rtgym, not as fast as possible
    finally:
        handle.close()
    with pytest.raises(EnvSpecError, match="invalid simulator options"):
        make_env("sim-fast", options={"no_such_field": 1})


def test_layout_command_prints_json_the_trainer_accepts_as_layout_file(plugged_module, tmp_path):
    from tmrl_trainer.service import layout_for_env
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["layout", "--env", f"{plugged_module}:PointInterface"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "layout.json"
    path.write_text(result.stdout)
    layout = layout_for_env(f"{plugged_module}:PointInterface", path)
    assert layout.action_dim == 1 and layout.action_history == 2 and layout.components[0].frame_shape == [1]
    bad = CliRunner().invoke(app, ["layout", "--env", "nonsense"])
    assert bad.exit_code == 2 and "unknown env" in bad.output


EMPTY_SPACES = '''
    class NoAction(ZeroReadingInterface):
        def get_action_space(self):
            return spaces.Box(-1.0, 1.0, (0,), np.float32)


    class EmptyPart(OneActionInterface):
        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-1.0, 1.0, (2,), np.float32), spaces.Box(-1.0, 1.0, (0,), np.float32)))


    class EmptyImage(OneActionInterface):
        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(0, 255, (3, 0), np.uint8),))
'''


@pytest.mark.parametrize(("interface", "says"), [
    ("NoAction", "the action space (a Box of shape (0,)) holds no values; tmrl's SAC needs at least one action"),
    ("EmptyPart", "observation part 'part1' (a Box of shape (0,)) holds no values"),
    ("EmptyImage", "observation part 'part0' (a Box of shape (3, 0)) holds no values"),
])
def test_a_space_that_holds_no_values_is_refused_in_one_line(plug_interface, interface, says):
    """The plug-ins probe: a zero-size action or observation space ended `layout` and `run` in a traceback (pydantic's
    action_dim >= 1, numpy's zero-size reduction), where docs/byo-robot.md promises one line and exit status 2."""
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    module = plug_interface("empty_spaces_robot", EMPTY_SPACES)
    result = CliRunner().invoke(app, ["layout", "--env", f"{module}:{interface}"])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()) and "Traceback" not in result.output
    with pytest.raises(EnvSpecError, match=r"the observation space \(a Box of shape \(0,\)\) holds no values"):
        layout_from_spaces(spaces.Box(-1.0, 1.0, (0,), np.float32), spaces.Box(-1.0, 1.0, (1,), np.float32))


FAILING_INTERFACES = '''
    class Sensor(OneActionInterface):
        def __init__(self, fail_in=""):
            self.fail_in = fail_in
            self.steps = 0

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-10.0, 10.0, (1,), np.float32),))

        def send_control(self, control):
            if self.fail_in == "send_control" and control is not None and self.steps >= 2:
                raise RuntimeError("motor driver gone")

        def reset(self, seed=None, options=None):
            return [np.zeros(1, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            self.steps += 1
            if self.fail_in == "observation" and self.steps >= 3:
                raise RuntimeError("sensor unplugged")
            return [np.zeros(1, dtype=np.float32)], 0.0, False, {}


    class RaisesWhenBuilt(Sensor):
        def __init__(self):
            raise RuntimeError("no such device /dev/ttyUSB0")


    class BareBoxObservation(Sensor):
        def get_observation_space(self):
            return spaces.Box(-10.0, 10.0, (1,), np.float32)


    class DictObservation(Sensor):
        def get_observation_space(self):
            return spaces.Dict({"position": spaces.Box(-10.0, 10.0, (1,), np.float32)})


    class DeclaresALayout(Sensor):
        def __init__(self, action_history=2, size=1):
            from tmrl_common.layout import ObservationComponent, ObservationLayout

            self.layout = ObservationLayout(components=[ObservationComponent(name="position", frame_shape=[size])],
                                            action_dim=1, action_history=action_history)
'''


@pytest.fixture
def failing_module(plug_interface, tmp_path):
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('calibration file missing')\n")
    (tmp_path / "needs_a_driver.py").write_text("import vendor_motor_driver_sdk\n")
    yield plug_interface("failing_robot", FAILING_INTERFACES)
    sys.modules.pop("raises_on_import", None)
    sys.modules.pop("needs_a_driver", None)


@pytest.mark.parametrize(("method", "message"), [("observation", "get_obs_rew_terminated_info raised RuntimeError: "
                                                                   "sensor unplugged"),
                                                  ("send_control", "send_control raised RuntimeError: motor driver gone")])
def test_an_interface_raising_on_rtgyms_thread_stops_the_episode_with_env_failure_instead_of_hanging(
        failing_module, method, message):
    from tmrl_worker.envs import EnvFailure

    handle = make_env(f"{failing_module}:Sensor", time_step_duration=0.02, options={"fail_in": method})
    try:
        handle.reset()
        started = time.monotonic()
        with pytest.raises(EnvFailure, match=rf"env 'failing_robot:Sensor': Sensor\.{message}"):
            for _ in range(10):
                handle.step(np.zeros(1, np.float32))
        assert time.monotonic() - started < 2.0
    finally:
        handle.close()


@pytest.mark.parametrize(("spec", "options", "message"), [
    ("raises_on_import:Anything", {}, r"importing module 'raises_on_import' failed: RuntimeError: calibration file"),
    ("failing_robot:RaisesWhenBuilt", {}, r"building it failed: RuntimeError: no such device /dev/ttyUSB0"),
    ("failing_robot:Sensor", {"gain_typo": 2}, r"building interface Sensor raised TypeError: .*unexpected keyword "
                                               r"argument 'gain_typo'"),
    ("failing_robot:BareBoxObservation", {}, r"get_observation_space returns a gymnasium.spaces.Tuple"),
    ("failing_robot:DictObservation", {}, r"building it failed: TypeError: position does not inherit from "
                                          r"`gymnasium.Space`.* a Dict's Boxes in a Tuple"),
    ("failing_robot:DeclaresALayout", {"action_history": 1}, r"layout declares action_history 1, but rtgym appends "
                                                             r"the last 2 actions .* declare action_history = 2"),
    ("failing_robot:DeclaresALayout", {"size": 3}, r"part 'position' has shape \(1,\) in get_observation_space, its "
                                                   r"layout declares \(3,\)"),
    ("needs_a_driver:Anything", {}, r"importing module 'needs_a_driver' failed: No module named "
                                    r"'vendor_motor_driver_sdk' \(install 'vendor_motor_driver_sdk' in this worker"),
])
def test_an_interface_that_cannot_be_imported_or_built_is_one_env_spec_error(failing_module, spec, options, message):
    with pytest.raises(EnvSpecError, match=message):
        make_env(spec, options=options)


def test_the_real_time_simulator_takes_its_time_step_from_its_options_too():
    handle = make_env("sim", time_step_duration=0.05, max_episode_steps=3, options={"time_step_duration": 0.02})
    try:
        assert handle.step_seconds == pytest.approx(0.02)
    finally:
        handle.close()


NON_FINITE = '''
    class Broken(OneActionInterface):
        def __init__(self, bad="observation"):
            self.bad = bad

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-10.0, 10.0, (2,), np.float32),))

        def reset(self, seed=None, options=None):
            return [np.zeros(2, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            if self.bad == "observation":
                return [np.array([0.0, np.nan], dtype=np.float32)], 0.0, False, {}
            if self.bad == "reward":
                return [np.zeros(2, dtype=np.float32)], float("inf"), False, {}
            return [np.zeros(2, dtype=np.float32)], 1.0, False, {}
'''


@pytest.mark.parametrize(("bad", "message"), [("observation", r"NaN or infinite values in observation part 'part0' at "
                                                              r"a step"),
                                              ("reward", r"returned reward inf at a step")])
def test_a_non_finite_observation_or_reward_stops_the_env_naming_it(plug_interface, bad, message):
    from tmrl_worker.envs import EnvFailure

    handle = make_env(f"{plug_interface('broken_robot', NON_FINITE)}:Broken", time_step_duration=0.02,
                      options={"bad": bad})
    try:
        handle.reset()
        with pytest.raises(EnvFailure, match=message):
            handle.step(np.zeros(1, np.float32))
    finally:
        handle.close()


CAMERA = '''
    class Camera(OneActionInterface):
        def __init__(self, frames="uint8"):
            self.frames = frames

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(0, 255, (1, 8, 8), np.uint8), spaces.Box(-10.0, 10.0, (2,), np.float32)))

        def _observation(self):
            ramp = np.arange(64, dtype=np.float64).reshape(1, 8, 8)  # whole numbers 0..63
            frame = {"uint8": ramp.astype(np.uint8), "whole floats": ramp, "unit floats": ramp / 255.0,
                     "wrapping ints": ramp.astype(np.int32) * 10}[self.frames]
            return [frame, [0.5, -0.25]]  # the flat part as a list of Python floats

        def reset(self, seed=None, options=None):
            return self._observation(), {}

        def get_obs_rew_terminated_info(self):
            return self._observation(), 0.0, False, {}
'''


@pytest.mark.parametrize("frames", ["uint8", "whole floats"])
def test_observation_parts_reach_the_policy_in_the_layouts_dtypes_when_the_cast_loses_nothing(plug_interface, frames):
    """The trainer stores each part in its layout dtype: the policy must act on the same values."""
    handle = make_env(f"{plug_interface('camera_robot', CAMERA)}:Camera", time_step_duration=0.02,
                      options={"frames": frames})
    try:
        for observation in (handle.reset(), handle.step(np.zeros(1, np.float32))[0]):
            image, flat = observation[0], observation[1]
            assert image.dtype == np.uint8 and image.ravel().tolist() == list(range(64))
            assert flat.dtype == np.float32 and flat.tolist() == [0.5, -0.25]
    finally:
        handle.close()


@pytest.mark.parametrize(("frames", "shown"), [("unit floats", r"float64 with values in \[0.0, 0.24"),
                                               ("wrapping ints", r"int32 with values in \[0, 630\]")])
def test_an_image_part_whose_values_uint8_cannot_hold_stops_the_env_at_the_reset_naming_the_fix(plug_interface, frames,
                                                                                                shown):
    """An outside probe: frames normalised to [0, 1] under a uint8 Box were stored as zeros, silently."""
    from tmrl_worker.envs import EnvFailure

    handle = make_env(f"{plug_interface('camera_robot', CAMERA)}:Camera", time_step_duration=0.02,
                      options={"frames": frames})
    try:
        with pytest.raises(EnvFailure, match=rf"part 'part0' as {shown}.* at the reset; its layout declares uint8.*"
                                             r"\(frame \* 255\)\.astype\(np\.uint8\)"):
            handle.reset()
    finally:
        handle.close()


ENCODER = '''
    class Encoder(OneActionInterface):
        def __init__(self, ticks=10):
            self.ticks = ticks

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-np.inf, np.inf, (1,), np.float32),))

        def reset(self, seed=None, options=None):
            return [np.array([self.ticks], dtype=np.int64)], {}

        def get_obs_rew_terminated_info(self):
            return [np.array([self.ticks], dtype=np.int64)], 0.0, False, {}
'''


@pytest.mark.parametrize("ticks", [2**24, 2**24 + 1])
def test_integers_float32_would_round_are_logged_naming_the_part(plug_interface, ticks, caplog):
    """A BYO-robot probe: an int64 encoder count (or a timestamp) was cast to float32 without a word, rounding it."""
    handle = make_env(f"{plug_interface('encoder_robot', ENCODER)}:Encoder", time_step_duration=0.02,
                      options={"ticks": ticks})
    try:
        with caplog.at_level("WARNING", logger="tmrl_worker.envs"):
            handle.reset()
            handle.step(np.zeros(1, np.float32))
    finally:
        handle.close()
    lines = [r.getMessage() for r in caplog.records if "are rounded" in r.getMessage()]
    if ticks <= 2**24:
        assert lines == []
    else:
        assert len(lines) == 1 and f"part 'part0' as int64 with values up to {ticks} at the reset" in lines[0]


GLITCHY = '''
    class Glitchy(OneActionInterface):
        """Declares readings in [-1, 1]; its second and third steps read 1.5 and -7 (a sensor glitch)."""

        def __init__(self):
            self.steps = 0

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-1.0, 1.0, (2,), np.float32),))

        def reset(self, seed=None, options=None):
            self.steps = 0
            return [np.zeros(2, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            self.steps += 1
            reading = {2: 1.5, 3: -7.0}.get(self.steps, 0.25)
            return [np.array([reading, 0.5], dtype=np.float32)], 0.0, False, {}
'''


def test_a_reading_outside_the_declared_bounds_is_clipped_into_them_counted_and_logged_once(plug_interface, caplog):
    """An outside probe: one reading of 1.5 under Box(-1, 1) made the trainer refuse its whole batch (50 steps)."""
    handle = make_env(f"{plug_interface('glitchy_robot', GLITCHY)}:Glitchy", time_step_duration=0.02)
    try:
        handle.reset()
        with caplog.at_level("WARNING"):
            readings = [handle.step(np.zeros(1, np.float32))[0][0].tolist() for _ in range(4)]
        assert readings == [[0.25, 0.5], [1.0, 0.5], [-1.0, 0.5], [0.25, 0.5]]
        assert handle.clipped_observations == 2
        [line] = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
        assert "part 'part0' with values in [0.5, 1.5] at a step, outside its layout's [-1.0, 1.0]" in line
    finally:
        handle.close()


BOUNDED = '''
    class Bounded(OneActionInterface):
        def __init__(self, low=(0.0, -1.0, -np.inf), high=(10.0, 1.0, np.inf), default=None):
            self.low, self.high = np.array(low, np.float32), np.array(high, np.float32)
            self.default = default

        def get_action_space(self):
            return spaces.Box(self.low, self.high, dtype=np.float32)

        def get_default_action(self):
            return np.zeros(len(self.low), np.float32) if self.default is None else np.array(self.default, np.float32)

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-10.0, 10.0, (2,), np.float32),))

        def reset(self, seed=None, options=None):
            return [np.zeros(2, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            return [np.zeros(2, dtype=np.float32)], 0.0, False, {}
'''


def test_each_action_dimension_with_bounds_is_rescaled_to_them_and_one_without_takes_the_policys_value(plug_interface):
    """An outside probe: one unbounded dimension turned rescaling off for all, sending [-1, 1] to a servo in [0, 180]."""
    handle = make_env(f"{plug_interface('bounded_robot', BOUNDED)}:Bounded", time_step_duration=0.02,
                      options={"default": [5.0, 0.5, 0.25]})
    try:
        np.testing.assert_allclose(handle.to_env_action(np.array([1.0, 0.5, -0.75])), [10.0, 0.5, -0.75])
        np.testing.assert_allclose(handle.to_env_action(np.array([-1.0, -2.0, 3.0])), [0.0, -1.0, 1.0])
        np.testing.assert_allclose(handle.default_action, [0.0, 0.5, 0.25])  # [5, 0.5, 0.25] in policy units
        np.testing.assert_allclose(handle.to_policy_action(handle.to_env_action(np.array([0.2, -0.3, 0.4]))),
                                   [0.2, -0.3, 0.4], rtol=1e-6)
    finally:
        handle.close()


@pytest.mark.parametrize(("low", "high", "message"), [
    ((0.0, 0.0), (np.inf, 180.0), r"one infinite bound in dimension\(s\) \[0\].*give it both bounds"),
    ((0.0, 2.0), (1.0, 2.0), r"dimension\(s\) \[1\] have high <= low"),
])
def test_an_action_space_that_cannot_be_rescaled_is_refused_when_the_env_is_built(plug_interface, low, high, message):
    with pytest.raises(EnvSpecError, match=message):
        make_env(f"{plug_interface('bounded_robot', BOUNDED)}:Bounded", time_step_duration=0.02,
                 options={"low": low, "high": high})


FAULTY = '''
    class Faulty(OneActionInterface):
        def __init__(self, fault="none", default_action_size=1, default_action_value=0.0):
            self.fault = fault
            self.default_action_size = default_action_size
            self.default_action_value = default_action_value

        def get_default_action(self):
            return np.full(self.default_action_size, self.default_action_value, dtype=np.float32)

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-10.0, 10.0, (2,), np.float32),))

        def reset(self, seed=None, options=None):
            if self.fault == "reset raises":
                raise RuntimeError("homing failed")
            if self.fault == "reset returns the observation alone":
                return [np.zeros(2, dtype=np.float32)]
            if self.fault == "reset shape":
                return [np.zeros(5, dtype=np.float32)], {}
            if self.fault == "tuple observations":  # what a Tuple space's sample() gives
                return (np.zeros(2, dtype=np.float32),), {}
            if self.fault == "reset array":  # `return obs, {}` for `[obs], {}`
                return np.zeros(2, dtype=np.float32), {}
            return [np.zeros(2, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            observation = [np.zeros(2, dtype=np.float32)]
            if self.fault == "step shape":
                observation = [np.zeros((3, 2), dtype=np.float32)]
            if self.fault == "extra part":
                observation = [np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32)]
            if self.fault == "step array":  # a BYO probe: `return o[0], ...` for `[o[0]]` was told of 4 parts
                observation = np.zeros(2, dtype=np.float32)
            if self.fault == "reward None":
                return observation, None, False, {}
            if self.fault == "reward array":
                return observation, np.array([1.0]), False, {}
            if self.fault == "reward string":
                return observation, "1.5", False, {}
            if self.fault == "reward bool":
                return observation, True, False, {}
            if self.fault == "reward complex":
                return observation, 1 + 2j, False, {}
            if self.fault == "reward 2-d array":
                return observation, np.zeros((4, 30)), False, {}
            if self.fault == "terminated array":  # rtgym's `if not terminated` raised on it, naming no value
                return observation, 0.0, np.array([False, True]), {}
            if self.fault == "terminated None":
                return observation, 0.0, None, {}
            if self.fault == "terminated string":
                return observation, 0.0, "False", {}
            if self.fault == "numpy types":  # accepted: numpy's scalars, and 0/1 for terminated
                return observation, np.float32(0.5), np.int64(0), {}
            if self.fault == "0-d array":  # accepted: one number
                return observation, np.array(0.5), np.bool_(False), {}
            if self.fault == "three values":
                return observation, 0.0, False
            if self.fault == "tuple observations":
                return tuple(observation), 0.0, False, {}
            return observation, 0.0, False, {}
'''


@pytest.mark.parametrize(("fault", "message"), [
    ("reset raises", r"its reset raised RuntimeError: homing failed$"),
    ("reset returns the observation alone", r"Faulty.reset returned 1 value\(s\); rtgym expects 2: \(observation list, info"),
    ("reset shape", r"returned observation part 'part0' of shape \(5,\) at the reset; its layout declares \(2,\)"),
    ("reset array", r"Faulty.reset returned the observation as one numpy array of shape \(2,\): return a list of "
                    r"arrays, one per part of the observation space's Tuple \(e.g. \[obs\] for one part\)$"),
])
def test_a_reset_that_raises_or_returns_the_wrong_thing_stops_the_env_in_one_line(plug_interface, fault, message):
    """Not a traceback out of the rollout loop, nor a batch the trainer will refuse: EnvFailure, which the worker
    reports in one line after delivering what it sent."""
    from tmrl_worker.envs import EnvFailure

    handle = make_env(f"{plug_interface('faulty_robot', FAULTY)}:Faulty", time_step_duration=0.02,
                      options={"fault": fault})
    try:
        with pytest.raises(EnvFailure, match=message):
            handle.reset()
        assert handle.in_call is None
    finally:
        handle.close()


@pytest.mark.parametrize(("fault", "message"), [
    ("step shape", r"returned observation part 'part0' of shape \(3, 2\) at a step; its layout declares \(2,\)"),
    ("extra part", r"returned an observation of 4 part\(s\) at a step; its layout has 3 \(part0, then 2 action"),
    ("reward None", r"Faulty.get_obs_rew_terminated_info returned reward None, which is not one number"),
    ("reward array", r"returned reward array\(\[1.\]\), which is not one number \(a numpy array of shape \(1,\)\)"),
    ("reward string", r"returned reward '1.5', which is not one number \(a str\): return a float$"),
    ("reward bool", r"returned reward True, which is not one number \(a bool\)"),
    ("reward complex", r"returned reward \(1\+2j\), which is not one number \(a complex\)"),
    ("reward 2-d array", r"returned reward array\(\[\[0\., 0\., 0\.,.{30,50}\.\.\., which is not one number \(a numpy "
                         r"array of shape \(4, 30\)\): return a float$"),
    ("terminated None", r"returned terminated None \(a NoneType\), which is not a bool"),
    ("terminated string", r"returned terminated 'False' \(a str\), which is not a bool"),
    ("terminated array", r"Faulty.get_obs_rew_terminated_info returned terminated array\(\[False, True\]\) \(a numpy "
                         r"array of shape \(2,\)\), which is not a bool: return True or False$"),
    ("three values", r"Faulty.get_obs_rew_terminated_info returned 3 value\(s\); rtgym expects 4"),
    ("step array", r"Faulty.get_obs_rew_terminated_info returned the observation as one numpy array of shape \(2,\): "
                   r"return a list of arrays"),
])
def test_a_step_that_returns_the_wrong_thing_stops_the_env_in_one_line(plug_interface, fault, message):
    """Three values from get_obs_rew_terminated_info used to kill rtgym's thread and leave the worker waiting for
    ever; the others went on to the batch builder and out as a traceback."""
    from tmrl_worker.envs import EnvFailure

    handle = make_env(f"{plug_interface('faulty_robot', FAULTY)}:Faulty", time_step_duration=0.02,
                      options={"fault": fault})
    try:
        handle.reset()
        started = time.monotonic()
        with pytest.raises(EnvFailure, match=message):
            for _ in range(3):  # rtgym returns the observation captured one step earlier
                handle.step(np.zeros(1, np.float32))
        assert time.monotonic() - started < 5.0
    finally:
        handle.close()


@pytest.mark.parametrize("fault", ["numpy types", "0-d array"])
def test_numpy_rewards_and_a_terminated_of_0_or_1_are_taken_as_a_float_and_a_bool(plug_interface, fault):
    handle = make_env(f"{plug_interface('faulty_robot', FAULTY)}:Faulty", time_step_duration=0.02,
                      options={"fault": fault})
    _, reward, terminated, truncated, _ = last_of_steps(handle, 3)  # rtgym returns what it captured a step earlier
    assert type(reward) is float and reward == 0.5 and terminated is False and truncated is False


def test_observations_returned_as_tuples_are_taken_as_lists_at_the_reset_and_at_steps(plug_interface):
    """An outside probe: a reset returning a tuple (as ``spaces.Tuple.sample()`` does) failed inside rtgym with
    "can only concatenate tuple (not "list") to tuple", blamed on the interface's reset."""
    handle = make_env(f"{plug_interface('faulty_robot', FAULTY)}:Faulty", time_step_duration=0.02,
                      options={"fault": "tuple observations"})
    try:
        observation = handle.reset()
        assert observation[0].shape == (2,)
        for _ in range(3):
            observation, reward, terminated, truncated, _ = handle.step(np.zeros(1, np.float32))
        assert observation[0].shape == (2,) and reward == 0.0 and not (terminated or truncated)
    finally:
        handle.close()


@pytest.mark.parametrize(("action", "message"), [
    (np.array([np.nan], np.float32), r"an action of 1 value\(s\) \[nan\] was not applied: the action space takes 1"),
    (np.array([np.inf], np.float32), r"\[inf\] was not applied"),
    (np.zeros(3, np.float32), r"an action of 3 value\(s\) \[0.0, 0.0, 0.0\] was not applied: the action space takes 1"),
])
def test_an_action_of_the_wrong_size_or_not_finite_never_reaches_the_interface(plug_interface, action, message):
    """An outside probe: an expert's NaN went through the clipping and rescaling to send_control, and three values
    for a 1-D space ended in a reshape traceback."""
    from tmrl_worker.envs import EnvFailure

    handle = make_env(f"{plug_interface('faulty_robot', FAULTY)}:Faulty", time_step_duration=0.02)
    try:
        handle.reset()
        with pytest.raises(EnvFailure, match=message):
            handle.step(action)
        handle.step(np.zeros(1, np.float32))  # nothing was applied: the env goes on
    finally:
        handle.close()


def test_an_interface_whose_wait_raises_is_named_not_the_step_that_called_it(plug_interface):
    """An outside probe: a ``wait()`` that raised (an e-stop not released) was reported as "its step raised"."""
    from tmrl_worker.envs import EnvFailure

    module = plug_interface("waiting_robot", """
        class WaitRaises(OneActionInterface):
            def get_observation_space(self):
                return spaces.Tuple((spaces.Box(-10.0, 10.0, (2,), np.float32),))

            def reset(self, seed=None, options=None):
                return [np.zeros(2, dtype=np.float32)], {}

            def get_obs_rew_terminated_info(self):
                return [np.zeros(2, dtype=np.float32)], 0.0, True, {}  # every step ends the episode

            def wait(self):
                raise RuntimeError("e-stop not released")
    """)
    handle = make_env(f"{module}:WaitRaises", time_step_duration=0.02)
    try:
        with pytest.raises(EnvFailure, match=r"WaitRaises.wait raised RuntimeError: e-stop not released$"):
            handle.reset()
            for _ in range(3):
                handle.step(np.zeros(1, np.float32))
    finally:
        handle.close()


def last_of_steps(handle, steps: int) -> tuple:
    """Reset ``handle``, take ``steps`` steps of action 0, close it; return the last step's result."""
    try:
        handle.reset()
        for _ in range(steps):
            result = handle.step(np.zeros(1, np.float32))
        return result
    finally:
        handle.close()


DECLARED_LAYOUTS = '''
    class DictLayout(Faulty):
        layout = {"components": [], "action_dim": 1}

    class RaisingLayout(Faulty):
        def layout(self):
            raise KeyError("lidar_beams")

    class NoLayout(Faulty):
        layout = None

    class MethodReturningAString(Faulty):
        def layout(self):
            return '{"components": [], "action_dim": 1}'

    class PropertyRaising(Faulty):
        @property
        def layout(self):
            raise FileNotFoundError("layout.json")
'''


@pytest.mark.parametrize(("interface", "message"), [
    ("DictLayout", r"DictLayout.layout is a dict, not a tmrl_common.layout.ObservationLayout"),
    ("RaisingLayout", r"RaisingLayout.layout\(\) raised KeyError: 'lidar_beams'"),
    ("MethodReturningAString", r"MethodReturningAString.layout\(\) returned a str, not a tmrl_common.layout."
                               r"ObservationLayout \(build one"),
    ("PropertyRaising", r"PropertyRaising.layout raised FileNotFoundError: layout.json$"),
])
def test_a_declared_layout_that_is_not_an_observation_layout_is_refused_not_ignored(plug_interface, interface, message):
    """It used to be ignored: the layout was derived from the spaces, and the worker trained without the histories
    and bounds its author declared."""
    module = plug_interface("declared_layouts", FAULTY + DECLARED_LAYOUTS)
    with pytest.raises(EnvSpecError, match=rf"^env '{module}:{interface}': {message}"):
        make_env(f"{module}:{interface}", time_step_duration=0.02)
    handle = make_env(f"{module}:NoLayout", time_step_duration=0.02)  # None: declares none, the spaces decide
    handle.close()


def test_an_interface_refusing_the_env_options_says_so_in_one_line_without_the_rtgym_config(plug_interface):
    """gymnasium re-raises the interface's TypeError with the whole rtgym config (about 15 keys) in its message."""
    module = plug_interface("faulty_robot", FAULTY)
    with pytest.raises(EnvSpecError) as raised:
        make_env(f"{module}:Faulty", time_step_duration=0.02, options={"colour": "red", "fault": "none"})
    assert str(raised.value) == (f"env '{module}:Faulty': building interface Faulty raised TypeError: "
                                 "Faulty.__init__() got an unexpected keyword argument 'colour' (its keyword "
                                 "arguments, from env_options: colour, fault)")


def test_an_interface_raising_its_own_type_error_on_an_option_is_named_with_the_option_names(plug_interface):
    """Its own message names no class (unlike Python's "Faulty.__init__() got an unexpected keyword argument"),
    and the values given stay out of the line (a device or a reward object prints as many lines)."""
    module = plug_interface("picky_robot", FAULTY + '''
    class Picky(Faulty):
        def __init__(self, gain=1.0, fault="none"):
            if not isinstance(gain, float):
                raise TypeError(f"gain must be a float,\\n got {type(gain).__name__}")
            super().__init__(fault)
    ''')
    with pytest.raises(EnvSpecError) as raised:
        make_env(f"{module}:Picky", time_step_duration=0.02, options={"gain": "high\nvery", "fault": "none"})
    assert str(raised.value) == (f"env '{module}:Picky': building interface Picky raised TypeError: gain must be a "
                                 "float, got str (its keyword arguments, from env_options: fault, gain)")


def test_a_gymnasium_env_refusing_the_options_is_named_without_their_values():
    with pytest.raises(EnvSpecError) as raised:
        make_env("gym:Pendulum-v1", options={"colour": "red", "g": 9.81})
    assert str(raised.value) == ("env 'gym:Pendulum-v1': 'Pendulum-v1' does not accept the options ['colour', 'g']: "
                                 "PendulumEnv.__init__() got an unexpected keyword argument 'colour'")


FAULTY_GYM = '''
    import gymnasium


    class FaultyGym(gymnasium.Env):
        """A plain gymnasium env (no rtgym guard in front of it): EnvHandle's own checks see what it returns."""

        observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
        action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

        def __init__(self, fault="none"):
            self.fault = fault

        def reset(self, seed=None, options=None):
            if self.fault == "reset returns the observation alone":  # the old gym API
                return np.zeros(3, np.float32)
            return np.zeros(3, np.float32), {}

        def step(self, action):
            observation = np.zeros(3, np.float32)
            if self.fault == "terminated array":
                return observation, 0.0, np.array([False, True]), False, {}
            if self.fault == "truncated None":
                return observation, 0.0, False, None, {}
            if self.fault == "reward string":
                return observation, "1.5", False, False, {}
            if self.fault == "numpy types":  # accepted, as from an interface
                return observation, np.float64(0.5), np.bool_(False), 0, {}
            return observation, 0.0, False, False, {}
'''


@pytest.fixture
def faulty_gym(plug_interface):
    import gymnasium

    module = plug_interface("faulty_gym_env", FAULTY_GYM)
    gymnasium.register("tmrl-test/FaultyGym-v0", entry_point=f"{module}:FaultyGym", disable_env_checker=True)
    yield "gym:tmrl-test/FaultyGym-v0"
    gymnasium.registry.pop("tmrl-test/FaultyGym-v0", None)


@pytest.mark.parametrize(("fault", "message"), [
    ("reset returns the observation alone", r"its reset returned a numpy array of shape \(3,\); gymnasium expects 2: "
                                            r"\(observation, info\)$"),
    ("terminated array", r"terminated array\(\[False, True\]\) \(a numpy array of shape \(2,\)\), which is not a bool"),
    ("truncated None", r"truncated None .*which is not a bool"),
    ("reward string", r"reward '1.5'.* which is not one number \(a str\)"),
])
def test_a_gymnasium_env_returning_the_wrong_thing_stops_in_one_line_as_an_interface_does(faulty_gym, fault, message):
    """The array of flags used to raise ValueError out of EnvHandle.step (a traceback), as did unpacking an
    observation of three values returned alone by reset."""
    from tmrl_worker.envs import EnvFailure

    handle = make_env(faulty_gym, options={"fault": fault})
    try:
        with pytest.raises(EnvFailure, match=rf"^env '{faulty_gym}'.*{message}") as raised:
            handle.reset()
            handle.step(np.zeros(1, np.float32))
        assert "\n" not in str(raised.value)
    finally:
        handle.close()
    _, reward, terminated, truncated, _ = last_of_steps(make_env(faulty_gym, options={"fault": "numpy types"}), 1)
    assert type(reward) is float and reward == 0.5 and terminated is False and truncated is False


HISTORIES = '''
    from collections import deque

    from tmrl_common.layout import ObservationComponent, ObservationLayout


    class Stacked(OneActionInterface):
        """Three frames of two values, oldest first, as the layout declares: the reset frame repeated at a reset,
        shifted by one each step (``stacking="right"``), or stacked otherwise."""

        def __init__(self, stacking="right"):
            self.stacking, self.count = stacking, 0

        def layout(self):
            return ObservationLayout(components=[ObservationComponent(name="frames", frame_shape=[2], history=3)],
                                     action_dim=1, action_history=2)

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-1e6, 1e6, (3, 2), np.float32),))

        def _frame(self):
            self.count += 1
            return np.full(2, self.count, dtype=np.float32)

        def reset(self, seed=None, options=None):
            first = self._frame()
            self.frames = deque([np.zeros(2, np.float32) if self.stacking == "zero padding" else first] * 2 + [first],
                                maxlen=3)
            return [np.stack(self.frames)], {}

        def get_obs_rew_terminated_info(self):
            if self.stacking == "two frames a step":  # captured twice as often as it steps: the history moves by two
                self.frames.append(self._frame())
            self.frames.append(self._frame())
            return [np.stack(self.frames)], 0.0, False, {}
'''


@pytest.mark.parametrize(("stacking", "when", "rule"), [
    ("zero padding", "the reset", "every frame the reset's"),
    ("two frames a step", "a step", "the previous step's frames shifted by one"),
])
def test_a_history_that_does_not_shift_frame_by_frame_stops_the_env_naming_the_part(plug_interface, stacking, when,
                                                                                     rule):
    """Only each step's newest frame is sent and the trainer rebuilds the history from them: a history stacked
    otherwise used to be learned from silently as other observations than the policy acted on."""
    from tmrl_worker.envs import EnvFailure

    module = plug_interface("stacked_robot", HISTORIES)
    handle = make_env(f"{module}:Stacked", time_step_duration=0.02, options={"stacking": stacking})
    try:
        with pytest.raises(EnvFailure, match=rf"returned observation part 'frames' at {when} with frames that are not "
                                             rf"{rule}"):
            handle.reset()
            for _ in range(3):
                handle.step(np.zeros(1, np.float32))
    finally:
        handle.close()
    handle = make_env(f"{module}:Stacked", time_step_duration=0.02)  # kept as the layout says: runs
    try:
        for _ in range(2):
            handle.reset()
            for _ in range(5):
                observation, *_ = handle.step(np.zeros(1, np.float32))
        assert observation[0].shape == (3, 2) and observation[0][2, 0] - observation[0][0, 0] == 2.0
    finally:
        handle.close()


@pytest.mark.parametrize(("options", "message"), [
    ({"default_action_size": 3}, r"default action has 3 value\(s\), its action space .* has 1"),
    # a BYO probe: [5.0] for a Box(-2, 2) was clipped silently, so the reset rows held +2, never applied
    ({"default_action_value": 5.0}, r"default action \[5.0\] lies outside its action space .* in dimension\(s\) "
                                    r"\[0\]: .* make get_default_action\(\) return an action within the bounds"),
    ({"default_action_value": float("nan")}, r"default action \[nan\] lies outside its action space"),
])
def test_a_default_action_of_the_wrong_size_or_out_of_bounds_is_refused_when_the_env_is_built(plug_interface, options, message):
    with pytest.raises(EnvSpecError, match=message):
        make_env(f"{plug_interface('faulty_robot', FAULTY)}:Faulty", time_step_duration=0.02, options=options)


def test_a_declared_layout_with_another_action_dim_than_the_action_space_is_refused(plug_interface):
    declared = FAULTY + '''
    from tmrl_common.layout import ObservationComponent, ObservationLayout


    class TwoActionLayout(Faulty):
        def layout(self):
            return ObservationLayout(components=[ObservationComponent(name="part0", frame_shape=[2])], action_dim=2,
                                     action_history=2)
'''
    with pytest.raises(EnvSpecError, match=r"has an action space of 1 value\(s\) .* but its layout declares "
                                           r"action_dim 2"):
        make_env(f"{plug_interface('declared_robot', declared)}:TwoActionLayout", time_step_duration=0.02)


def test_a_scalar_observation_part_is_sent_as_the_layouts_one_value_component(plug_interface):
    scalar = NON_FINITE.replace("(2,)", "()").replace("np.zeros(2, dtype=np.float32)", "np.float32(0.5)")
    handle = make_env(f"{plug_interface('scalar_robot', scalar)}:Broken", time_step_duration=0.02,
                      options={"bad": "none"})
    try:
        assert handle.layout.components[0].observation_shape == (1,)
        observation = handle.reset()
        assert observation[0].shape == (1,) and observation[0][0] == np.float32(0.5)
        step_observation = handle.step(np.zeros(1, np.float32))[0]
        assert step_observation[0].shape == (1,)
    finally:
        handle.close()


def test_an_interface_whose_constructor_raises_on_an_option_value_is_named_with_the_option_names(plug_interface):
    """A BYO probe: TMRL_WORKER__ENV_OPTIONS__GAIN=abc and a constructor doing float(gain) gave `building it failed:
    ValueError: could not convert string to float: 'abc'`, with nothing pointing at env_options."""
    module = plug_interface("gain_robot", FAULTY + '''
    class Gained(Faulty):
        def __init__(self, gain=1.0, fault="none"):
            self.gain = float(gain)
            super().__init__(fault)
    ''')
    with pytest.raises(EnvSpecError) as raised:
        make_env(f"{module}:Gained", time_step_duration=0.02, options={"gain": "abc", "fault": "none"})
    assert str(raised.value) == (f"env '{module}:Gained': building it failed: ValueError: could not convert string to "
                                 "float: 'abc' (its keyword arguments, from env_options: fault, gain)")
