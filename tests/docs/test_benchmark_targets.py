"""`make bench` and `make bench-long` between them run every benchmark script, each once (gpu_check.py is for a GPU)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_list(name: str) -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*:=\s*(.*)$", text, re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1).split()


def test_every_benchmark_script_is_in_exactly_one_make_target():
    speed, long = make_list("BENCH_SPEED"), make_list("BENCH_LONG")
    scripts = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py"))
    listed = sorted(speed + long + ["gpu_check"])
    assert listed == scripts, "add a new benchmark script to BENCH_SPEED (minutes) or BENCH_LONG in the Makefile"


def test_the_long_learning_runs_are_not_in_make_bench():
    assert {"sim_laps", "tm20_emulated_learning", "sac_halfcheetah", "sac_pendulum"}.isdisjoint(make_list("BENCH_SPEED"))
