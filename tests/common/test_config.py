"""load_config: TOML table, then env vars, then flags; render_config writes TOML that parses back to the same values."""

from __future__ import annotations

import math
import tomllib
from enum import Enum
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tmrl_common.config import load_config, render_config
from tmrl_common.errors import ConfigError


class SacConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gamma: float = 0.99
    hidden: list[int] = [256, 256]
    polyak: float = Field(default=0.995, gt=0, lt=1)


class Device(str, Enum):  # noqa: UP042 - configs written against Python 3.10-style str enums must keep working
    cpu = "cpu"
    cuda = "cuda"


class ExampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: str = "worker-1"
    port: int = Field(default=5555, ge=1, le=65535)
    verbose: bool = False
    mode: Literal["sim", "tm20"] = "sim"
    device: Device = Device.cpu
    checkpoint: Path | None = None
    max_batches: int | None = None
    tags: dict[str, str] = {}
    sac: SacConfig = SacConfig()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tmrl.toml"
    path.write_text(text)
    return path


def test_defaults_when_there_is_no_file_no_env_and_no_flags():
    assert load_config(ExampleConfig, "example", environ={}) == ExampleConfig()


def test_values_come_from_the_services_own_table(tmp_path):
    path = write(tmp_path, """
[example]
port = 6000
worker_id = "w7"
[example.sac]
gamma = 0.9
[relay]
port = 1
""")
    config = load_config(ExampleConfig, "example", path, environ={})
    assert (config.port, config.worker_id, config.sac.gamma, config.sac.polyak) == (6000, "w7", 0.9, 0.995)


def test_a_missing_table_means_defaults(tmp_path):
    assert load_config(ExampleConfig, "example", write(tmp_path, "[relay]\nx = 1\n"), environ={}) == ExampleConfig()


def test_env_vars_override_the_file_including_nested_fields(tmp_path):
    path = write(tmp_path, "[example]\nport = 6000\n[example.sac]\ngamma = 0.9\nhidden = [1]\n")
    environ = {"TMRL_EXAMPLE__PORT": "7000", "TMRL_EXAMPLE__SAC__GAMMA": "0.5", "TMRL_OTHER__PORT": "1", "PATH": "/bin"}
    config = load_config(ExampleConfig, "example", path, environ=environ)
    assert (config.port, config.sac.gamma, config.sac.hidden) == (7000, 0.5, [1])


def test_a_tmrl_variable_no_table_reads_is_warned_about_once_with_the_name_meant(caplog, monkeypatch):
    """An outside probe: ``TMRL_TRAINR__SEED=3`` and ``TMRL_TRAINER_SEED=3`` were ignored without a word, while a
    misspelt table of the file is an error."""
    import tmrl_common.config as config_module

    monkeypatch.setattr(config_module, "_warned_env_names", set())
    environ = {"TMRL_TRAINR__SEED": "3", "TMRL_TRAINER_SEED": "3", "TMRL_TRAINER__SEED": "5",
               "TMRL_STOP_ON_STDIN_CLOSE": "1", "TMRL_EXAMPLE__PORT": "7000", "TMRL_EXAMPL__SAC__GAMMA": "0.5"}
    with caplog.at_level("WARNING", logger="tmrl_common.config"):
        assert load_config(ExampleConfig, "example", environ=environ).port == 7000
        load_config(ExampleConfig, "example", environ=environ)  # said once per process
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 3
    assert messages[0].startswith("environment variable TMRL_EXAMPL__SAC__GAMMA sets nothing: tmrl reads "
                                  "TMRL_<TABLE>__<FIELD> for the tables relay, worker, trainer, example")
    assert messages[0].endswith("(did you mean TMRL_EXAMPLE__SAC__GAMMA?)")
    assert messages[1].startswith("environment variable TMRL_TRAINER_SEED") and "TMRL_TRAINER__SEED?" in messages[1]
    assert messages[2].startswith("environment variable TMRL_TRAINR__SEED") and "TMRL_TRAINER__SEED?" in messages[2]


def test_env_values_are_parsed_as_json():
    environ = {"TMRL_EXAMPLE__VERBOSE": "true", "TMRL_EXAMPLE__SAC__HIDDEN": "[64, 32]",
               "TMRL_EXAMPLE__TAGS": '{"site": "lab"}', "TMRL_EXAMPLE__MAX_BATCHES": "null"}
    config = load_config(ExampleConfig, "example", environ=environ)
    assert config.verbose is True and config.sac.hidden == [64, 32] and config.tags == {"site": "lab"}
    assert config.max_batches is None


