"""The local stack launcher (``tmrl_stack``): ports, keys, the options each service gets, readiness, stopping."""

from __future__ import annotations

import signal

import pytest
from tmrl_stack import LocalStack, StackError, free_ports, wait_until


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
