"""Helpers for the end-to-end tests: free loopback ports and service processes with their logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Stack:
    """Service processes started from the venv's console scripts, each logging to ``<root>/<name>.log``."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, *args: str) -> None:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            self.processes[name] = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                                    cwd=self.root, env=self.env)
        self.logs[name] = log_path

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.processes):
            process = self.processes[name]
            if process.poll() is not None:
                raise AssertionError(f"{name} exited early with code {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(name)}" for name in self.processes)

    def stop(self, name: str, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"{name} ignored signal {sig} for {timeout}s:\n{self.tail(name)}") from None
        return process.returncode

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.processes[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout}s:\n{self.tails()}") from None

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_until(condition, timeout: float, stack: Stack, what: str, *alive: str):
    """Poll ``condition()`` until it returns a truthy value; fail with the logs if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive:
            stack.check_alive(*alive)
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout}s\n{stack.tails()}")