def test_env_text_for_string_fields_is_kept_as_written():
    environ = {"TMRL_EXAMPLE__WORKER_ID": "123", "TMRL_EXAMPLE__MODE": "tm20", "TMRL_EXAMPLE__DEVICE": "cuda",
               "TMRL_EXAMPLE__CHECKPOINT": "/tmp/1", "TMRL_EXAMPLE__TAGS__SITE": "true"}
    config = load_config(ExampleConfig, "example", environ=environ)
    assert config.worker_id == "123" and config.mode == "tm20" and config.device is Device.cuda
    assert config.checkpoint == Path("/tmp/1")
    assert config.tags == {"site": "true"}  # a value of a dict[str, str] field is a str field too


def test_lower_case_field_names_in_env_keys_work_too():
    assert load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__port": "6001"}).port == 6001


def test_flags_override_env_and_none_flags_are_ignored():
    environ = {"TMRL_EXAMPLE__PORT": "7000", "TMRL_EXAMPLE__WORKER_ID": "env"}
    config = load_config(ExampleConfig, "example", overrides={"port": 8000, "worker_id": None}, environ=environ)
    assert (config.port, config.worker_id) == (8000, "env")


def test_process_environment_is_read_when_no_environ_is_given(monkeypatch):
    monkeypatch.setenv("TMRL_EXAMPLE__PORT", "6123")
    assert load_config(ExampleConfig, "example").port == 6123


def test_unknown_keys_in_the_file_are_rejected_naming_the_field(tmp_path):
    path = write(tmp_path, "[example]\nprot = 6000\n")
    with pytest.raises(ConfigError, match="prot") as info:
        load_config(ExampleConfig, "example", path, environ={})
    assert str(path) in str(info.value)


def test_unknown_nested_keys_are_rejected_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"sac\.gama"):
        load_config(ExampleConfig, "example", write(tmp_path, "[example.sac]\ngama = 0.9\n"), environ={})


def test_unknown_env_keys_are_rejected_naming_the_field():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__BOGUS": "1"})


def test_a_misspelt_table_is_an_error_listing_the_known_tables(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, "example", write(tmp_path, "[example]\nport = 1\n[trainr]\nx = 1\n"), environ={})
    assert "unknown table [trainr] (did you mean [trainer]?)" in str(info.value)
    assert "[relay], [worker], [trainer], [example]" in str(info.value)


def test_a_config_file_without_the_services_table_is_said_not_silently_taken_as_defaults(tmp_path, caplog):
    """A config probe: a file with only [trainer] given to the relay ran it on its defaults without a word."""
    caplog.set_level("WARNING", logger="tmrl_common.config")
    load_config(ExampleConfig, "example", write(tmp_path, "[example]\nport = 1\n[trainer]\nx = 1\n"), environ={})
    assert "has no [example] table" not in caplog.text
    path = write(tmp_path, "[trainer]\nx = 1\n")
    assert load_config(ExampleConfig, "example", path, environ={}) == ExampleConfig()
    assert f"config file {path} has no [example] table: example runs on its defaults" in caplog.text


