"""Delivery and replay integrity on real processes (issue 13): batches lost in a relay, a real gap from a full spool,
a trainer restarted without its memory mid-episode. Shared by ``tests/reliability/test_integrity.py`` and
``benchmarks/reliability_report.py``; each scenario raises :class:`AssertionError` (with the logs) when a guarantee
does not hold and returns its figures.

Every worker runs in verification mode (``verify_observations``): each row carries a digest of the full observation
the env returned, and the trainer compares the observation it rebuilds for that row (``verification`` in its
``status.json``). Every scenario reports, per worker:

* ``rows_lost``: what the worker built that the trainer neither stored nor the worker counted as dropped (must be 0;
  in rows where the trainer ran throughout, else in batches: built - acknowledged - dropped by a full spool);
* ``batches_stored_twice``: batches stored minus distinct seqs stored (must be 0);
* ``mismatched_observations``: rebuilt observations that differ from the env's (must be 0), beside the rows checked
  and the rows that could not be rebuilt from real frames (never sampled).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from faults import Pipeline, check_relay_matches_trainer, metric_sum, parse_summary, write_config

VERIFY = "verify_observations = true\n"


def _integrity(status: dict, worker_id: str) -> dict:
    """The three figures every scenario must hold at 0, read from the trainer's status."""
    stored = status["workers"][worker_id]
    verification = status["verification"]
    assert stored["batches"] == stored["distinct_seqs"], f"batches stored twice: {stored}"
    assert verification["mismatched_rows"] == 0, f"rebuilt observations differ from the env's: {verification}"
    assert verification["verified_rows"] > 0, verification
    return {"batches_stored_twice": stored["batches"] - stored["distinct_seqs"],
            "mismatched_observations": verification["mismatched_rows"],
            "observations_checked": verification["verified_rows"],
            "rows_not_rebuildable": verification["unverifiable_rows"], "orphan_rows": verification["orphan_rows"]}


def relay_killed_holding_batches(root: Path, steps: int = 3000) -> dict:
    """Freeze the trainer (SIGSTOP) until the relay holds the worker's batches for it, SIGKILL the relay with them,
    let the trainer go on and restart the relay: the worker resends what the relay died with, and every row is
    stored once, every rebuilt observation equal to the env's."""
    config = write_config(root, learning_starts=200)
    config.write_text(config.read_text() + VERIFY + "\n[relay]\npeer_timeout_s = 1.5\n")
    p = Pipeline(root)
    try:
        p.start_relay()
        p.start_trainer()
        p.start_worker("w1", "--max-steps", str(steps))
        p.wait(lambda: p.worker_status("w1").get("batches", 0) >= 5, 90, "the first batches reaching the trainer")
        trainer = p.stack.processes["trainer"]
        trainer.send_signal(signal.SIGSTOP)
        held = p.wait(lambda: (n := metric_sum(p.metrics(), "tmrl_relay_pending_batches")) >= 4 and n, 60,
                      "the relay holding batches for the frozen trainer", "relay", "w1")
        p.stack.stop("relay", sig=signal.SIGKILL)
        trainer.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # the worker keeps stepping and spooling meanwhile
        # paused while the relay starts again: on a loaded CI machine the restart once took longer than the rest of
        # the worker's steps, and it ended before the relay was back
        worker_process = p.stack.processes["w1"]
        worker_process.send_signal(signal.SIGSTOP)
        try:
            p.start_relay()
        finally:
            worker_process.send_signal(signal.SIGCONT)
        assert p.stack.wait("w1", timeout=180) == 0, p.stack.tail("w1")
        worker = parse_summary(p.stack.logs["w1"].read_text())
        assert worker["dropped"] == worker["unacknowledged"] == 0 and worker["acknowledged"] == worker["batches"], worker
        p.wait(lambda: p.worker_status("w1").get("batches") == worker["batches"], 30, "the trainer storing every batch",
               "trainer")
        status = p.settled_status()
        stored = status["workers"]["w1"]
        assert stored["steps"] == worker["rows"] and stored["min_seq"] == 0, (stored, worker)
        figures = _integrity(status, "w1")
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "relay SIGKILLed holding batches for a frozen trainer, then restarted",
                "relay_held_at_kill": int(held), "worker": worker, "trainer_batches": stored["batches"],
                "trainer_steps": stored["steps"], "duplicates": stored["duplicates"],
                "rows_lost": worker["rows"] - stored["steps"], **figures}
    finally:
        p.stack.kill_all()  # SIGKILL also ends a process still frozen by SIGSTOP


