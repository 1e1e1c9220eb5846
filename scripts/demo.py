"""``make demo``: relay + trainer + 2 workers on the simulated race track, as separate processes on loopback.

What it does, in order:

1. makes a working directory with CurveZMQ keys for the relay, the trainer and two workers, the three client keys
   in the relay's allow-list (what ``tmrl-relay keys generate`` and ``tmrl-relay keys add`` do);
2. starts ``tmrl-relay run``, ``tmrl-trainer run`` and two ``tmrl-worker run`` on free loopback ports
   (:class:`tmrl_stack.LocalStack`, the launcher the end-to-end tests and the reliability scenarios use too); workers
   drive the simulator in real time (20 Hz, rtgym) or, with ``--fast``, the synchronous simulator;
3. shows a live progress display (samples, updates, weights version each worker is running on, recent returns) read
   from the trainer's ``status.json`` and ``metrics.jsonl``;
4. after ``--minutes`` (default 5) stops everything with SIGTERM (workers first, so their last batches are stored);
5. writes ``learning_curve.png`` (episode return vs environment steps and vs time, per worker) and, when the trainer
   published a policy, ``policy_drive.gif`` / ``policy_drive.png`` (the policy driving one lap attempt).

Run ``python scripts/demo.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path

from tmrl_stack import LocalStack, StackError, raise_on_sigterm

WORKERS = ("worker-1", "worker-2")

DEMO_CONFIG = """\
# Written by scripts/demo.py: small networks and a short warm-up so learning shows within minutes on a laptop CPU.
[trainer]
env = "sim"
publish_every = 50
checkpoint_every = 2000
memory_capacity = 200000

[trainer.sac]
hidden_sizes = [128, 128]
batch_size = 128
learning_starts = 1000
utd = 2.0
n_step = 3

[worker]
batch_steps = 50
max_episode_steps = 1000
"""

FAST_WORKER_RATE = 150  # steps/s per --fast worker: leaves CPU to the trainer on small machines


class MetricsTail:
    """Reads ``metrics.jsonl`` incrementally; keeps recent returns per worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.recent: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=10))
        self.best: dict[str, float] = {}

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                handle.seek(self.offset)
                while True:
                    line = handle.readline()
                    if not line.endswith("\n"):
                        break
                    self.offset = handle.tell()
                    record = json.loads(line)
                    if record.get("kind") == "episode":
                        worker, value = record["worker"], record["return"]
                        self.recent[worker].append(value)
                        self.best[worker] = max(self.best.get(worker, value), value)
        except FileNotFoundError:
            pass

    def returns_line(self) -> str:
        """Each worker's mean return over its last 10 episodes (as acted), for the plain progress line."""
        if not self.recent:
            return "no episode finished yet"
        means = ", ".join(f"{worker} {sum(values) / len(values):.1f}" for worker, values in sorted(self.recent.items()))
        return f"mean return of the last 10 episodes (as acted): {means}"


def render_progress(status: dict, metrics: MetricsTail, elapsed: float, total: float, mode: str, dead: list[str]):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    header = Table.grid(padding=(0, 3))
    for _ in range(4):
        header.add_column()
    header.add_row(
        f"[bold]elapsed[/] {elapsed / 60:4.1f} / {total / 60:.1f} min",
        f"[bold]updates[/] {status.get('updates', 0):,}",
        f"[bold]samples[/] {status.get('samples_received', 0):,} received, {status.get('samples_stored', 0):,} stored",
        f"[bold]weights[/] version {status.get('weights_version', 0)} published",
    )
    train = status.get("metrics") or {}
    if train:
        header.add_row(f"alpha {train.get('alpha', 0):.3f}", f"critic loss {train.get('critic_loss', 0):.3f}",
                       f"Q {train.get('q_mean', 0):.2f}", f"duplicates {status.get('duplicates', 0)}, "
                       f"rejects {sum((status.get('rejects') or {}).values())}")
    table = Table(expand=True)
    table.add_column("worker", no_wrap=True, min_width=max(map(len, WORKERS)))  # never cut to "worker…"
    for column in ("batches", "env steps", "weights version", "episodes", "last return", "mean of last 10", "best"):
        table.add_column(column, justify="right")  # headers wrap on a narrow terminal, names do not
    workers = status.get("workers") or {}
    for name in WORKERS:
        w = workers.get(name, {})
        recent = metrics.recent.get(name)
        table.add_row(
            name, str(w.get("batches", 0)), f"{w.get('steps', 0):,}", str(w.get("weights_version", 0)),
            str(w.get("episodes", 0)),
            "-" if w.get("last_return") is None else f"{w['last_return']:.1f}",
            f"{sum(recent) / len(recent):.1f}" if recent else "-",
            f"{metrics.best[name]:.1f}" if name in metrics.best else "-",
        )
    parts = [header, table]
    if dead:
        parts.append(f"[red]stopped unexpectedly: {', '.join(dead)} (see the logs)[/]")
    return Panel(Group(*parts), title=f"tmrl demo: relay + trainer + 2 workers ({mode})", border_style="cyan")


