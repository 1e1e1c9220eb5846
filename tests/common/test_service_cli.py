"""Smoke tests of the three service CLIs: --help works and `run --show-config` prints the effective config."""

from __future__ import annotations

import tomllib

import pytest
import tmrl_relay.cli
import tmrl_trainer.cli
import tmrl_worker.cli
from tmrl_relay.config import RelayConfig
from tmrl_trainer.config import TrainerConfig
from tmrl_worker.config import WorkerConfig
from typer.testing import CliRunner

SERVICES = {
    "relay": (tmrl_relay.cli.app, RelayConfig),
    "worker": (tmrl_worker.cli.app, WorkerConfig),
    "trainer": (tmrl_trainer.cli.app, TrainerConfig),
}
# one override per service, on a field each config has had since the first commit
ENV_OVERRIDES = {
    "relay": ("TMRL_RELAY__WORKER_PORT", "6555", "worker_port", 6555),
    "worker": ("TMRL_WORKER__WORKER_ID", "77", "worker_id", "77"),
    "trainer": ("TMRL_TRAINER__TRAINER_ID", "trainer-b", "trainer_id", "trainer-b"),
}


@pytest.fixture
def runner(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("TMRL_"):
            monkeypatch.delenv(key)
    return CliRunner()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_help_lists_the_run_command(service, runner):
    app, _ = SERVICES[service]
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "run" in result.output
    run_help = runner.invoke(app, ["run", "--help"])
    assert run_help.exit_code == 0 and "--show-config" in run_help.output and "--config" in run_help.output


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_show_config_prints_the_defaults_as_toml(service, runner):
    app, model = SERVICES[service]
    result = runner.invoke(app, ["run", "--show-config"])
    assert result.exit_code == 0, result.output
    table = tomllib.loads(result.stdout)[service]
    assert model.model_validate(table) == model()
    for name, value in model().model_dump(mode="json", exclude_none=True).items():
        assert table[name] == value, name


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_show_config_includes_an_env_override(service, runner):
    app, model = SERVICES[service]
    key, text, field, expected = ENV_OVERRIDES[service]
    result = runner.invoke(app, ["run", "--show-config"], env={key: text})
    assert result.exit_code == 0, result.output
    table = tomllib.loads(result.stdout)[service]
    assert table[field] == expected
    assert model.model_validate(table) == model(**{field: expected})


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_show_config_reads_the_services_table_of_a_config_file(service, runner, tmp_path):
    app, _ = SERVICES[service]
    _, _, field, expected = ENV_OVERRIDES[service]
    path = tmp_path / "tmrl.toml"
    value = f'"{expected}"' if isinstance(expected, str) else expected
    path.write_text(f"[{service}]\n{field} = {value}\n")
    result = runner.invoke(app, ["run", "--config", str(path), "--show-config"])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)[service][field] == expected


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_missing_config_file_is_a_usage_error(service, runner, tmp_path):
    app, _ = SERVICES[service]
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "missing.toml"), "--show-config"])
    assert result.exit_code == 2


@pytest.mark.parametrize(("app", "command"), [(tmrl_worker.cli.app, ["layout"]),
                                              (tmrl_trainer.cli.app, ["train-local", "--env", "Pendulum-v1"])])
