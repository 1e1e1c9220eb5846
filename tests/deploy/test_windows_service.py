"""deploy/windows/tmrl_windows_service.py, run against an in-memory stand-in for pywin32 (this is not Windows).

The regression checked: a running service is hosted by pywin32's ``pythonservice.exe`` (copied to the venv root,
not ``Scripts``), so the CLI path must be recorded at install time from the venv's python.exe, not derived from
``sys.executable`` at run time.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "windows" / "tmrl_windows_service.py"


class FakeServiceUtil(types.ModuleType):
    """The few win32serviceutil calls the script makes, recorded in memory."""

    def __init__(self) -> None:
        super().__init__("win32serviceutil")
        self.options: dict[tuple[str, str], str] = {}
        self.commands: list[list[str]] = []

        class ServiceFramework:
            def __init__(self, args) -> None:
                self.args = args

            def ReportServiceStatus(self, status) -> None:  # noqa: N802 - pywin32's name
                pass

        self.ServiceFramework = ServiceFramework

    def HandleCommandLine(self, cls, argv=None):  # noqa: N802 - pywin32's name
        self.commands.append([cls._svc_name_, *argv[1:]])

    def SetServiceCustomOption(self, service, option, value):  # noqa: N802
        self.options[(service, option)] = value

    def GetServiceCustomOption(self, service, option, default=None):  # noqa: N802
        return self.options.get((service, option), default)


@pytest.fixture
def service_module(monkeypatch):
    util = FakeServiceUtil()
    monkeypatch.setitem(sys.modules, "win32serviceutil", util)
    monkeypatch.setitem(sys.modules, "servicemanager", types.ModuleType("servicemanager"))
    event = types.ModuleType("win32event")
    event.CreateEvent = lambda *args: object()
    monkeypatch.setitem(sys.modules, "win32event", event)
    monkeypatch.setitem(sys.modules, "win32service", types.ModuleType("win32service"))
    spec = importlib.util.spec_from_file_location("tmrl_windows_service", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, util


def _venv(root: Path) -> Path:
    scripts = root / "venv" / "Scripts"
    scripts.mkdir(parents=True)
    for name in ("python.exe", "tmrl-relay.exe", "tmrl-trainer.exe"):
        (scripts / name).write_bytes(b"")
    return scripts


def test_install_records_the_venv_cli_and_the_config_for_the_service(service_module, tmp_path, monkeypatch) -> None:
    module, util = service_module
    scripts = _venv(tmp_path)
    config = tmp_path / "tmrl.toml"
    monkeypatch.setattr(sys, "executable", str(scripts / "python.exe"))
    module.main(["tmrl_windows_service.py", "trainer", "install", "--config", str(config)])
    assert util.commands == [["tmrl-trainer", "--startup", "auto", "install"]]
    assert util.options[("tmrl-trainer", module.EXECUTABLE_KEY)] == str(scripts / "tmrl-trainer.exe")
    assert util.options[("tmrl-trainer", module.CONFIG_KEY)] == str(config.resolve())


def test_running_service_starts_the_recorded_cli_whatever_hosts_it(service_module, tmp_path, monkeypatch) -> None:
    module, _util = service_module
    scripts = _venv(tmp_path)
    config = tmp_path / "tmrl.toml"
    monkeypatch.setattr(sys, "executable", str(scripts / "python.exe"))
    module.main(["tmrl_windows_service.py", "relay", "install", "--config", str(config)])
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "pythonservice.exe"))  # the service host
    service = module.TmrlRelayService(["tmrl-relay"])
    assert service._command() == [str(scripts / "tmrl-relay.exe"), "run", "--config", str(config.resolve())]
    assert service._work_dir() == config.resolve().parent
    assert service._log_file() == config.resolve().parent / "logs" / "tmrl-relay.log"


def test_install_from_a_python_without_tmrl_says_which_python_to_use(service_module, tmp_path, monkeypatch) -> None:
    module, util = service_module
    (tmp_path / "python.exe").write_bytes(b"")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python.exe"))
    with pytest.raises(SystemExit, match=r"Scripts\\python\.exe"):
        module.main(["tmrl_windows_service.py", "relay", "install"])
    assert util.commands == []


def test_service_not_installed_by_this_script_fails_with_a_reinstall_hint(service_module) -> None:
    module, _util = service_module
    with pytest.raises(RuntimeError, match="reinstall it with install-services.ps1"):
        module.TmrlRelayService(["tmrl-relay"])._command()