def plot_learning_curve(metrics_path: Path, output: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes: dict[str, list[dict]] = defaultdict(list)
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "episode":
                episodes[record["worker"]].append(record)
    if not episodes:
        return False
    figure, (by_steps, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for worker, records in sorted(episodes.items()):
        steps = [r["worker_steps"] for r in records]
        minutes = [r["elapsed_s"] / 60 for r in records]
        returns = [r["return"] for r in records]
        window = max(1, min(10, len(returns) // 5))
        smooth = [sum(returns[max(0, i - window + 1):i + 1]) / len(returns[max(0, i - window + 1):i + 1])
                  for i in range(len(returns))]
        for axis, x in ((by_steps, steps), (by_time, minutes)):
            line, = axis.plot(x, smooth, label=f"{worker} (mean of {window})")
            axis.scatter(x, returns, s=6, alpha=0.3, color=line.get_color())
    by_steps.set_xlabel("environment steps (per worker)")
    by_time.set_xlabel("wall-clock time since the trainer started (min)")
    for axis in (by_steps, by_time):
        axis.set_ylabel("episode return")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("SAC on the simulated race track: episode return per worker, as acted (the exploring policy of "
                    "each moment)")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return True


def render_policy_drive(policy_path: Path, gif: Path, png: Path, max_steps: int = 1000,
                        attempts: int = 3, track: str | None = None) -> tuple[float, int, int] | None:
    """Drive the fast sim (``track``, default the sim's) with the exported policy (deterministic) from ``attempts``
    start positions (``tmrl-worker eval``'s core); write the best attempt as a GIF and its final frame as a PNG.
    Returns (return, steps, seed), or None when there is no policy."""
    if not policy_path.exists():
        return None
    from PIL import Image
    from tmrl_worker.evaluate import EvalConfig, evaluate

    summary = evaluate(EvalConfig(policy=policy_path, env="sim", track=track, episodes=attempts, seed=0,
                                  max_episode_steps=max_steps, gif=gif))
    with Image.open(gif) as image:
        image.seek(image.n_frames - 1)
        image.convert("RGB").save(png)
    best = summary.episodes[summary.best_episode]
    return best.episode_return, best.steps, best.seed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to train (default 5)")
    parser.add_argument("--fast", action="store_true", help=f"synchronous simulator workers ({FAST_WORKER_RATE} steps/s each) "
                                                            "instead of real time (20 steps/s)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/demo-<time>)")
    parser.add_argument("--config", type=Path, default=None, help="TOML file with [trainer]/[worker] tables to use "
                                                                  "instead of the demo's settings")
    parser.add_argument("--episode-tracks", default=None, metavar="SPEC",
                        help="a new track per episode for the workers (env_options.episode_tracks), e.g. "
                             "random:1000-100000; the final drive is then on the held-out track random:0")
    parser.add_argument("--no-display", action="store_true", help="print a progress line every 10 s instead of the live "
                        "display (the default when the output is not a terminal)")
    args = parser.parse_args()
    if not sys.stdout.isatty():  # a live display redrawn in a log file shows nothing until the end (an outside probe)
        args.no_display = True

    if args.out is not None:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = new_run_folder(Path("runs").resolve(), time.strftime("demo-%Y%m%d-%H%M%S"))
    work = Path(tempfile.mkdtemp(prefix="tmrl-demo-"))  # keys (secret halves too), config, worker state
    try:
        return run_demo(args, out, work)
    finally:  # whatever ends the demo, a second Ctrl-C included: no secret key left in the temporary folder
        shutil.rmtree(work, ignore_errors=True)


def run_demo(args: argparse.Namespace, out: Path, work: Path) -> int:
    """The demo in ``out`` with its keys, config and worker state in ``work`` (see :func:`main`)."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    config = args.config.resolve() if args.config else work / "tmrl.toml"
    if not args.config:
        config.write_text(DEMO_CONFIG)
    mode = f"--fast: synchronous sim, {FAST_WORKER_RATE} steps/s per worker" if args.fast else "real time, 20 Hz"

    from rich.console import Console

    console = Console()
    console.print(f"[bold]tmrl demo[/] ({mode}) for {args.minutes:g} min; outputs in {out}")
    run_dir = out / "trainer"
    env_name = "sim-fast" if args.fast else "sim"
    stack = LocalStack(work, config=config, curve_clients=("trainer", *WORKERS), run_dir=run_dir,
                       state_dir="worker-state", logs=logs)
    console.print(f"CurveZMQ keys in {stack.keys[0]}; allow-list {stack.keys[1]} (relay, trainer, {', '.join(WORKERS)})")
    stopped_by_user = False
    raise_on_sigterm(interrupt=True)  # `kill` stops the services as Ctrl-C does, instead of orphaning them
    # Ctrl-C too, even where the demo was started with SIGINT ignored (a job started with `&` by a script, nohup):
    # the services handle it themselves and stop, and the demo must stop them in order, not report them dead
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start_relay()
        stack.start_trainer("--env", env_name)
        for index, worker in enumerate(WORKERS):
            settings = {"TMRL_WORKER__MAX_STEPS_PER_SECOND": str(FAST_WORKER_RATE)} if args.fast else {}
            if args.episode_tracks:
                settings["TMRL_WORKER__ENV_OPTIONS__EPISODE_TRACKS"] = args.episode_tracks
            stack.start_worker(worker, "--env", env_name, "--seed", str(index), env=settings)
        metrics = MetricsTail(run_dir / "metrics.jsonl")
        total = args.minutes * 60
        started = time.monotonic()

        def frame():
            metrics.poll()
            return render_progress(stack.status(), metrics, time.monotonic() - started, total, mode, stack.dead())

        def service_died() -> str | None:
            """A line naming the services that exited on their own, or None (the demo stops on it)."""
            dead = stack.dead()
            if not dead:
                return None
            return "; ".join(f"{name} exited with code {stack.processes[name].returncode} ({stack.tail(name, 1).strip()!r}"
                             f"; the whole log: {logs / f'{name}.log'})" for name in dead)

        died = None
        try:
            if args.no_display:
                next_line = started
                while time.monotonic() - started < total and (died := service_died()) is None:
                    if time.monotonic() >= next_line:
                        status = stack.status()
                        metrics.poll()
                        # one line each, whatever the width: a log file's reader greps them (a re-check)
                        console.print(f"{(time.monotonic() - started) / 60:4.1f} min: {status.get('updates', 0)} updates, "
                                      f"{status.get('samples_received', 0)} samples, weights v{status.get('weights_version', 0)}"
                                      f"; {metrics.returns_line()}", soft_wrap=True)
                        next_line = time.monotonic() + 10  # not += 10: a slow first line (torch's import) made three at once
                    time.sleep(0.5)
            else:
                from rich.live import Live

                with Live(frame(), console=console, refresh_per_second=2) as live:
                    while time.monotonic() - started < total and (died := service_died()) is None:
                        time.sleep(0.5)
                        live.update(frame())
        except KeyboardInterrupt:
            stopped_by_user = True
            console.print("interrupted: stopping the services")
        if died is not None:
            console.print(f"[red]stopping early: {died}[/]")
        console.print("stopping workers, then trainer, then relay ...")
        codes: dict[str, int | str] = {}
        with stop_requests_said_not_raised(console):  # a second Ctrl-C must not cut the trainer's final checkpoint
            for name in (*WORKERS, "trainer", "relay"):
                try:
                    codes[name] = stack.stop(name, timeout=30.0)
                except StackError:
                    codes[name] = "killed after 30 s"
        unclean = {name: code for name, code in codes.items() if code != 0}
        if unclean:
            console.print(f"[yellow]exit codes: {unclean} (logs in {logs})[/]")
    finally:
        stack.kill_all()

    final = stack.status()
    console.print(f"trainer: {final.get('updates', 0)} updates, {final.get('samples_received', 0)} samples, "
                  f"weights version {final.get('weights_version', 0)}; per worker: "
                  + ", ".join(f"{n} {w.get('batches', 0)} batches on v{w.get('weights_version', 0)}"
                              for n, w in (final.get("workers") or {}).items()))
    curve = out / "learning_curve.png"
    if plot_learning_curve(run_dir / "metrics.jsonl", curve):
        console.print(f"learning curve: {curve}")
    else:
        console.print("[yellow]no finished episode was recorded: no learning curve[/]")
    try:
        drive = render_policy_drive(run_dir / "policy.safetensors", out / "policy_drive.gif", out / "policy_drive.png",
                                    track="random:0" if args.episode_tracks else None)
    except KeyboardInterrupt:
        console.print("interrupted: no policy animation")
        return 130
    if drive is None:
        console.print("[yellow]the trainer published no policy (warm-up not reached?): no policy animation[/]")
    else:
        console.print(f"policy drive: {out / 'policy_drive.gif'} and {out / 'policy_drive.png'} "
                      f"(the final policy, deterministic, best of 3 starts: return {drive[0]:.1f} over {drive[1]} "
                      f"steps, seed {drive[2]}; the learning curve shows the exploring policy's episodes)")
    console.print(f"trainer run (status.json, metrics.jsonl, tensorboard/, checkpoints/, policy.safetensors): {run_dir}")
    console.print(f"service logs: {logs}")
    if stopped_by_user:
        return 130
    return 1 if unclean else 0


@contextlib.contextmanager
def stop_requests_said_not_raised(console) -> Iterator[None]:
    """While the services stop in turn: Ctrl-C (and SIGTERM) print that the demo is already stopping instead of
    raising out of the stop loop, which left a traceback, no learning curve and the services killed mid-save."""
    def already_stopping(signum: int, frame: object) -> None:
        console.print("already stopping: the workers deliver, then the trainer saves its final checkpoint (each "
                      "service is killed after 30 s)")

    previous = {signum: signal.signal(signum, already_stopping) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def new_run_folder(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name-2``, ``name-3``, ... when it exists: two demos started in the same second each get
    their own (before, the second wrote its logs into the first's and its trainer was refused the run directory)."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise SystemExit(f"demo: {parent} already holds 999 folders named {name}*: pass --out")


if __name__ == "__main__":
    sys.exit(main())