def test_other_commands_report_an_invalid_config_as_a_usage_error_naming_the_field(app, command, runner, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[worker]\nbatch_steps = "many"\n[trainer]\nmemory_capacity = "lots"\n')
    result = runner.invoke(app, [*command, "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "invalid config" in result.output and ("batch_steps" in result.output or "memory_capacity" in result.output)


def _options(app, command: str) -> dict[str, str]:
    """``{"--name": help}`` of every option of ``command`` (``train-local``...), from the CLI as typer builds it."""
    import typer.main

    group = typer.main.get_command(app)
    return {name: param.help or "" for param in group.commands[command].params
            for name in getattr(param, "opts", []) if name.startswith("--")}


RUN_COMMANDS = [(tmrl_relay.cli.app, "run"), (tmrl_worker.cli.app, "run"), (tmrl_trainer.cli.app, "run"),
                (tmrl_trainer.cli.app, "train-local"), (tmrl_worker.cli.app, "eval"), (tmrl_trainer.cli.app, "export")]


@pytest.mark.parametrize(("app", "command"), RUN_COMMANDS)
def test_every_option_has_help_and_shared_options_share_their_help(app, command):
    from tmrl_common.options import HELP

    options = _options(app, command)
    assert [name for name, text in options.items() if not text and name != "--help"] == []
    for key, text in HELP.items():
        name = "--" + key.replace("_", "-")
        if name in options and (command, name) != ("train-local", "--env"):  # gymnasium envs only there
            assert options[name].startswith(text), f"{command} {name}: {options[name]!r}"


def test_train_local_has_show_config_log_level_and_the_run_option_names():
    options = _options(tmrl_trainer.cli.app, "train-local")
    assert {"--show-config", "--log-level", "--max-steps", "--torch-threads", "--seed", "--device"} <= set(options)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_an_unknown_log_level_is_refused_before_anything_starts_listing_the_choices(service, runner):
    app, _ = SERVICES[service]
    result = runner.invoke(app, ["run", "--log-level", "LOUD"])
    assert result.exit_code == 2
    words = "".join(ch for ch in result.output if ch not in "│╭╮╰╯─").split()
    assert "'LOUD' is not one of 'debug', 'info', 'warning', 'error'" in " ".join(words)


def test_an_unknown_device_fails_show_config_naming_the_flag(runner):
    result = runner.invoke(tmrl_trainer.cli.app, ["run", "--device", "gpu", "--show-config"])
    assert result.exit_code == 2
    assert "device = 'gpu' from the command line" in result.output and "cuda:N" in result.output


def test_train_local_show_config_prints_the_trainer_table_with_its_flags(runner):
    result = runner.invoke(tmrl_trainer.cli.app, ["train-local", "--show-config", "--seed", "7", "--torch-threads", "2"])
    assert result.exit_code == 0, result.output
    table = tomllib.loads(result.stdout)["trainer"]
    assert (table["seed"], table["torch_threads"]) == (7, 2)


def _leaf_commands(command, path: tuple[str, ...]):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_option_of_every_command_has_help(service):
    import typer.main

    app, _ = SERVICES[service]
    missing = [f"{' '.join(path)} {param.opts[0] if getattr(param, 'opts', None) else param.name}"
               for path, command in _leaf_commands(typer.main.get_command(app), (service,))
               for param in command.params if param.name != "help" and not getattr(param, "help", None)
               and getattr(param, "param_type_name", "option") == "option"]
    assert not missing, f"options without help: {missing}"


def test_trainer_run_takes_seed_and_torch_threads_from_the_command_line(runner):
    result = runner.invoke(tmrl_trainer.cli.app, ["run", "--seed", "7", "--torch-threads", "3", "--show-config"])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)["trainer"]
    assert shown["seed"] == 7 and shown["torch_threads"] == 3


def test_trainer_run_refuses_zero_torch_threads(runner):
    result = runner.invoke(tmrl_trainer.cli.app, ["run", "--torch-threads", "0", "--show-config"])
    assert result.exit_code == 2


def test_a_checkpoint_of_another_architecture_stops_the_trainer_in_one_line(runner, monkeypatch, tmp_path):
    from tmrl_trainer import service
    from tmrl_trainer.checkpoint import CheckpointMismatchError

    class WrongCheckpoint:
        def __init__(self, config) -> None:
            raise CheckpointMismatchError("checkpoint-000000000010.safetensors was written for another policy "
                                          "architecture; start with the same layout and hidden sizes, or from scratch")

    monkeypatch.setattr(service, "TrainerService", WrongCheckpoint)
    result = runner.invoke(tmrl_trainer.cli.app, ["run", "--insecure", "--device", "cpu", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("tmrl-trainer: checkpoint-000000000010.safetensors was written for another")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("service", "args", "option"), [
    ("trainer", ["run", "--insecure", "--env", "sim", "--show-config", "--run-dir"], "--run-dir"),
    ("trainer", ["train-local", "--steps", "5", "--run-dir"], "--run-dir"),
    ("worker", ["run", "--show-config", "--state-dir"], "--state-dir"),
    ("worker", ["check-env", "--save-frames"], "--save-frames"),
    ("relay", ["run", "--show-config", "--allow-dir"], "--allow-dir"),
    ("relay", ["keys", "init", "--allow-dir", "allow", "--worker", "w1", "--dir"], "--dir"),
    ("relay", ["keys", "init", "--dir", "keys", "--worker", "w1", "--allow-dir"], "--allow-dir"),
])
def test_an_empty_or_file_folder_option_is_refused_before_anything_is_written(service, args, option, runner, tmp_path,
                                                                             monkeypatch):
    """A CLI probe: `Path("")` is the current folder, so `--run-dir ""` wrote a run into the repository root and
    `keys init --dir ""` wrote the secret keys there, where the same value from a config file was refused."""
    monkeypatch.chdir(tmp_path)
    app, _ = SERVICES[service]
    empty = runner.invoke(app, [*args, ""])
    assert empty.exit_code == 2 and f"Invalid value for '{option}': is empty; give a folder" in " ".join(
        empty.output.split()), empty.output
    (tmp_path / "a-file").write_text("not a folder")
    file = runner.invoke(app, [*args, "a-file"])
    assert file.exit_code == 2 and "'a-file' is a file, not a folder" in " ".join(file.output.split()), file.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written in the current folder
