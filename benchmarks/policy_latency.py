"""Single-observation policy latency: the ONNX export run by onnxruntime beside torch, same actor, same run.

For the MLP actor (the simulator's LIDAR layout, [256, 256]) and the CNN actor (the image layout: 4 × 64 × 64
uint8 frames, 4 convolutions, [256, 256]), times one deterministic action for one observation:

(a) ``torch``: ``Actor.act(observation, deterministic=True)``, what the worker calls every step (numpy in, numpy out,
    1 torch thread like ``tmrl-worker run``);
(b) ``onnxruntime``: ``InferenceSession.run`` on the file ``tmrl-trainer export --onnx`` writes, batch of 1,
    1 intra-op thread, the inputs fed as numpy arrays.

The two alternate in ``--repeats`` blocks of ``--calls`` calls on the same observations; the median of each block is
kept and the best block reported (milliseconds), with the ratio torch / onnxruntime (> 1: onnxruntime is faster).
The largest difference between the two actions is printed too.

    .venv/bin/python benchmarks/policy_latency.py [--calls 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tmrl_common.layout import tm20_image_layout, tm20_lidar_layout
from tmrl_common.networks import PolicyArchitecture, build_actor
from tmrl_trainer.policy_export import OUTPUT_NAME, export_onnx, input_names, random_observations


def block_median_ms(call, observations: list, calls: int) -> float:
    times = []
    for i in range(calls):
        observation = observations[i % len(observations)]
        start = time.perf_counter()
        call(observation)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, layout, calls: int, repeats: int, folder: Path) -> None:
    torch.manual_seed(0)
    actor = build_actor(PolicyArchitecture.for_layout(layout)).eval()
    path = export_onnx(actor, folder / f"{name}.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = input_names(layout)
    batch = random_observations(layout, 16, np.random.default_rng(1))
    observations = [[part[i] for part in batch] for i in range(16)]  # unbatched tuples, as an env returns them
    feeds = [{n: part[None] for n, part in zip(names, o, strict=True)} for o in observations]

    def torch_call(observation):
        return actor.act(observation, deterministic=True)

    def onnx_call(index_feed):
        return session.run([OUTPUT_NAME], index_feed)[0][0]

    difference = max(float(np.abs(torch_call(o) - onnx_call(f)).max()) for o, f in zip(observations, feeds, strict=True))
    torch_ms, onnx_ms = [], []
    for _ in range(repeats):
        torch_ms.append(block_median_ms(torch_call, observations, calls))
        onnx_ms.append(block_median_ms(onnx_call, feeds, calls))
    best_torch, best_onnx = min(torch_ms), min(onnx_ms)
    print(f"{name:4s} {actor.architecture.kind}: torch {best_torch:7.3f} ms   onnxruntime {best_onnx:7.3f} ms   "
          f"ratio {best_torch / best_onnx:5.2f}x   largest |difference| {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per block")
    parser.add_argument("--repeats", type=int, default=5, help="alternating blocks per side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, 1 thread each; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        for name, layout in (("lidar", tm20_lidar_layout()), ("image", tm20_image_layout())):
            measure(name, layout, args.calls, args.repeats, Path(folder))


if __name__ == "__main__":
    main()
