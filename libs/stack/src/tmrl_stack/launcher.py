"""Relay + trainer + workers on one machine as child processes, on free loopback ports: the one launcher of
``make demo`` (``scripts/demo.py``), the end-to-end tests (``tests/e2e``), the reliability scenarios
(``tests/reliability``) and ``benchmarks/reliability_report.py``.

Every service is started from the console script installed next to the running Python (``tmrl-relay``,
``tmrl-trainer``, ``tmrl-worker``), so what runs is what an operator runs. :class:`LocalStack` owns:

* **ports**: four free loopback ports picked at construction (:class:`StackPorts`; the relay's Prometheus port only
  when ``metrics`` is on, else ``--metrics-port 0``);
* **security**: with ``curve_clients`` a CurveZMQ key pair per client and the relay's (``<root>/keys``), the clients'
  public keys in the relay's allow-list (``<root>/allowed``; the trainer's in ``<root>/allowed/trainers``), and the
  matching ``--secret-key`` / ``--server-key`` / ``--allow-dir`` options; without, ``--insecure`` everywhere (plain
  text on loopback);
* **where things go**: processes run in ``root``; the trainer's ``--run-dir`` and the workers' ``--state-dir`` are
  ``run_dir`` and ``state_dir`` (relative to ``root`` unless absolute); each process logs to ``<logs>/<name>.log``;
* **life cycle**: :meth:`LocalStack.wait_ready` (relay listening, trainer's first ``status.json``, worker connected),
  :meth:`LocalStack.stop` (a signal, then SIGKILL past a timeout, reported as :class:`StackError`),
  :meth:`LocalStack.kill_all`; used as a context manager it kills whatever is left on exit, also when the
  launcher itself is stopped by SIGTERM or SIGHUP (in the main thread, they become ``SystemExit`` inside the
  ``with``). Each service runs in a process group of its own, so a Ctrl-C at the terminal reaches the launcher only,
  which stops them in its order (workers first, so that the relay is still up to carry their last batches: with
  the terminal's SIGINT reaching all at once, each demo worker lost its last batch).

A process that must stay up is checked by :func:`wait_until` while it polls; failures carry the tails of the logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

BIN = Path(sys.executable).parent
"""Where the console scripts of the running environment are (a virtual environment's ``bin``)."""


def console_script(name: str) -> Path:
    """The console script ``name``: beside the running interpreter (:data:`BIN`), else the first on ``PATH`` (packages
    installed with ``pip install --target`` or ``--user`` put their scripts elsewhere, as on the GPU machine of
    ``benchmarks/gpu_check.sh``); a clear error when neither has it."""
    beside = BIN / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"the console script {name!r} is neither in {BIN} nor on PATH: install tmrl's "
                                "packages (make install) in the environment that runs this")
    return Path(found)

T = TypeVar("T")


class StackError(AssertionError):
    """A process of the stack died, ignored a stop signal, or did not become ready in time; the message holds the
    logs. An ``AssertionError``, so that tests and the reliability report count it as a failed check."""


class StackPorts(NamedTuple):
    """The relay's loopback ports."""

    worker: int
    trainer: int
    weights: int
    metrics: int
    """The relay's Prometheus endpoint (0: not served)."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nobody listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until(condition: Callable[[], T], timeout: float, stack: LocalStack, what: str, *alive: str) -> T:
    """Poll ``condition()`` until it returns a truthy value and return it; raise :class:`StackError` with the logs if
    ``timeout`` passes first or one of the ``alive`` processes exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive:
            stack.check_alive(*alive)
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise StackError(f"{what} did not happen within {timeout}s\n{stack.tails()}")


def _make_keys(root: Path, clients: Sequence[str]) -> tuple[Path, Path]:
    from tmrl_common.curve import allow_public_key, generate_key_pair

    keys, allowed = root / "keys", root / "allowed"
    generate_key_pair(keys, "relay")
    for client in clients:  # the trainer's key goes in allowed/trainers (`keys add --role trainer`): only it may train
        role_dir = allowed / "trainers" if client == "trainer" else allowed
        allow_public_key(role_dir, generate_key_pair(keys, client).public_file)
    return keys, allowed


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _interrupt_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
"""What stops a launcher besides Ctrl-C: ``kill`` or a CI timeout, and the terminal closing (the services, in
process groups of their own, no longer get its SIGHUP themselves)."""


