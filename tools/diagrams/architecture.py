"""Draw docs/img/architecture.png: how samples flow from workers through the relay to the trainer, and weights back.

Regenerate after changing the architecture (matplotlib only, no network):

    .venv/bin/python tools/diagrams/architecture.py            # writes docs/img/architecture.png
    .venv/bin/python tools/diagrams/architecture.py -o out.png

Socket types, default ports and thread names follow docs/architecture.md and the config defaults
(``RelayConfig.worker_port`` 5555, ``trainer_port`` 5556, ``weights_port`` 5557, ``metrics_port`` 9108).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[2] / "docs" / "img" / "architecture.png"

SAMPLES = "#1f6fb2"   # samples and acks
WEIGHTS = "#c0392b"   # weights
INTERNAL = "#555555"  # inside one process
SERVICE_FILL = {"worker": "#eaf2fb", "relay": "#f4f4f4", "trainer": "#fdf0e6"}


def box(ax, x, y, w, h, title, lines=(), fill="white", edge="#333333", title_size=10.5, text_size=8.5, bold=True,
        dashed=False):
    """A rounded box with a bold title and smaller lines under it; returns its (x, y, w, h)."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.003,rounding_size=0.012", linewidth=1.2,
                                facecolor=fill, edgecolor=edge, linestyle="--" if dashed else "-"))
    ax.text(x + 0.012, y + h - 0.012, title, ha="left", va="top", fontsize=title_size,
            fontweight="bold" if bold else "normal")
    for i, line in enumerate(lines):
        ax.text(x + 0.012, y + h - 0.045 - i * 0.026, line, ha="left", va="top", fontsize=text_size, color="#222222")
    return x, y, w, h


def label(ax, x, y, text, color, ha="center", va="center", size=8.5):
    ax.text(x, y, text, color=color, fontsize=size, ha=ha, va=va,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.9, "pad": 1.0})


def arrow(ax, start, end, color, width=1.6):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13, color=color, linewidth=width,
                                 shrinkA=1, shrinkB=1))


