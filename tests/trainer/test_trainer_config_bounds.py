"""Trainer settings it cannot use are refused when the config is read (one line each, naming the setting), and a
config too large for this machine's memory is a one-line error with status 2 instead of a traceback."""

from __future__ import annotations

import pytest
from config_refusal import assert_refused_in_one_line
from tmrl_trainer.config import TrainerConfig


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("seed", "-1", "seed"),
    ("seed", "100000000000000000000000", "seed"),
    ("status_interval_s", "1e12", "status_interval_s"),
    ("heartbeat_interval_s", "1e12", "heartbeat_interval_s"),
    ("relay_host", '""', "relay_host '' is not a host name or IP address"),
    ("allowed_workers", '["worker 1", ""]', "allowed_workers ['worker 1', ''] can never match a worker"),
    ("sac.hidden_sizes", "[16, 16, 16, 16, 16, 16, 16, 16, 16]", "sac.hidden_sizes"),
    ("sac.hidden_sizes", "[1000000000000]", "less than or equal to 65536"),
    ("sac.conv_channels", "[100000]", "less than or equal to 4096"),
    ("sac.batch_size", "1000000000000", "sac.batch_size"),
    ("transport.linger_ms", str(2**31), "transport.linger_ms"),
    ("run_dir", '""', "run_dir is empty: give a path, or leave the setting out"),
    # ids and a device ending in a newline passed ($ matches before it): the ingest thread died on the id, exit 1
    ("trainer_id", '"trainer\\n"', "trainer_id 'trainer\\n' must match"),
    ("allowed_workers", '["w1\\n"]', "allowed_workers ['w1\\n'] can never match a worker"),
    ("trainer_id", '"relay"', "trainer_id 'relay' is reserved"),
    # a config probe: each ran to exit 0 with every update thrown away, hung, or crashed libgomp
    ("sac.utd", "1e9", "sac.utd"),
    ("sac.actor_lr", "1e30", "sac.actor_lr"),
    ("sac.critic_lr", "2.0", "sac.critic_lr"),
    ("sac.init_alpha", "1e300", "sac.init_alpha"),
    ("sac.reward_scale", "1e300", "sac.reward_scale"),
    ("torch_threads", "1000000000", "torch_threads"),
    ("sac.batch_size", "1048576", "sac.batch_size (1048576) exceeds memory_capacity (1000000)"),
    ("allowed_workers", '["w1", "trainer"]', "allowed_workers ['trainer'] can never match a worker: those ids are reserved"),
    ("device", '"cpu\\n"', "device"),
])
def test_a_setting_the_trainer_cannot_use_is_a_one_line_config_error(tmp_path, setting, value, says):
    assert_refused_in_one_line(TrainerConfig, "trainer", tmp_path, setting, value, says)


def test_a_replay_memory_too_large_for_this_machine_is_a_one_line_error_with_status_2(tmp_path):
    from tmrl_trainer.cli import app
    from typer.testing import CliRunner

    config = tmp_path / "trainer.toml"
    config.write_text("[trainer]\nmemory_capacity = 1000000000000\n")
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--insecure", "--env", "gym:Pendulum-v1",
                                      "--device", "cpu", "--trainer-port", "1", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "tmrl-trainer: not enough memory for this config (Unable to allocate" in result.output
    assert "memory_capacity = 1000000000000 rows" in result.output and "Traceback" not in result.output


def test_the_layout_file_can_be_given_on_the_command_line_beside_env():
    """A BYO probe: `tmrl-trainer run --layout-file x` was 'No such option', leaving TMRL_TRAINER__LAYOUT_FILE as the
    only way to give a module:Class env's layout without a config file."""
    from pathlib import Path

    from tmrl_trainer.cli import app
    from typer.testing import CliRunner

    layout = Path(__file__).parents[2] / "examples" / "byo_robot" / "layout.json"
    result = CliRunner().invoke(app, ["run", "--show-config", "--env", "mybot.robot:Robot", "--layout-file", str(layout)])
    assert result.exit_code == 0, result.output
    assert f'layout_file = "{layout}"' in result.output and 'env = "mybot.robot:Robot"' in result.output
    missing = CliRunner().invoke(app, ["run", "--show-config", "--layout-file", str(layout.with_name("none.json"))])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())
