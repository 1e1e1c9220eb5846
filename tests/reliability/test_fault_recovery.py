"""Kill -9 a worker or the trainer mid-run and restart it, or leave the trainer away until the bounds overflow: training
goes on, nothing is lost uncounted or counted twice
(the accounting is defined in ``faults.py``; the relay crash is ``tests/e2e/test_delivery_across_restarts.py``)."""

from __future__ import annotations

import pytest
from faults import trainer_absent, trainer_crash, worker_crash


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_worker_killed_mid_episode_and_restarted_reuses_no_seq_and_loses_nothing_that_left_it(tmp_path):
    figures = worker_crash(tmp_path, restart_steps=1200)
    assert figures["updates_after"] > figures["updates_at_fault"]
    assert figures["weights_version_after"] > figures["weights_version_at_fault"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_trainer_resumes_from_its_checkpoint_and_stores_resent_batches_once(tmp_path):
    figures = trainer_crash(tmp_path, checkpoint_every=40)
    assert figures["resumed_updates"] == figures["checkpoint_updates"] > 0
    assert figures["updates_after"] > figures["resumed_updates"]
    assert figures["lost"] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_batches_that_overflow_while_the_trainer_is_away_are_stored_or_counted_as_dropped(tmp_path):
    figures = trainer_absent(tmp_path, steps=1500, spool_batches=8)
    worker = figures["worker"]
    assert worker["dropped"] > 0 and figures["relay_dropped"] > 0
    assert figures["lost_uncounted"] == 0
    assert figures["trainer_batches"] == worker["acknowledged"] + figures["dropped_but_delivered"]
