"""Fault scenarios on real processes (relay, trainer, workers on loopback, fast simulator), shared by the tests in
this folder and ``benchmarks/reliability_report.py``. Each scenario raises :class:`AssertionError` (with the logs)
when a guarantee does not hold and returns the figures it measured.

Accounting, per worker id (what "nothing lost, nothing counted twice" means here):

* worker side, from the summary line a worker prints when it exits (``delivery: R rows in B batches, A acknowledged,
  S resent, D dropped, U unacknowledged``): ``B`` batches built and numbered, ``A`` acknowledged by a trainer (an ack is
  only sent for a batch stored, or for a duplicate of one stored, by that trainer), ``D`` dropped from a full spool
  (counted and logged), ``U`` still unacknowledged at exit. Nothing is lost when ``A + D == B`` and ``D == U == 0``.
* trainer side, from ``status.json`` (``workers.<id>``): ``batches``/``steps`` stored, ``duplicates`` (resends of a
  stored batch, acknowledged again, not stored), ``min_seq``/``max_seq`` of the stored batches. Every stored seq is
  stored once; ``batches == max_seq - min_seq + 1`` says the stored seqs are one range without a hole.
* relay side, from its Prometheus metrics: ``tmrl_relay_batches_forwarded_total`` (every batch handed to a trainer,
  resends included) must equal the trainer's ``batches + duplicates + rejects`` while one trainer process ran.

A worker killed with SIGKILL loses what only it held: its partly filled batch and the batches in its in-memory spool
that had not reached the relay; everything that reached the relay is accounted for above. With ``durable_spool`` the
spooled batches are on disk and a restarted worker sends them again, so it loses only its partly filled batch; the
worker's progress file (``state_dir/<id>.progress.json``) says how many rows that was
(:func:`worker_killed_holding_unacknowledged_batches`). A restarted worker never
reuses a seq (its state file reserves blocks of 1000), so the trainer cannot mistake new rows for old ones.
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tmrl_stack import LocalStack, wait_until

SUMMARY = re.compile(r"delivery: (\d+) rows in (\d+) batches, (\d+) acknowledged, (\d+) resent, (\d+) dropped, "
                     r"(\d+) unacknowledged")
RESUMED = re.compile(r"resumed from checkpoint \S+: (\d+) updates, weights version (\d+)")

TRAINING_CONFIG = """
[trainer]
env = "sim-fast"
device = "cpu"
torch_threads = 1
publish_every = 10
checkpoint_every = {checkpoint_every}
memory_capacity = 50000
status_interval_s = 0.25

[trainer.sac]
hidden_sizes = [32, 32]
batch_size = 32
learning_starts = {learning_starts}
utd = {utd}

[worker]
batch_steps = 25
max_episode_steps = 200
max_steps_per_second = {steps_per_second}
ack_timeout_s = 2.0
flush_timeout_s = 30.0
"""


def write_config(root: Path, checkpoint_every: int = 1_000_000, learning_starts: int = 200, utd: float = 0.5,
                 steps_per_second: float = 300) -> Path:
    path = root / "tmrl.toml"
    path.write_text(TRAINING_CONFIG.format(checkpoint_every=checkpoint_every, learning_starts=learning_starts, utd=utd,
                                           steps_per_second=steps_per_second))
    return path


def parse_summary(log: str) -> dict[str, int]:
    """The last delivery summary in a worker log (AssertionError when there is none)."""
    matches = SUMMARY.findall(log)
    assert matches, f"no delivery summary in the worker log:\n{log[-3000:]}"
    keys = ("rows", "batches", "acknowledged", "resent", "dropped", "unacknowledged")
    return dict(zip(keys, map(int, matches[-1]), strict=True))


def scrape(port: int) -> dict[str, float]:
    """The relay's Prometheus samples as ``{'name{label="v",...}': value}`` (labels sorted)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that contains ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


