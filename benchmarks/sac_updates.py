"""SAC gradient updates per second on CPU: tmrl's learner versus Stable-Baselines3's SAC, measured in the same run.

Both sides: batch 256, 83-dimensional observations (TrackMania LIDAR layout: speed, 4 x 19 LIDAR, 2 previous actions),
3-dimensional actions, [256, 256] actor and twin critics, learned entropy coefficient, polyak targets, the same
number of torch threads, a replay memory pre-filled with 20,000 random steps, and each update includes sampling
its batch from that memory (SB3's ``train()`` does too). tmrl stores newest frames only and rebuilds the LIDAR
history at sampling time.

    .venv/bin/python benchmarks/sac_updates.py [--updates 200] [--threads 1,N] [--repeats 5] [--backend auto]
        [--sampling host] [--profile]

tmrl's learner is built through the trainer's seam, ``make_learner`` (``--backend``: ``auto`` is ``cpu-fast`` on
CPU; ``reference`` times the plain PyTorch update the fast backends are tested against).

By default both sides are measured at 1 torch thread and then at torch's default thread count ``N`` (the number of
physical cores, what either library uses unless told otherwise).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, get_args

import gymnasium as gym
import numpy as np
import torch
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import tm20_lidar_layout
from tmrl_trainer.device_replay import DeviceReplay
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import Backend, SACConfig, UpdateOrder

BATCH = 256
HIDDEN = [256, 256]
PREFILL = 20_000
DEFAULT_ORDER = SACConfig.model_fields["update_order"].default
"""The update order tmrl trains in unless told otherwise (the one measured by default)."""


def tmrl_memory_and_learner(seed: int = 0, backend: str = "auto", update_order: str = DEFAULT_ORDER) -> tuple[ReplayMemory, Any]:
    """A replay memory pre-filled with :data:`PREFILL` random steps, and tmrl's learner from ``make_learner``."""
    layout = tm20_lidar_layout()
    rng = np.random.default_rng(seed)
    memory = ReplayMemory(layout, capacity=PREFILL + 10, seed=seed)
    builder = SampleBatchBuilder(layout)

    def observation():
        return (rng.random(1, dtype=np.float32), rng.random((4, 19), dtype=np.float32),
                rng.uniform(-1, 1, 3).astype(np.float32), rng.uniform(-1, 1, 3).astype(np.float32))

    builder.add_reset(observation())
    seq = 0
    for step in range(PREFILL - 1):
        done = step % 1000 == 999
        builder.add_step(rng.uniform(-1, 1, 3), observation(), float(rng.normal()), False, done)
        if done:
            builder.add_reset(observation())
        if len(builder) >= 1000:
            memory.add_batch("bench", builder.build(seq=seq, weights_version=0))
            seq += 1  # consecutive: the memory links batch seq to batch seq - 1
    memory.add_batch("bench", builder.build(seq=seq, weights_version=0))
    config = SACConfig(batch_size=BATCH, hidden_sizes=HIDDEN, update_order=update_order)
    return memory, make_learner(config, config.architecture(layout), device="cpu", seed=seed, backend=backend)


def tmrl_update_block(seed: int = 0, backend: str = "auto", sampling: str = "host",
                      update_order: str = DEFAULT_ORDER) -> Callable[[int], None]:
    """A function running ``n`` tmrl updates (sampling included) on a pre-filled memory, sampled by the memory
    (``sampling="host"``, what the trainer does on CPU) or drawn from its ``DeviceReplay`` mirror on the CPU
    (``"device"``, the GPU path's sampler run here)."""
    memory, learner = tmrl_memory_and_learner(seed, backend, update_order)
    if sampling == "device":
        replay = DeviceReplay(memory, "cpu", seed=seed)
        replay.sync()

        def block_on_mirror(updates: int) -> None:
            for _ in range(updates - 1):
                learner.update_sampled(replay, with_metrics=False)
            learner.update_sampled(replay)

        return block_on_mirror

    def block(updates: int) -> None:
        for _ in range(updates - 1):
            learner.update(memory.sample(BATCH), with_metrics=False)
        learner.update(memory.sample(BATCH))  # metrics once per block, as a trainer's logging loop would

    return block


