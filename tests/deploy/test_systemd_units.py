"""The systemd unit files parse cleanly and start the right CLI (checked with systemd-analyze where it exists)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
VENV_BIN = Path(sys.executable).parent


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_every_service_has_a_unit() -> None:
    assert {u.name for u in UNITS} == {"tmrl-relay.service", "tmrl-trainer.service", "tmrl-worker@.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_runs_as_non_root_with_restart_policy_and_env_file(unit: Path) -> None:
    service = _unit(unit)["Service"]
    assert service["User"] == "tmrl"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "-/etc/tmrl/tmrl.env"
    command = service["ExecStart"].split()
    assert command[0].startswith("/opt/tmrl/.venv/bin/tmrl-")
    assert command[1:] == ["run", "--config", "/etc/tmrl/tmrl.toml"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_command_exists_in_the_installed_venv(unit: Path) -> None:
    executable = _unit(unit)["Service"]["ExecStart"].split()[0].rsplit("/", 1)[1]
    assert (VENV_BIN / executable).exists(), f"{executable} is not installed by make install"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_reports_nothing(unit: Path, tmp_path: Path) -> None:
    local = tmp_path / unit.name
    local.write_text(unit.read_text().replace("/opt/tmrl/.venv/bin/", f"{VENV_BIN}/"))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