class Pipeline:
    """Relay, trainer and workers of one scenario (a :class:`~tmrl_stack.LocalStack`: fresh loopback ports, plain
    text, since CurveZMQ is covered by the hostile-input checks, ``root/tmrl.toml``, logs in ``root``), with the
    accounting reads the scenarios share."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stack = LocalStack(root, config=root / "tmrl.toml", metrics=True)
        self.status_path = self.stack.status_path

    def start_relay(self) -> None:
        self.stack.start_relay()

    def start_trainer(self) -> None:
        self.stack.start_trainer()

    def start_worker(self, worker_id: str, *extra: str, name: str | None = None) -> None:
        """A worker's first start numbers its batches from 0 (a state file reserving nothing yet), so the scenarios'
        seq figures read as batch counts; without a state file a worker starts at the clock (tmrl_worker.spool)."""
        state = self.stack.state_dir / f"{worker_id}.state.json"
        if not state.exists():
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps({"worker_id": worker_id, "reserved_until": 0}))
        self.stack.start_worker(worker_id, "--env", "sim-fast", *extra, name=name)

    def status(self) -> dict:
        return self.stack.status()

    def worker_status(self, worker_id: str) -> dict:
        return self.stack.worker_status(worker_id)

    def wait(self, condition, timeout: float, what: str, *alive: str):
        return wait_until(condition, timeout, self.stack, what, *alive)

    def metrics(self) -> dict[str, float]:
        return scrape(self.stack.ports.metrics)

    def kill_trainer_after_a_checkpoint(self, checkpoint_every: int, worker_id: str = "w1") -> float:
        """Start relay, trainer and one worker, wait until the trainer is past its first checkpoint, SIGKILL it;
        returns when it was killed (``time.time()``)."""
        self.start_relay()
        self.start_trainer()
        self.start_worker(worker_id, "--max-steps", "1000000")
        self.wait(lambda: self.status().get("updates", 0) >= checkpoint_every + 5, 120, "a checkpoint", "trainer",
                  worker_id)
        self.stack.stop("trainer", sig=signal.SIGKILL)
        return time.time()

    def settled_status(self, seconds: float = 1.0, timeout: float = 20.0) -> dict:
        """``status.json`` once its counters stopped moving for ``seconds`` (in-flight batches landed)."""
        deadline = time.monotonic() + timeout
        previous = None
        while time.monotonic() < deadline:
            current = self.status()
            key = {w: (s.get("batches"), s.get("duplicates")) for w, s in (current.get("workers") or {}).items()}
            if previous is not None and key == previous:
                return current
            previous = key
            time.sleep(seconds)
        raise AssertionError(f"the trainer's counters kept moving for {timeout}s\n{self.stack.tails()}")


def check_relay_matches_trainer(pipeline: Pipeline) -> dict[str, float]:
    """Every batch the relay forwarded is, at the trainer, exactly one of stored / duplicate / rejected."""
    status = pipeline.settled_status()
    forwarded = metric_sum(pipeline.metrics(), "tmrl_relay_batches_forwarded_total")
    counted = status["batches_stored"] + status["duplicates"] + sum(status["rejects"].values())
    assert forwarded == counted, f"relay forwarded {forwarded} batches, trainer counted {counted}: {status}"
    return {"relay_forwarded": int(forwarded), "trainer_counted": int(counted)}


# --------------------------------------------------------------------------------------------------- scenarios


def relay_crash(root: Path, steps: int = 4500) -> dict:
    """SIGKILL the relay while a worker sends, restart it: every row is stored exactly once (the e2e test
    ``tests/e2e/test_delivery_across_restarts.py`` checks the same in ``make test``; this variant also reports)."""
    write_config(root, learning_starts=200)
    p = Pipeline(root)
    try:
        p.start_relay()
        p.start_trainer()
        p.start_worker("w1", "--max-steps", str(steps))
        p.wait(lambda: p.worker_status("w1").get("batches", 0) >= 5, 90, "the first batches reaching the trainer")
        before = p.status()
        p.stack.stop("relay", sig=signal.SIGKILL)
        time.sleep(1.5)  # the worker keeps stepping and spooling meanwhile
        p.start_relay()
        assert p.stack.wait("w1", timeout=120) == 0, p.stack.tail("w1")
        worker = parse_summary(p.stack.logs["w1"].read_text())
        assert worker["dropped"] == worker["unacknowledged"] == 0 and worker["acknowledged"] == worker["batches"], worker
        stored = p.wait(lambda: (s := p.worker_status("w1")).get("batches") == worker["batches"] and s, 30,
                        "the trainer storing every batch", "trainer")
        assert stored["steps"] == worker["rows"], (stored, worker)
        assert stored["batches"] == stored["max_seq"] - stored["min_seq"] + 1, stored
        after = p.wait(lambda: (s := p.status()).get("weights_version", 0) > before.get("weights_version", 0) and s,
                       60, "a newer weights version after the relay restart", "trainer")
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "relay SIGKILL + restart", "worker": worker, "trainer_batches": stored["batches"],
                "trainer_steps": stored["steps"], "duplicates": stored["duplicates"],
                "weights_version_at_fault": before.get("weights_version", 0),
                "weights_version_after": after["weights_version"], "lost": worker["rows"] - stored["steps"]}
    finally:
        p.stack.kill_all()


def worker_crash(root: Path, restart_steps: int = 1500) -> dict:
    """SIGKILL a worker mid-episode, restart it with the same id: its seqs are not reused, what reached the relay is
    stored once, the restarted worker's batches all arrive, training goes on with newer weights."""
    write_config(root, learning_starts=200)
    p = Pipeline(root)
    try:
        p.start_relay()
        p.start_trainer()
        p.start_worker("w1", "--max-steps", "1000000", name="w1-first")
        p.wait(lambda: p.status().get("weights_version", 0) >= 2 and p.worker_status("w1").get("batches", 0) >= 10,
               90, "training on the first worker's batches", "trainer", "w1-first")
        p.stack.stop("w1-first", sig=signal.SIGKILL)
        before = p.settled_status()
        first = before["workers"]["w1"]
        # life 1: every seq from 0 to the last one stored, each once (nothing that reached the relay went missing)
        assert first["min_seq"] == 0 and first["batches"] == first["max_seq"] + 1, first
        relay_check_before = check_relay_matches_trainer(p)

        p.start_worker("w1", "--max-steps", str(restart_steps), name="w1-second")
        assert p.stack.wait("w1-second", timeout=120) == 0, p.stack.tail("w1-second")
        second = parse_summary(p.stack.logs["w1-second"].read_text())
        assert second["dropped"] == second["unacknowledged"] == 0 and second["acknowledged"] == second["batches"], second
        total = first["batches"] + second["batches"]
        stored = p.wait(lambda: (s := p.worker_status("w1")).get("batches") == total and s, 30,
                        "the trainer storing the restarted worker's batches", "trainer")
        assert stored["steps"] == first["steps"] + second["rows"], (stored, first, second)
        # the restarted worker numbered from its reservation (>= 1000), not from a seq life 1 may have used
        assert stored["max_seq"] >= 1000 + second["batches"] - 1, stored
        relay_check = check_relay_matches_trainer(p)
        after = p.wait(lambda: (s := p.status()).get("weights_version", 0) > before["weights_version"]
                       and s["workers"]["w1"]["weights_version"] > before["weights_version"] and s, 60,
                       "newer weights reaching the restarted worker", "trainer")
        assert after["updates"] > before["updates"]
        # episodes_abandoned (reported, not asserted): the killed worker's episode is counted as abandoned when the
        # trainer had stored part of it; a kill that lands right after a batch ending an episode leaves none open
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "worker SIGKILL mid-episode + restart (same id)", "first_life": first, "second_life": second,
                "trainer_batches": stored["batches"], "trainer_steps": stored["steps"],
                "duplicates": stored["duplicates"], "max_seq": stored["max_seq"], "relay": relay_check,
                "relay_before_restart": relay_check_before, "updates_at_fault": before["updates"],
                "updates_after": after["updates"], "weights_version_at_fault": before["weights_version"],
                "weights_version_after": after["weights_version"], "episodes_abandoned": after["episodes_abandoned"],
                "lost_after_reaching_relay": 0}
    finally:
        p.stack.kill_all()


