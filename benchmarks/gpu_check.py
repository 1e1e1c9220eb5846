"""The GPU check of issue 16, in one run: tmrl's learner beside Stable-Baselines3's SAC on the same GPU, and the
trainer service fed by 8 simulator workers.

Prints, on one CUDA device:

1. SAC updates/s (sampling included on both sides) at batch 256 and 1024 for the MLP (obs 83, act 3, [256, 256]) and
   the CNN (4 x 64 x 64 uint8 frames, convolutions [16, 32, 64, 64], [256, 256]): tmrl through ``make_learner``
   (``auto``: the ``cuda-graph`` backend on CUDA), its batch sampled on the host and copied in, and drawn on the
   device from a :class:`~tmrl_trainer.device_replay.DeviceReplay` mirror inside the CUDA graph; SB3's ``SAC.train``
   with the same nets and batch; and the ratios (target: at least 5x at batch 256 for the MLP);
2. the trainer service's updates/s on the GPU while 8 ``sim-fast`` workers feed it through the relay (real processes,
   :class:`tmrl_stack.LocalStack`; ``sac.sampling`` ``auto``, so on CUDA it samples from its device mirror);
3. the peak GPU memory allocated by this process's learners (the service runs in its own process).

    python3 benchmarks/gpu_check.py                 # on a CUDA machine (see benchmarks/gpu_check.sh)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --nets mlp   # the script itself, on any machine

It stops at once, with exit status 2, when ``--device cuda`` is asked for and torch sees no CUDA device. The CNN
sides differ in one respect: tmrl's layout adds speed and the two previous actions to the frames, and each of its
critics has its own CNN, while SB3's two critics share one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationLayout, tm20_image_layout, tm20_lidar_layout
from tmrl_trainer.device_replay import DeviceReplay
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import SACConfig

HIDDEN = [256, 256]
CONV = [16, 32, 64, 64]
SERVICE_CONFIG = """\
# written by benchmarks/gpu_check.py: the service's update rate, not learning; utd high so data does not cap it
[trainer]
env = "sim-fast"
publish_every = 200
checkpoint_every = 1000000
memory_capacity = 200000

[trainer.sac]
hidden_sizes = [256, 256]
batch_size = 256
learning_starts = 2000
utd = 64.0

