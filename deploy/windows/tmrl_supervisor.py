"""Keep one tmrl command running on Windows: the loop behind the relay/trainer services and the worker's log-on task.

:class:`Supervisor` starts the command as a child process (no console window, normal priority, output appended to a
log file, in a given working directory) and decides what an exit means:

* exit 0: the command finished on purpose (``--max-steps``, a clean stop): not restarted;
* exit 2: a usage or config error (bad flag, bad config, missing key): restarting cannot fix it, not restarted
  (the systemd units' ``RestartPreventExitStatus=2``);
* any other exit: restarted after a back-off that doubles from ``first_delay_s`` up to ``max_delay_s`` and starts
  over once a child has run for ``stable_after_s``.

A stop request (:meth:`Supervisor.stop`, from the service's stop control or Ctrl-C) asks the child to stop by closing
its stdin (the child runs with ``TMRL_STOP_ON_STDIN_CLOSE=1``, which makes a tmrl service take stdin's end as it takes
SIGTERM: the trainer saves its final checkpoint, the worker hands over its last batch; see
``tmrl_common.stop_signals``), waits up to ``stop_timeout_s`` for it to exit, and only then terminates it (on Windows
``TerminateProcess``, a kill). A service's child has no console, so Ctrl-C or Ctrl-Break cannot be sent to it. A
stop is honoured during the back-off too: no child is started after it. On Windows the child is also put in a job object that ends it
when the supervisor ends, since ``Stop-ScheduledTask`` terminates the task's own process only. Task Scheduler's own "restart on failure" only retries a task
that failed to *start*, never a worker that exited with an error, hence this loop in the task's command.

As the worker task's command (run by ``pythonw.exe``, so no console window opens)::

    pythonw.exe tmrl_supervisor.py --log C:\\ProgramData\\tmrl\\logs\\tmrl-worker-worker-1.log
        --cwd C:\\ProgramData\\tmrl -- C:\\tmrl\\.venv\\Scripts\\tmrl-worker.exe run --config ... --worker-id worker-1
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

NO_RESTART_CODES = (0, 2)
"""0: finished on purpose; 2: usage or config error (restarting cannot fix it)."""
STOP_TIMEOUT_S = 120.0
"""How long a stop waits for the child to exit before terminating it: the trainer's final checkpoint (with
``save_memory``, its whole replay memory) must fit in it."""
STOP_ON_STDIN_CLOSE = "TMRL_STOP_ON_STDIN_CLOSE"
"""Set to 1 in the child's environment: it stops cleanly when its stdin closes (``tmrl_common.stop_signals``, whose
constant of the same name this copies: this script runs without importing tmrl)."""
# Windows process creation flags (subprocess defines them on Windows only): no console window for the console-mode
# child, and normal priority whatever the parent's, e.g. a task started below normal (Task Scheduler's default 7)
CREATE_NO_WINDOW = 0x08000000
NORMAL_PRIORITY_CLASS = 0x00000020


class Supervisor:
    """Runs ``command`` until it exits 0 or 2, or :meth:`stop` is called (see the module docstring).

    ``wait(seconds)`` waits for a stop request and says whether one came (a threading.Event by default; the Windows
    service passes a wait on its stop event); ``log(message)`` records what happens (the log file by default)."""

    def __init__(self, command: list[str], log_file: Path, cwd: Path, *, first_delay_s: float = 5.0,
                 max_delay_s: float = 60.0, stable_after_s: float = 300.0, stop_timeout_s: float = STOP_TIMEOUT_S,
                 wait: Callable[[float], bool] | None = None, log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.command = command
        self.log_file = Path(log_file)
        self.cwd = Path(cwd)
        self.first_delay_s, self.max_delay_s, self.stable_after_s = first_delay_s, max_delay_s, stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._log = log or self._append
        self._clock = clock or time.monotonic
        self._child: subprocess.Popen | None = None
        self._job = None  # Windows job object handle, kept open while this process lives
        self.starts = 0
        self.exit_codes: list[int] = []

    def stop(self) -> None:
        """Ask :meth:`run` to end the child and return (any thread): the child is asked to stop at once, and
        :meth:`run` waits for it (:meth:`end_child`)."""
        self._stop.set()
        self._ask_child_to_stop()

    def _ask_child_to_stop(self) -> None:
        child = self._child
        if child is None or child.stdin is None:
            return
        try:
            child.stdin.close()  # the child's watcher reads the end of its stdin and stops as on SIGTERM
        except (OSError, ValueError):  # already closed (maybe by another thread), or the pipe broke as the child exited
            pass

    def _stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Supervise until the command exits 0 or 2 (returns that code) or a stop is requested (returns 0)."""
        delay = self.first_delay_s
        while not self._stopping():
            started = self._clock()
            code = self._run_child()
            if code is None:  # stopped while the child ran
                return 0
            ran_s = self._clock() - started
            if code in NO_RESTART_CODES:
                self._log(f"{self._name()} exited with code {code} after {ran_s:.0f}s: "
                          f"{'finished' if code == 0 else 'usage or config error (see above)'}; not restarting")
                return code
            delay = self.first_delay_s if ran_s >= self.stable_after_s else delay
            self._log(f"{self._name()} exited with code {code} after {ran_s:.0f}s; restarting in {delay:.0f}s")
            if self._wait(delay) or self._stopping():  # a stop during the back-off starts no new child
                self._log("stop requested during the restart delay; not restarting")
                return 0
            delay = min(delay * 2, self.max_delay_s)
        return 0

    def _run_child(self) -> int | None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        flags = CREATE_NO_WINDOW | NORMAL_PRIORITY_CLASS if sys.platform == "win32" else 0
        with open(self.log_file, "ab") as output:
            self._log(f"starting: {subprocess.list2cmdline(self.command)} (in {self.cwd})")
            self._child = subprocess.Popen(self.command, cwd=self.cwd, stdout=output, stderr=subprocess.STDOUT,
                                           stdin=subprocess.PIPE, creationflags=flags,
                                           env={**os.environ, STOP_ON_STDIN_CLOSE: "1"})
        self.starts += 1
        if sys.platform == "win32":
            self._job = _end_with_this_process(self._child, self._log)
        while self._child.poll() is None:
            if self._wait(0.5) or self._stopping():
                self.end_child()
                return None
        self.exit_codes.append(self._child.returncode)
        return self._child.returncode

    def end_child(self) -> None:
        """Ask the running child to stop, wait up to ``stop_timeout_s`` for it, then terminate it (module docstring);
        nothing when no child runs."""
        child = self._child
        if child is None or child.poll() is not None:
            return
        self._log(f"asking {self._name()} to stop (its stdin closed); waiting up to {self.stop_timeout_s:.0f}s")
        self._ask_child_to_stop()
        try:
            child.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self._log(f"{self._name()} did not stop within {self.stop_timeout_s:.0f}s: terminating it")
            child.terminate()
            try:
                child.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._log(f"{self._name()} stopped with code {child.returncode} (service or task stop)")

    def _name(self) -> str:
        return Path(self.command[0]).stem

    def _append(self, message: str) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        with open(self.log_file, "a", encoding="utf-8") as log:
            log.write(f"{stamp} supervisor: {message}\n")