def trainer_crash(root: Path, checkpoint_every: int = 40) -> dict:
    """SIGKILL the trainer after a checkpoint, restart it: it resumes from that checkpoint (updates and weights version
    continue), the worker's unacknowledged batches are resent and stored once, training goes on with newer weights."""
    write_config(root, checkpoint_every=checkpoint_every, learning_starts=200)
    p = Pipeline(root)
    checkpoints = root / "run" / "checkpoints"
    try:
        killed_at = p.kill_trainer_after_a_checkpoint(checkpoint_every)
        before = p.status()
        saved = sorted(checkpoints.glob("checkpoint-*.safetensors"))
        assert saved, f"no checkpoint in {checkpoints}"
        checkpoint_updates = int(saved[-1].stem.split("-")[1])
        time.sleep(1.0)  # the worker keeps sending; the relay holds its batches for the trainer
        p.start_trainer()
        log_path = p.stack.logs["trainer"]
        resumed = p.wait(lambda: RESUMED.findall(log_path.read_text()), 60, "the trainer resuming", "trainer")
        resumed_updates, resumed_version = map(int, resumed[-1])
        assert resumed_updates == checkpoint_updates > 0, (resumed_updates, checkpoint_updates)
        assert resumed_version >= 1
        first = p.wait(lambda: (s := p.status()).get("updated_at", 0) > killed_at and s.get("uptime_s", 1e9) < 30 and s,
                       60, "a status from the restarted trainer", "trainer")
        assert first["updates"] >= checkpoint_updates, f"restarted at {first['updates']} updates, not from the checkpoint"
        after = p.wait(lambda: (s := p.status()).get("updates", 0) >= checkpoint_updates + 30
                       and s["weights_version"] > resumed_version
                       and s["workers"].get("w1", {}).get("weights_version", 0) > resumed_version and s, 120,
                       "training going on after the restart, newer weights at the worker", "trainer", "w1")
        assert p.stack.stop("w1") == 0, p.stack.tail("w1")
        worker = parse_summary(p.stack.logs["w1"].read_text())
        assert worker["dropped"] == worker["unacknowledged"] == 0 and worker["acknowledged"] == worker["batches"], worker
        stored = p.wait(lambda: (s := p.worker_status("w1")).get("max_seq") == worker["batches"] - 1 and s, 30,
                        "the restarted trainer storing the worker's last batch", "trainer")
        stored = p.settled_status()["workers"]["w1"]
        # the new trainer stored one contiguous range of seqs, each once; every seq below it was acknowledged by the
        # killed trainer (the worker got an ack for every batch it built)
        assert stored["batches"] == stored["max_seq"] - stored["min_seq"] + 1, stored
        assert 0 < stored["min_seq"], stored
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "trainer SIGKILL + restart from checkpoint", "worker": worker,
                "checkpoint_updates": checkpoint_updates, "resumed_updates": resumed_updates,
                "resumed_weights_version": resumed_version, "updates_at_kill_last_status": before.get("updates"),
                "updates_after": after["updates"], "weights_version_after": after["weights_version"],
                "new_trainer_seq_range": [stored["min_seq"], stored["max_seq"]],
                "new_trainer_batches": stored["batches"], "new_trainer_duplicates": stored["duplicates"],
                "acked_by_killed_trainer": stored["min_seq"], "lost": worker["batches"] - worker["acknowledged"]}
    finally:
        p.stack.kill_all()


