"""End to end: relay, trainer and two workers as separate processes on loopback, CurveZMQ on, the fast simulator.

The trainer must receive batches from both workers, and both workers must end up sending batches collected with
weights version >= 2 (read from the trainer's ``status.json``), i.e. weights went trainer → relay → workers and
were swapped in while the workers kept running. Every process must then stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import time

import pytest
from tmrl_stack import LocalStack

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
    (tmp_path / "tmrl.toml").write_text(CONFIG)
    workers = ("worker-1", "worker-2")
    with LocalStack(tmp_path, config=tmp_path / "tmrl.toml", curve_clients=("trainer", *workers), run_dir="trainer-run",
                    state_dir="worker-state") as stack:
        stack.start_relay()
        stack.start_trainer()
        for worker in workers:
            stack.start_worker(worker, "--env", "sim-fast")

        started = time.monotonic()
        status = None
        while time.monotonic() - started < DEADLINE_S:
            stack.check_alive()
            status = stack.status()
            seen = status.get("workers", {})
            if all(seen.get(w, {}).get("batches", 0) > 0 and seen[w]["weights_version"] >= 2 for w in workers):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no batches with weights version >= 2 from both workers within {DEADLINE_S}s; "
                                 f"last status: {json.dumps(status, indent=1)}\n{stack.tails()}")

        assert status["weights_version"] >= 2 and status["updates"] >= 20
        assert status["rejects"] == {}
        assert status["samples_received"] == sum(w["steps"] for w in status["workers"].values())
        for worker in workers:
            assert status["workers"][worker]["max_weights_version"] >= 2

        # clean shutdown, workers first so their last batches are acknowledged while relay and trainer still run
        for name in (*workers, "trainer", "relay"):
            assert stack.stop(name) == 0, f"{name} did not exit cleanly:\n{stack.tail(name)}"
        assert list((tmp_path / "trainer-run" / "checkpoints").glob("checkpoint-*.safetensors"))
        metrics = (tmp_path / "trainer-run" / "metrics.jsonl").read_text().splitlines()
        kinds = {json.loads(line)["kind"] for line in metrics}
        assert kinds == {"start", "episode", "train"}
        for worker in workers:
            state = json.loads((tmp_path / "worker-state" / f"{worker}.state.json").read_text())
            assert state["worker_id"] == worker and state["reserved_until"] > 0
