"""What the worker's rollout machinery costs on top of the environment, same env, same run.

On the synchronous simulator (``sim-fast``), times ``--steps`` steps of:

(a) ``bare env``: ``env.step`` with uniform random actions in a plain loop (the peer);
(b) ``rollout, test mode``: :class:`RolloutLoop` with no sample sink (policy swap check every step);
(c) ``rollout, sending``: :class:`RolloutLoop` handing batches to a real :class:`RelayLink` (DEALER, zlib, spool) whose
    relay is a bare ROUTER on loopback that acknowledges every batch;
(d) ``rollout, sending + actor``: as (c), acting with a [256, 256] MLP actor on the CPU (``Actor.act``);
(e) ``rollout, sending + progress``: as (c), also rewriting the progress file after every step, as ``tmrl-worker run``
    does in sending modes (:mod:`tmrl_worker.progress`).

Each variant runs ``--repeats`` times interleaved; the best steps/s is kept. Ratios are against (a).

    .venv/bin/python benchmarks/worker_loop_overhead.py [--steps 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq
from tmrl_common.networks import PolicyArchitecture, build_actor
from tmrl_common.protocol import SampleAck, decode, encode
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig
from tmrl_worker.envs import make_env
from tmrl_worker.progress import ProgressFile
from tmrl_worker.relay_link import RelayLink
from tmrl_worker.runtime import ActorPolicy, RolloutLoop, UniformPolicy
from tmrl_worker.spool import SequenceCounter, Spool


class AckingRouter:
    """A stand-in relay + trainer on loopback: acknowledges every sample batch it receives."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self._stop = threading.Event()
        self.batches = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(20):
                continue
            routing_id, *frames = self.socket.recv_multipart()
            envelope, message = decode(frames)
            if envelope.type == "sample_batch":
                self.batches += 1
                self.socket.send_multipart([routing_id, *encode(SampleAck(worker=envelope.sender, seqs=[message.seq]), "relay")])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close(linger=0)


def bare_env(env, steps: int) -> float:
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    started = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_dim).astype(np.float32))
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - started)


def rollout(env, steps: int, link: RelayLink | None, policy, progress: ProgressFile | None = None) -> float:
    loop = RolloutLoop(env, link, None, policy, batch_steps=100, compress=True, progress=progress)
    started = time.perf_counter()
    loop.run(max_steps=steps)
    if link is not None:
        link.flush(timeout=30.0)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    env = make_env("sim-fast", max_episode_steps=1000)
    context = zmq.Context()
    router = AckingRouter(context)
    state = tempfile.mkdtemp(prefix="tmrl-bench-")
    link = RelayLink("bench", env.layout, RelayEndpoint("127.0.0.1", router.port, TransportConfig(),
                                                         SecurityConfig(insecure=True)),
                     SequenceCounter(state, "bench"), Spool(10_000, 1 << 30), context=context)
    link.start()
    link.wait_connected(10.0)
    torch.manual_seed(0)
    actor = ActorPolicy(build_actor(PolicyArchitecture.for_layout(env.layout)), version=1)
    progress = ProgressFile(Path(state) / "bench.progress.json")
    variants = {
        "bare env": lambda: bare_env(env, args.steps),
        "rollout, test mode": lambda: rollout(env, args.steps, None, UniformPolicy(env.action_dim, 0)),
        "rollout, sending": lambda: rollout(env, args.steps, link, UniformPolicy(env.action_dim, 0)),
        "rollout, sending + actor": lambda: rollout(env, args.steps, link, actor),
        "rollout, sending + progress": lambda: rollout(env, args.steps, link, UniformPolicy(env.action_dim, 0), progress),
    }
    best = {name: 0.0 for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            best[name] = max(best[name], run())
    progress.close()
    link.stop()
    router.close()
    env.close()
    context.destroy(linger=0)
    peer = best["bare env"]
    print(f"sim-fast, {args.steps} steps, best of {args.repeats}; {router.batches} batches acknowledged")
    for name, rate in best.items():
        print(f"  {name:28s} {rate:9.0f} steps/s   ratio {rate / peer:5.2f}")


if __name__ == "__main__":
    main()
