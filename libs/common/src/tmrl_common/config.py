"""Configuration: pydantic models filled from a TOML file, then environment variables, then command-line flags.

Each service owns its config model (``tmrl_relay.config.RelayConfig`` ...) and reads its own table of one shared
TOML file (``[relay]``, ``[worker]``, ``[trainer]``). Environment variables override file values:
``TMRL_RELAY__SAMPLES_PORT=6000`` sets ``samples_port`` of the ``relay`` table, ``TMRL_TRAINER__SAC__GAMMA=0.99``
sets a nested field. Values are parsed as JSON when they parse (numbers, booleans, lists), else taken as strings.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ValidationError

from tmrl_common.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)
ENV_PREFIX = "TMRL_"
NESTING = "__"


def _env_overrides(section: str, environ: Mapping[str, str]) -> dict[str, Any]:
    prefix = f"{ENV_PREFIX}{section.upper()}{NESTING}"
    overrides: dict[str, Any] = {}
    for key, text in environ.items():
        if not key.startswith(prefix):
            continue
        path = [part.lower() for part in key[len(prefix):].split(NESTING)]
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return overrides


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    model: type[ModelT],
    section: str,
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelT:
    """Build ``model`` from table ``section`` of the TOML file at ``path`` (optional), env vars and ``overrides``.

    Raises :class:`ConfigError` naming the file and the offending field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        table = document.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] in {path} must be a table")
        data = table
    data = _merge(data, _env_overrides(section, os.environ if environ is None else environ))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        source = f"{path} [{section}]" if path else f"[{section}] (defaults, env, flags)"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config {source}: {problems}") from exc


def render_config(config: BaseModel, section: str) -> str:
    """The effective config as a TOML table, for ``--show-config``."""
    lines = [f"[{section}]"]
    nested: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.model_dump(mode="json").items():
        if isinstance(value, dict):
            nested.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in nested:
        lines.append("")
        lines.append(f"[{section}.{key}]")
        for sub_key, sub_value in table.items():
            lines.append(f"{sub_key} = {_toml_value(sub_value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)
