"""End to end: relay, trainer and two workers as separate processes on loopback, CurveZMQ on, the fast simulator.

The trainer must receive batches from both workers, and both workers must end up sending batches collected with
weights version >= 2 (read from the trainer's ``status.json``), i.e. weights went trainer → relay → workers and
were swapped in while the workers kept running. Every process must then stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import time

import pytest
from process_stack import Stack, free_ports, read_status
from tmrl_common.curve import allow_public_key, generate_key_pair

DEADLINE_S = 80.0

CONFIG = """
[trainer]
env = "sim-fast"
device = "cpu"
publish_every = 10
checkpoint_every = 1000000
memory_capacity = 20000
status_interval_s = 0.5

[trainer.sac]
hidden_sizes = [32, 32]
batch_size = 32
learning_starts = 200
utd = 0.5

[worker]
batch_steps = 40
max_episode_steps = 200
max_steps_per_second = 400
ack_timeout_s = 5.0
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_workers_feed_the_trainer_and_run_on_published_weights(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("relay", "trainer", "worker-1", "worker-2"):
        files = generate_key_pair(keys, name)
        if name != "relay":
            allow_public_key(allowed, files.public_file)
    (tmp_path / "tmrl.toml").write_text(CONFIG)
    worker_port, trainer_port, weights_port = free_ports(3)
    server_key = str(keys / "relay.key")

    stack = Stack(tmp_path)
    try:
        stack.start("relay", "tmrl-relay", "run", "--worker-port", str(worker_port), "--trainer-port", str(trainer_port),
                    "--weights-port", str(weights_port), "--metrics-port", "0",
                    "--secret-key", str(keys / "relay.key_secret"), "--allow-dir", str(allowed))
        stack.start("trainer", "tmrl-trainer", "run", "-c", "tmrl.toml", "--trainer-port", str(trainer_port),
                    "--run-dir", "trainer-run", "--secret-key", str(keys / "trainer.key_secret"),
                    "--server-key", server_key)
        for worker in ("worker-1", "worker-2"):
            stack.start(worker, "tmrl-worker", "run", "-c", "tmrl.toml", "--env", "sim-fast", "--worker-id", worker,
                        "--worker-port", str(worker_port), "--weights-port", str(weights_port),
                        "--state-dir", "worker-state", "--secret-key", str(keys / f"{worker}.key_secret"),
                        "--server-key", server_key)

        status_path = tmp_path / "trainer-run" / "status.json"
        started = time.monotonic()
        status = None
        while time.monotonic() - started < DEADLINE_S:
            stack.check_alive()
            status = read_status(status_path)
            workers = (status or {}).get("workers", {})
            if all(workers.get(w, {}).get("batches", 0) > 0 and workers[w]["weights_version"] >= 2
                   for w in ("worker-1", "worker-2")):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no batches with weights version >= 2 from both workers within {DEADLINE_S}s; "
                                 f"last status: {json.dumps(status, indent=1)}\n{stack.tails()}")

        assert status["weights_version"] >= 2 and status["updates"] >= 20
        assert status["rejects"] == {}
        assert status["samples_received"] == sum(w["steps"] for w in status["workers"].values())
        for worker in ("worker-1", "worker-2"):
            assert status["workers"][worker]["max_weights_version"] >= 2

        # clean shutdown, workers first so their last batches are acknowledged while relay and trainer still run
        for name in ("worker-1", "worker-2", "trainer", "relay"):
            assert stack.stop(name) == 0, f"{name} did not exit cleanly:\n{stack.tail(name)}"
        assert list((tmp_path / "trainer-run" / "checkpoints").glob("checkpoint-*.safetensors"))
        metrics = (tmp_path / "trainer-run" / "metrics.jsonl").read_text().splitlines()
        kinds = {json.loads(line)["kind"] for line in metrics}
        assert kinds == {"episode", "train"}
        for worker in ("worker-1", "worker-2"):
            state = json.loads((tmp_path / "worker-state" / f"{worker}.state.json").read_text())
            assert state["worker_id"] == worker and state["reserved_until"] > 0
    finally:
        stack.kill_all()
