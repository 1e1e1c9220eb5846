"""Hostile input over real sockets into a relay process, and into the trainer's ingest path: nothing crashes,
every reject is counted, good traffic still flows afterwards (what is compared: ``hostile.py``)."""

from __future__ import annotations

import pytest
from hostile import curve_cases, ingest_fuzz, relay_edge_cases, relay_fuzz, trainer_ingestor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ten_thousand_hostile_messages_over_sockets_are_all_read_and_counted_and_the_relay_still_forwards(tmp_path):
    figures = relay_fuzz(tmp_path, count=10_000)
    assert figures["read_per_link"] == figures["sent_per_link"]
    assert figures["rejected"] > 0.8 * figures["messages"]  # mutations almost always break something
    assert {"workers/malformed", "workers/bad_version", "trainer/unknown_sender"} <= set(figures["rejects"])


def test_ten_thousand_hostile_messages_into_the_trainer_ingest_each_land_in_exactly_one_counted_bucket():
    figures = ingest_fuzz(count=10_000)
    buckets = figures["buckets"]
    assert sum(buckets.values()) == 10_000
    assert {"rejected/malformed", "rejected/schema", "rejected/non_finite", "rejected/bad_version", "stored",
            "duplicate"} <= set(buckets)


@pytest.mark.timeout(60)
def test_oversized_frames_wrong_versions_and_nan_samples_are_counted_and_do_not_stop_the_relay(tmp_path):
    figures = relay_edge_cases(tmp_path)
    assert figures["cases"].pop("dropped connections counted (tmrl_relay_disconnects_total)") >= 1
    assert figures["cases"] == {"oversized body (counted)": 1, "protocol version 2": 1,
                                "frame over the socket cap (connection dropped, not read)": 0,
                                "NaN rewards (rejected by trainer ingest)": 1}


@pytest.mark.timeout(60)
def test_a_key_outside_the_allow_list_gets_nothing_in_and_an_impostor_id_is_rejected(tmp_path):
    figures = curve_cases(tmp_path)
    assert figures["intruder_handshakes_refused"] >= 1 and figures["intruder_messages_read"] == 0
    assert figures["impostor_rejects"] == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_arbitrary_frames_into_the_trainer_ingest_are_rejected_and_counted(frames):
    ingest, memory = trainer_ingestor()
    replies = ingest.handle(frames)
    snapshot = ingest.snapshot()
    assert replies == [] and len(memory) == 0
    assert sum(snapshot["rejects"].values()) == 1
