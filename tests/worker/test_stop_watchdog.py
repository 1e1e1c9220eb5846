"""``tmrl-worker run`` stops even when its env does not: an interface whose reset blocks without seeing the stop (a
robot waiting on its hardware) would keep the worker alive after SIGTERM; ``stop_grace_s`` later the worker delivers
what it sent and exits with status 1, naming the call it was stuck in. A real process, a real signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tmrl_stack import free_ports

BLOCKS_IN_RESET = '''
    import threading
    from pathlib import Path


    class BlocksInReset(ZeroReadingInterface):
        """A reset that never returns and never looks at a stop event."""

        def reset(self, seed=None, options=None):
            Path(__file__).with_suffix(".resetting").touch()
            threading.Event().wait()
'''


def _worker_process(tmp_path: Path, plug_interface, grace_s: float) -> subprocess.Popen:
    module = plug_interface("blocking_robot", BLOCKS_IN_RESET)  # written into tmp_path
    worker_port, weights_port = free_ports(2)
    config = tmp_path / "tmrl.toml"
    config.write_text(f'''[worker]
worker_id = "stuck-robot"
env = "{module}:BlocksInReset"
worker_port = {worker_port}
weights_port = {weights_port}
state_dir = "{tmp_path / 'state'}"
stop_grace_s = {grace_s}
flush_timeout_s = 0.5
''')
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([str(Path(sys.executable).parent / "tmrl-worker"), "run", "--insecure", "--config",
                             str(config)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_worker_whose_env_blocks_in_reset_exits_1_stop_grace_s_after_sigterm_naming_the_reset(tmp_path,
                                                                                              plug_interface):
    worker = _worker_process(tmp_path, plug_interface, grace_s=1.0)
    try:
        deadline = time.monotonic() + 60.0
        while not (tmp_path / "blocking_robot.resetting").exists():
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline, "the worker never reached the env's reset"
            time.sleep(0.05)
        time.sleep(0.3)
        worker.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = worker.communicate(timeout=30.0)
        took = time.monotonic() - signalled
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 1, stderr
    assert 1.0 <= took < 15.0  # the grace, then the flush (nothing to deliver here)
    last = stderr.strip().splitlines()[-1]
    assert last == ("tmrl-worker: stuck-robot: the env's reset did not return within 1 s of the stop request (it does "
                    "not see the stop); stopping without it; 0 batch(es) acknowledged, 0 unacknowledged"), stderr


def test_the_grace_is_a_positive_number_of_seconds():
    from pydantic import ValidationError
    from tmrl_worker.config import WorkerConfig

    assert WorkerConfig().stop_grace_s == 15.0
    with pytest.raises(ValidationError, match="stop_grace_s"):
        WorkerConfig(stop_grace_s=0)
