"""deploy/windows/*.ps1, read without PowerShell (not installed here): every script parses (tree-sitter's PowerShell
grammar), and the rules a failed step depends on hold: every native command's exit code is checked (Windows
PowerShell 5.1's $ErrorActionPreference = "Stop" does not cover them), "installed" is printed only after the service
is seen running, pywin32's post-install step runs, paths are made absolute, and the worker task runs the supervisor
windowless at normal priority with a log file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tree_sitter  # both from requirements-dev.txt (make install)
import tree_sitter_powershell

WINDOWS = Path(__file__).resolve().parents[2] / "deploy" / "windows"
SCRIPTS = sorted(WINDOWS.glob("*.ps1"))


def _parse(source: bytes):
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    return parser.parse(source).root_node


def test_the_parser_catches_a_broken_script():
    assert _parse(b'foreach ($a in $b) { if ($a) { Write-Host "x" }').has_error


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_stops_on_errors(script: Path):
    assert not _parse(script.read_bytes()).has_error, f"{script.name} does not parse as PowerShell"
    assert '$ErrorActionPreference = "Stop"' in script.read_text()


def test_every_native_command_of_the_service_installer_is_checked():
    text = (WINDOWS / "install-services.ps1").read_text()
    calls = [line.strip() for line in text.splitlines() if re.search(r"& \$(python|Command)\b", line)]
    assert calls, "no native command found: the check below would pass vacuously"
    unchecked = [line for line in calls if not (line.startswith("Invoke-Native") or line == "& $Command")]
    assert not unchecked, f"native commands whose exit code nobody checks: {unchecked}"
    assert "$code = $LASTEXITCODE" in text and "if ($code -ne 0) { throw" in text


def test_installed_is_printed_only_after_the_service_is_seen_running():
    text = (WINDOWS / "install-services.ps1").read_text()
    assert text.index(".WaitForStatus(\"Running\"") < text.index("installed and running")
    assert "pywin32_postinstall" in text and "-install" in text


@pytest.mark.parametrize("script", ["install-services.ps1", "install-worker-task.ps1"])
def test_relative_paths_are_made_absolute_before_use(script: str):
    text = (WINDOWS / script).read_text()
    assert "$Config = (Resolve-Path -LiteralPath $Config).Path" in text
    assert "$Venv = (Resolve-Path -LiteralPath $Venv).Path" in text


def test_worker_task_runs_the_supervisor_windowless_at_normal_priority_with_a_log():
    text = (WINDOWS / "install-worker-task.ps1").read_text()
    assert 'Join-Path $Venv "Scripts\\pythonw.exe"' in text and "-Execute $pythonw" in text
    assert "tmrl_supervisor.py" in text and '--log `"$log`"' in text
    assert re.search(r"New-ScheduledTaskSettingsSet -Priority 4\b", text)
    assert "-RestartCount 99" not in text
