"""Nothing is lost silently: the relay is killed (SIGKILL, in-flight batches gone) and restarted while a worker is
sending; every row the worker produced ends up stored exactly once in the trainer's replay memory."""

from __future__ import annotations

import re
import signal
import time

import pytest
from tmrl_stack import LocalStack, wait_until

CONFIG = """
[trainer]
env = "sim-fast"
device = "cpu"
status_interval_s = 0.25
[trainer.sac]
learning_starts = 1000000000  # ingestion only: this test is about delivery

[worker]
batch_steps = 25
max_episode_steps = 200
max_steps_per_second = 300
ack_timeout_s = 2.0
flush_timeout_s = 30.0
"""

SUMMARY = re.compile(r"delivery: (\d+) rows in (\d+) batches, (\d+) acknowledged, (\d+) resent, (\d+) dropped, "
                     r"(\d+) unacknowledged")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_relay_crash_mid_run_loses_and_duplicates_nothing(tmp_path):
    (tmp_path / "tmrl.toml").write_text(CONFIG)
    with LocalStack(tmp_path, config=tmp_path / "tmrl.toml") as stack:
        stack.start_relay()
        stack.start_trainer()
        stack.start_worker("w1", "--env", "sim-fast", "--max-steps", "4500")

        def stored_batches() -> int:
            return stack.worker_status("w1").get("batches", 0)

        wait_until(lambda: stored_batches() >= 5, 60, stack, "the first batches reaching the trainer")
        stack.stop("relay", sig=signal.SIGKILL)
        time.sleep(1.5)  # the worker keeps stepping and spooling meanwhile
        stack.start_relay()

        assert stack.wait("w1", timeout=90) == 0, stack.tail("w1")
        log = stack.logs["w1"].read_text()
        match = SUMMARY.search(log)
        assert match, f"no delivery summary in the worker log:\n{stack.tail('w1')}"
        rows, batches, acknowledged, resent, dropped, unacknowledged = map(int, match.groups())
        assert (dropped, unacknowledged) == (0, 0) and acknowledged == batches
        assert log.count("connected to the relay") >= 2, "the worker should have reconnected to the new relay"

        def complete():
            worker = stack.worker_status("w1")
            return worker if worker.get("batches") == batches else None

        stored = wait_until(complete, 30, stack, "the trainer storing every batch", "trainer")
        assert stored["steps"] == rows  # every row exactly once, resends deduplicated
        assert stack.stop("trainer") == 0 and stack.stop("relay") == 0
