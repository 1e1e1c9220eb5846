"""Reliability figures: fault scenarios, hostile input and a load run on real processes, written to
``docs/reliability.md``.

* faults: SIGKILL + restart of the relay, of a worker (mid-episode, same id) and of the trainer (resume from its
  checkpoint), and of a worker holding unacknowledged batches with ``durable_spool`` on and off; each checks the
  delivery accounting defined in ``tests/reliability/faults.py``;
* fuzz: random and mutated messages over sockets into a relay process and into the trainer's ingest path, plus
  oversized frames, a wrong protocol version, NaN samples, a CurveZMQ key outside the allow-list and a worker
  impersonating another (``tests/reliability/hostile.py``);
* integrity: a relay SIGKILLed holding batches, a worker's spool overflowing (real gaps), a trainer restarted
  without its memory mid-episode, a rogue worker sending finite but absurd values while training, with workers in
  verification mode: rows lost, batches stored twice and rebuilt
  observations that differ from the env's (``tests/reliability/integrity.py``);
* load: N workers on the fast simulator through one relay (``tests/reliability/load.py``);
* rogue: a worker sending absurd but finite values (rewards 3e38, LIDAR or speed 1e30) among two honest workers while
  the trainer trains on the simulator, against the same run without it (``tests/reliability/rogue.py``).

The same scenario code runs, smaller, in ``make test`` (``tests/reliability/``). Bounded: the defaults take about
3-5 minutes on 2 cores. A scenario whose guarantee fails is reported as failed (with its message) and the script
exits 1.

    .venv/bin/python benchmarks/reliability_report.py                       # everything, writes docs/reliability.md
    .venv/bin/python benchmarks/reliability_report.py --only fuzz --out -   # a subset, printed instead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "reliability")]  # the scenarios; processes are started by tmrl_stack

from faults import (  # noqa: E402
    relay_crash,
    trainer_absent,
    trainer_crash,
    worker_crash,
    worker_killed_holding_unacknowledged_batches,
)
from hostile import curve_cases, ingest_fuzz, relay_edge_cases, relay_fuzz  # noqa: E402
from integrity import relay_killed_holding_batches, spool_overflow_gap, trainer_restart_without_memory  # noqa: E402
from load import load_run  # noqa: E402
from rogue import rogue_worker  # noqa: E402

PARTS = ("faults", "integrity", "fuzz", "load", "rogue")


def run_part(name: str, function, *args, **kwargs) -> dict:
    """Run one scenario in a fresh directory; its figures, or the assertion that failed."""
    started = time.monotonic()
    print(f"--- {name} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="tmrl-reliability-") as tmp:
        try:
            figures = function(Path(tmp), *args, **kwargs) if function is not ingest_fuzz else function(*args, **kwargs)
            outcome = {"ok": True, "figures": figures}
        except AssertionError as exc:
            outcome = {"ok": False, "error": str(exc)[:3000]}
        except Exception:  # a crash of the harness itself is a failed scenario too, reported with its traceback
            outcome = {"ok": False, "error": traceback.format_exc()[-3000:]}
    outcome["seconds"] = round(time.monotonic() - started, 1)
    print(f"    {'ok' if outcome['ok'] else 'FAILED'} in {outcome['seconds']} s: "
          f"{json.dumps(outcome.get('figures', outcome.get('error')))[:600]}", flush=True)
    return outcome


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    memory = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), "unknown")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "load_average": os.getloadavg(),
            "python": platform.python_version(), "system": f"{platform.system()} {platform.release()}",
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---------------------------------------------------------------------------------------------------- report


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _failed(outcome: dict) -> str:
    return f"**FAILED** after {outcome['seconds']} s:\n\n```\n{outcome['error']}\n```\n"


def render(results: dict, info: dict, command: str) -> str:
    out = ["# Reliability figures", "",
           "Produced by `benchmarks/reliability_report.py` (do not edit by hand; rerun it). Every figure below was "
           "measured on real processes talking over loopback ZeroMQ: a relay, a trainer and workers on the fast "
           "simulator (`sim-fast`), started from the installed console scripts. What \"nothing lost, nothing counted "
           "twice\" means, counter by counter, is defined in `tests/reliability/faults.py`; the smaller versions of "
           "the same scenarios run in `make test` (`tests/reliability/`, `tests/e2e/test_delivery_across_restarts.py`).",
           "", f"Command: `{command}`", "",
           f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, {info['system']}, Python "
           f"{info['python']}; load average at start {', '.join(f'{x:.2f}' for x in info['load_average'])} (the "
           f"cores are shared with other work, so rates are indicative); commit `{info['commit']}`, {info['date']}.",
           ""]

    summary = []
    if "faults" in results:
        faults = results["faults"]
        survived = sum(o["ok"] for o in faults.values())
        lost = sum(o["figures"].get("lost", o["figures"].get("lost_after_reaching_relay",
                                                            o["figures"].get("lost_uncounted", 0)))
                   for o in faults.values() if o["ok"])
        summary.append((f"faults survived ({len(faults) - 1} SIGKILL + restart, 1 trainer away past the bounds)",
                        f"{survived} of {len(faults)}"))
        summary.append(("samples lost uncounted across the faults (after leaving a worker)", lost))
        spools = [(o["figures"]["killed"], o["figures"]["lost_rows"], o["figures"]["durable_spool"])
                  for name, o in faults.items() if name.startswith("spool ") and o["ok"]]
        if spools:
            summary.append(("rows a worker SIGKILLed with unacknowledged batches lost, of the rows it built",
                            "; ".join(f"durable_spool {'on' if durable else 'off'}: {lost} of {k['rows_built']}"
                                      f"{' (its unfinished batch)' if durable else ''}"
                                      for k, lost, durable in spools)))
    if "integrity" in results:
        integrity = results["integrity"]
        ok = [o["figures"] for o in integrity.values() if o["ok"]]
        summary.append(("integrity scenarios passed (relay killed holding batches, spool gaps, trainer restart "
                        "without memory)", f"{len(ok)} of {len(integrity)}"))
        summary.append(("integrity: lost / batches stored twice / rebuilt observations differing from the env's",
                        " / ".join(str(sum(f[k] or 0 for f in ok)) for k in
                                   ("rows_lost", "batches_stored_twice", "mismatched_observations"))
                        + f" (of {sum(f['observations_checked'] for f in ok):,} observations checked)"))
    if "fuzz" in results:
        fuzz = results["fuzz"]
        tried = sum(fuzz[k]["figures"]["messages"] for k in ("relay", "ingest") if fuzz[k]["ok"])
        summary.append(("hostile messages tried (relay over sockets + trainer ingest)", tried))
        summary.append(("hostile-input checks passed", f"{sum(o['ok'] for o in fuzz.values())} of {len(fuzz)}"))
        if fuzz["relay"]["ok"]:
            summary.append(("relay crashes / uncounted messages / internal errors", "0 / 0 / 0"))
    if "load" in results and results["load"]["ok"]:
        load = results["load"]["figures"]
        summary.append((f"load: {load['workers']} fast workers, samples/s stored by the trainer",
                        f"{load['samples_per_s']:,.0f}"))
        summary.append(("load: relay peak RSS (VmHWM)", f"{load['relay_peak_rss_mib']} MiB"))
        summary.append(("load: rows lost", load["lost_rows"]))
    if "rogue" in results and results["rogue"]["ok"]:
        rogue = results["rogue"]["figures"]
        summary.append(("rogue worker among 2 honest ones: policy return without / with it",
                        f"{rogue['return_without']} / {rogue['return_with']}"))
        summary.append(("rogue worker: honest rows lost / stored twice", f"{rogue['lost']} / "
                        f"{rogue['with_rogue']['honest_rows_stored_twice']}"))
    out += ["## Summary", "", _table(summary, ("", "figure")), ""]

    if "faults" in results:
        out += ["## Faults", "",
                "The first three scenarios SIGKILL one process while a worker is sending, restart it, and check the "
                "accounting (worker summary line vs the trainer's `status.json` vs the relay's Prometheus counters), "
                "then that training goes on (more updates, a newer weights version reaching the worker). The fourth "
                "keeps the trainer away until the worker's spool and the relay's hold overflow: the oldest batches "
                "are dropped, counted and logged, and every batch is either stored or counted as dropped. The last "
                "two SIGKILL a worker that holds unacknowledged batches (no relay yet, so no ack can come), with "
                "`durable_spool` on and then off, and restart it with the same id and `state_dir`.", ""]
        for name, outcome in results["faults"].items():
            out.append(f"### {outcome.get('figures', {}).get('fault', name)}\n")
            if not outcome["ok"]:
                out.append(_failed(outcome))
                continue
            f = outcome["figures"]
            if name == "relay":
                w = f["worker"]
                rows = [("worker: rows / batches built", f"{w['rows']} / {w['batches']}"),
                        ("worker: acknowledged / resent / dropped / unacknowledged",
                         f"{w['acknowledged']} / {w['resent']} / {w['dropped']} / {w['unacknowledged']}"),
                        ("trainer: batches / rows stored", f"{f['trainer_batches']} / {f['trainer_steps']}"),
                        ("trainer: duplicates (resends, acknowledged again, not stored)", f["duplicates"]),
                        ("weights version at the fault → after", f"{f['weights_version_at_fault']} → {f['weights_version_after']}"),
                        ("rows lost", f["lost"])]
            elif name == "worker":
                first, second = f["first_life"], f["second_life"]
                rows = [("first life (killed): batches / rows stored, seqs",
                         f"{first['batches']} / {first['steps']}, {first['min_seq']}..{first['max_seq']} (contiguous)"),
                        ("restarted worker: rows / batches built, acknowledged, dropped",
                         f"{second['rows']} / {second['batches']}, {second['acknowledged']}, {second['dropped']}"),
                        ("trainer: batches / rows stored in all", f"{f['trainer_batches']} / {f['trainer_steps']}"),
                        ("highest seq stored (restart numbers from its reservation, no seq reused)", f["max_seq"]),
                        ("relay batches forwarded = trainer stored + duplicates + rejects",
                         f"{f['relay']['relay_forwarded']} = {f['relay']['trainer_counted']}"),
                        ("trainer duplicates", f["duplicates"]),
                        ("episodes the trainer counts as abandoned (the killed worker's, if it had stored part of it)", f["episodes_abandoned"]),
                        ("updates at the fault → after", f"{f['updates_at_fault']} → {f['updates_after']}"),
                        ("weights version at the fault → after", f"{f['weights_version_at_fault']} → {f['weights_version_after']}"),
                        ("batches lost after reaching the relay", f["lost_after_reaching_relay"])]
            elif name.startswith("spool "):
                k, second = f["killed"], f["second_life"]
                rows = [("killed run, from its progress file: steps + resets = rows built",
                         f"{k['steps']} + {k['resets']} = {k['rows_built']}"),
                        ("killed run: rows handed over in batches / rows of the batch it was still filling",
                         f"{k['rows_handed_over']} in {k['batches_handed_over']} / {k['rows_unfinished']}"),
                        ("spool directory at the kill (files decoded): batches / rows",
                         f"{f['batches_on_disk_at_kill']} / {f['rows_on_disk_at_kill']}"),
                        ("restarted worker: batches restored from disk and sent again", f["restored"]),
                        ("restarted worker: rows / batches built, acknowledged (restored included), dropped",
                         f"{second['rows']} / {second['batches']}, {second['acknowledged']}, {second['dropped']}"),
                        ("trainer: batches / rows stored in all", f"{f['trainer_batches']} / {f['trainer_steps']}"),
                        ("trainer: batches / rows stored from the killed run",
                         f"{f['stored_first_life_batches']} / {f['stored_first_life_rows']}"),
                        ("rows built by the killed run = stored + unfinished batch + in-memory spool",
                         f"{k['rows_built']} = {f['stored_first_life_rows']} + {f['lost_rows_unfinished_batch']} + "
                         f"{f['lost_rows_in_memory_spool']}"),
                        ("trainer duplicates (resends acknowledged again, not stored)", f["duplicates"]),
                        ("relay batches forwarded = trainer stored + duplicates + rejects",
                         f"{f['relay']['relay_forwarded']} = {f['relay']['trainer_counted']}"),
                        ("SIGSTOP tries to catch the worker part-way through a batch with its spool written",
                         f["sigstop_attempts"]),
                        ("rows lost (by design) / lost uncounted", f"{f['lost_rows']} / {f['lost_uncounted']}")]
            elif name == "trainer away":
                w = f["worker"]
                rows = [("worker (spool bound 8 batches): rows / batches built", f"{w['rows']} / {w['batches']}"),
                        ("worker: acknowledged + dropped (counted, logged) = built",
                         f"{w['acknowledged']} + {w['dropped']} = {w['acknowledged'] + w['dropped']}"),
                        ("relay (hold bound 16 KiB): batches dropped (counted, logged)", f["relay_dropped"]),
                        ("late trainer: batches / rows stored", f"{f['trainer_batches']} / {f['trainer_steps']}"),
                        ("dropped by the worker but still delivered from the relay's hold", f["dropped_but_delivered"]),
                        ("batches neither stored nor counted as dropped", f["lost_uncounted"])]
            else:
                w = f["worker"]
                rows = [("latest checkpoint on disk (updates)", f["checkpoint_updates"]),
                        ("restarted trainer resumed at updates / weights version",
                         f"{f['resumed_updates']} / {f['resumed_weights_version']}"),
                        ("updates / weights version later", f"{f['updates_after']} / {f['weights_version_after']}"),
                        ("worker: batches built / acknowledged / resent / dropped / unacknowledged",
                         f"{w['batches']} / {w['acknowledged']} / {w['resent']} / {w['dropped']} / {w['unacknowledged']}"),
                        ("new trainer stored seqs (one contiguous range, each once)",
                         f"{f['new_trainer_seq_range'][0]}..{f['new_trainer_seq_range'][1]} ({f['new_trainer_batches']} batches)"),
                        ("seqs below that range: acknowledged by the killed trainer", f["acked_by_killed_trainer"]),
                        ("new trainer duplicates (resends of batches it already stored)", f["new_trainer_duplicates"]),
                        ("batches lost", f["lost"])]
            out += [_table(rows, ("", "")), f"\n({outcome['seconds']} s)\n"]
        out += ["What a SIGKILLed worker loses: only what it alone held, its partly filled batch and spooled batches "
                "that had not reached the relay (the spool is in memory: `durable_spool` is off, the default, in every "
                "scenario but the one named so). With `durable_spool` on, the spooled batches are on disk and sent "
                "again by the restarted worker, so it loses only the batch it was still filling (and a batch handed over "
                "in the last milliseconds that the sender thread had not written yet: the kill above is timed to avoid "
                "that window, to check the rest exactly); its progress file "
                "(`state_dir/<worker_id>.progress.json`, logged by the restarted worker) says how many rows that was. "
                "What the durable spool costs per batch: [tuning.md](tuning.md#durable-spool). Everything that "
                "reached the relay is stored once. Across a trainer crash, batches the killed trainer stored but had not acknowledged are "
                "resent and stored by the new trainer; its replay memory starts empty (`save_memory` is off here), so such rows "
                "are in memory once.", ""]

    if "integrity" in results:
        out += ["## Delivery and replay integrity", "",
                "Workers run in verification mode (`verify_observations`): each row carries a digest of the full "
                "observation the env returned, and the trainer compares the observation its replay memory rebuilds "
                "for every row it can rebuild from real frames (the only ones a sampled transition ever uses). Rows "
                "after a gap or a restart cannot be rebuilt until enough real frames follow; they are stored, counted "
                "and never sampled. `lost` counts what was neither stored nor counted as dropped by a full spool (rows "
                "where one trainer ran throughout, else batches); "
                "`batches stored twice` is the trainer's batches stored minus distinct seqs stored.", ""]
        for key, outcome in results["integrity"].items():
            out.append(f"### {outcome.get('figures', {}).get('fault', key)}\n")
            if not outcome["ok"]:
                out.append(_failed(outcome))
                continue
            f = outcome["figures"]
            w = f["worker"]
            rows = [("worker: rows / batches built", f"{w['rows']} / {w['batches']}"),
                    ("worker: acknowledged / resent / dropped (full spool) / unacknowledged",
                     f"{w['acknowledged']} / {w['resent']} / {w['dropped']} / {w['unacknowledged']}"),
                    *([("relay: batches held when it was killed", f["relay_held_at_kill"])]
                      if "relay_held_at_kill" in f else []),
                    *([("trainer: batches / rows stored", f"{f['trainer_batches']} / {f['trainer_steps']}")]
                      if "trainer_batches" in f else
                      [("restarted trainer: seqs stored (contiguous) / acknowledged by the killed one",
                        f"{f['new_trainer_seq_range'][0]}..{f['new_trainer_seq_range'][1]} / below "
                        f"{f['acked_by_killed_trainer']}")]),
                    ("rows not rebuildable from real frames (never sampled) / orphan rows",
                     f"{f['rows_not_rebuildable']} / {f['orphan_rows']}"),
                    ("observations checked against the env's digest", f"{f['observations_checked']:,}"),
                    *([("worker batches dropped by its full spool but still delivered from the relay",
                        f["dropped_but_delivered"])] if "dropped_but_delivered" in f else []),
                    ("**lost / batches stored twice / observations differing**",
                     f"**{f['rows_lost']} / {f['batches_stored_twice']} / {f['mismatched_observations']}**")]
            out += [_table(rows, ("", "")), f"\n({outcome['seconds']} s)\n"]

    if "fuzz" in results:
        fuzz = results["fuzz"]
        out += ["## Hostile input", ""]
        relay = fuzz["relay"]
        out.append("### Relay, over sockets\n")
        if relay["ok"]:
            f = relay["figures"]
            out += [f"{f['messages']:,} random and mutated messages (byte flips, truncations, insertions, random "
                    "frames, wrong frame counts, envelope fields swapped: version, type, sender, timestamp; msgpack of "
                    "the wrong shape) from a registered worker and a registered trainer peer, plus a fresh hello on "
                    "both links every 250 messages. The relay process read every message "
                    f"(`tmrl_relay_received_messages_total`: workers link {f['read_per_link']['workers']:,}, trainer "
                    f"link {f['read_per_link']['trainer']:,}, exactly what was sent), "
                    f"rejected {f['rejected']:,}, forwarded {f['forwarded_batches']} batches (every one arrived at the "
                    "trainer peer; the relay reads only a batch's head, so these went on into the trainer's ingest: "
                    + ", ".join(f"{k} {v}" for k, v in f["forwarded_at_trainer_ingest"].items())
                    + f"), answered {f['errors_sent']:,} rejects "
                    f"with an `error`, had no `internal` error, stayed up and forwarded a good batch afterwards "
                    f"({f['seconds']} s for the messages).", "",
                    _table(sorted(((k.split("/")[0], k.split("/")[1], v) for k, v in f["rejects"].items())),
                           ("link", "reject reason", "count")), ""]
        else:
            out.append(_failed(relay))
        ingest = fuzz["ingest"]
        out.append("### Trainer ingest (decode, validate, dedupe, store)\n")
        if ingest["ok"]:
            f = ingest["figures"]
            out += [f"{f['messages']:,} messages (90 % mutated, 10 % valid: batches, a NaN batch, hello, heartbeat, "
                    "a misrouted ack). Each landed in exactly one bucket, and the buckets add up to the messages "
                    f"tried ({f['seconds']} s):", "",
                    _table(list(f["buckets"].items()), ("outcome", "messages")), ""]
        else:
            out.append(_failed(ingest))
        out.append("### Edge cases\n")
        rows = []
        edges, curve = fuzz["edges"], fuzz["curve"]
        if edges["ok"]:
            rows += [(case, value) for case, value in edges["figures"]["cases"].items()]
        if curve["ok"]:
            c = curve["figures"]
            rows += [("CurveZMQ key outside the allow-list: handshakes refused / messages read",
                      f"{c['intruder_handshakes_refused']} / {c['intruder_messages_read']}"),
                     ("allow-listed worker claiming another worker's id: hello + batch rejected (`unknown_sender`)",
                      c["impostor_rejects"]),
                     ("impostor batches reaching the trainer", c["impostor_batches_forwarded"])]
        out += [_table(rows, ("case", "counted")), ""]
        for name in ("edges", "curve"):
            if not fuzz[name]["ok"]:
                out.append(_failed(fuzz[name]))
        out += ["After each case the relay was still running and forwarded a good batch.", ""]

    if "load" in results:
        out += ["## Load", ""]
        outcome = results["load"]
        if outcome["ok"]:
            f = outcome["figures"]
            mode = "the trainer also running SAC updates" if f["train"] else \
                "the trainer ingesting only (no SAC updates: this measures the pipeline, not the learner)"
            out += [f"{f['workers']} workers on `sim-fast`, stepping as fast as they can, through one relay, "
                    f"{mode}, measured for {f['seconds']} s after every worker's first batch arrived. All processes "
                    "share the same cores.", "",
                    _table([("samples/s stored by the trainer", f"{f['samples_per_s']:,.0f}"),
                            ("per worker", f"{f['samples_per_s_per_worker']:,.0f}"),
                            *([("SAC updates/s", f["updates_per_s"])] if f["train"] else []),
                            ("relay peak RSS (VmHWM) / RSS at the end", f"{f['relay_peak_rss_mib']} / {f['relay_rss_mib_at_end']} MiB"),
                            ("relay CPU", f"{f['relay_cpu_percent']} % of one core"),
                            ("relay batches forwarded / dropped / rejected",
                             f"{f['relay_batches_forwarded']} / {f['relay_dropped_batches']} / {f['relay_rejects']}"),
                            ("rows built by the workers / stored by the trainer / lost",
                             f"{f['worker_rows']} / {f['trainer_rows']} / {f['lost_rows']}"),
                            ("worker batches dropped / unacknowledged at exit / resent",
                             f"{f['worker_dropped_batches']} / {f['worker_unacknowledged']} / {f['resent']}"),
                            ("trainer duplicates", f["trainer_duplicates"])], ("", "")), ""]
            if f["resent"]:
                out += [f"The {f['resent']} resends are batches whose acknowledgement took longer than the workers' "
                        "`ack_timeout_s` (10 s here): the trainer's ingest, sharing the cores with the uncapped "
                        "workers, was the bottleneck, so queues grew. Each resend was acknowledged again and counted as "
                        "a duplicate, none stored twice. On a real deployment, cap the workers' step rate or raise "
                        "`ack_timeout_s` ([tuning.md](tuning.md)).", ""]
        else:
            out.append(_failed(outcome))
    if "rogue" in results:
        out += ["## A rogue worker among honest ones", ""]
        outcome = results["rogue"]
        if outcome["ok"]:
            f = outcome["figures"]
            runs = (f["without_rogue"], f["with_rogue"])

            def row(label: str, key: str) -> tuple:
                return (label, *(run[key] for run in runs))

            out += ["Two honest workers (`sim-fast`, seeds 1 and 2) train one trainer to the same number of updates, "
                    "once alone and once beside a third worker whose env reports rewards of 3e38 and, by episode, "
                    "LIDAR or speed of 1e30: finite, so well-formed on the wire. The rogue runs with "
                    "`max_consecutive_refusals` set out of reach: a reference worker whose batches are all refused "
                    "stops by itself after 5 in a row, and a rogue would not. The policy published at that update "
                    "count is then driven deterministically on the same reset seeds. The runs are asynchronous, so "
                    "seeds do not make them repeat: three honest runs of 3000 updates on an idle machine returned "
                    "148.7, 175.0 and 228.0 (`tests/reliability/rogue.py`); the check is therefore that the run "
                    "with the rogue returns at least half of the run without it, one run each.", "",
                    _table([row("updates when the policy was taken", "updates_at_evaluation"),
                            row("deterministic return of that policy (mean of 3 episodes)", "return"),
                            row("rejected at ingest (by reason)", "rejects"),
                            row("rogue rows stored in the replay memory", "rogue_rows_stored"),
                            row("updates not applied by the learner guard", "updates_rejected"),
                            row("honest rows lost", "honest_rows_lost"),
                            row("honest rows stored twice", "honest_rows_stored_twice")],
                           ("", "without the rogue", "with the rogue")), f"\n({outcome['seconds']} s)\n"]
        else:
            out.append(_failed(outcome))
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--fuzz-count", type=int, default=10_000, help="messages per fuzz target (relay, ingest)")
    parser.add_argument("--load-workers", type=int, default=8)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--load-train", action="store_true", help="run SAC updates during the load run")
    parser.add_argument("--rogue-updates", type=int, default=3000, help="updates each rogue-scenario run trains")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"), help="markdown file, or - for stdout")
    args = parser.parse_args(argv)
    parts = args.only or list(PARTS)
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    command = " ".join(shlex.quote(str(a)) for a in [".venv/bin/python", shown,
                                                     *(argv if argv is not None else sys.argv[1:])])
    info = machine()
    results: dict = {}
    if "faults" in parts:
        results["faults"] = {"relay": run_part("relay SIGKILL + restart", relay_crash),
                             "worker": run_part("worker SIGKILL + restart", worker_crash),
                             "trainer": run_part("trainer SIGKILL + resume", trainer_crash),
                             "trainer away": run_part("trainer away, bounds overflow", trainer_absent),
                             "spool durable": run_part("worker SIGKILL holding unacknowledged batches, durable_spool on",
                                                       worker_killed_holding_unacknowledged_batches, durable_spool=True),
                             "spool in memory": run_part("worker SIGKILL holding unacknowledged batches, durable_spool off",
                                                         worker_killed_holding_unacknowledged_batches,
                                                         durable_spool=False)}
    if "integrity" in parts:
        results["integrity"] = {
            "relay": run_part("relay SIGKILLed holding batches", relay_killed_holding_batches),
            "gaps": run_part("spool overflow gaps", spool_overflow_gap),
            "trainer": run_part("trainer restart without memory", trainer_restart_without_memory)}
    if "fuzz" in parts:
        results["fuzz"] = {"relay": run_part("relay fuzz over sockets", relay_fuzz, count=args.fuzz_count),
                           "ingest": run_part("trainer ingest fuzz", ingest_fuzz, count=args.fuzz_count),
                           "edges": run_part("oversized / version / NaN", relay_edge_cases),
                           "curve": run_part("CurveZMQ intruder / impostor", curve_cases)}
    if "load" in parts:
        results["load"] = run_part(f"load: {args.load_workers} workers", load_run, workers=args.load_workers,
                                   seconds=args.load_seconds, train=args.load_train)
    if "rogue" in parts:
        results["rogue"] = run_part("rogue worker among honest ones", rogue_worker, updates=args.rogue_updates)
    text = render(results, info, command)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    outcomes = [o for group in results.values() for o in (group.values() if "ok" not in group else [group])]
    return 0 if all(o["ok"] for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
