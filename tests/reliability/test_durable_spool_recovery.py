"""Kill -9 a worker that holds unacknowledged batches (no relay, so no ack can come) and restart it with the same id
and state_dir: with ``durable_spool`` the trainer stores every batch the killed run handed over, each once, and the only
rows lost are those of the batch it was still filling, as its own progress record says (``faults.py``)."""

from __future__ import annotations

import pytest
from faults import worker_killed_holding_unacknowledged_batches


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_worker_with_a_durable_spool_loses_only_the_batch_it_was_filling(tmp_path):
    figures = worker_killed_holding_unacknowledged_batches(tmp_path, durable_spool=True, spooled_batches=3,
                                                           restart_steps=150)
    killed = figures["killed"]
    assert figures["batches_on_disk_at_kill"] == killed["batches_handed_over"] >= 3
    assert figures["stored_first_life_batches"] == figures["restored"] == killed["batches_handed_over"]
    assert killed["rows_built"] == figures["stored_first_life_rows"] + killed["rows_unfinished"]
    assert figures["lost_rows"] == killed["rows_unfinished"] > 0
    assert figures["lost_rows_in_memory_spool"] == 0
