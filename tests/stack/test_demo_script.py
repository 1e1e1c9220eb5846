"""``make demo`` (scripts/demo.py) as an operator meets it: two demos started in the same second each get their own
output folder, and a demo whose trainer dies at start stops at once and exits 1 with the trainer's own last line
(an outside probe: the second demo shared the first's folder and logs, and a demo whose trainer exited 2 ran its
full time and exited 0)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.py"


def demo_module():
    spec = importlib.util.spec_from_file_location("tmrl_demo_script", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demos_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    new_run_folder = demo_module().new_run_folder
    folders = [new_run_folder(tmp_path / "runs", "demo-20261129-032421") for _ in range(3)]
    assert [f.name for f in folders] == ["demo-20261129-032421", "demo-20261129-032421-2", "demo-20261129-032421-3"]
    assert all(f.is_dir() for f in folders)


@pytest.mark.slow
def test_a_demo_whose_trainer_dies_at_start_stops_at_once_and_exits_1_naming_why(tmp_path):
    config = tmp_path / "too_big.toml"
    config.write_text('[trainer]\nenv = "sim"\nmemory_capacity = 1000000000000\n')  # no machine has that memory
    started = time.monotonic()
    demo = subprocess.Popen([sys.executable, str(DEMO), "--config", str(config), "--minutes", "3", "--fast",
                             "--no-display", "--out", str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "400"})
    try:
        output, _ = demo.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # SIGTERM: the demo stops its services (SIGKILL would orphan them)
        demo.terminate()
        output, _ = demo.communicate(timeout=90)
    took = time.monotonic() - started
    assert demo.returncode == 1 and took < 120, output  # not the 3 minutes asked for
    assert "stopping early: trainer exited with code 2" in output and "memory_capacity" in output


def test_the_live_display_keeps_worker_names_whole_on_an_80_column_terminal():
    from rich.console import Console

    demo = demo_module()
    metrics = demo.MetricsTail(Path("missing.jsonl"))
    status = {"workers": {name: {"batches": 1234, "steps": 123456, "weights_version": 321, "episodes": 99,
                                 "last_return": -123.4} for name in demo.WORKERS}}
    console = Console(width=80, record=True, color_system=None)
    console.print(demo.render_progress(status, metrics, 61.0, 300.0, "real time, 20 Hz", []))
    text = console.export_text()
    assert all(name in text for name in demo.WORKERS), text


def test_the_plain_progress_line_gives_each_workers_mean_return(tmp_path):
    """An operator probe: `--no-display` lines showed updates and samples but no return, the one figure that says
    whether the demo learns."""
    demo = demo_module()
    metrics_path = tmp_path / "metrics.jsonl"
    metrics = demo.MetricsTail(metrics_path)
    assert metrics.returns_line() == "no episode finished yet"
    lines = [{"kind": "episode", "worker": "worker-1", "return": value} for value in (10.0, 20.0)]
    lines += [{"kind": "train", "updates": 5}, {"kind": "episode", "worker": "worker-2", "return": -3.0}]
    metrics_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics.poll()
    assert metrics.returns_line() == "mean return of the last 10 episodes (as acted): worker-1 15.0, worker-2 -3.0"


@pytest.mark.slow
def test_ctrl_c_twice_stops_the_demo_in_order_with_every_batch_stored_and_no_keys_left_behind(tmp_path):
    """An outside probe pressed Ctrl-C twice: the second, during "stopping workers, then trainer, then relay", raised
    out of the stop loop (a traceback, no learning curve) and left the demo's temporary folder, secret keys in it.
    And the first, sent by the terminal to its whole process group, reached the services too: the relay stopped with
    the workers, and each lost its last batch ("stopping with 1 unacknowledged batch(es)")."""
    import re
    import signal
    import threading

    # no --no-display: an output that is no terminal gets progress lines by itself (a probe's `make demo > log`
    # showed nothing for 5 minutes, then the whole live display at once)
    demo = subprocess.Popen([sys.executable, str(DEMO), "--minutes", "3", "--fast", "--out",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env={**os.environ, "COLUMNS": "400"}, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()

    def wait_for_line(pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(lines)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(re.search(pattern, line) for line in list(lines)), "".join(lines)

    try:
        # training, the trainer answering: a Ctrl-C before it is up leaves batches the trainer never acknowledges
        wait_for_line(r" min: [1-9]\d* updates", 120)
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
        wait_for_line("stopping workers, then trainer, then relay", 30)
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=120)
    finally:
        if demo.poll() is None:  # the test failed midway: a SIGTERM lets the demo stop its services (each in a
            # process group of its own, so a SIGKILL of the demo's group orphaned a training stack for an hour)
            demo.terminate()
            try:
                demo.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
    reader.join(timeout=5)
    output = "".join(lines)
    assert demo.returncode == 130, output
    assert "already stopping: the workers deliver, then the trainer saves its final checkpoint" in output
    assert "Traceback" not in output
    keys = re.search(r"CurveZMQ keys in (\S+);", output)
    assert keys is not None and not Path(keys.group(1)).exists(), output  # the temporary folder is gone
    assert "exit codes:" not in output, output  # each service stopped by the demo's SIGTERM, exit 0
    worker_logs = sorted((tmp_path / "out" / "logs").glob("worker-*.log"))
    assert len(worker_logs) == 2
    for log in worker_logs:  # the summary line: "delivery: ... N acknowledged, 0 resent, 0 dropped, 0 unacknowledged"
        summary = log.read_text().splitlines()[-1]
        assert re.search(r"delivery: .* 0 dropped, 0 unacknowledged, 0 rejected$", summary), summary
