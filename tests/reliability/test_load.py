"""A short load run (4 workers, a few seconds) through one relay: every row the workers built is stored once and
the relay's peak memory is reported (the 8-worker, 60 s figures come from ``benchmarks/reliability_report.py``)."""

from __future__ import annotations

import pytest
from load import load_run


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_fast_workers_through_one_relay_lose_no_row(tmp_path):
    figures = load_run(tmp_path, workers=4, seconds=5.0)
    assert figures["samples_per_s"] > 0 and figures["relay_peak_rss_mib"] > 0
    assert figures["lost_rows"] == 0 and figures["worker_dropped_batches"] == figures["worker_unacknowledged"] == 0
    assert figures["relay_dropped_batches"] == figures["relay_rejects"] == 0
