"""Load run: N workers on the fast simulator, as fast as they can step, through one relay process into one trainer;
used by ``benchmarks/reliability_report.py`` (and, briefly, by ``test_load.py``).

Measured: samples/s stored by the trainer (``status.json`` ``samples_received`` over a timed window after every
worker's first batch arrived), the relay's peak resident memory (``VmHWM`` in ``/proc/<pid>/status``) and CPU
time, and the delivery accounting when the workers stop (every row a worker built is stored once at the trainer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from faults import Pipeline, metric_sum, parse_summary

LOAD_CONFIG = """
[trainer]
env = "sim-fast"
device = "cpu"
torch_threads = 1
publish_every = 50
checkpoint_every = 1000000
memory_capacity = 1000000
status_interval_s = 0.5

[trainer.sac]
hidden_sizes = [64, 64]
batch_size = 64
learning_starts = {learning_starts}
utd = 0.25

[worker]
batch_steps = 100
max_episode_steps = 1000
ack_timeout_s = 10.0
flush_timeout_s = 60.0
"""


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    values = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")


def load_run(root: Path, workers: int = 8, seconds: float = 60.0, train: bool = False) -> dict:
    """``workers`` workers for ``seconds`` seconds of measurement; ``train`` also runs SAC updates (else the trainer
    only ingests, which measures the pipeline rather than the learner)."""
    (root / "tmrl.toml").write_text(LOAD_CONFIG.format(learning_starts=1000 if train else 1_000_000_000))
    p = Pipeline(root)
    names = [f"load-{i + 1}" for i in range(workers)]
    try:
        p.start_relay()
        p.start_trainer()
        for name in names:
            p.start_worker(name)
        p.wait(lambda: all(p.worker_status(n).get("batches", 0) > 0 for n in names), 120,
               "every worker's first batch at the trainer", "relay", "trainer")
        relay_pid = p.stack.processes["relay"].pid
        start_status, start_time, start_cpu = p.status(), time.monotonic(), cpu_seconds(relay_pid)
        time.sleep(seconds)
        end_status, end_time, end_cpu = p.status(), time.monotonic(), cpu_seconds(relay_pid)
        p.stack.check_alive()
        elapsed = end_status["updated_at"] - start_status["updated_at"]
        samples = end_status["samples_received"] - start_status["samples_received"]
        for name in names:
            assert p.stack.stop(name, timeout=90) == 0, p.stack.tail(name)
        summaries = {n: parse_summary(p.stack.logs[n].read_text()) for n in names}
        rows = sum(s["rows"] for s in summaries.values())
        final = p.wait(lambda: (s := p.status()) and sum(w["steps"] for w in s["workers"].values()) >= rows and s, 60,
                       "the trainer storing the workers' last batches", "trainer")
        stored_rows = sum(final["workers"][n]["steps"] for n in names)
        relay_memory = proc_status(relay_pid)
        metrics = p.metrics()
        assert p.stack.stop("trainer") == 0 and p.stack.stop("relay") == 0
        return {
            "workers": workers, "seconds": round(elapsed, 1), "train": train,
            "samples_per_s": round(samples / elapsed, 1),
            "samples_per_s_per_worker": round(samples / elapsed / workers, 1),
            "updates_per_s": round((end_status["updates"] - start_status["updates"]) / elapsed, 1),
            "relay_peak_rss_mib": round(int(relay_memory["VmHWM"].split()[0]) / 1024, 1),
            "relay_rss_mib_at_end": round(int(relay_memory["VmRSS"].split()[0]) / 1024, 1),
            "relay_cpu_percent": round(100 * (end_cpu - start_cpu) / (end_time - start_time), 1),
            "relay_batches_forwarded": int(metric_sum(metrics, "tmrl_relay_batches_forwarded_total")),
            "relay_dropped_batches": int(metric_sum(metrics, "tmrl_relay_dropped_batches_total")),
            "relay_rejects": int(metric_sum(metrics, "tmrl_relay_rejects_total")),
            "worker_rows": rows, "trainer_rows": stored_rows, "lost_rows": rows - stored_rows,
            "worker_dropped_batches": sum(s["dropped"] for s in summaries.values()),
            "worker_unacknowledged": sum(s["unacknowledged"] for s in summaries.values()),
            "resent": sum(s["resent"] for s in summaries.values()),
            "trainer_duplicates": final["duplicates"],
        }
    finally:
        p.stack.kill_all()
