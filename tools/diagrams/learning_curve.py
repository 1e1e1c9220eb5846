"""Plot episode returns from a trainer's ``metrics.jsonl`` (one ``{"kind": "episode", ...}`` line per episode).

    .venv/bin/python tools/diagrams/learning_curve.py runs/byo-robot/metrics.jsonl -o curve.png \
        --reference random=54.1 --reference "PD controller=92.4" --title "cart on a rail"

Each worker's returns are drawn against its environment steps, with a moving average over ``--window`` episodes.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_episodes(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """Per worker: (worker steps at the episode's end, return), in file order."""
    episodes: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{metrics}:{number} is not JSON: {exc}") from exc
        if record.get("kind") == "episode":
            episodes[str(record["worker"])].append((int(record["worker_steps"]), float(record["return"])))
    if not episodes:
        raise SystemExit(f"{metrics} holds no episode records: did any worker finish an episode?")
    return episodes


def draw(metrics: Path, output: Path, title: str, window: int, references: list[tuple[str, float]]) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for worker, points in sorted(read_episodes(metrics).items()):
        steps, returns = (np.array(v) for v in zip(*points, strict=True))
        line, = ax.plot(steps, returns, ".", alpha=0.35, label=f"{worker}: episode return")
        if len(returns) >= window:
            smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=line.get_color(), linewidth=2,
                    label=f"{worker}: mean of {window} episodes")
    for name, value in references:
        ax.axhline(value, linestyle="--", linewidth=1, color="#555555")
        ax.text(ax.get_xlim()[0], value, f" {name}", va="bottom", fontsize=8.5, color="#333333")
    ax.set_xlabel("environment steps of the worker")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, metadata={"Software": None})
    plt.close(fig)
    return output


def _reference(text: str) -> tuple[str, float]:
    name, _, value = text.rpartition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--reference wants NAME=VALUE, got {text!r}")
    return name, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="the trainer's run_dir/metrics.jsonl")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="learning curve")
    parser.add_argument("--window", type=int, default=10, help="episodes in the moving average")
    parser.add_argument("--reference", type=_reference, action="append", default=[],
                        help="a horizontal line NAME=VALUE (e.g. the return of a scripted controller)")
    args = parser.parse_args()
    print(draw(args.metrics, args.output, args.title, args.window, args.reference))


if __name__ == "__main__":
    main()
