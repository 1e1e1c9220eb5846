"""Relay settings that ZeroMQ or Python cannot take are refused when the config is read, one line each, and a socket
that fails to set up never leaves the relay hanging at start."""

from __future__ import annotations

import threading

import pytest
from config_refusal import assert_refused_in_one_line
from tmrl_relay.broker import Relay
from tmrl_relay.config import RelayConfig
from tmrl_relay.metrics import RelayMetrics

from .relay_harness import insecure_config


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("weights_send_hwm", "1000000000000", "weights_send_hwm"),
    ("max_body_bytes", "1e21", "max_body_bytes"),
    ("max_weights_bytes", str(2**41), "max_weights_bytes"),
    ("peer_timeout_s", "inf", "peer_timeout_s"),
    ("weights_min_interval_s", "inf", "weights_min_interval_s"),
    ("weights_min_interval_s", "1e12", "weights_min_interval_s"),
    ("allowlist_reload_s", "nan", "allowlist_reload_s"),
    ("bind_host", '""', "bind_host '' is not a host name or IP address, or * for every interface"),
    ("metrics_host", '"no such host!"', "metrics_host 'no such host!' is not a host name or IP address"),
    ("transport.send_hwm", "3000000000", "transport.send_hwm"),
    ("transport.heartbeat_ivl_ms", str(2**31), "transport.heartbeat_ivl_ms"),
    ("transport.max_frame_bytes", str(2**63), "transport.max_frame_bytes"),
    ("security.secret_key_file", '""', "security.secret_key_file = '' in"),
    ("trainer_allowlist_dir", '" "', "trainer_allowlist_dir is empty: give a path, or leave the setting out"),
])
def test_a_setting_out_of_what_the_relay_can_use_is_a_one_line_config_error(tmp_path, setting, value, says):
    assert_refused_in_one_line(RelayConfig, "relay", tmp_path, setting, value, says)


@pytest.mark.parametrize("host", ["*", "0.0.0.0", "::1", "[::1]", "relay.example.org", "localhost", "my_host-2"])
def test_hosts_the_relay_can_bind_are_accepted(host):
    assert RelayConfig(bind_host=host).bind_host == host


def test_a_socket_option_zeromq_refuses_fails_the_start_instead_of_hanging_it():
    """Found by an outside probe: a setsockopt that raised left that socket open, and closing the context at shutdown
    then waited for it for ever (no output, no exit)."""
    config = insecure_config()
    object.__setattr__(config, "weights_send_hwm", 2**40)  # past the config's bound, as a caller building it by hand
    relay, outcome = Relay(config, RelayMetrics()), []

    def start() -> None:
        try:
            relay.bind()
        except OverflowError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the relay hung while giving up its start"
    assert len(outcome) == 1