def trainer_absent(root: Path, steps: int = 1500, spool_batches: int = 8, relay_pending_bytes: int = 16384) -> dict:
    """No trainer while a worker sends: the worker's spool (``spool_batches``) and the relay's hold
    (``relay_pending_bytes``) overflow; every batch is then either stored by the late trainer or counted as dropped
    (worker: acknowledged + dropped == built; what the trainer stored beyond the acknowledged ones are dropped
    batches the relay still held and delivered; the relay counts its own drops)."""
    config = write_config(root, learning_starts=200)
    config.write_text(config.read_text() + f"spool_max_batches = {spool_batches}\n\n[relay]\n"
                      f"max_pending_bytes = {relay_pending_bytes}\n")
    p = Pipeline(root)
    try:
        p.start_relay()
        p.start_worker("w1", "--max-steps", str(steps))
        log = p.stack.logs["w1"]
        p.wait(lambda: "spool full" in log.read_text(), 60, "the worker's spool overflowing", "relay", "w1")
        p.wait(lambda: metric_sum(p.metrics(), "tmrl_relay_dropped_batches_total") > 0, 60,
               "the relay's hold overflowing", "relay", "w1")
        p.start_trainer()
        assert p.stack.wait("w1", timeout=120) == 0, p.stack.tail("w1")
        worker = parse_summary(log.read_text())
        assert worker["unacknowledged"] == 0 and worker["dropped"] > 0, worker
        assert worker["acknowledged"] + worker["dropped"] == worker["batches"], worker
        status = p.settled_status()
        stored = status["workers"]["w1"]
        relay_dropped = int(metric_sum(p.metrics(), "tmrl_relay_dropped_batches_total"))
        assert worker["acknowledged"] <= stored["batches"] <= worker["batches"], (worker, stored)
        assert stored["duplicates"] + stored["batches"] >= worker["acknowledged"]
        check_relay_matches_trainer(p)
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": "no trainer while a worker sends (spool and relay hold overflow)", "worker": worker,
                "trainer_batches": stored["batches"], "trainer_steps": stored["steps"],
                "duplicates": stored["duplicates"], "relay_dropped": relay_dropped,
                "dropped_but_delivered": stored["batches"] - worker["acknowledged"],
                "lost_uncounted": worker["batches"] - worker["acknowledged"] - worker["dropped"]}
    finally:
        p.stack.kill_all()