[worker]
batch_steps = 100
"""


def _layouts() -> dict[str, ObservationLayout]:
    return {"mlp": tm20_lidar_layout(), "cnn": tm20_image_layout(img_hist_len=4, height=64, width=64)}


def filled_memory(layout: ObservationLayout, rows: int, seed: int = 0) -> ReplayMemory:
    """A replay memory holding ``rows`` random steps in 1000-step episodes."""
    rng = np.random.default_rng(seed)
    memory = ReplayMemory(layout, capacity=rows + 10, seed=seed)
    builder = SampleBatchBuilder(layout)
    shapes = layout.observation_shapes()
    dtypes = [c.dtype for c in layout.components] + ["float32"] * layout.action_history

    def observation() -> tuple[np.ndarray, ...]:
        return tuple(rng.integers(0, 256, shape, dtype=np.uint8) if dtype == "uint8"
                     else rng.uniform(-1, 1, shape).astype(np.float32) for shape, dtype in zip(shapes, dtypes, strict=True))

    builder.add_reset(observation())
    for step in range(rows - 1):
        done = step % 1000 == 999
        builder.add_step(rng.uniform(-1, 1, layout.action_dim), observation(), float(rng.normal()), False, done)
        if done:
            builder.add_reset(observation())
        if len(builder) >= 500:
            memory.add_batch("bench", builder.build(seq=step, weights_version=0))
    memory.add_batch("bench", builder.build(seq=rows, weights_version=0))
    return memory


def tmrl_block(net: str, batch: int, device: torch.device, memory: ReplayMemory, sampling: str,
               backend: str = "auto") -> Callable[[int], None]:
    """tmrl's updates through ``make_learner`` (``backend``), the batch sampled on the host (``sampling="host"``:
    ``ReplayMemory.sample``, copied in) or on the device (``"device"``: a ``DeviceReplay`` mirror, drawn inside the
    CUDA graph)."""
    layout = _layouts()[net]
    config = SACConfig(batch_size=batch, hidden_sizes=HIDDEN, conv_channels=CONV)
    learner = make_learner(config, config.architecture(layout), device=device, seed=0, backend=backend)
    if sampling == "device":
        replay = DeviceReplay(memory, device)
        replay.sync()
        if not replay.ready():
            raise RuntimeError("the device mirror holds no sampleable transition")

        def block(updates: int) -> None:
            for _ in range(updates - 1):
                learner.update_sampled(replay, with_metrics=False)
            learner.update_sampled(replay)  # metrics once per block: one synchronisation

        return block

    def block(updates: int) -> None:
        for _ in range(updates - 1):
            learner.update(memory.sample(batch).to(device), with_metrics=False)
        learner.update(memory.sample(batch).to(device))  # metrics once per block: one synchronisation

    return block


def sb3_block(net: str, batch: int, device: torch.device, rows: int) -> Callable[[int], None]:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    shape, dtype, low, high = ((83,), np.float32, -np.inf, np.inf) if net == "mlp" else ((4, 64, 64), np.uint8, 0, 255)

    class _Env(gym.Env):
        observation_space = gym.spaces.Box(low, high, shape, dtype)
        action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

        def reset(self, *, seed=None, options=None):
            return np.zeros(shape, dtype), {}

        def step(self, action):
            return np.zeros(shape, dtype), 0.0, False, False, {}

    class _Convolutions(BaseFeaturesExtractor):
        """tmrl's CNN: 4x4 stride-2 convolutions with ReLU, flattened (SB3 scales uint8 images to [0, 1] itself)."""

        def __init__(self, observation_space: gym.spaces.Box) -> None:
            layers, channels, size = [], observation_space.shape[0], observation_space.shape[1]
            for out in CONV:
                layers += [torch.nn.Conv2d(channels, out, 4, stride=2), torch.nn.ReLU()]
                channels, size = out, (size - 4) // 2 + 1
            super().__init__(observation_space, features_dim=channels * size * size)
            self.cnn = torch.nn.Sequential(*layers, torch.nn.Flatten())

        def forward(self, observations: torch.Tensor) -> torch.Tensor:
            return self.cnn(observations)

    policy_kwargs: dict = {"net_arch": HIDDEN}
    if net == "cnn":
        policy_kwargs["features_extractor_class"] = _Convolutions
    model = SAC("MlpPolicy" if net == "mlp" else "CnnPolicy", _Env(), batch_size=batch, learning_starts=0,
                buffer_size=rows + 10, policy_kwargs=policy_kwargs, device=device, seed=0)
    model.set_logger(Logger(folder=None, output_formats=[]))
    rng = np.random.default_rng(0)
    for step in range(rows):
        observation = (rng.random((1, *shape), dtype=np.float32) if net == "mlp"
                       else rng.integers(0, 256, (1, *shape), dtype=np.uint8))
        model.replay_buffer.add(observation, observation, rng.uniform(-1, 1, (1, 3)).astype(np.float32),
                                np.array([rng.normal()]), np.array([step % 1000 == 999]), [{}])

    def block(updates: int) -> None:
        model.train(gradient_steps=updates, batch_size=batch)

    return block


def _failed(what: str, errors: dict[str, str], name: str) -> None:
    """Record and print the error of one side: the other sides' figures still come (a GPU run is short and rare)."""
    errors[name] = traceback.format_exc()
    print(f"  {what} failed:\n{errors[name]}", file=sys.stderr, flush=True)


def best_rate(builders: dict[str, Callable[[], Callable[[int], None]]], updates: int, repeats: int,
              device: torch.device, errors: dict[str, str]) -> dict[str, float]:
    """Best updates/s of each side over ``repeats`` timed blocks, the sides taking turns; a side that fails to build
    or to run is left out, its traceback in ``errors``."""
    blocks: dict[str, Callable[[int], None]] = {}
    for name, build in builders.items():
        try:
            blocks[name] = build()
            blocks[name](20)  # warm-up (and, for tmrl on CUDA, the graph's recording)
        except Exception:
            blocks.pop(name, None)
            _failed(name, errors, name)
    best = dict.fromkeys(blocks, 0.0)
    for _ in range(repeats):
        for name, block in list(blocks.items()):
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                block(updates)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception:
                del blocks[name], best[name]
                _failed(name, errors, name)
                continue
            best[name] = max(best[name], updates / (time.perf_counter() - started))
    return best


