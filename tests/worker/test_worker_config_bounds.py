"""Worker settings that ZeroMQ, Python's waits or the wire cannot take are refused when the config is read, one line
each, naming the setting (before, each surfaced later as a traceback in a thread, or a worker deaf to SIGTERM)."""

from __future__ import annotations

import pytest
from config_refusal import assert_refused_in_one_line
from tmrl_worker.config import WorkerConfig


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("time_step_duration", "inf", "time_step_duration"),
    ("time_step_duration", "1e12", "time_step_duration"),
    ("stop_grace_s", "1e12", "stop_grace_s"),
    ("flush_timeout_s", "inf", "flush_timeout_s"),
    ("ack_timeout_s", "nan", "ack_timeout_s"),
    ("heartbeat_interval_s", "inf", "heartbeat_interval_s"),
    ("max_steps_per_second", "inf", "max_steps_per_second"),
    ("seed", "-1", "seed"),
    ("seed", "100000000000000000000000", "seed"),
    ("relay_host", '""', "relay_host '' is not a host name or IP address"),
    ("relay_host", '"no such host!"', "relay_host 'no such host!' is not a host name or IP address"),
    ("weights_port", "5555", "worker_port and weights_port must differ (both 5555)"),
    ("transport.recv_hwm", "3000000000", "transport.recv_hwm"),
    ("state_dir", '""', "state_dir is empty: give a path, or leave the setting out"),
    ("security.server_public_key_file", '""', "server_public_key_file is empty"),
    # an outside probe's id ending in a newline passed ($ matches before it) and died in the sender thread, exit 1
    ("worker_id", '"w9\\n"', "worker_id 'w9\\n' must match"),
    # the relay's messages carry "relay" and "trainer" is the trainer's default id: logs and counts mixed them up
    ("worker_id", '"relay"', "worker_id 'relay' is reserved"),
    ("worker_id", '"trainer"', "worker_id 'trainer' is reserved"),
    # the real-time simulator's step: passed --show-config, refused only when the env was built (a config probe)
    ("time_step_duration", "0.033", "time_step_duration (0.033 s) must be a whole number of physics ticks"),
    # ignored without a word outside expert mode (a config probe's --test --policy FILE)
    ("policy_file", '"policy.safetensors"', "policy_file is driven in expert mode only (--expert --policy FILE)"),
])
def test_a_setting_the_worker_cannot_use_is_a_one_line_config_error(tmp_path, setting, value, says):
    assert_refused_in_one_line(WorkerConfig, "worker", tmp_path, setting, value, says)


def test_the_largest_settings_a_worker_may_have_are_accepted(tmp_path):
    config = WorkerConfig(time_step_duration=86_400, stop_grace_s=86_400, flush_timeout_s=0, seed=2**62,
                          relay_host="relay-1.example.org", transport={"send_hwm": 2**31 - 1})
    assert config.seed == 2**62 and config.transport.send_hwm == 2**31 - 1


def test_two_different_simulator_steps_are_refused_not_one_silently_kept(tmp_path):
    from tmrl_common.config import load_config
    from tmrl_common.errors import ConfigError

    path = tmp_path / "worker.toml"
    path.write_text("[worker]\ntime_step_duration = 0.1\nenv_options = { time_step_duration = 0.05 }\n")
    with pytest.raises(ConfigError, match=r"time_step_duration = 0.1 and env_options.time_step_duration = 0.05 "
                                          r"disagree"):
        load_config(WorkerConfig, "worker", path, environ={})
    path.write_text("[worker]\nenv_options = { time_step_duration = 0.1 }\n")  # given once: the option's
    assert load_config(WorkerConfig, "worker", path, environ={}).env_options == {"time_step_duration": 0.1}
