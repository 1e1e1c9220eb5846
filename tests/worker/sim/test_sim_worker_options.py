"""The simulator's ``env_options`` are checked when the worker's config is read, as TrackMania's are: an outside
probe's ``episode_tracks = "random:0-100"`` (held-out tracks) passed ``tmrl-worker run --show-config`` with exit 0,
and was refused only when the worker built its env."""

from __future__ import annotations

import pytest
from tmrl_worker.cli import app
from typer.testing import CliRunner

BAD_SIM_OPTIONS = [
    ('episode_tracks = "random:0-100"', "episode_tracks item 'random:0-100' includes the held-out evaluation tracks"),
    ('trak = "oval"', "env_options.trak: unknown option for env '{env}' (did you mean track?)"),
    ('track = "nowhere"', "env_options for env '{env}': track: "),
    ("car = { grip = -1 }", "env_options for env '{env}': car.grip: Input should be greater than 0"),
    ("reward = { finish_bonuss = 1.0 }", "env_options for env '{env}': reward.finish_bonuss: Extra inputs"),
]


@pytest.mark.parametrize("env", ["sim", "sim-fast"])
@pytest.mark.parametrize(("option", "message"), BAD_SIM_OPTIONS,
                         ids=["held-out-tracks", "unknown-option", "unknown-track", "car-value", "reward-field"])
@pytest.mark.parametrize("command", [["run", "--insecure", "--show-config"], ["layout"]])
def test_a_bad_sim_env_option_is_refused_in_one_line_when_the_config_is_read(command, env, option, message, tmp_path,
                                                                             monkeypatch):
    import tmrl_worker.envs

    monkeypatch.setattr(tmrl_worker.envs, "make_env", lambda *a, **k: pytest.fail("the env was built"))
    config = tmp_path / "tmrl.toml"
    config.write_text(f'[worker]\nenv = "{env}"\n[worker.env_options]\n{option}\n')
    result = CliRunner().invoke(app, [*command, "--config", str(config)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert message.format(env=env) in lines[0], lines[0]


def test_the_documented_sim_env_options_pass_show_config(tmp_path):
    config = tmp_path / "tmrl.toml"
    config.write_text('[worker]\nenv = "sim"\n[worker.env_options]\ntrack = "random:3"\n'
                      'episode_tracks = "hairpins,random:1000-100000"\nphysics_hz = 200\nreward = { step_penalty = 0.5 }\n'
                      'car = { grip = 10.0 }\n')
    result = CliRunner().invoke(app, ["run", "--insecure", "--show-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert 'episode_tracks = "hairpins,random:1000-100000"' in result.output
