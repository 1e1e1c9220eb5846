"""Configuration: pydantic models filled from a TOML file, then environment variables, then command-line flags.

Each service owns its config model (``tmrl_relay.config.RelayConfig`` ...) and reads its own table of one shared
TOML file (``[relay]``, ``[worker]``, ``[trainer]``). Environment variables override file values:
``TMRL_RELAY__SAMPLES_PORT=6000`` sets ``samples_port`` of the ``relay`` table, ``TMRL_TRAINER__SAC__GAMMA=0.99``
sets a nested field. Values are parsed as JSON when they parse (numbers, booleans, lists), else taken as strings;
a field declared as ``str`` always gets the text as it is (``TMRL_WORKER__WORKER_ID=7`` is the string ``"7"``).
"""

from __future__ import annotations

import collections.abc
import enum
import json
import math
import os
import re
import sys
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from tmrl_common.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)
ENV_PREFIX = "TMRL_"
NESTING = "__"


def _field_annotation(model: type[BaseModel] | None, path: list[str]) -> Any:
    """The annotation of the field at ``path`` inside ``model`` (None when the path does not name a field)."""
    annotation: Any = model
    for part in path:
        annotation = _strip_optional(annotation)
        if get_origin(annotation) in (dict, collections.abc.Mapping) and len(get_args(annotation)) == 2:
            annotation = get_args(annotation)[1]  # TMRL_X__TAGS__SITE: a value of a dict field
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        field = annotation.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
    return annotation


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _wants_text(annotation: Any) -> bool:
    annotation = _strip_optional(annotation)
    if annotation in (str, Path):
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(choice, str) for choice in get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum) and issubclass(annotation, str)


def _env_overrides(section: str, environ: Mapping[str, str], model: type[BaseModel] | None = None) -> dict[str, Any]:
    prefix = f"{ENV_PREFIX}{section.upper()}{NESTING}"
    overrides: dict[str, Any] = {}
    for key, text in sorted(environ.items()):
        if not key.startswith(prefix):
            continue
        path = [part.lower() for part in key[len(prefix):].split(NESTING)]
        value: Any = text
        if not _wants_text(_field_annotation(model, path)):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
        node = overrides
        for depth, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key} sets a field inside {prefix}{NESTING.join(path[:depth + 1]).upper()}, "
                                  "which another variable sets to a plain value; unset one of them")
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"{key} sets a plain value where other {key}{NESTING}* variables set fields; unset one")
        node[path[-1]] = value
    return overrides


def _without_unset(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line overrides minus the flags left unset (None), at every nesting level."""
    kept: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            value = _without_unset(value) or None
        if value is not None:
            kept[key] = value
    return kept


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
    data = _merge(data, _env_overrides(section, os.environ if environ is None else environ, model))
    data = _merge(data, _without_unset(overrides or {}))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        source = f"{path} [{section}]" if path else f"[{section}] (defaults, env, flags)"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config {source}: {problems}") from exc


def load_config_for_command(
    model: type[ModelT],
    section: str,
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    show_config: bool = False,
) -> ModelT:
    """:func:`load_config` as every service command starts: a :class:`ConfigError` is printed to stderr and ends the
    command with status 2; with ``show_config`` the effective config is printed (:func:`render_config`) and the command
    ends with status 0 (``--show-config``)."""
    try:
        effective = load_config(model, section, path, overrides=overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from exc
    if show_config:
        print(render_config(effective, section))
        raise SystemExit(0)
    return effective


def render_config(config: BaseModel, section: str) -> str:
    """The effective config as TOML, for ``--show-config``: ``tomllib`` parses it back to the same values.

    Nested models and dicts become ``[section.field]`` tables. TOML has no null, so a field whose value is None
    is written as a comment (``# field = (unset)``) and reads back as the field's default.
    """
    lines: list[str] = []
    _render_table(config.model_dump(mode="python"), [section], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _render_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    lines.append("")
    lines.append("[" + ".".join(_toml_key(part) for part in path) + "]")
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is None:
            lines.append(f"# {_toml_key(key)} = (unset)")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, sub_table in tables:
        _render_table(sub_table, [*path, key], lines)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, enum.Enum):
        return _toml_value(value.value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, Mapping):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, (list, tuple, set, frozenset)):
        if any(item is None for item in value):
            raise ConfigError(f"cannot write {value!r} as TOML: arrays cannot hold an unset (None) value")
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if value is None:
        raise ConfigError("cannot write an unset (None) value inside a TOML inline table or array")
    return _toml_value(to_jsonable_python(value))
