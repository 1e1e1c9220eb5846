"""Trainer settings it cannot use are refused when the config is read (one line each, naming the setting)."""

from __future__ import annotations

import pytest
from tmrl_common.config import load_config
from tmrl_common.errors import ConfigError
from tmrl_trainer.config import TrainerConfig


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("seed", "-1", "seed"),
    ("seed", "100000000000000000000000", "seed"),
    ("status_interval_s", "1e12", "status_interval_s"),
    ("heartbeat_interval_s", "1e12", "heartbeat_interval_s"),
    ("relay_host", '""', "relay_host '' is not a host name or IP address"),
    ("allowed_workers", '["worker 1", ""]', "allowed_workers ['worker 1', ''] can never match a worker"),
    ("sac.hidden_sizes", "[16, 16, 16, 16, 16, 16, 16, 16, 16]", "sac.hidden_sizes"),
    ("sac.hidden_sizes", "[1000000000000]", "may be at most 65536"),
    ("sac.conv_channels", "[100000]", "may be at most 65536 and 4096 wide"),
    ("sac.batch_size", "1000000000000", "sac.batch_size"),
    ("transport.linger_ms", str(2**31), "transport.linger_ms"),
])
def test_a_setting_the_trainer_cannot_use_is_a_one_line_config_error(tmp_path, setting, value, says):
    table, _, field = setting.rpartition(".")
    path = tmp_path / "trainer.toml"
    path.write_text(f"[trainer{'.' + table if table else ''}]\n{field} = {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(TrainerConfig, "trainer", path, environ={})
    assert says in str(refused.value) and "\n" not in str(refused.value)

