"""Delivery and replay integrity on real processes (issue 13; scenarios in ``integrity.py``): nothing lost or
stored twice, and no rebuilt observation that differs from the env's, after a relay dies holding batches."""

from __future__ import annotations

import pytest
from integrity import relay_killed_holding_batches


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_relay_killed_holding_batches_loses_nothing_and_no_rebuilt_observation_differs(tmp_path):
    figures = relay_killed_holding_batches(tmp_path, steps=1500)
    assert figures["rows_lost"] == figures["batches_stored_twice"] == figures["mismatched_observations"] == 0
    assert figures["relay_held_at_kill"] > 0 and figures["observations_checked"] > 1000
