"""The systemd unit files parse cleanly, start the right CLI, start for any worker id, do not restart on a config
error, and are sandboxed (``systemd-analyze verify`` and ``security --offline`` where the tool exists); the installer
puts torch only where a role needs it."""

from __future__ import annotations

import configparser
import os
import re
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


def _directives(unit: Path) -> list[tuple[str, str]]:
    """Every ``Key=value`` line of the [Service] section in order (configparser keeps only the last of repeated keys)."""
    section, found = None, []
    for line in unit.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.append((key, value))
    return found


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_a_config_error_is_not_restarted_forever(unit: Path) -> None:
    assert _unit(unit)["Service"]["RestartPreventExitStatus"] == "2"  # typer usage errors and ConfigError exit 2


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_sandboxed(unit: Path) -> None:
    service = dict(_directives(unit))
    for key, value in {"NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true",
                       "PrivateTmp": "true", "CapabilityBoundingSet": "", "RestrictNamespaces": "true",
                       "SystemCallArchitectures": "native", "ReadOnlyPaths": "/etc/tmrl"}.items():
        assert service.get(key) == value, f"{unit.name}: {key}={service.get(key)!r}"
    assert "ReadWritePaths" not in service, "state is writable through StateDirectory= only"


@pytest.mark.parametrize("unit", [u for u in UNITS if "relay" not in u.name], ids=lambda p: p.name)
def test_state_lives_in_a_state_directory_systemd_creates_for_any_instance(unit: Path) -> None:
    service = _unit(unit)["Service"]
    state = service["StateDirectory"]
    assert service["WorkingDirectory"] == f"%S/{state}"
    if "worker" in unit.name:
        assert state == "tmrl/worker-%i"  # tmrl-worker@worker-2 starts without install.sh having seen worker-2
        assert f"TMRL_WORKER__STATE_DIR=%S/{state}" in [v for k, v in _directives(unit) if k == "Environment"]


def test_installer_puts_torch_only_where_a_role_needs_it() -> None:
    def plan(*roles: str) -> str:
        result = subprocess.run(["bash", str(REPO / "deploy/systemd/install.sh"), "--dry-run", *roles],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert plan("relay").splitlines()[:4] == ["torch: no", "package: libs/common", "package: services/relay",
                                              "unit: /etc/systemd/system/tmrl-relay.service"]
    assert plan("trainer").splitlines()[0] == "torch: yes"
    assert "package: services/worker" in plan("worker:worker-1")
    # a docs probe: deployment.md has the trainer and worker hosts run `tmrl-relay keys generate`, which only the
    # relay's package installs: every host gets it (without its unit)
    for role in ("trainer", "worker"):
        assert "package: services/relay" in plan(role) and "tmrl-relay.service" not in plan(role)
    # an operator's probe: the dry run named no unit, file or user, and took --dry-run as the first argument only
    worker_plan = plan("worker", "--dry-run")
    assert "unit: /etc/systemd/system/tmrl-worker@.service" in worker_plan and "user: tmrl" in worker_plan
    assert "config: /etc/tmrl/tmrl.toml" in worker_plan


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_security_rates_the_unit_ok(unit: Path, tmp_path: Path) -> None:
    local = tmp_path / unit.name.replace("@.", "@worker-2.")  # an instance, as systemctl would run it
    local.write_text(unit.read_text())
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(local)], capture_output=True,
                            text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout + result.stderr)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= 2.0 and score.group(2) == "OK", score.group(0)


def test_the_installers_dry_run_names_the_interpreter_problems_the_real_run_stops_on(tmp_path: Path) -> None:
    """An operator probe: the dry run printed its plan for a pyenv python under /root and exited 0 without a word,
    where the real run refuses that interpreter."""
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.9.18' && exit 0\nexit 1\n")
    old.chmod(0o755)
    for python, says in ((str(tmp_path / "missing-python"), f"no {tmp_path / 'missing-python'}: install Python >= 3.11"),
                         (str(old), f"{old} is Python 3.9.18; tmrl needs >= 3.11"),
                         ("/bin/true", "/bin/true is not a working Python")):  # a re-check's: every check passed
        result = subprocess.run(["bash", str(REPO / "deploy/systemd/install.sh"), "--dry-run", "relay"],
                                capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHON": python})
        assert result.returncode == 0, result.stderr
        [line] = [line for line in result.stdout.splitlines() if line.startswith("problem")]
        assert line.startswith(f"problem (the real run stops on it): {says}"), line
    home = subprocess.run([sys.executable, "-c", "import os, sys; print(os.path.realpath(sys.executable))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    result = subprocess.run(["bash", str(REPO / "deploy/systemd/install.sh"), "--dry-run", "relay"],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHON": sys.executable})
    in_home = home.startswith(("/root/", "/home/", "/run/user/"))
    assert ("in a home folder: the units (User=tmrl, ProtectHome=true) cannot run it" in result.stdout) == in_home
