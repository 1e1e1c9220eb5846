"""The local stack launcher (``tmrl_stack``): ports, keys, the options each service gets, readiness, stopping."""

from __future__ import annotations

import signal

import pytest
from tmrl_stack import LocalStack, StackError, free_ports, launcher, wait_until


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_with_curve_clients_each_gets_a_key_pair_and_a_place_in_the_relays_allow_list(tmp_path):
    stack = LocalStack(tmp_path, curve_clients=("trainer", "worker-1"))
    keys, allowed = stack.keys
    assert sorted(p.name for p in keys.iterdir()) == ["relay.key", "relay.key_secret", "trainer.key",
                                                      "trainer.key_secret", "worker-1.key", "worker-1.key_secret"]
    assert sorted(p.relative_to(allowed).as_posix() for p in allowed.rglob("*.key")) == ["trainers/trainer.key",
                                                                                       "worker-1.key"]
    assert stack.ports.metrics == 0 and len(set(stack.ports[:3])) == 3


def test_console_scripts_come_from_beside_the_interpreter_else_from_path(tmp_path, monkeypatch):
    beside, on_path = tmp_path / "venv-bin", tmp_path / "target-bin"
    beside.mkdir()
    on_path.mkdir()
    for folder, name in ((beside, "tmrl-relay"), (on_path, "tmrl-relay"), (on_path, "tmrl-trainer")):
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    monkeypatch.setattr(launcher, "BIN", beside)
    monkeypatch.setenv("PATH", str(on_path))
    assert launcher.console_script("tmrl-relay") == beside / "tmrl-relay"  # the environment's own wins
    assert launcher.console_script("tmrl-trainer") == on_path / "tmrl-trainer"  # pip --target: its bin on PATH
    with pytest.raises(FileNotFoundError, match="'tmrl-worker' is neither in .*venv-bin nor on PATH"):
        launcher.console_script("tmrl-worker")


@pytest.mark.slow
def test_a_relay_started_insecure_becomes_ready_and_stops_cleanly_on_sigterm(tmp_path):
    with LocalStack(tmp_path, metrics=True) as stack:
        stack.start_relay()
        stack.wait_ready("relay", timeout=30)
        log = stack.logs["relay"].read_text()
        assert f"workers {stack.ports.worker}, trainer {stack.ports.trainer}, weights {stack.ports.weights}" in log
        assert stack.stop("relay") == 0 and stack.dead() == ["relay"]


def test_a_process_that_dies_fails_the_wait_with_its_log(tmp_path):
    with LocalStack(tmp_path) as stack:
        stack.start("broken", "python", "-c", "print('no config here'); raise SystemExit(3)")
        with pytest.raises(StackError, match="broken exited early with code 3:\nno config here"):
            wait_until(lambda: False, 30, stack, "something", "broken")