def raise_on_sigterm(interrupt: bool = False) -> None:
    """For a launcher script (call it in the main thread): SIGTERM and SIGHUP raise ``SystemExit(128 + signal)``, or
    with ``interrupt`` ``KeyboardInterrupt`` as Ctrl-C would, so the script's ``finally`` and ``with`` blocks stop its
    services instead of leaving them running after ``kill``, a CI timeout or a closed terminal."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt_on_signal if interrupt else _exit_on_signal)


class LocalStack:
    """Relay, trainer and workers of one test, demo or scenario (see the module docstring)."""

    READY = {"relay": "relay listening on", "worker": "connected to the relay"}
    """Log lines that say a relay / worker process is ready (a trainer is ready once it wrote ``status.json``)."""

    def __init__(self, root: Path, config: Path | None = None, curve_clients: Sequence[str] | None = None,
                 run_dir: Path | str = "run", state_dir: Path | str = "state", logs: Path | None = None,
                 metrics: bool = False, env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.run_dir = self.root / run_dir
        self.state_dir = self.root / state_dir
        self.logs_dir = Path(logs) if logs is not None else self.root
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        worker, trainer, weights, prometheus = free_ports(4)
        self.ports = StackPorts(worker, trainer, weights, prometheus if metrics else 0)
        self.keys: tuple[Path, Path] | None = _make_keys(self.root, curve_clients) if curve_clients is not None else None
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.roles: dict[str, str] = {}

    def __enter__(self) -> LocalStack:
        # SIGTERM or SIGHUP to the launcher (``kill``, a CI timeout, a closed terminal) would end it without running
        # __exit__ and leave the services running; in the main thread they become SystemExit, so they are killed on
        # the way out
        self._previous_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, _exit_on_signal) or signal.SIG_DFL
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill_all()
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)

    # ---------------------------------------------------------------------------------------------- starting

    def _config_args(self) -> list[str]:
        return ["-c", str(self.config)] if self.config is not None else []

    def _client_security(self, client: str) -> list[str]:
        if self.keys is None:
            return ["--insecure"]
        keys, _ = self.keys
        return ["--secret-key", str(keys / f"{client}.key_secret"), "--server-key", str(keys / "relay.key")]

    def start_relay(self, *extra: str, name: str = "relay") -> None:
        """``tmrl-relay run`` on this stack's ports (``extra``: more options)."""
        security = ["--insecure"] if self.keys is None else [
            "--secret-key", str(self.keys[0] / "relay.key_secret"), "--allow-dir", str(self.keys[1])]
        self.start(name, "tmrl-relay", "run", *self._config_args(), *security, "--worker-port", str(self.ports.worker),
                   "--trainer-port", str(self.ports.trainer), "--weights-port", str(self.ports.weights),
                   "--metrics-port", str(self.ports.metrics), *extra, role="relay")

    def start_trainer(self, *extra: str, name: str = "trainer") -> None:
        """``tmrl-trainer run`` writing to ``run_dir`` (its status, metrics, checkpoints)."""
        self.start(name, "tmrl-trainer", "run", *self._config_args(), *self._client_security("trainer"),
                   "--trainer-port", str(self.ports.trainer), "--run-dir", str(self.run_dir), *extra, role="trainer")

    def start_worker(self, worker_id: str, *extra: str, name: str | None = None,
                     env: dict[str, str] | None = None, config: Path | None = None) -> None:
        """``tmrl-worker run`` as ``worker_id`` (process name ``name``, default the id), state in ``state_dir``;
        ``config``: a config file of its own instead of the stack's (e.g. its own ``[worker.env_options]``)."""
        config_args = ["-c", str(config)] if config is not None else self._config_args()
        self.start(name or worker_id, "tmrl-worker", "run", *config_args, *self._client_security(worker_id),
                   "--worker-id", worker_id, "--worker-port", str(self.ports.worker), "--weights-port",
                   str(self.ports.weights), "--state-dir", str(self.state_dir), *extra, role="worker", env=env)

    def start(self, name: str, *args: str, role: str = "", env: dict[str, str] | None = None) -> None:
        """Any console script (``args[0]``) as process ``name``, appending to ``<logs>/<name>.log``."""
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            # process_group=0: a group of its own (module docstring: the terminal's Ctrl-C); ignored on Windows
            self.processes[name] = subprocess.Popen([str(console_script(args[0])), *args[1:]], stdout=log,
                                                    stderr=subprocess.STDOUT, cwd=self.root,
                                                    env={**self.env, **(env or {})}, process_group=0)
        self.logs[name] = log_path
        self.roles[name] = role

    # ------------------------------------------------------------------------------------------- watching

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    def status(self) -> dict[str, Any]:
        """The trainer's latest ``status.json`` (empty before the first)."""
        from tmrl_trainer.status import read_status  # here: ``import tmrl_stack`` stays light (no torch)

        return read_status(self.status_path) or {}

    def worker_status(self, worker_id: str) -> dict[str, Any]:
        """What the trainer's status says about ``worker_id`` (empty before its first batch)."""
        return (self.status().get("workers") or {}).get(worker_id) or {}

    def is_ready(self, name: str) -> bool:
        role = self.roles.get(name, "")
        if role == "trainer":
            return self.status_path.exists()
        marker = self.READY.get(role)
        return marker is None or marker in self.logs[name].read_text(errors="replace")

    def wait_ready(self, *names: str, timeout: float = 60.0) -> None:
        """Until every named process (all by default) is ready, see :attr:`READY`."""
        names = names or tuple(self.processes)
        wait_until(lambda: all(self.is_ready(n) for n in names), timeout, self, f"{', '.join(names)} ready", *names)

    def dead(self) -> list[str]:
        """Processes that exited."""
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.processes):
            process = self.processes[name]
            if process.poll() is not None:
                raise StackError(f"{name} exited early with code {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(name)}" for name in self.processes)

    # ------------------------------------------------------------------------------------------- stopping

    def stop(self, name: str, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit code; a process still running after ``timeout`` is killed and reported
        (:class:`StackError`)."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                if hasattr(signal, "SIGUSR1") and self.roles.get(name):  # a tmrl service prints every thread's
                    process.send_signal(signal.SIGUSR1)  # stack on it (configure_logging): where it is stuck
                    time.sleep(1.0)
                process.kill()
                process.wait()
                raise StackError(f"{name} ignored signal {sig} for {timeout}s (its threads' stacks at the end):\n"
                                 f"{self.tail(name, lines=80)}") from None
        return process.returncode

    def wait(self, name: str, timeout: float) -> int:
        """The exit code of ``name`` once it ends by itself (:class:`StackError` after ``timeout``)."""
        try:
            return self.processes[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise StackError(f"{name} still running after {timeout}s:\n{self.tails()}") from None

    def kill_all(self) -> None:
        """SIGKILL every process still running (SIGKILL also ends a process frozen by SIGSTOP)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
