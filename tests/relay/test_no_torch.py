"""The relay never imports torch (it runs on small machines without it)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_every_relay_module_and_building_a_relay_does_not_import_torch():
    code = (
        "import sys\n"
        "import tmrl_relay, tmrl_relay.cli, tmrl_relay.broker, tmrl_relay.config, tmrl_relay.envelope, "
        "tmrl_relay.keys, tmrl_relay.metrics, tmrl_relay.peers, tmrl_relay.pending\n"
        "from tmrl_relay.broker import Relay\n"
        "from tmrl_relay.config import RelayConfig\n"
        "from tmrl_common.sockets import SecurityConfig\n"
        "relay = Relay(RelayConfig(worker_port=0, trainer_port=0, weights_port=0, metrics_port=0,"
        " security=SecurityConfig(insecure=True)))\n"
        "relay.bind(); relay.stop(); relay.run()\n"
        "print('torch' in sys.modules, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False []"