class _Box83(gym.Env):
    observation_space = gym.spaces.Box(-np.inf, np.inf, (83,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros(83, np.float32), {}

    def step(self, action):
        return np.zeros(83, np.float32), 0.0, False, False, {}


def sb3_update_block(seed: int = 0) -> Callable[[int], None]:
    """A function running ``n`` gradient steps of SB3's ``SAC.train`` (sampling included) on a pre-filled buffer."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.logger import Logger

    model = SAC("MlpPolicy", _Box83(), batch_size=BATCH, learning_starts=0, buffer_size=PREFILL + 10,
                policy_kwargs={"net_arch": HIDDEN}, device="cpu", seed=seed)
    model.set_logger(Logger(folder=None, output_formats=[]))
    rng = np.random.default_rng(seed)
    for step in range(PREFILL):
        model.replay_buffer.add(rng.random((1, 83), dtype=np.float32), rng.random((1, 83), dtype=np.float32),
                                rng.uniform(-1, 1, (1, 3)).astype(np.float32), np.array([rng.normal()]),
                                np.array([step % 1000 == 999]), [{}])

    def block(updates: int) -> None:
        model.train(gradient_steps=updates, batch_size=BATCH)

    return block


def measure(blocks: dict[str, Callable[[int], None]], updates: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU-time) updates/s of each side over ``repeats`` blocks, the sides taking turns so that a change
    in machine load hits both. CPU time (``time.process_time``) is the steadier figure on a shared machine."""
    best = {name: (0.0, 0.0) for name in blocks}
    for name, block in blocks.items():
        start = time.perf_counter()
        block(20)  # warm-up (the cpu-compiled backend compiles here)
        print(f"  {name}: warm-up of 20 updates {time.perf_counter() - start:.1f} s")
    for _ in range(repeats):
        for name, block in blocks.items():
            wall, cpu = time.perf_counter(), time.process_time()
            block(updates)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (max(best[name][0], updates / wall), max(best[name][1], updates / cpu))
    return best


def profile_tmrl(backend: str, updates: int, repeats: int) -> None:
    """Where a tmrl update's time goes at the current thread count: CPU time per call (best of ``repeats`` blocks) of
    sampling alone, of the update on one fixed batch, of both in turn, and of the mirror's sampling; then the
    operators taking the most CPU time (``torch.profiler``, self time) over ``updates`` updates with sampling; then
    the matrix products' FLOPs and time per update on both sides (:func:`matrix_product_cost`)."""
    from torch.profiler import ProfilerActivity, profile

    memory, learner = tmrl_memory_and_learner(backend=backend)
    replay = DeviceReplay(memory, "cpu")
    replay.sync()
    fixed = memory.sample(BATCH)
    parts: dict[str, tuple[Callable[[], Any], int]] = {
        "host sampling alone (ReplayMemory.sample)": (lambda: memory.sample(BATCH), 10 * updates),
        "mirror sampling alone (DeviceReplay.sample)": (lambda: replay.sample(BATCH), 10 * updates),
        "update on one fixed batch": (lambda: learner.update(fixed, with_metrics=False), updates),
        "host sampling + update": (lambda: learner.update(memory.sample(BATCH), with_metrics=False), updates),
    }
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(repeats):
        for name, (call, calls) in parts.items():
            started = time.process_time()
            for _ in range(calls):
                call()
            best[name] = min(best[name], (time.process_time() - started) / calls)
    print(f"  profile of tmrl ({backend!r}, {torch.get_num_threads()} thread(s)), CPU ms per call, best of {repeats}:")
    for name, seconds in best.items():
        print(f"    {name:<45} {seconds * 1e3:8.3f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(updates):
            learner.update(memory.sample(BATCH), with_metrics=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    sb3_block = sb3_update_block()
    sb3_block(20)  # warm-up
    sides = {"tmrl": lambda: [learner.update(memory.sample(BATCH), with_metrics=False) for _ in range(updates)],
             "stable-baselines3": lambda: sb3_block(updates)}
    print(f"  matrix products per update (torch.profiler's FLOP count and self CPU time, {updates} updates):")
    for name, run in sides.items():
        megaflops, milliseconds = matrix_product_cost(run, updates)
        print(f"    {name:<20} {megaflops:8.1f} MFLOP in {milliseconds:6.2f} ms ({megaflops / milliseconds:5.1f} GFLOP/s)")


MATRIX_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm_")


def matrix_product_cost(run: Callable[[], Any], updates: int) -> tuple[float, float]:
    """(MFLOP, self CPU milliseconds) of the matrix-product operators per update while ``run()`` does ``updates``
    updates: the work an exact SAC update cannot skip, and how fast this CPU does it in place."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        run()
    events = [event for event in prof.key_averages() if event.key in MATRIX_PRODUCTS]
    flops = sum(event.flops for event in events)
    return flops / updates / 1e6, sum(event.self_cpu_time_total for event in events) / updates / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200, help="updates per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per side (best is reported)")
    default_threads = torch.get_num_threads()
    parser.add_argument("--threads", default=",".join(dict.fromkeys(["1", str(default_threads)])),
                        help="comma-separated torch thread counts, each measured for both sides "
                             f"[1 and torch's default here, {default_threads}]")
    parser.add_argument("--backend", default="auto",
                        help="tmrl learner backend (make_learner), or several, comma-separated, each raced as its own "
                             f"side: {', '.join(get_args(Backend))} [auto: cpu-fast on CPU]")
    parser.add_argument("--sampling", default="host", choices=["host", "device"],
                        help="tmrl's sampler: the replay memory's [host], or its DeviceReplay mirror on the CPU")
    parser.add_argument("--profile", action="store_true", help="profile instead of racing: tmrl's sampling against its "
                        "update (CPU time), torch.profiler's top operators, then both sides' matrix-product FLOPs and "
                        "time per update, at each thread count")
    parser.add_argument("--update-order", default=DEFAULT_ORDER, choices=[*get_args(UpdateOrder), "both"],
                        help=f"tmrl's SACConfig.update_order [{DEFAULT_ORDER}]; both: tmrl in each order and SB3, "
                             "alternating in one process")
    args = parser.parse_args()
    backends = args.backend.split(",")
    if unknown := [backend for backend in backends if backend not in get_args(Backend)]:
        parser.error(f"unknown backend {', '.join(unknown)} (choose from {', '.join(get_args(Backend))})")
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.profile:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for backend in backends:
                profile_tmrl(backend, args.updates, args.repeats)
        return
    orders = list(get_args(UpdateOrder)) if args.update_order == "both" else [args.update_order]
    sides = {" ".join(["tmrl", *([backend] if len(backends) > 1 else []), *([order] if len(orders) > 1 else [])]):
             (backend, order) for backend in backends for order in orders}
    blocks = {side: tmrl_update_block(backend=backend, sampling=args.sampling, update_order=order)
              for side, (backend, order) in sides.items()}
    blocks["stable-baselines3"] = sb3_update_block()
    print(f"SAC updates/s on CPU, tmrl backend {' and '.join(map(repr, backends))}, {args.sampling} sampling, update order "
          f"{' and '.join(map(repr, orders))} (batch {BATCH}, obs 83, act 3, nets {HIDDEN}, best of {args.repeats} alternating "
          f"blocks of {args.updates} updates, sampling included; both sides on the same torch thread count)")
    print(f"  {'threads':>7} {'side':<20} {'wall clock':>12} {'CPU time':>12}")
    ratios = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        rates = measure(blocks, args.updates, args.repeats)
        for name, (wall, cpu) in rates.items():
            print(f"  {threads:>7} {name:<20} {wall:12.1f} {cpu:12.1f}")
        peer_wall, peer_cpu = rates["stable-baselines3"]
        for side in sides:
            ours_wall, ours_cpu = rates[side]
            ratios.append((threads, side, ours_wall / peer_wall, ours_cpu / peer_cpu))
    for threads, side, wall, cpu in ratios:
        default = " (torch's default)" if threads == default_threads else ""
        print(f"  ratio {side} / sb3 at {threads} thread(s){default}: {wall:.2f}x wall clock, {cpu:.2f}x CPU time "
              "(target >= 1.5x)")


if __name__ == "__main__":
    main()
