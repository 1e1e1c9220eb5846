"""The check the config-bounds tests of every service share: one setting written into the service's table of a
TOML file is refused by ``load_config`` with one line that says ``says``."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel
from tmrl_common.config import load_config
from tmrl_common.errors import ConfigError


def assert_refused_in_one_line(model: type[BaseModel], section: str, tmp_path: Path, setting: str, value: str,
                               says: str) -> None:
    """``setting`` (``field`` or ``table.field``) = ``value`` (TOML text) in ``[section]`` is a one-line error."""
    table, _, field = setting.rpartition(".")
    path = tmp_path / f"{section}.toml"
    path.write_text(f"[{section}{'.' + table if table else ''}]\n{field} = {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(model, section, path, environ={})
    assert says in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