def test_errors_name_the_env_variable_and_the_value_it_gave_not_the_file(tmp_path):
    path = write(tmp_path, "[example]\nport = 6000\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, "example", path, environ={"TMRL_EXAMPLE__SAC__GAMMA": "abc"})
    assert "sac.gamma = 'abc' from environment variable TMRL_EXAMPLE__SAC__GAMMA" in str(info.value)
    assert str(path) not in str(info.value)


def test_errors_name_the_command_line_for_flag_values():
    with pytest.raises(ConfigError, match=r"port = 70000 from the command line: .*less than or equal to 65535"):
        load_config(ExampleConfig, "example", overrides={"port": 70000}, environ={})


class PairedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: str = "train"
    keep: bool = False

    @model_validator(mode="after")
    def _keep_needs_test(self) -> PairedConfig:
        if self.keep and self.mode != "test":
            raise ValueError("keep needs mode test")
        return self


def test_an_error_across_fields_is_its_message_alone():
    with pytest.raises(ConfigError) as caught:
        load_config(PairedConfig, "example", overrides={"keep": True}, environ={})
    assert str(caught.value) == "invalid config [example]: keep needs mode test"


class NestedPairConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pair: PairedConfig = PairedConfig()


def test_an_error_across_the_fields_of_a_sub_table_names_the_table_not_its_contents(tmp_path):
    path = write(tmp_path, "[example.pair]\nkeep = true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(NestedPairConfig, "example", path, environ={})
    assert str(caught.value) == f"invalid config [example]: pair in {path} [example]: keep needs mode test"


def test_file_errors_name_the_file_the_table_and_the_value(tmp_path):
    path = write(tmp_path, "[example.sac]\npolyak = 1.5\n")
    with pytest.raises(ConfigError, match=rf"sac.polyak = 1.5 in {path} \[example\]"):
        load_config(ExampleConfig, "example", path, environ={})


def test_unknown_fields_get_the_closest_known_name(tmp_path):
    with pytest.raises(ConfigError, match=r"sac.gama = 0.9 .*unknown field \(did you mean gamma\?\)"):
        load_config(ExampleConfig, "example", write(tmp_path, "[example.sac]\ngama = 0.9\n"), environ={})
    with pytest.raises(ConfigError, match=r"TMRL_EXAMPLE__PROT: unknown field \(did you mean port\?\)"):
        load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__PROT": "1"})


def test_values_out_of_range_or_of_the_wrong_type_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="port"):
        load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__PORT": "70000"})
    with pytest.raises(ConfigError, match="polyak"):
        load_config(ExampleConfig, "example", write(tmp_path, "[example.sac]\npolyak = 1.5\n"), environ={})
    with pytest.raises(ConfigError, match="port"):
        load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__PORT": "many"})


def test_missing_file_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml.*does not exist"):
        load_config(ExampleConfig, "example", missing, environ={})


def test_invalid_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ExampleConfig, "example", write(tmp_path, "[example\nport = 1\n"), environ={})


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_a_config_error(tmp_path):
    """A CLI probe's UTF-16 file (BOM ff fe) ended `run --show-config` in a UnicodeDecodeError traceback."""
    utf16 = tmp_path / "utf16.toml"
    utf16.write_bytes("[example]\nport = 1\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"utf16.toml is not UTF-8 text \(TOML files are\): byte 0xff at position 0"):
        load_config(ExampleConfig, "example", utf16, environ={})
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"folder.toml cannot be read: Is a directory"):
        load_config(ExampleConfig, "example", folder, environ={})


def test_a_section_that_is_not_a_table_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(ExampleConfig, "example", write(tmp_path, "example = 3\n"), environ={})


def test_conflicting_env_vars_are_a_config_error_not_a_crash():
    environ = {"TMRL_EXAMPLE__SAC": "1", "TMRL_EXAMPLE__SAC__GAMMA": "0.5"}
    with pytest.raises(ConfigError, match="TMRL_EXAMPLE__SAC"):
        load_config(ExampleConfig, "example", environ=environ)


def reparsed(config: BaseModel, section: str) -> dict:
    return tomllib.loads(render_config(config, section))[section]


def test_render_config_parses_back_to_the_same_model():
    config = ExampleConfig(worker_id='odd "id" \\ é 😀\n\ttab\x01', port=6000, verbose=True, mode="tm20",
                           device=Device.cuda, checkpoint=Path("/var/lib/tmrl/ckpt"), max_batches=3,
                           tags={"a b": "c", "plain": "d"}, sac=SacConfig(gamma=1e-20, hidden=[]))
    table = reparsed(config, "example")
    assert ExampleConfig.model_validate(table) == config
    assert table["sac"]["gamma"] == 1e-20 and table["tags"] == {"a b": "c", "plain": "d"}


def test_render_config_writes_nested_models_as_sub_tables():
    text = render_config(ExampleConfig(), "example")
    assert "[example]\n" in text and "[example.sac]\n" in text
    assert text.index("port = 5555") < text.index("[example.sac]")


def test_render_config_marks_unset_values_and_they_read_back_as_the_default():
    text = render_config(ExampleConfig(), "example")
    assert "# checkpoint = (unset)" in text
    table = reparsed(ExampleConfig(), "example")
    assert "checkpoint" not in table and ExampleConfig.model_validate(table) == ExampleConfig()