def spool_overflow_gap(root: Path, steps: int = 3000, spool_batches: int = 6) -> dict:
    """Freeze the trainer (SIGSTOP) mid-run until the relay's small hold has dropped more batches than the worker's
    spool keeps (both drop their oldest, counted and logged), then let it go on: the stored seqs have a real gap in
    the middle, and batches the relay dropped but the spool still held arrive late, after newer ones. Every batch is stored or counted dropped, none twice, and no observation is rebuilt
    across the gap."""
    config = write_config(root, learning_starts=200)
    config.write_text(config.read_text() + VERIFY + f"spool_max_batches = {spool_batches}\n\n[relay]\n"
                      "peer_timeout_s = 1.5\nmax_pending_bytes = 4096\n")
    p = Pipeline(root)
    try:
        p.start_relay()
        p.start_trainer()
        p.wait(lambda: p.status().get("connected"), 90, "the trainer connecting", "trainer")  # before the spool fills
        p.start_worker("w1", "--max-steps", str(steps))
        log = p.stack.logs["w1"]
        p.wait(lambda: p.worker_status("w1").get("batches", 0) >= 5, 90, "the first batches reaching the trainer")
        trainer = p.stack.processes["trainer"]
        trainer.send_signal(signal.SIGSTOP)
        # the batches already in the frozen trainer's socket arrive later; those the relay holds past its bound (and
        # the worker's spool no longer has) are gone: a real gap
        p.wait(lambda: metric_sum(p.metrics(), "tmrl_relay_dropped_batches_total") >= 2 * spool_batches, 90,
               "the relay's hold overflowing", "relay", "w1")
        trainer.send_signal(signal.SIGCONT)
        assert p.stack.wait("w1", timeout=180) == 0, p.stack.tail("w1")
        worker = parse_summary(log.read_text())
        assert worker["unacknowledged"] == 0 and worker["dropped"] > 0, worker
        assert worker["acknowledged"] + worker["dropped"] == worker["batches"], worker
        status = p.settled_status()
        stored = status["workers"]["w1"]
        assert stored["distinct_seqs"] < stored["max_seq"] - stored["min_seq"] + 1, f"no gap in the stored seqs: {stored}"
        relay_check = check_relay_matches_trainer(p)
        figures = _integrity(status, "w1")
        assert figures["rows_not_rebuildable"] + figures["orphan_rows"] > 0, figures  # the rows right after the gap
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "trainer frozen until the relay's hold and the worker's spool overflowed (a real gap in the "
                         "seqs, late batches)", "worker": worker,
                "trainer_batches": stored["batches"], "trainer_steps": stored["steps"],
                "seq_range": [stored["min_seq"], stored["max_seq"]], "duplicates": stored["duplicates"],
                "relay": relay_check, "rows_lost": worker["batches"] - worker["acknowledged"] - worker["dropped"],
                "batches_dropped_counted": worker["dropped"],
                "dropped_but_delivered": stored["batches"] - worker["acknowledged"], **figures}
    finally:
        p.stack.kill_all()  # SIGKILL also ends a process still frozen by SIGSTOP


def trainer_restart_without_memory(root: Path, checkpoint_every: int = 40) -> dict:
    """SIGKILL the trainer mid-episode and restart it without a saved memory (the default): it resumes its learner
    from the checkpoint with an empty memory, and the rows of the episodes it joins mid-way are stored but never
    rebuilt with invented history (the rows after the restart cannot be rebuilt until enough real frames arrived)."""
    config = write_config(root, checkpoint_every=checkpoint_every, learning_starts=200)
    config.write_text(config.read_text() + VERIFY)
    p = Pipeline(root)
    try:
        killed_at = p.kill_trainer_after_a_checkpoint(checkpoint_every)
        time.sleep(1.0)
        p.start_trainer()
        p.wait(lambda: (s := p.status()).get("updated_at", 0) > killed_at and s.get("uptime_s", 1e9) < 60
               and s.get("workers", {}).get("w1", {}).get("batches", 0) >= 20 and s, 120,
               "the restarted trainer storing batches", "trainer", "w1")
        assert p.stack.stop("w1") == 0, p.stack.tail("w1")
        worker = parse_summary(p.stack.logs["w1"].read_text())
        assert worker["dropped"] == worker["unacknowledged"] == 0 and worker["acknowledged"] == worker["batches"], worker
        p.wait(lambda: p.worker_status("w1").get("max_seq") == worker["batches"] - 1, 30,
               "the restarted trainer storing the worker's last batch", "trainer")
        status = p.settled_status()
        stored = status["workers"]["w1"]
        assert stored["batches"] == stored["max_seq"] - stored["min_seq"] + 1 and stored["min_seq"] > 0, stored
        figures = _integrity(status, "w1")
        assert figures["orphan_rows"] + figures["rows_not_rebuildable"] > 0 or stored["min_seq"] == 0, figures
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "trainer SIGKILL mid-episode, restarted without a saved memory", "worker": worker,
                "new_trainer_seq_range": [stored["min_seq"], stored["max_seq"]],
                "new_trainer_batches": stored["batches"], "new_trainer_duplicates": stored["duplicates"],
                "acked_by_killed_trainer": stored["min_seq"],
                "rows_lost": worker["batches"] - worker["acknowledged"], **figures}
    finally:
        p.stack.kill_all()
