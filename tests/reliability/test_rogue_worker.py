"""A rogue worker sending absurd but finite values among honest workers (``rogue.py``): the trainer stays up, counts
what it rejected or did not apply, and the honest workers lose nothing. The comparison of the returns trained with and
without the rogue is in ``benchmarks/reliability_report.py`` (``--only rogue``): it takes two full trainings."""

from __future__ import annotations

import pytest
from rogue import train


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rogue_worker_neither_kills_the_trainer_nor_costs_honest_rows(tmp_path):
    run = train(tmp_path, rogue=True, updates=400, steps_per_second=150)
    assert run["updates"] >= 400 and run["weights_version"] >= 8  # it trained on and published throughout
    assert run["honest_rows_lost"] == run["honest_rows_stored_twice"] == run["honest_unacknowledged"] == 0, run
    # what the rogue sent is rejected at ingest or, stored, its updates are not applied: counted either way
    assert sum(run["rejects"].values()) + run["updates_rejected"] > 0, run