def service_rate(device: torch.device, workers: int, seconds: float) -> tuple[float, int]:
    """(updates/s, samples received) of ``tmrl-trainer run`` on ``device`` fed by ``workers`` sim-fast workers,
    measured from its ``status.json`` over ``seconds`` once its warm-up is over."""
    from tmrl_stack import LocalStack, wait_until

    root = Path(tempfile.mkdtemp(prefix="tmrl-gpu-check-"))
    config = root / "tmrl.toml"
    config.write_text(SERVICE_CONFIG)
    with LocalStack(root, config=config) as stack:
        stack.start_relay()
        stack.start_trainer("--device", str(device))
        for index in range(workers):
            stack.start_worker(f"w{index}", "--env", "sim-fast", "--seed", str(index))
        names = ["relay", "trainer", *[f"w{index}" for index in range(workers)]]
        wait_until(lambda: stack.status().get("updates", 0) > 0, 180.0, stack, "the trainer's first update", *names)
        first, started = stack.status()["updates"], time.monotonic()
        time.sleep(seconds)
        status = stack.status()
        rate = (status["updates"] - first) / (time.monotonic() - started)
        return rate, int(status.get("samples_received", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (to try the script itself)")
    parser.add_argument("--quick", action="store_true", help="small blocks, batch 256 only, a short service run")
    parser.add_argument("--no-service", action="store_true", help="skip the trainer service with 8 workers")
    parser.add_argument("--no-sb3", action="store_true", help="skip Stable-Baselines3 (when it is not installed)")
    parser.add_argument("--nets", default="mlp,cnn", help="comma-separated nets to time [mlp,cnn] (the CNN at batch "
                        "256 takes minutes on a CPU)")
    parser.add_argument("--service-seconds", type=float, default=None, help="how long the service's rate is measured, "
                        "after its first update (default 30; 10 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file (after "
                        "each row, so that a run stopped midway keeps what it measured)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); run it on "
              "a CUDA machine (benchmarks/gpu_check.sh), or with --device cpu --quick to try the script itself",
              file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    updates, repeats = (20, 2) if args.quick else (300, 3)
    rows = {"mlp": 2_000 if args.quick else 20_000, "cnn": 1_500 if args.quick else 5_000}
    batches = [256] if args.quick else [256, 1024]
    print(f"gpu_check on {card}: torch {torch.__version__}; best of {repeats} alternating blocks of {updates} updates, "
          "sampling included")
    results: dict = {"device": card, "torch": torch.__version__, "learner": [], "errors": {}}
    errors: dict[str, str] = results["errors"]

    def save() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print("  tmrl host: batch sampled on the host and copied in; tmrl device: drawn from the DeviceReplay mirror "
          "(inside the CUDA graph on CUDA); reference: the plain-PyTorch update, eager, host-sampled")
    sides = ["tmrl host", "tmrl device", "reference"] + ([] if args.no_sb3 else ["sb3"])
    print(f"  {'net':<4} {'batch':>5} {'tmrl host':>10} {'tmrl device':>12} {'reference':>10} {'sb3 upd/s':>10} "
          f"{'host/sb3':>9} {'device/sb3':>11}", flush=True)
    for net in args.nets.split(","):
        memory = filled_memory(_layouts()[net], rows[net])
        for batch in batches:
            builders = {"tmrl host": partial(tmrl_block, net, batch, device, memory, "host"),
                        "tmrl device": partial(tmrl_block, net, batch, device, memory, "device"),
                        "reference": partial(tmrl_block, net, batch, device, memory, "host", backend="reference")}
            if not args.no_sb3:
                builders["sb3"] = partial(sb3_block, net, batch, device, rows[net])
            row_errors: dict[str, str] = {}
            rate = best_rate(builders, updates, repeats, device, row_errors)
            errors.update({f"{net} {batch} {name}": text for name, text in row_errors.items()})
            figures = {side: rate.get(side, float("nan")) for side in sides}
            sb3 = figures.get("sb3", float("nan"))
            ratio = {side: "-" if args.no_sb3 else f"{figures[side] / sb3:.2f}x" for side in sides}
            print(f"  {net:<4} {batch:>5} {figures['tmrl host']:10.1f} {figures['tmrl device']:12.1f} "
                  f"{figures['reference']:10.1f} {sb3:10.1f} {ratio['tmrl host']:>9} {ratio['tmrl device']:>11}",
                  flush=True)
            results["learner"].append({"net": net, "batch": batch, "tmrl_host_sampled": figures["tmrl host"],
                                       "tmrl_device_sampled": figures["tmrl device"],
                                       "reference_eager": figures["reference"], "sb3": sb3})
            save()
    if device.type == "cuda":
        results["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"  peak GPU memory of these learners: {results['peak_memory_mib']:.0f} MiB")
    if not args.no_service:
        seconds = args.service_seconds if args.service_seconds is not None else 10.0 if args.quick else 30.0
        try:
            rate, samples = service_rate(device, workers=8, seconds=seconds)
            results["service"] = {"updates_per_s": rate, "samples_received": samples, "workers": 8, "seconds": seconds}
            print(f"  trainer service on {card}, 8 sim-fast workers: {rate:.1f} updates/s over {seconds:.0f} s "
                  f"({samples} samples received)")
        except Exception:
            _failed("the trainer service", errors, "service")
    save()
    if errors:
        print(f"gpu_check: {len(errors)} part(s) failed: {', '.join(errors)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
