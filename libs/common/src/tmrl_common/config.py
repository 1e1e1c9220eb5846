"""Configuration: pydantic models filled from a TOML file, then environment variables, then command-line flags.

Each service owns its config model (``tmrl_relay.config.RelayConfig`` ...) and reads its own table of one shared
TOML file (``[relay]``, ``[worker]``, ``[trainer]``). Environment variables override file values:
``TMRL_RELAY__WORKER_PORT=6000`` sets ``worker_port`` of the ``relay`` table, ``TMRL_TRAINER__SAC__GAMMA=0.99``
sets a nested field. Values are parsed as JSON when they parse (numbers, booleans, lists), else taken as strings;
a field declared as ``str`` always gets the text as it is (``TMRL_WORKER__WORKER_ID=7`` is the string ``"7"``).

Errors name where the bad value came from (the file and table, the environment variable, or the command line), the
value given and, for an unknown field, the closest known name. A top-level table that is not a service's
(``[trainr]``) is an error that lists the known ones, since a misspelt table would otherwise be silently ignored.
"""

from __future__ import annotations

import collections.abc
import difflib
import enum
import json
import logging
import math
import os
import re
import sys
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError, ValidationInfo
from pydantic_core import to_jsonable_python

from tmrl_common.errors import ConfigError

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)
ENV_PREFIX = "TMRL_"
NESTING = "__"
SERVICE_SECTIONS = ("relay", "worker", "trainer")
"""The top-level tables of a tmrl config file; any other is reported (a misspelt ``[trainr]`` would be ignored)."""
OTHER_ENV_NAMES = frozenset({"TMRL_STOP_ON_STDIN_CLOSE"})
"""tmrl's environment variables that are no config field (:mod:`tmrl_common.stop_signals`)."""
MAX_DURATION_S = 86_400.0
"""The longest any tmrl interval or timeout setting may be: a day. Longer is a typo, and past about 9.2e9 s Python's
waits raise (``threading.TIMEOUT_MAX``) in a thread, far from the setting."""
MAX_SEED = 2**62
"""The largest seed a config takes: numpy and torch take any seed up to 2**63 - 1, including the offsets tmrl adds to
it for each of its random streams."""


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


