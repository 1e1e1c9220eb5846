"""docs/trackmania.md and deploy/tmrl.example.toml document every TrackMania reward, recovery and stale-frames
setting."""

from __future__ import annotations

import re
from pathlib import Path

from tmrl_worker.reward import TrajectoryRewardConfig
from tmrl_worker.tm20.interfaces import RecoveryConfig
from tmrl_worker.tm20.stale_frames import StaleFrameConfig

REPO = Path(__file__).resolve().parents[2]


def trackmania_table_fields() -> set[str]:
    """Field names in the first column of docs/trackmania.md's tables."""
    return set(re.findall(r"^\| `(\w+)` \|", (REPO / "docs" / "trackmania.md").read_text(), flags=re.M))


def example_config_fields() -> set[str]:
    """Field names commented in deploy/tmrl.example.toml (``#   name = value``)."""
    return set(re.findall(r"^#\s+(\w+) = ", (REPO / "deploy" / "tmrl.example.toml").read_text(), flags=re.M))


def test_every_reward_config_field_is_in_the_trackmania_table_and_the_example_config():
    table, in_example = trackmania_table_fields(), example_config_fields()
    fields = set(TrajectoryRewardConfig.model_fields)
    assert fields <= table, f"docs/trackmania.md does not describe {sorted(fields - table)}"
    assert fields <= in_example, f"deploy/tmrl.example.toml does not describe {sorted(fields - in_example)}"


def test_every_recovery_field_is_named_in_the_trackmania_doc():
    doc = (REPO / "docs" / "trackmania.md").read_text()
    missing = [name for name in RecoveryConfig.model_fields if f"`{name}`" not in doc and f"{name} =" not in doc]
    assert not missing, f"docs/trackmania.md does not name {missing}"


def test_every_stale_frames_field_is_in_the_trackmania_table_and_every_recovery_field_in_the_example_config():
    table, in_example = trackmania_table_fields(), example_config_fields()
    stale = set(StaleFrameConfig.model_fields)
    assert stale <= table, f"docs/trackmania.md does not describe {sorted(stale - table)}"
    documented = stale | set(RecoveryConfig.model_fields)
    assert documented <= in_example, f"deploy/tmrl.example.toml does not describe {sorted(documented - in_example)}"


def test_the_just_the_environment_block_runs_as_written_against_the_emulated_game(tmp_path):
    import subprocess
    import sys

    section = (REPO / "docs" / "trackmania.md").read_text().split("## Just the environment", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    script = tmp_path / "own_loop.py"
    script.write_text(block)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steps, episode_return = re.fullmatch(r"return after (\d+) steps: (\S+)\n", done.stdout).groups()
    assert 1 <= int(steps) <= 100 and float(episode_return) > 0, done.stdout
