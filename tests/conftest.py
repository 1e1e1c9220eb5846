"""Test-suite set-up shared by every folder: the end-to-end process harness (``tests/e2e/process_stack.py``) is
importable as ``process_stack`` from any test, and ``context`` is a ZeroMQ context destroyed after each test."""

import sys
from pathlib import Path

import pytest
import zmq

_E2E = str(Path(__file__).resolve().parent / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