def _env_overrides(section: str, environ: Mapping[str, str], model: type[BaseModel] | None = None,
                   names: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    """The ``TMRL_<SECTION>__...`` variables as a nested dict; ``names`` (when given) maps each path to its variable."""
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
        if names is not None:
            names[tuple(path)] = key
    return overrides


_warned_env_names: set[str] = set()


def _warn_of_unknown_env_names(environ: Mapping[str, str], sections: tuple[str, ...]) -> None:
    """Warn (once per process and name) of each ``TMRL_*`` variable that no table reads: a misspelt table
    (``TMRL_TRAINR__SEED``) or a single underscore (``TMRL_TRAINER_SEED``) would be ignored without a word, as a
    misspelt table of the file is not."""
    prefixes = [f"{ENV_PREFIX}{name.upper()}{NESTING}" for name in sections]
    for key in sorted(environ):
        if (not key.startswith(ENV_PREFIX) or key in OTHER_ENV_NAMES or key in _warned_env_names
                or any(key.startswith(prefix) for prefix in prefixes)):
            continue
        _warned_env_names.add(key)
        head = key[len(ENV_PREFIX):].split(NESTING)[0]
        close = difflib.get_close_matches(head.upper(), [name.upper() for name in sections], n=1, cutoff=0.6)
        guess = next((f"{ENV_PREFIX}{name.upper()}{NESTING}{head[len(name) + 1:]}" for name in sections
                      if head.upper().startswith(f"{name.upper()}_") and len(head) > len(name) + 1), None)
        if guess is None and close:
            guess = f"{ENV_PREFIX}{close[0]}{NESTING}{NESTING.join(key[len(ENV_PREFIX):].split(NESTING)[1:])}"
        hint = f" (did you mean {guess}?)" if guess else ""
        log.warning("environment variable %s sets nothing: tmrl reads TMRL_<TABLE>__<FIELD> for the tables %s, "
                    "with two underscores before each field%s", key, ", ".join(sections), hint)


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


def _read_table(path: Path, section: str, known_sections: tuple[str, ...]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # a traceback before (a probe's UTF-16 file); TOML is UTF-8 text
        raise ConfigError(f"config file {path} is not UTF-8 text (TOML files are): byte {exc.object[exc.start]:#04x} "
                          f"at position {exc.start}") from exc
    except OSError as exc:  # a folder, a file this user may not read...
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    known = (*known_sections, section) if section not in known_sections else known_sections
    unknown = [name for name in document if name not in known]
    if unknown:
        hints = [f"[{name}]{did_you_mean(name, known, '[{}]')}" for name in unknown]
        raise ConfigError(f"config file {path}: unknown table {', '.join(hints)}; the known tables are "
                          f"{', '.join(f'[{name}]' for name in known)}")
    if section not in document:  # a config for the other services, most likely (a config probe: silent before)
        log.warning("config file %s has no [%s] table: %s runs on its defaults, environment variables and flags",
                    path, section, section)
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in {path} must be a table")
    return table


def did_you_mean(name: str, choices: Any, shown: str = "{}") -> str:
    """`` (did you mean X?)`` with the choice closest to ``name`` (written through ``shown``), or ``""`` when none is
    close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {shown.format(close[0])}?)" if close else ""


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line (an array's repr spans lines), cut to ``limit`` characters with ``...``: a value
    quoted in a one-line error."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _unknown_field(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """``unknown field`` with the closest field name of the (nested) model that ``loc[:-1]`` names in ``model``."""
    parent = _strip_optional(_field_annotation(model, [str(part) for part in loc[:-1]]))
    fields = parent.model_fields if isinstance(parent, type) and issubclass(parent, BaseModel) else {}
    return f"unknown field{did_you_mean(loc[-1], fields)}"


def refuse_empty_path(value: Any, info: ValidationInfo) -> Any:
    """A ``field_validator(..., mode="before")`` for path settings: an empty string would become ``Path(".")``, the
    working folder, and a key file or state folder set to ``""`` would then fail later with a message about ``.``."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{info.field_name} is empty: give a path, or leave the setting out")
    return value


def validation_problems(model: type[BaseModel], exc: ValidationError, prefix: str = "") -> str:
    """``exc`` (from validating ``model``) on one line, each error as ``prefix.field: message``, and an unknown
    field as ``prefix.field: unknown field (did you mean ...?)``: for a settings table that is validated apart from
    its service's config (a TrackMania env's ``recovery``...), in the words :func:`load_config` uses."""
    problems = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        field = ".".join(part for part in (prefix, *loc) if part)
        if error["type"] == "extra_forbidden":
            problems.append(f"{field}: {_unknown_field(model, loc)}")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:  # a check across fields: its message says which
            problems.append(f"{field}: {message}" if field else message)
            continue
        shown = "" if isinstance(error.get("input"), Mapping) else f" = {short_repr(error.get('input'))}"
        problems.append(f"{field}{shown}: {message}")
    return "; ".join(problems)


def _find(tree: Mapping[str, Any], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any] | None:
    """The longest prefix of ``loc`` that ``tree`` sets, and its value (None when it sets none)."""
    node: Any = tree
    for depth, part in enumerate(loc):
        if not isinstance(node, Mapping) or part not in node:
            return (tuple(loc[:depth]), node) if depth and not isinstance(node, Mapping) else None
        node = node[part]
    return tuple(loc), node


class _Sources:
    """Where each value came from, by precedence: command line, environment, file (defaults otherwise)."""

    def __init__(self, section: str, path: Path | None, file_data: Mapping[str, Any], env_data: Mapping[str, Any],
                 env_names: dict[tuple[str, ...], str], flag_data: Mapping[str, Any]) -> None:
        self.section, self.path = section, path
        self.file_data, self.env_data, self.env_names, self.flag_data = file_data, env_data, env_names, flag_data

    def describe(self, loc: tuple[Any, ...]) -> str:
        """``"a.b = 'x' from TMRL_...`` or ``... from the command line`` or ``... in FILE [table]``."""
        field = ".".join(map(str, loc))
        for where, data in (("the command line", self.flag_data), ("env", self.env_data), ("file", self.file_data)):
            found = _find(data, loc)
            if found is None:
                continue
            prefix, value = found
            shown = f"{'.'.join(map(str, prefix)) or field}"
            if not isinstance(value, Mapping):  # a table's check across its fields: its message quotes the values
                shown += f" = {value!r}"
            if where == "env":
                name = next((self.env_names[prefix[:n]] for n in range(len(prefix), 0, -1)
                             if prefix[:n] in self.env_names), f"{ENV_PREFIX}{self.section.upper()}__...")
                return f"{shown} from environment variable {name}"
            if where == "file":
                return f"{shown} in {self.path} [{self.section}]"
            return f"{shown} from {where}"
        return f"{field} (default)"


def _explain(model: type[BaseModel], error: Mapping[str, Any], sources: _Sources) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{sources.describe(loc)}: {_unknown_field(model, loc)}"
    if not loc:  # a check across fields (a model validator): no one value to quote, the message says which
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{sources.describe(loc)}: {str(error['msg']).removeprefix('Value error, ')}"


def _scalar_types(annotation: Any) -> set[Any]:
    """The plain types a field's annotation admits (through ``Optional``/unions, ``Annotated`` and ``Literal``);
    ``object`` for what is not judged here (``Any``, containers)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_scalar_types(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {type(value) for value in get_args(annotation)}
    return {annotation} if isinstance(annotation, type) else {object}


def _item_annotations(annotation: Any) -> list[Any]:
    """The item types of the list, tuple or set types an annotation admits (``list[int] | None`` → ``[int]``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _item_annotations(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [item for arg in get_args(annotation) for item in _item_annotations(arg)]
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        return [arg for arg in get_args(annotation) if arg is not Ellipsis]
    return []


def _boolean_for_a_number(annotation: Any, value: Any) -> bool:
    admitted = _scalar_types(annotation)
    return isinstance(value, bool) and bool(admitted & {int, float}) and not admitted & {bool, object}


def _booleans_for_numbers(model: type[BaseModel], data: Mapping[str, Any], loc: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where ``data`` gives ``true``/``false`` to a number field, or to a number in a list: pydantic reads them as 1
    and 0 (a CLI probe's ``worker_port = false`` bound a random port, ``publish_every = true`` published at every
    update, ``hidden_sizes = [true, 64]`` built a layer of one unit)."""
    found = []
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        admitted = _scalar_types(field.annotation)
        if _boolean_for_a_number(field.annotation, value):
            found.append((*loc, name))
        elif isinstance(value, Mapping):
            for nested in admitted:
                if isinstance(nested, type) and issubclass(nested, BaseModel):
                    found += _booleans_for_numbers(nested, value, (*loc, name))
        elif isinstance(value, list | tuple):
            items = _item_annotations(field.annotation)
            found += [(*loc, name, index) for index, item in enumerate(value)
                      if items and all(_boolean_for_a_number(annotation, item) for annotation in items)]
    return found


def load_config(
    model: type[ModelT],
    section: str,
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    known_sections: tuple[str, ...] = SERVICE_SECTIONS,
) -> ModelT:
    """Build ``model`` from table ``section`` of the TOML file at ``path`` (optional), env vars and ``overrides``.

    Raises :class:`ConfigError` naming where each bad value came from (file and table, environment variable or
    command line), the value given, and the closest field name for an unknown one; and for a top-level table of the
    file not in ``known_sections``.
    """
    file_data = _read_table(path, section, known_sections) if path is not None else {}
    env_names: dict[tuple[str, ...], str] = {}
    environ = os.environ if environ is None else environ
    _warn_of_unknown_env_names(environ, tuple(dict.fromkeys((*known_sections, section))))
    env_data = _env_overrides(section, environ, model, env_names)
    flag_data = _without_unset(overrides or {})
    data = _merge(_merge(file_data, env_data), flag_data)
    sources = _Sources(section, path, file_data, env_data, env_names, flag_data)
    booleans = _booleans_for_numbers(model, data)
    if booleans:
        problems = [f"{sources.describe(loc)}: a number is expected, not true or false" for loc in booleans]
        raise ConfigError(f"invalid config [{section}]: " + (problems[0] if len(problems) == 1 else
                                                             "".join(f"\n  {problem}" for problem in problems)))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_explain(model, e, sources) for e in exc.errors()]
        raise ConfigError(f"invalid config [{section}]: " + (problems[0] if len(problems) == 1 else
                                                             "".join(f"\n  {problem}" for problem in problems))) from exc


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
