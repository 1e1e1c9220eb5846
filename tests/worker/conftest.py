"""``plug_interface``: write a small rtgym interface into a module on ``sys.path``, to plug in by ``module:Class``."""

from __future__ import annotations

import sys
import textwrap

import pytest

ONE_ACTION_INTERFACE = textwrap.dedent('''
    import numpy as np
    from gymnasium import spaces
    from rtgym import RealTimeGymInterface


    class OneActionInterface(RealTimeGymInterface):
        """One action in [-1, 1] (default 0) that does nothing; a subclass gives observations and rewards."""

        def get_action_space(self):
            return spaces.Box(-1.0, 1.0, (1,), np.float32)

        def get_default_action(self):
            return np.zeros(1, dtype=np.float32)

        def send_control(self, control):
            pass


    class ZeroReadingInterface(OneActionInterface):
        """One observation value, always 0, reward 0, never terminated: a subclass makes its calls slow or stuck."""

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-1.0, 1.0, (1,), np.float32),))

        def reset(self, seed=None, options=None):
            return [np.zeros(1, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            return [np.zeros(1, dtype=np.float32)], 0.0, False, {}
''')


@pytest.fixture
def plug_interface(tmp_path, monkeypatch):
    """``plug_interface(module_name, classes_source)``: the module holds ``classes_source`` (dedented) after
    ``OneActionInterface``, ``ZeroReadingInterface`` and the imports they use (numpy as np, gymnasium's spaces);
    returns the module name. The module is forgotten after the test."""
    written: list[str] = []

    def plug(module_name: str, classes_source: str) -> str:
        (tmp_path / f"{module_name}.py").write_text(ONE_ACTION_INTERFACE + "\n\n" + textwrap.dedent(classes_source))
        written.append(module_name)
        return module_name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield plug
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
def refusing_disk(monkeypatch):
    """The disk under ``tmrl_worker.spool``'s files (the state file, the durable spool): while ``.full`` is true,
    every atomic write there raises ``.error`` (a full disk by default; set it to ``OSError(30, ...)`` for a
    read-only folder); otherwise the writes go through."""
    from types import SimpleNamespace

    from tmrl_worker import spool as spool_module

    disk = SimpleNamespace(full=False, error=OSError(28, "No space left on device"))
    real_write = spool_module.write_atomically

    def write(path, data, *args, **kwargs):
        if disk.full:
            raise disk.error
        return real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(spool_module, "write_atomically", write)
    return disk