class Deep(BaseModel):
    level3: dict[str, dict[str, int]] = {"x": {"y": 1}}
    items: list[dict[str, int]] = [{"a": 1}, {"b": 2}]
    ratio: float = math.inf
    negative: float = -math.inf


def test_render_config_handles_deep_tables_arrays_of_tables_and_infinities():
    table = reparsed(Deep(), "deep")
    assert table == {"level3": {"x": {"y": 1}}, "items": [{"a": 1}, {"b": 2}], "ratio": math.inf, "negative": -math.inf}


def test_render_config_of_a_loaded_config_reloads_to_the_same_config(tmp_path):
    environ = {"TMRL_EXAMPLE__SAC__HIDDEN": "[8]", "TMRL_EXAMPLE__WORKER_ID": "42"}
    config = load_config(ExampleConfig, "example", environ=environ)
    path = write(tmp_path, render_config(config, "example"))
    assert load_config(ExampleConfig, "example", path, environ={}) == config


def test_unset_flags_in_nested_overrides_keep_file_values(tmp_path):
    path = write(tmp_path, "[example.sac]\ngamma = 0.9\npolyak = 0.5\n")
    config = load_config(ExampleConfig, "example", path, overrides={"sac": {"gamma": None, "polyak": 0.75}}, environ={})
    assert config.sac.gamma == 0.9 and config.sac.polyak == 0.75
    untouched = load_config(ExampleConfig, "example", path, overrides={"sac": {"gamma": None}}, environ={})
    assert untouched.sac.gamma == 0.9 and untouched.sac.polyak == 0.5


def test_validation_problems_put_a_table_validated_apart_on_one_line_with_paths_and_closest_names():
    from pydantic import ValidationError
    from tmrl_common.config import validation_problems

    with pytest.raises(ValidationError) as caught:
        ExampleConfig.model_validate({"port": 0, "sac": {"gama": 0.9}, "worker_id": ["x" * 100]})
    problems = validation_problems(ExampleConfig, caught.value, "env_options.example")
    assert "\n" not in problems
    parts = problems.split("; ")
    assert parts[0].startswith("env_options.example.worker_id = ['xxxxxxx") and "...: " in parts[0]
    assert len(parts[0].split(":")[0]) < 100  # a long value is cut, not quoted whole
    assert parts[1].startswith("env_options.example.port = 0: Input should be greater than or equal to 1")
    assert parts[2] == "env_options.example.sac.gama: unknown field (did you mean gamma?)"


def test_true_or_false_for_a_number_is_refused_wherever_it_comes_from(tmp_path):
    """A CLI probe: pydantic read `worker_port = false` as 0 (a random port), `publish_every = true` and
    TMRL_WORKER__BATCH_STEPS=true as 1, without a word."""
    path = write(tmp_path, "[example]\nport = false\nverbose = true\n[example.sac]\npolyak = true\n")
    with pytest.raises(ConfigError) as refused:
        load_config(ExampleConfig, "example", path, environ={"TMRL_EXAMPLE__MAX_BATCHES": "true"})
    assert str(refused.value) == (
        "invalid config [example]: "
        f"\n  port = False in {path} [example]: a number is expected, not true or false"
        f"\n  sac.polyak = True in {path} [example]: a number is expected, not true or false"
        "\n  max_batches = True from environment variable TMRL_EXAMPLE__MAX_BATCHES: a number is expected, not true or "
        "false")
    assert load_config(ExampleConfig, "example", write(tmp_path, "[example]\nverbose = true\nport = 7\n"),
                       environ={}).verbose  # a bool field takes them, a number field its numbers
    listed = write(tmp_path, "[example.sac]\nhidden = [true, 64]\n")  # the re-check probe's layer of one unit
    with pytest.raises(ConfigError, match=r"sac.hidden = \[True, 64\] in .* a number is expected, not true or false"):
        load_config(ExampleConfig, "example", listed, environ={})
    with pytest.raises(ConfigError, match=r"from environment variable TMRL_EXAMPLE__SAC__HIDDEN: a number is expected"):
        load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__SAC__HIDDEN": "[64, false]"})
    assert load_config(ExampleConfig, "example", environ={"TMRL_EXAMPLE__SAC__HIDDEN": "[64, 32]"}).sac.hidden == [64, 32]