def test_a_process_ignoring_sigterm_is_killed_and_reported(tmp_path):
    with LocalStack(tmp_path) as stack:
        stack.start("stubborn", "python", "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                                "print('ready', flush=True)\ntime.sleep(60)")
        wait_until(lambda: "ready" in stack.logs["stubborn"].read_text(), 30, stack, "the child starting", "stubborn")
        with pytest.raises(StackError, match="stubborn ignored signal"):
            stack.stop("stubborn", timeout=0.5, sig=signal.SIGTERM)
        assert stack.processes["stubborn"].returncode == -signal.SIGKILL


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="Windows has no SIGUSR1")
def test_a_service_ignoring_sigterm_is_reported_with_its_threads_stacks(tmp_path):
    with LocalStack(tmp_path) as stack:
        stack.start("stuck", "python", "-c", "import signal, time\nfrom tmrl_common.options import configure_logging\n"
                                             "configure_logging('INFO')\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                             "print('ready', flush=True)\ntime.sleep(60)", role="trainer")
        wait_until(lambda: "ready" in stack.logs["stuck"].read_text(), 30, stack, "the child starting", "stuck")
        with pytest.raises(StackError, match=r"(?s)stuck ignored signal .*its threads' stacks.*Current thread 0x"):
            stack.stop("stuck", timeout=0.5, sig=signal.SIGTERM)
        assert stack.processes["stuck"].returncode == -signal.SIGKILL  # the dump did not end it: the kill did


WITH_STACK = """
with LocalStack(root) as stack:
    stack.start("sleeper", sys.executable, "-c", "import time; time.sleep(120)")
    print(stack.processes["sleeper"].pid, flush=True)
    time.sleep(120)
"""
SCRIPT_WITH_FINALLY = """
stack = LocalStack(root)
raise_on_sigterm(interrupt=INTERRUPT)
try:
    stack.start("sleeper", sys.executable, "-c", "import time; time.sleep(120)")
    try:  # the pid is printed inside: the test's SIGTERM may arrive as soon as it is read
        print(stack.processes["sleeper"].pid, flush=True)
        time.sleep(120)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
finally:
    stack.kill_all()
"""


@pytest.mark.parametrize(("launcher_code", "interrupt", "signum", "exit_code"),
                         [(WITH_STACK, False, signal.SIGTERM, 128 + signal.SIGTERM),
                          (SCRIPT_WITH_FINALLY, False, signal.SIGTERM, 128 + signal.SIGTERM),
                          (SCRIPT_WITH_FINALLY, True, signal.SIGTERM, 0),
                          (WITH_STACK, False, signal.SIGHUP, 128 + signal.SIGHUP),
                          (SCRIPT_WITH_FINALLY, True, signal.SIGHUP, 0)],
                         ids=["with-LocalStack", "raise_on_sigterm", "raise_on_sigterm-as-Ctrl-C",
                              "with-LocalStack-terminal-closed", "raise_on_sigterm-terminal-closed"])
def test_a_launcher_stopped_by_a_signal_takes_its_services_down_with_it(tmp_path, launcher_code, interrupt, signum,
                                                                        exit_code):
    """``kill <launcher>`` (an operator, a CI timeout) used to end the launcher and leave its services running; so
    does a closed terminal (SIGHUP) now that each service has a process group of its own."""
    import subprocess
    import sys
    import time

    prelude = (f"import sys, time\nfrom pathlib import Path\nfrom tmrl_stack import LocalStack, raise_on_sigterm\n"
               f"root = Path({str(tmp_path)!r})\nINTERRUPT = {interrupt}\n")
    launcher = subprocess.Popen([sys.executable, "-c", prelude + launcher_code], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    launcher.send_signal(signum)
    assert launcher.wait(timeout=30) == exit_code
    assert ("interrupted" in launcher.stdout.read()) is interrupt  # as Ctrl-C: the script's own stopping path runs
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(child):
        time.sleep(0.05)
    assert not _running(child)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_the_stack_puts_the_previous_stop_signal_handler_back_on_exit(tmp_path, signum):
    def previous(signum, frame):
        pass

    saved = signal.signal(signum, previous)
    try:
        with LocalStack(tmp_path):
            assert signal.getsignal(signum) is not previous
        assert signal.getsignal(signum) is previous
    finally:
        signal.signal(signum, saved)


CTRL_C_LAUNCHER = """
with LocalStack(root) as stack:
    stack.start("sleeper", sys.executable, "-c", "import time; time.sleep(120)")
    try:  # the pid is printed inside: the test's Ctrl-C may arrive as soon as it is read
        print(stack.processes["sleeper"].pid, flush=True)
        time.sleep(120)
    except KeyboardInterrupt:
        time.sleep(0.5)  # a SIGINT that reached the sleeper too has ended it by now
        print("sleeper", "running" if stack.processes["sleeper"].poll() is None else "gone", flush=True)
        print("stopped with", stack.stop("sleeper", timeout=10), flush=True)
"""


def test_a_ctrl_c_at_the_terminal_reaches_the_launcher_and_not_its_services(tmp_path):
    """The terminal sends Ctrl-C's SIGINT to its whole foreground process group: it reached the demo's services as
    well as the demo, all stopped at once, and each worker lost the last batch the relay was no longer up to carry.
    In process groups of their own, the services run on until the launcher stops them, in its order."""
    import os
    import subprocess
    import sys

    # SIGINT as a terminal's foreground job has it: CI runs the tests under `nohup ... &`, which ignores it, and a
    # child inherits that (the launcher then slept through the Ctrl-C)
    prelude = (f"import signal, sys, time\nfrom pathlib import Path\nfrom tmrl_stack import LocalStack\n"
               f"signal.signal(signal.SIGINT, signal.default_int_handler)\nroot = Path({str(tmp_path)!r})\n")
    launcher = subprocess.Popen([sys.executable, "-c", prelude + CTRL_C_LAUNCHER], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group, as a terminal's foreground job has
    try:
        sleeper = int(launcher.stdout.readline())
        assert os.getpgid(sleeper) != launcher.pid
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
        assert launcher.wait(timeout=30) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.stdout.read().splitlines() == ["sleeper running", f"stopped with {-signal.SIGTERM}"]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