def _end_with_this_process(child: subprocess.Popen, log: Callable[[str], None]):  # pragma: no cover - Windows only
    """Put ``child`` in a job object with JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE: when this process ends (even killed),
    Windows closes the job's handle and ends the child. Returns the handle; on failure logs why and returns None."""
    import ctypes
    from ctypes import wintypes

    class BasicLimits(ctypes.Structure):
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD), ("SchedulingClass", wintypes.DWORD)]

    class ExtendedLimits(ctypes.Structure):
        _fields_ = [("BasicLimitInformation", BasicLimits), ("IoInfo", ctypes.c_uint64 * 6),
                    ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                    ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    job = kernel32.CreateJobObjectW(None, None)
    limits = ExtendedLimits()
    limits.BasicLimitInformation.LimitFlags = 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    extended_limit_information = 9  # JobObjectExtendedLimitInformation
    if not (job and kernel32.SetInformationJobObject(wintypes.HANDLE(job), extended_limit_information,
                                                     ctypes.byref(limits), ctypes.sizeof(limits))
            and kernel32.AssignProcessToJobObject(wintypes.HANDLE(job), wintypes.HANDLE(int(child._handle)))):
        log(f"could not tie the child to this supervisor (Windows error {ctypes.get_last_error()}): stopping the task "
            "may leave it running")
        return None
    return job


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Keep one tmrl command running (restart on errors, with back-off).")
    parser.add_argument("--log", type=Path, required=True, help="Log file: the command's output and these lines.")
    parser.add_argument("--cwd", type=Path, required=True, help="Working directory of the command.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments.")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    supervisor = Supervisor(command, args.log, args.cwd)
    try:
        return supervisor.run()
    except KeyboardInterrupt:
        supervisor.stop()
        supervisor.end_child()
        return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
