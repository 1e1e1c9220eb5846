"""A service that will not stop can be asked where it is stuck: SIGUSR1 prints every thread's stack and it goes on
(registered by ``configure_logging``, which every CLI calls; the stack launcher sends it before killing a process
that ignored SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

WAITS = """
import sys, threading, time
from tmrl_common.options import configure_logging
configure_logging("INFO")
threading.Thread(target=lambda: time.sleep(30), name="ingest", daemon=True).start()
print("ready", flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="Windows has no SIGUSR1")
def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on():
    process = subprocess.Popen([sys.executable, "-c", WAITS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert process.poll() is None  # still running
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert stderr.count("Thread 0x") + stderr.count("Current thread 0x") >= 2  # the main thread and "ingest"
    assert 'File "<string>"' in stderr  # each stack names the code it waits in
