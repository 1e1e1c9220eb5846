"""RateLimitedLog: the first message of a key is logged, the rest of an interval counted, the count always reported."""

from __future__ import annotations

import logging
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
    assert messages(caplog)[3:] == ["bad 11 (the last of 1 like it in 5s)"]


def test_past_max_keys_the_held_counts_are_reported_and_the_keys_forgotten(caplog, monkeypatch):
    caplog.set_level("INFO", logger=log.name)
    monkeypatch.setattr("tmrl_common.log_limit.MAX_KEYS", 3)
    limited = RateLimitedLog(log, interval_s=60.0)
    for key in range(4):
        limited.warning(key, "key %d", key)
        limited.warning(key, "key %d again", key)
    limited.warning("new", "new key")
    # key 3's second message finds four keys (over MAX_KEYS = 3): the three held counts are reported, every key is
    # forgotten, and that message is logged as a first one
    assert messages(caplog) == ["key 0", "key 1", "key 2", "key 3", *(f"key {k} again (the last of 1 like it in 60s)"
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
    assert first.startswith("message ") and summary.endswith("(the last of 7999 like it in 0s)")
