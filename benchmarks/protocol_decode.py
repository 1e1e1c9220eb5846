"""Decoding sample batches: tmrl's validated decode beside bare ``msgpack.unpackb`` of the same body, same run.

For image batches (64x64 uint8 frames) of several sizes, times:

(a) ``unpackb``: ``msgpack.unpackb(body)`` alone — parsing only, no validation, array bytes copied (the peer);
(b) ``decode (msgpack path)``: ``tmrl_common.protocol.decode`` forced through msgpack's C unpacker;
(c) ``decode (zero-copy path)``: ``decode`` forced through the zero-copy reader (arrays are views on the frame);
(d) ``decode (default)``: ``decode`` with default limits (zero-copy from 1 MiB bodies).

Each variant runs ``--repeats`` times interleaved; the best time per call is kept. Ratios are against (a).
The zero-copy reader's Python work is roughly constant, the copy grows with the body: where (c) overtakes (b) is
where ``DecodeLimits.zero_copy_min_body_bytes`` belongs.

    .venv/bin/python benchmarks/protocol_decode.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import time

import msgpack
import numpy as np
from tmrl_common.arrays import WireArray
from tmrl_common.protocol import DecodeLimits, Heartbeat, SampleBatch, decode, encode


def image_batch(rows: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    wire = WireArray.from_numpy
    batch = SampleBatch(
        seq=1, weights_version=0, first=wire(np.zeros(rows, bool)),
        observations={"speed": wire(rng.random((rows, 1), dtype=np.float32)),
                      "image": wire(rng.integers(0, 256, (rows, 64, 64), dtype=np.uint8))},
        actions=wire(rng.random((rows, 3), dtype=np.float32)), rewards=wire(rng.random(rows, dtype=np.float32)),
        terminated=wire(np.zeros(rows, bool)), truncated=wire(np.zeros(rows, bool)),
    )
    return encode(batch, "worker-1")


def best_seconds_per_call(variants: dict, calls: int, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            for _ in range(calls):
                run()
            best[name] = min(best[name], (time.perf_counter() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    msgpack_path = DecodeLimits(zero_copy_min_body_bytes=2**62)
    zero_copy_path = DecodeLimits(zero_copy_min_body_bytes=0)
    cases = [("heartbeat", encode(Heartbeat(role="worker", uptime_s=1.0, counters={"sent": 3}), "worker-1"))]
    cases += [(f"{rows} image rows", image_batch(rows)) for rows in (10, 100, 250, 1000, 4000)]
    print(f"{'message':16s} {'body':>10s}  {'unpackb':>9s}  {'msgpack path':>20s}  {'zero-copy path':>20s}  {'default':>20s}")
    for name, frames in cases:
        calls = max(10, 4_000_000 // max(len(frames[1]), 2000))
        best = best_seconds_per_call({
            "unpackb": lambda frames=frames: msgpack.unpackb(frames[1]),
            "msgpack": lambda frames=frames: decode(frames, msgpack_path),
            "zero-copy": lambda frames=frames: decode(frames, zero_copy_path),
            "default": lambda frames=frames: decode(frames),
        }, calls, args.repeats)
        peer = best["unpackb"]
        cells = [f"{best[k] * 1e6:8.1f} us ({best[k] / peer:5.2f}x)" for k in ("msgpack", "zero-copy", "default")]
        print(f"{name:16s} {len(frames[1]):>10d}  {peer * 1e6:7.1f}us  " + "  ".join(cells))


if __name__ == "__main__":
    main()
