"""Test-suite set-up shared by every folder: the loopback relay stand-in (``tests/loopback_relay.py``) is importable
as ``loopback_relay`` from any test (tests that need real processes use :mod:`tmrl_stack`, the launcher ``make demo``
uses too), ``context`` is a ZeroMQ context destroyed after each test, and
``one_torch_thread`` (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``) runs a module's tests on one
torch thread. Every test gets SIGINT, SIGTERM and the signal wake-up fd back as they were before it: a service CLI
called in process (``CliRunner``) installs its stop signals and, after a clean stop, ignores them, which would
otherwise leave the rest of the session deaf to Ctrl-C and SIGTERM."""

import signal
import sys
from pathlib import Path

import pytest
import zmq

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


@pytest.fixture(autouse=True)
def restore_stop_signals():
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    yield
    signal.set_wakeup_fd(wakeup_fd)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def one_torch_thread():
    """Small networks run fastest on one thread, and OpenMP threads stall badly on a busy shared machine."""
    import torch  # here, not at the top: the relay's tests must not need torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
