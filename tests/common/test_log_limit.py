"""RateLimitedLog: the first message of a key is logged, the rest of an interval counted, the count always reported."""

from __future__ import annotations

import logging
import re
import threading

from tmrl_common.log_limit import RateLimitedLog

log = logging.getLogger("tests.log_limit")


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == log.name]


def test_each_key_logs_its_first_message_and_counts_the_rest_of_the_interval(caplog, monkeypatch):
    caplog.set_level("INFO", logger=log.name)
    clock = [100.0]
    monkeypatch.setattr("tmrl_common.log_limit.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(log, interval_s=5.0)
    for index in range(10):
        limited.warning("a", "bad %d", index)
    limited.log(logging.INFO, "b", "other %d", 0)
    assert messages(caplog) == ["bad 0", "other 0"]
    clock[0] += 5.0
    limited.warning("a", "bad %d", 10)  # the next one after the interval says how many were held back
    assert messages(caplog)[-1] == "bad 10 (+9 similar in the last 5s)"
    limited.warning("a", "bad %d", 11)
    limited.flush()  # the interval is not over: nothing yet
    assert len(messages(caplog)) == 3
    clock[0] += 5.0
    limited.flush()  # no message came after it: flush reports the count with the last message held back
    limited.flush()  # once
    # and when that message came: a summary logged after the cause went away does not read as current
    assert messages(caplog)[3:] == ["bad 11 (the last of 1 like it in 5s, 5.0 s ago)"]


def test_due_says_whether_a_line_under_a_key_would_be_written_now(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("tmrl_common.log_limit.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(log, interval_s=5.0)
    assert limited.due("a")
    limited.warning("a", "first")
    assert not limited.due("a") and limited.due("b")
    clock[0] += 5.0
    assert limited.due("a")


def test_past_max_keys_the_held_counts_are_reported_and_the_keys_forgotten(caplog, monkeypatch):
    caplog.set_level("INFO", logger=log.name)
    monkeypatch.setattr("tmrl_common.log_limit.MAX_KEYS", 3)
    monkeypatch.setattr("tmrl_common.log_limit.time.monotonic", lambda: 100.0)
    limited = RateLimitedLog(log, interval_s=60.0)
    for key in range(4):
        limited.warning(key, "key %d", key)
        limited.warning(key, "key %d again", key)
    limited.warning("new", "new key")
    # key 3's second message finds four keys (over MAX_KEYS = 3): the three held counts are reported, every key is
    # forgotten, and that message is logged as a first one
    assert messages(caplog) == ["key 0", "key 1", "key 2", "key 3", *(f"key {k} again (the last of 1 like it in 60s, 0.0 s ago)"
                                                                       for k in range(3)), "key 3 again", "new key"]


def test_threads_logging_and_flushing_at_once_lose_no_count(caplog):
    caplog.set_level("INFO", logger=log.name)
    limited = RateLimitedLog(log, interval_s=60.0)

    def flood() -> None:
        for index in range(2000):
            limited.warning("k", "message %d", index)

    threads = [threading.Thread(target=flood) for _ in range(4)] + [threading.Thread(target=limited.flush)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    limited.interval_s = 0.0
    limited.flush()
    first, summary = messages(caplog)
    assert first.startswith("message ") and re.search(r"\(the last of 7999 like it in 0s, \d+\.\d s ago\)$", summary)


def test_a_line_budget_takes_its_lines_per_window_then_refuses_until_the_window_moves():
    from tmrl_common.log_limit import LineBudget

    budget = LineBudget(lines=3, window_s=10.0)
    assert [budget.take(now=t) for t in (0.0, 1.0, 2.0, 3.0, 9.9)] == [True, True, True, False, False]
    assert budget.take(now=10.0) and not budget.take(now=10.5)  # the oldest line left the window: one more fits


def test_a_flood_of_fresh_curve_keys_costs_a_bounded_number_of_lines(caplog):
    """An overload probe: 200 handshakes a second with fresh keys logged 5,980 refusal lines in 30 s (one per key)."""
    import zmq
    from tmrl_common.curve import AllowedKeySets

    sets = AllowedKeySets()
    sets.replace({"tmrl-workers": frozenset()})
    with caplog.at_level(logging.WARNING, logger="tmrl_common.curve"):
        for _ in range(500):
            public, _ = zmq.curve_keypair()
            assert not sets.callback("tmrl-workers", public)
    lines = [r.getMessage() for r in caplog.records if "refused the CurveZMQ key" in r.getMessage()]
    assert len(lines) == 21 and "more than 20 refusals in 30 s" in lines[-1]
