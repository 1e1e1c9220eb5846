"""The README's quick start, run as a new operator would: its bash blocks, extracted from README.md and run verbatim
in order on one machine (``RELAY`` replaced by 127.0.0.1), give a trainer that updates and a worker that receives
weights, with CurveZMQ keys from the one ``keys init`` command.

Only the environment differs from a user's shell, through documented ``TMRL_<SERVICE>__<FIELD>`` overrides: free
ports instead of 5555-5557 and 9108 (other tests may run beside this one), and a 64-row warm-up with weights
published every 10 updates instead of 1000 rows and 100 updates, so the run takes seconds instead of a minute."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tmrl_stack import free_ports
from tmrl_trainer.status import read_status

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


def quick_start_commands(readme: str) -> list[str]:
    """The shell commands of the bash blocks between the quick-start markers, continuation lines joined."""
    section = re.search(r"<!-- quick-start.*?-->(.*?)<!-- /quick-start -->", readme, re.S)
    assert section, "README.md has no <!-- quick-start --> ... <!-- /quick-start --> section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def test_quick_start_section_is_keys_then_relay_trainer_worker():
    programs = [shlex.split(command)[:2] for command in quick_start_commands((REPO / "README.md").read_text())]
    assert programs == [[".venv/bin/tmrl-relay", "keys"], [".venv/bin/tmrl-relay", "run"],
                        [".venv/bin/tmrl-trainer", "run"], [".venv/bin/tmrl-worker", "run"]]


@pytest.mark.slow
def test_readme_quick_start_verbatim_trains_and_delivers_weights(tmp_path):
    commands = [c.replace("RELAY", "127.0.0.1") for c in quick_start_commands((REPO / "README.md").read_text())]
    (tmp_path / ".venv").symlink_to(VENV)
    (tmp_path / "home").mkdir()
    worker_port, trainer_port, weights_port = free_ports(3)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TMRL_")}, "HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TMRL_RELAY__WORKER_PORT": str(worker_port), "TMRL_RELAY__TRAINER_PORT": str(trainer_port),
           "TMRL_RELAY__WEIGHTS_PORT": str(weights_port), "TMRL_RELAY__METRICS_PORT": "0",
           "TMRL_TRAINER__TRAINER_PORT": str(trainer_port), "TMRL_WORKER__WORKER_PORT": str(worker_port),
           "TMRL_WORKER__WEIGHTS_PORT": str(weights_port), "TMRL_TRAINER__SAC__LEARNING_STARTS": "64",
           "TMRL_TRAINER__SAC__BATCH_SIZE": "32", "TMRL_TRAINER__PUBLISH_EVERY": "10",
           "TMRL_TRAINER__TORCH_THREADS": "1", "TMRL_WORKER__BATCH_STEPS": "20"}
    setup = subprocess.run(["bash", "-c", commands[0]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert setup.returncode == 0, setup.stderr
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("relay", "trainer", "worker")}
    try:
        for name, command in zip(("relay", "trainer", "worker"), commands[1:], strict=True):
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT)
        status_file = tmp_path / "runs" / "trainer" / "status.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for name, process in processes.items():
                assert process.poll() is None, f"{name} exited:\n{logs[name].read_text()[-3000:]}"
            status = read_status(status_file) or {}
            if status.get("weights_version", 0) >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no weights published in 90 s:\n" + "\n".join(f"--- {n}\n{p.read_text()[-2000:]}"
                                                                       for n, p in logs.items()))
        assert status["updates"] >= 10
        processes["worker"].send_signal(signal.SIGTERM)
        assert processes["worker"].wait(30) == 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
    worker_log, trainer_log = logs["worker"].read_text(), logs["trainer"].read_text()
    summary = re.search(r"worker-1: \d+ steps, \d+ episodes, \d+ batches, weights version (\d+)", worker_log)
    assert summary and int(summary.group(1)) >= 1, worker_log[-3000:]
    assert "refused" not in worker_log + trainer_log
    assert re.search(r"trainer trainer on cpu", trainer_log), trainer_log[-2000:]