def draw(output: Path) -> Path:
    fig = plt.figure(figsize=(16, 9), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1.6)
    ax.set_ylim(0, 0.9)
    ax.axis("off")

    ax.text(0.8, 0.885, "tmrl: data flow between rollout workers, relay and trainer", ha="center", va="top",
            fontsize=15, fontweight="bold")
    ax.text(0.8, 0.852, "samples and acks in blue, weights in red, inside one process in grey; "
            "every message is msgpack [envelope, body] (docs/protocol.md)", ha="center", va="top", fontsize=9.5,
            color="#333333")

    # ---- workers: one drawn in detail, the others stacked behind it
    for k in (2, 1):
        ax.add_patch(FancyBboxPatch((0.02 + 0.01 * k, 0.07 - 0.01 * k), 0.45, 0.74,
                                    boxstyle="round,pad=0.003,rounding_size=0.012", facecolor=SERVICE_FILL["worker"],
                                    edgecolor="#7a9cc6", linewidth=1.0))
    box(ax, 0.02, 0.07, 0.45, 0.74, "tmrl-worker  (x N: one per game or robot)", fill=SERVICE_FILL["worker"],
        title_size=11.5)
    main_w = box(ax, 0.04, 0.55, 0.41, 0.19, "main thread: real-time loop", [
        "rtgym env: send_control, observation at start_obs_capture,",
        "elastic time step (time_step_duration, 20 Hz by default)",
        "policy inference on CPU (uniform random before weights)",
        "swaps in a newly prepared actor between two steps",
    ])
    sender = box(ax, 0.08, 0.30, 0.37, 0.16, "sender thread: DEALER", [
        "numbers batches (seq, persisted in state_dir)",
        "encodes + zlib off the hot path, spools until acked",
        "resends after ack_timeout_s or a reconnection;",
        "gets the latest weights after its hello",
    ])
    feed = box(ax, 0.08, 0.10, 0.37, 0.13, "weights thread: SUB", [
        "decodes weights_update (safetensors)",
        "builds the new actor off the hot path",
    ])
    arrow(ax, (0.25, main_w[1]), (0.25, sender[1] + sender[3]), INTERNAL)
    label(ax, 0.26, 0.505, "filled batch (every batch_steps\nsteps and at episode end)", INTERNAL, ha="left")
    ax.plot([feed[0], 0.058, 0.058], [feed[1] + 0.06, feed[1] + 0.06, 0.40], color=INTERNAL, linewidth=1.6)
    arrow(ax, (0.058, 0.40), (0.058, main_w[1]), INTERNAL)
    label(ax, 0.045, 0.24, "prepared\nactor", INTERNAL, ha="left", size=8)
    ax.text(0.245, 0.077, "env: sim, sim-fast, tm20-*, module:Class, gym:<id>", ha="center", fontsize=8.5,
            color="#333333")

    # ---- relay
    box(ax, 0.62, 0.07, 0.36, 0.74, "tmrl-relay  (no torch)", [
        "one poll loop over the three sockets; checks every",
        "envelope (version, type for the link, registered",
        "sender, size); rejects counted per reason; bounded",
        "pending batches while no trainer is connected",
    ], fill=SERVICE_FILL["relay"], title_size=11.5, text_size=8.8)
    r_trainer = box(ax, 0.64, 0.52, 0.32, 0.10, "ROUTER :5556", ["trainer_port"])
    r_workers = box(ax, 0.64, 0.32, 0.32, 0.12, "ROUTER :5555", ["worker_port"])
    r_weights = box(ax, 0.64, 0.14, 0.32, 0.12, "XPUB :5557", ["weights_port; new versions only,",
                                                               "at most one per 0.05 s"])
    box(ax, 0.64, 0.085, 0.32, 0.035, "metrics thread: HTTP :9108 /metrics", [], title_size=8.5, bold=False,
        dashed=True)
    arrow(ax, (0.74, r_workers[1] + r_workers[3]), (0.74, r_trainer[1]), SAMPLES)
    label(ax, 0.75, 0.48, "forward", SAMPLES, ha="left")
    arrow(ax, (0.88, r_trainer[1]), (0.88, r_workers[1] + r_workers[3]), SAMPLES)
    label(ax, 0.89, 0.48, "acks", SAMPLES, ha="left")

    # ---- trainer
    box(ax, 1.12, 0.07, 0.46, 0.74, "tmrl-trainer  (GPU when available)", fill=SERVICE_FILL["trainer"],
        title_size=11.5)
    ingest = box(ax, 1.14, 0.55, 0.42, 0.19, "ingest thread: DEALER", [
        "decodes, validates against the observation layout,",
        "dedupes (worker, seq), stores, acks; says hello,",
        "sends heartbeats, publishes the newest weights",
    ])
    memory = box(ax, 1.14, 0.39, 0.42, 0.09, "replay memory", ["each frame stored once; memory_capacity rows"])
    learner = box(ax, 1.14, 0.15, 0.42, 0.17, "main thread: SAC / REDQ updates", [
        "warm-up: sac.learning_starts rows",
        "at most sac.utd updates per row received",
        "publishes every publish_every updates",
    ])
    box(ax, 1.14, 0.085, 0.42, 0.035, "status thread: rewrites run_dir/status.json every status_interval_s", [],
        title_size=8.5, bold=False, dashed=True)
    arrow(ax, (1.24, ingest[1]), (1.24, memory[1] + memory[3]), INTERNAL)
    label(ax, 1.25, 0.515, "add batch", INTERNAL, ha="left")
    arrow(ax, (1.24, memory[1]), (1.24, learner[1] + learner[3]), INTERNAL)
    label(ax, 1.25, 0.355, "sample minibatch", INTERNAL, ha="left")
    arrow(ax, (1.53, learner[1] + learner[3]), (1.53, ingest[1]), WEIGHTS)
    label(ax, 1.525, 0.355, "weights\nv + 1", WEIGHTS, ha="right", size=8)

    # ---- links between processes
    arrow(ax, (sender[0] + sender[2], 0.42), (r_workers[0], 0.42), SAMPLES)
    label(ax, 0.545, 0.435, "hello, sample_batch,\nheartbeat", SAMPLES, size=8)
    arrow(ax, (r_workers[0], 0.34), (sender[0] + sender[2], 0.34), SAMPLES)
    label(ax, 0.545, 0.355, "sample_ack, error, heartbeat,\nlatest weights after hello", SAMPLES, size=8)
    arrow(ax, (r_weights[0], 0.17), (feed[0] + feed[2], 0.17), WEIGHTS)
    label(ax, 0.545, 0.19, "weights_update\n(new versions)", WEIGHTS, size=8)
    arrow(ax, (r_trainer[0] + r_trainer[2], 0.60), (ingest[0], 0.70), SAMPLES)
    label(ax, 1.05, 0.695, "sample_batch (unchanged,\nsender = worker id)", SAMPLES, size=8)
    arrow(ax, (ingest[0], 0.60), (r_trainer[0] + r_trainer[2], 0.555), SAMPLES)
    label(ax, 1.05, 0.555, "sample_ack, hello,\nheartbeat", SAMPLES, size=8)
    arrow(ax, (ingest[0], 0.565), (r_weights[0] + r_weights[2], 0.235), WEIGHTS)
    label(ax, 1.06, 0.36, "weights_update", WEIGHTS, size=8)

    ax.text(0.8, 0.015, "Every link: CurveZMQ (relay key pair + allow-list of client public keys), TCP keepalive, "
            "high-water marks, LINGER, automatic reconnection. Plain text only with --insecure.",
            ha="center", va="bottom", fontsize=9.5, color="#222222")

    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help=f"PNG to write (default: {OUTPUT})")
    print(draw(parser.parse_args().output))


if __name__ == "__main__":
    main()