UNCLEAN_STOP = re.compile(r"at its last step it had taken (\d+) steps and (\d+) resets, built (\d+) rows, handed over "
                          r"(\d+) rows in (\d+) batches, and had (\d+) rows in its unfinished batch")
RESTORED = re.compile(r"(\d+) unacknowledged batch\(es\) restored from")


def spooled_on_disk(spool_dir: Path) -> tuple[int, int]:
    """Batches and rows in a durable spool directory (each ``<seq>.batch`` file decoded as the batch it holds)."""
    import msgpack
    from tmrl_common.protocol import SampleBatch, decode

    batches = rows = 0
    for path in sorted(spool_dir.glob("*.batch")) if spool_dir.is_dir() else []:
        _, batch = decode(msgpack.unpackb(path.read_bytes(), raw=False))
        assert isinstance(batch, SampleBatch), f"{path} holds a {type(batch).__name__}"
        batches, rows = batches + 1, rows + batch.steps
    return batches, rows


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of ``pid`` is stopped (state ``T`` in ``/proc/<pid>/task/*/stat``) after a SIGSTOP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [stat.read_text().rsplit(")", 1)[1].split()[0] for stat in Path(f"/proc/{pid}/task").glob("*/stat")]
        if states and all(state in "tT" for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout}s of SIGSTOP")


def worker_killed_holding_unacknowledged_batches(root: Path, durable_spool: bool = True, spooled_batches: int = 4,
                                                 restart_steps: int = 300) -> dict:
    """No relay while a worker steps, so nothing it builds can be acknowledged; SIGKILL it once it has handed over
    ``spooled_batches`` batches and is part-way through the next, then restart it (same id, same ``state_dir``) with a
    relay and a trainer up.

    The worker's own account of its killed run is its progress file (``state_dir/<id>.progress.json``, rewritten after
    every step; the restarted worker logs it): rows built, rows handed over in batches, rows of the batch it was still
    filling. The kill is timed with SIGSTOP: the worker is frozen, its progress record and (``durable_spool``) its spool
    directory are read, and it is SIGKILLed only while it is part-way through a batch and every batch it handed over is
    on disk; otherwise it is let go on (SIGCONT) and tried again. Checked with ``durable_spool``: the trainer stores the
    killed run's batches, each once, and ``rows built == rows stored + rows of the unfinished batch``; without it, the
    trainer stores none of them (the in-memory spool died with the process) and the restarted worker still delivers
    its own rows."""
    config = write_config(root, learning_starts=1_000_000_000, steps_per_second=100)
    config.write_text(config.read_text() + f"durable_spool = {'true' if durable_spool else 'false'}\n")
    spool_dir, progress_file = root / "state" / "w1.spool", root / "state" / "w1.progress.json"
    p = Pipeline(root)
    try:
        from tmrl_worker.progress import ProgressFileError, read_progress

        def progress_or_none():  # None before the first record, or for a record read while the worker rewrote it
            try:
                return read_progress(progress_file)
            except ProgressFileError:
                return None

        p.start_worker("w1", "--max-steps", "1000000", "--seed", "1", name="w1-first")
        first = p.stack.processes["w1-first"]
        p.wait(lambda: (r := progress_or_none()) is not None and r.batches_handed_over >= spooled_batches, 90,
               f"the worker handing over {spooled_batches} batches", "w1-first")
        attempts = 0
        while True:
            attempts += 1
            assert attempts <= 500, f"never caught the worker part-way through a batch with its spool written:\n" \
                                    f"{p.stack.tail('w1-first')}"
            first.send_signal(signal.SIGSTOP)
            wait_stopped(first.pid)
            record = progress_or_none()  # torn only if the stop caught the worker copying it: try again
            on_disk = spooled_on_disk(spool_dir)
            if record is not None and record.rows_unfinished > 0 and (not durable_spool or on_disk[1] == record.rows_handed_over):
                break
            first.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        p.stack.stop("w1-first", sig=signal.SIGKILL)
        killed = read_progress(progress_file)  # the frozen worker wrote nothing more: the same record
        assert killed == record and killed.running, (killed, record)
        batches_on_disk, rows_on_disk = spooled_on_disk(spool_dir)
        assert (batches_on_disk, rows_on_disk) == ((killed.batches_handed_over, killed.rows_handed_over) if durable_spool
                                                   else (0, 0)), (batches_on_disk, rows_on_disk, killed)

        p.start_relay()
        p.start_trainer()
        p.start_worker("w1", "--max-steps", str(restart_steps), "--seed", "2", name="w1-second")
        assert p.stack.wait("w1-second", timeout=120) == 0, p.stack.tail("w1-second")
        log = p.stack.logs["w1-second"].read_text()
        second = parse_summary(log)
        reported = UNCLEAN_STOP.findall(log)
        assert reported, f"the restarted worker did not report the killed run:\n{log[-3000:]}"
        reported = dict(zip(("steps", "resets", "rows_built", "rows_handed_over", "batches_handed_over",
                             "rows_unfinished"), map(int, reported[-1]), strict=True))
        assert reported == killed.model_dump(include=set(reported)), (reported, killed)
        restored = int(RESTORED.findall(log)[-1]) if RESTORED.search(log) else 0
        assert restored == batches_on_disk, (restored, batches_on_disk)
        assert second["dropped"] == second["unacknowledged"] == 0, second
        assert second["acknowledged"] == second["batches"] + restored, second
        stored = p.wait(lambda: (s := p.worker_status("w1")).get("batches") == second["batches"] + restored and s, 30,
                        "the trainer storing the restored and the new batches", "trainer")
        stored = p.settled_status()["workers"]["w1"]
        relay_check = check_relay_matches_trainer(p)
        stored_first_rows = stored["steps"] - second["rows"]
        stored_first_batches = stored["batches"] - second["batches"]
        # each (worker, seq) at most once: the killed run's seqs start at 0, the restarted worker's at its reservation
        assert stored_first_batches == restored and stored_first_rows == rows_on_disk, (stored, second, rows_on_disk)
        assert stored["min_seq"] == (0 if durable_spool else 1000) and stored["max_seq"] == 1000 + second["batches"] - 1
        assert killed.rows_built == killed.steps + killed.resets
        lost = killed.rows_built - stored_first_rows
        if durable_spool:
            assert lost == killed.rows_unfinished > 0, (killed, stored_first_rows)
            assert not list(spool_dir.glob("*.batch")), "acknowledged batches left in the spool directory"
        else:
            assert lost == killed.rows_built, (killed, stored_first_rows)
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {"fault": f"worker SIGKILL holding unacknowledged batches, durable_spool "
                         f"{'on' if durable_spool else 'off'} (relay away, then restart with the same id)",
                "durable_spool": durable_spool, "killed": killed.model_dump(exclude={"pid", "started_at", "updated_at"}),
                "sigstop_attempts": attempts, "batches_on_disk_at_kill": batches_on_disk,
                "rows_on_disk_at_kill": rows_on_disk, "restored": restored, "second_life": second,
                "stored_first_life_batches": stored_first_batches, "stored_first_life_rows": stored_first_rows,
                "trainer_batches": stored["batches"], "trainer_steps": stored["steps"],
                "duplicates": stored["duplicates"], "relay": relay_check, "lost_rows": lost,
                "lost_rows_unfinished_batch": killed.rows_unfinished,
                "lost_rows_in_memory_spool": lost - killed.rows_unfinished,
                "lost_uncounted": lost - killed.rows_unfinished - (0 if durable_spool else killed.rows_handed_over)}
    finally:
        p.stack.kill_all()  # SIGKILL: a frozen worker does not outlive the scenario
