"""Relay throughput and weight-broadcast latency, each beside peers measured in the same run on the same machine.

Throughput, for sample batches of 64 KiB and 1 MiB (two frames per message, ``[envelope, body]``, as tmrl sends them):

(a) ``direct``: raw pyzmq PUSH → PULL, no broker;
(b) ``zmq.proxy``: PUSH → [PULL ⇄ PUSH ``zmq.proxy`` in its own process] → PULL, a broker that checks nothing;
(c) ``tmrl-relay``: DEALER worker → ``tmrl-relay run --insecure`` (a real subprocess) → DEALER trainer, with real
    protocol frames (``hello`` first, then ``sample_batch`` messages), every envelope checked, sender checked,
    batch head read, counters updated;
(c') the same relay with CurveZMQ on (encryption and authentication), for information.

Sender, broker and receiver are separate processes; the receiver times first to last message. Each variant runs
``--repeats`` times interleaved, and the median is reported. The bar is relay ≥ 0.9 × zmq.proxy (plain text).

Weight broadcast: a 4 MiB ``weights_update`` (safetensors bytes, sha256) sent by a trainer DEALER to the relay, which
verifies it and publishes it to 4 SUB workers (separate processes); latency is the time from the trainer's send
to each worker's receipt of the frames. Peer: the same message PUB → 4 SUB directly.

    .venv/bin/python benchmarks/relay_throughput.py [--repeats 5] [--seconds 1.5] [--publications 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from tmrl_common.arrays import WireArray
from tmrl_common.protocol import Hello, SampleBatch, WeightsUpdate, decode_envelope, encode, encode_envelope
from tmrl_common.weights import tensors_to_bytes

SIZES = {"64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}
LOOPBACK = "tcp://127.0.0.1"
READY_TIMEOUT_S = 30


# ------------------------------------------------------------------------------------------------------ payloads


def batch_frames(body_bytes: int, sender: str = "worker-1") -> list[bytes]:
    """A real ``sample_batch`` message whose body is about ``body_bytes`` long."""
    steps = 16
    width = max(1, (body_bytes - 400) // steps)
    rng = np.random.default_rng(0)
    batch = SampleBatch(
        seq=0, weights_version=0,
        first=WireArray.from_numpy(np.zeros(steps, dtype=bool)),
        observations={"lidar": WireArray.from_numpy(rng.integers(0, 255, size=(steps, width), dtype=np.uint8))},
        actions=WireArray.from_numpy(np.zeros((steps, 3), dtype=np.float32)),
        rewards=WireArray.from_numpy(np.zeros(steps, dtype=np.float32)),
        terminated=WireArray.from_numpy(np.zeros(steps, dtype=bool)),
        truncated=WireArray.from_numpy(np.zeros(steps, dtype=bool)),
    )
    return encode(batch, sender)


def weights_frames(nbytes: int, version: int) -> list[bytes]:
    tensors = {"policy": np.random.default_rng(version).normal(size=nbytes // 4).astype(np.float32)}
    update = WeightsUpdate.build(version=version, architecture={"kind": "benchmark"}, tensors=tensors_to_bytes(tensors))
    return encode(update, "trainer-1")


# --------------------------------------------------------------------------------------------- process bodies


def _send_loop(kind: int, endpoint: str, body_bytes: int, duration_s: float, hello: bool, security: dict | None) -> None:
    context = zmq.Context()
    socket = context.socket(kind)
    socket.linger = 5000
    if security:
        _client_keys(socket, security)
    socket.connect(endpoint)
    frames = batch_frames(body_bytes)
    if hello:
        socket.send_multipart(encode(Hello(role="worker", software="bench"), "worker-1"))
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        for _ in range(64):
            socket.send_multipart(frames, copy=False)
    socket.send_multipart([b"STOP", b""])  # relays reject this (counted), proxies pass it; receivers stop on timeout
    socket.close()
    context.term()


def _receive_loop(kind: int, endpoint: str, hello: bool, security: dict | None, ready, results, bind: bool = False) -> None:
    context = zmq.Context()
    socket = context.socket(kind)
    socket.linger = 0
    if security:
        _client_keys(socket, security)
    socket.bind(endpoint) if bind else socket.connect(endpoint)
    if hello:
        socket.send_multipart(encode(Hello(role="trainer", software="bench"), "trainer-1"))
    ready.set()
    count, nbytes, first, last = 0, 0, None, None
    while True:
        if not socket.poll(3000 if first is None else 1000):
            break  # one quiet second after traffic (or three before any): the sender is done
        frames = socket.recv_multipart(copy=False)
        if bytes(frames[0].buffer[:4]) == b"STOP":
            break
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            count += 1
            nbytes += sum(len(f) for f in frames)
        last = now
    socket.close()
    context.term()
    elapsed = (last - first) if first is not None and last is not None and last > first else float("nan")
    results.put((count / elapsed, nbytes / elapsed / 1e6, count) if count else (0.0, 0.0, 0))


def _proxy(frontend_port, backend_port, ready) -> None:
    context = zmq.Context()
    frontend, backend = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    frontend_port.value = frontend.bind_to_random_port(LOOPBACK)
    backend_port.value = backend.bind_to_random_port(LOOPBACK)
    ready.set()
    try:
        zmq.proxy(frontend, backend)
    except zmq.ContextTerminated:  # pragma: no cover
        pass


def _client_keys(socket: zmq.Socket, security: dict) -> None:
    from tmrl_common.sockets import SecurityConfig, secure_client_socket

    secure_client_socket(socket, SecurityConfig(**security))


# ----------------------------------------------------------------------------------------------------- runners


class RelayProcess:
    """``tmrl-relay run`` as a subprocess on free loopback ports."""

    def __init__(self, *extra: str) -> None:
        command = [sys.executable, "-c", "from tmrl_relay.cli import app; app()", "run", "--bind-host", "127.0.0.1",
                   "--worker-port", "0", "--trainer-port", "0", "--weights-port", "0", "--metrics-port", "0",
                   "--log-level", "ERROR", *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"worker_port=(\d+) trainer_port=(\d+) weights_port=(\d+)", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"relay did not start: {line!r} {self.process.stderr.read()}")
        self.worker_port, self.trainer_port, self.weights_port = map(int, match.groups())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _run_pair(send_kind, send_endpoint, recv_kind, recv_endpoint, body_bytes, duration_s, hello=False,
              sender_security=None, receiver_security=None, broker_pid=None, receiver_binds=False) -> tuple[float, float, float]:
    """(messages/s, MB/s, broker CPU microseconds per message) for one sender → [broker] → receiver run."""
    spawn = mp.get_context("spawn")
    ready, results = spawn.Event(), spawn.Queue()
    receiver = spawn.Process(target=_receive_loop, args=(recv_kind, recv_endpoint, hello, receiver_security, ready,
                                                         results, receiver_binds))
    receiver.start()
    if not ready.wait(READY_TIMEOUT_S):
        raise RuntimeError("receiver did not start")
    time.sleep(0.3)  # let the receiver's connection (and hello) settle
    cpu_before = _cpu_seconds(broker_pid)
    sender = spawn.Process(target=_send_loop, args=(send_kind, send_endpoint, body_bytes, duration_s, hello, sender_security))
    sender.start()
    sender.join()
    rate, mbps, count = results.get(timeout=60)
    cpu = _cpu_seconds(broker_pid) - cpu_before
    receiver.join()
    return rate, mbps, (1e6 * cpu / count) if count else float("nan")


def direct(body_bytes: int, duration_s: float) -> tuple[float, float, float]:
    endpoint = f"{LOOPBACK}:{_free_port()}"  # the PULL side binds, the PUSH side connects
    return _run_pair(zmq.PUSH, endpoint, zmq.PULL, endpoint, body_bytes, duration_s, receiver_binds=True)


def proxied(body_bytes: int, duration_s: float) -> tuple[float, float, float]:
    spawn = mp.get_context("spawn")
    frontend, backend, ready = spawn.Value("i", 0), spawn.Value("i", 0), spawn.Event()
    broker = spawn.Process(target=_proxy, args=(frontend, backend, ready), daemon=True)
    broker.start()
    if not ready.wait(READY_TIMEOUT_S):
        raise RuntimeError("proxy did not start")
    try:
        return _run_pair(zmq.PUSH, f"{LOOPBACK}:{frontend.value}", zmq.PULL, f"{LOOPBACK}:{backend.value}", body_bytes,
                         duration_s, broker_pid=broker.pid)
    finally:
        broker.terminate()
        broker.join()


def relayed(body_bytes: int, duration_s: float, keys: dict | None = None) -> tuple[float, float, float]:
    if keys is None:
        relay = RelayProcess("--insecure")
        client_security = {"worker": None, "trainer": None}
    else:
        relay = RelayProcess("--secret-key", str(keys["relay_secret"]), "--allow-dir", str(keys["allow"]))
        client_security = {role: {"secret_key_file": str(keys[f"{role}_secret"]), "server_public_key_file": str(keys["relay_public"])}
                           for role in ("worker", "trainer")}
    try:
        return _run_pair(zmq.DEALER, f"{LOOPBACK}:{relay.worker_port}", zmq.DEALER, f"{LOOPBACK}:{relay.trainer_port}",
                         body_bytes, duration_s, hello=True, sender_security=client_security["worker"],
                         receiver_security=client_security["trainer"], broker_pid=relay.process.pid)
    finally:
        relay.close()


def _load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _make_keys(directory: Path) -> dict:
    from tmrl_common.curve import allow_public_key, generate_key_pair

    pairs = {name: generate_key_pair(directory / "keys", name) for name in ("relay", "worker", "trainer")}
    allow_public_key(directory / "allow", pairs["worker"].public_file)
    allow_public_key(directory / "allow" / "trainers", pairs["trainer"].public_file)  # keys add --role trainer
    return {"relay_secret": pairs["relay"].secret_file, "relay_public": pairs["relay"].public_file,
            "worker_secret": pairs["worker"].secret_file, "trainer_secret": pairs["trainer"].secret_file,
            "allow": directory / "allow"}


# ------------------------------------------------------------------------------------------ broadcast latency


def _subscriber(endpoint: str, expected: int, ready, results) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.linger = 0
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)
    ready.set()
    latencies: dict[float, float] = {}  # publication (its envelope's sent_at) -> seconds until receipt
    while len(latencies) < expected and socket.poll(10_000):
        frames = socket.recv_multipart(copy=False)
        received = time.time()
        envelope = decode_envelope(frames[0].bytes)
        if envelope.type == "weights_update":
            latencies.setdefault(envelope.sent_at, received - envelope.sent_at)
    results.put(list(latencies.values()))
    socket.close()
    context.term()


def broadcast_latency(use_relay: bool, workers: int, model_bytes: int, publications: int) -> list[float]:
    """Milliseconds from the trainer's send to each worker's receipt, over all (publication, worker) pairs."""
    spawn = mp.get_context("spawn")
    context = zmq.Context()
    relay = None
    if use_relay:
        relay = RelayProcess("--insecure")
        publisher = context.socket(zmq.DEALER)
        publisher.connect(f"{LOOPBACK}:{relay.trainer_port}")
        publisher.send_multipart(encode(Hello(role="trainer", software="bench"), "trainer-1"))
        endpoint = f"{LOOPBACK}:{relay.weights_port}"
    else:
        publisher = context.socket(zmq.PUB)
        endpoint = f"{LOOPBACK}:{publisher.bind_to_random_port(LOOPBACK)}"
    publisher.linger = 0
    results = spawn.Queue()
    readies = [spawn.Event() for _ in range(workers)]
    processes = [spawn.Process(target=_subscriber, args=(endpoint, publications, ready, results)) for ready in readies]
    for process in processes:
        process.start()
    for ready in readies:
        ready.wait(READY_TIMEOUT_S)
    time.sleep(1.0)  # subscriptions settle (a PUB drops messages to subscribers it does not know yet)
    bodies = [weights_frames(model_bytes, version)[1] for version in range(1, publications + 1)]
    for body in bodies:
        publisher.send_multipart([encode_envelope("weights_update", "trainer-1"), body], copy=False)
        time.sleep(0.1)
    latencies: list[float] = []
    for _ in processes:
        latencies.extend(results.get(timeout=60))
    for process in processes:
        process.join()
    publisher.close()
    context.term()
    if relay is not None:
        relay.close()
    return [1000 * value for value in latencies]


# ------------------------------------------------------------------------------------------------------ report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="sending time per measurement")
    parser.add_argument("--publications", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model-mib", type=float, default=4.0)
    parser.add_argument("--no-curve", action="store_true", help="skip the CurveZMQ relay row")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--no-broadcast", action="store_true", help="skip the weight broadcast latency")
    args = parser.parse_args()

    print(f"relay throughput: {os.cpu_count()} CPU(s), pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
          f"{args.repeats} repeat(s) x {args.seconds}s, median reported; load average {_load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        keys = None if args.no_curve else _make_keys(Path(tmp))
        for label, size in SIZES.items():
            if label not in args.sizes:
                continue
            runs: dict[str, list[tuple[float, float, float]]] = {"direct": [], "proxy": [], "relay": [], "relay_curve": []}
            for _ in range(args.repeats):
                runs["direct"].append(direct(size, args.seconds))
                runs["proxy"].append(proxied(size, args.seconds))
                runs["relay"].append(relayed(size, args.seconds))
                if keys is not None:
                    runs["relay_curve"].append(relayed(size, args.seconds, keys))
            median = {name: tuple(statistics.median(r[i] for r in values) for i in range(3))
                      for name, values in runs.items() if values}
            print(f"\nbatch {label}:")
            print(f"  {'path':<26}{'msgs/s':>10}{'MB/s':>10}{'÷ direct':>10}{'÷ proxy':>10}{'broker CPU µs/msg':>20}")
            names = {"direct": "(a) direct PUSH→PULL", "proxy": "(b) zmq.proxy broker", "relay": "(c) tmrl-relay plain",
                     "relay_curve": "(c') tmrl-relay CurveZMQ"}
            for name, (rate, mbps, cpu) in median.items():
                print(f"  {names[name]:<26}{rate:>10.0f}{mbps:>10.0f}{rate / median['direct'][0]:>10.2f}"
                      f"{rate / median['proxy'][0]:>10.2f}{cpu:>20.1f}")
            ratio = median["relay"][0] / median["proxy"][0]
            paired = [r[0] / p[0] for r, p in zip(runs["relay"], runs["proxy"], strict=True)]
            per_run = ", ".join(f"{value:.2f}" for value in paired)
            print(f"  relay / proxy = {ratio:.2f} ({'meets' if ratio >= 0.9 else 'BELOW'} the 0.9 bar; per repeat: {per_run}, "
                  f"median of those {statistics.median(paired):.2f}); "
                  f"relay / direct = {median['relay'][0] / median['direct'][0]:.2f}; "
                  f"broker CPU per message relay / proxy = {median['relay'][2] / median['proxy'][2]:.2f}")

    print(f"\nload average after the throughput runs: {_load_average()} (other processes share these CPUs)")
    if args.no_broadcast:
        return
    model_bytes = int(args.model_mib * 1024 * 1024)
    print(f"\nweight broadcast: {args.model_mib:g} MiB model to {args.workers} SUB workers, {args.publications} publications, "
          "latency = trainer send → worker receipt")
    for name, use_relay in (("direct PUB→SUB", False), ("via tmrl-relay (verified)", True)):
        latencies = broadcast_latency(use_relay, args.workers, model_bytes, args.publications)
        expected = args.workers * args.publications
        print(f"  {name:<26} median {statistics.median(latencies):6.1f} ms   p95 {np.percentile(latencies, 95):6.1f} ms"
              f"   received {len(latencies)}/{expected}")


if __name__ == "__main__":
    main()
