"""deploy/tmrl.example.toml loads with every service's config model and mentions every field they have."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel
from tmrl_common.config import load_config
from tmrl_relay.config import RelayConfig
from tmrl_trainer.config import TrainerConfig
from tmrl_worker.config import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "tmrl.example.toml"
SERVICES = {"relay": RelayConfig, "worker": WorkerConfig, "trainer": TrainerConfig}
_TABLE = re.compile(r"^\[([a-z_.]+)\]\s*(#.*)?$")
_KEY = re.compile(r"^#?\s*([a-z_][a-z0-9_]*)\s*[=:]")


def _nested_model(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _field_paths(model: type[BaseModel], prefix: str) -> set[str]:
    """``table.field`` for every field of ``model``, recursing into nested models (which are TOML tables)."""
    paths = set()
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            paths |= _field_paths(nested, f"{prefix}.{name}")
        else:
            paths.add(f"{prefix}.{name}")
    return paths


def _mentioned_paths(text: str) -> set[str]:
    """``table.key`` for every key set in the file, or named in a comment line ``# key = ...`` / ``# key: ...``."""
    table = ""
    mentioned = set()
    for line in text.splitlines():
        stripped = line.strip()
        if match := _TABLE.match(stripped):
            table = match.group(1)
            mentioned.add(table)  # a table header mentions its field (e.g. [worker.env_options])
        elif table and (match := _KEY.match(stripped)):
            mentioned.add(f"{table}.{match.group(1)}")
    return mentioned


@pytest.mark.parametrize("section", sorted(SERVICES))
def test_example_config_loads_with_the_service_model(section: str) -> None:
    config = load_config(SERVICES[section], section, EXAMPLE, environ={})
    assert isinstance(config, SERVICES[section])


def test_example_config_sets_the_values_its_comments_promise() -> None:
    relay = load_config(RelayConfig, "relay", EXAMPLE, environ={})
    worker = load_config(WorkerConfig, "worker", EXAMPLE, environ={})
    trainer = load_config(TrainerConfig, "trainer", EXAMPLE, environ={})
    assert relay.bind_host == "*" and not relay.security.insecure
    assert (worker.worker_port, worker.weights_port) == (relay.worker_port, relay.weights_port)
    assert trainer.trainer_port == relay.trainer_port
    assert worker.env == trainer.env
    assert worker.security.server_public_key_file == trainer.security.server_public_key_file
    assert worker.security.server_public_key_file.name == Path(str(relay.security.secret_key_file).removesuffix("_secret")).name


@pytest.mark.parametrize("section", sorted(SERVICES))
def test_example_config_mentions_every_field_of_the_service(section: str) -> None:
    mentioned = _mentioned_paths(EXAMPLE.read_text())
    missing = sorted(_field_paths(SERVICES[section], section) - mentioned)
    assert not missing, f"deploy/tmrl.example.toml does not document {missing}: add them (set, or commented out)"


def _set_values(text: str):
    """``(table, key, line, comment lines just above)`` for every key the file sets."""
    table, comments = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if match := _TABLE.match(stripped):
            table, comments = match.group(1), []
        elif stripped.startswith("#"):
            comments.append(stripped)
        elif not stripped:
            comments = []
        elif match := re.match(r"^([a-z_][a-z0-9_]*)\s*=", stripped):
            yield table, match.group(1), line, comments
            comments = []


def test_every_value_that_is_not_the_default_says_so() -> None:
    document = tomllib.loads(EXAMPLE.read_text())
    defaults = {section: model().model_dump(mode="json") for section, model in SERVICES.items()}
    unmarked = []
    for table, key, line, comments in _set_values(EXAMPLE.read_text()):
        value, default = document, defaults
        for part in table.split("."):
            value, default = value[part], default.get(part, {}) if isinstance(default, dict) else {}
        if not isinstance(default, dict) or key not in default:
            continue  # a free-form table (env_options): no defaults to compare with
        if value[key] != default[key] and not any("not the default" in text for text in [line, *comments]):
            unmarked.append(f"[{table}] {key}")
    assert not unmarked, f"set to a value other than the default without saying so: {unmarked}"
