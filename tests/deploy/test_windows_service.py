"""deploy/windows/tmrl_windows_service.py, run against an in-memory stand-in for pywin32 (this is not Windows), and
deploy/windows/tmrl_supervisor.py, the restart loop of the services and the worker task, with real child processes.

Regressions checked: a running service is hosted by pywin32's ``pythonservice.exe`` (copied to the venv root, not
``Scripts``), so the CLI path must be recorded at install time from the venv's python.exe, not derived from
``sys.executable`` at run time; that host needs the base Python's and pywin32's DLLs beside it (error 1053 under
LocalSystem with a per-user Python otherwise); a child that exits 0 or 2 is not restarted; a stop during the
restart delay starts no new child; a failed pywin32 command is an exit code the PowerShell scripts can check.
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
        self.error = 0  # what HandleCommandLine returns (pywin32: 0, or the Windows error code)

        class ServiceFramework:
            def __init__(self, args) -> None:
                self.args = args

            def ReportServiceStatus(self, status, waitHint=5000, win32ExitCode=0, svcExitCode=0) -> None:  # noqa: N802, N803 - pywin32's names
                pass

        self.ServiceFramework = ServiceFramework

    def HandleCommandLine(self, cls, argv=None):  # noqa: N802 - pywin32's name
        self.commands.append([cls._svc_name_, *argv[1:]])
        return self.error

    def SetServiceCustomOption(self, service, option, value):  # noqa: N802
        self.options[(service, option)] = value

    def GetServiceCustomOption(self, service, option, default=None):  # noqa: N802
        return self.options.get((service, option), default)


@pytest.fixture
def service_module(monkeypatch, tmp_path):
    util = FakeServiceUtil()
    base, pywin32 = tmp_path / "Python311", tmp_path / "venv" / "Lib" / "site-packages" / "pywin32_system32"
    tag = f"{sys.version_info[0]}{sys.version_info[1]}"
    for path in (base / f"python{tag}.dll", base / "python3.dll", base / "vcruntime140.dll",
                 pywin32 / f"pywintypes{tag}.dll", pywin32 / f"pythoncom{tag}.dll"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(path.name.encode())
    pywintypes = types.ModuleType("pywintypes")
    pywintypes.__file__ = str(pywin32 / f"pywintypes{tag}.dll")
    monkeypatch.setitem(sys.modules, "pywintypes", pywintypes)
    monkeypatch.setattr(sys, "base_prefix", str(base))
    monkeypatch.setattr(sys, "exec_prefix", str(tmp_path / "venv"))
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


def test_install_puts_the_dlls_the_service_host_loads_next_to_it(service_module, tmp_path, monkeypatch) -> None:
    module, _util = service_module
    scripts = _venv(tmp_path)
    monkeypatch.setattr(sys, "executable", str(scripts / "python.exe"))
    module.main(["tmrl_windows_service.py", "relay", "install", "--config", str(tmp_path / "tmrl.toml")])
    tag = f"{sys.version_info[0]}{sys.version_info[1]}"
    root = tmp_path / "venv"  # where pywin32 puts pythonservice.exe (sys.exec_prefix)
    for name in (f"python{tag}.dll", "python3.dll", "vcruntime140.dll", f"pywintypes{tag}.dll", f"pythoncom{tag}.dll"):
        assert (root / name).read_bytes() == name.encode(), name
    assert module.stage_host_dlls(root, module.host_dlls(tmp_path / "Python311", root / "Lib" / "site-packages" /
                                                         "pywin32_system32", sys.version_info[:2])) == []


def test_install_without_the_python_dll_names_it_and_installs_nothing(service_module, tmp_path, monkeypatch) -> None:
    module, util = service_module
    scripts = _venv(tmp_path)
    monkeypatch.setattr(sys, "executable", str(scripts / "python.exe"))
    (tmp_path / "Python311" / f"python{sys.version_info[0]}{sys.version_info[1]}.dll").unlink()
    with pytest.raises(SystemExit, match=r"cannot find .*python3\d+\.dll"):
        module.main(["tmrl_windows_service.py", "relay", "install"])
    assert util.commands == []


def test_a_failed_pywin32_command_is_the_scripts_exit_code(service_module) -> None:
    module, util = service_module
    util.error = 1060  # ERROR_SERVICE_DOES_NOT_EXIST
    with pytest.raises(SystemExit) as info:
        module.main(["tmrl_windows_service.py", "relay", "start"])
    assert info.value.code == 1060


# ------------------------------------------------------------------------------------------- the restart loop

def _supervisor(module_dir: Path, tmp_path: Path, script: str, **options):
    sys.path.insert(0, str(module_dir))
    try:
        from tmrl_supervisor import Supervisor
    finally:
        sys.path.remove(str(module_dir))
    child = tmp_path / "child.py"
    child.write_text(script)
    return Supervisor([sys.executable, str(child)], tmp_path / "logs" / "child.log", tmp_path,
                      first_delay_s=0.05, max_delay_s=0.2, **options)


# exits 1 on its first two runs, then with the code in final.txt (counting runs in runs.txt)
FLAKY = """
import pathlib, sys
runs = pathlib.Path("runs.txt")
count = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(count))
print("child run", count, flush=True)
sys.exit(1 if count <= 2 else int(pathlib.Path("final.txt").read_text()))
"""


@pytest.mark.parametrize("final", [0, 2])
def test_errors_are_restarted_with_back_off_but_exit_0_and_2_end_the_loop(tmp_path, final) -> None:
    (tmp_path / "final.txt").write_text(str(final))
    supervisor = _supervisor(SCRIPT.parent, tmp_path, FLAKY)
    assert supervisor.run() == final
    assert supervisor.exit_codes == [1, 1, final] and supervisor.starts == 3
    log = (tmp_path / "logs" / "child.log").read_text()
    assert "child run 3" in log and "restarting in 0s" in log and "not restarting" in log


def test_a_stop_during_the_restart_delay_starts_no_new_child(tmp_path) -> None:
    waits: list[float] = []

    def stop_comes_during_the_back_off(seconds: float) -> bool:
        waits.append(seconds)
        return seconds < 0.5  # the 0.5 s polls while the child runs see no stop; the 0.05 s back-off does

    supervisor = _supervisor(SCRIPT.parent, tmp_path, "import sys; sys.exit(3)", wait=stop_comes_during_the_back_off)
    assert supervisor.run() == 0
    assert supervisor.starts == 1
    assert "stop requested during the restart delay" in (tmp_path / "logs" / "child.log").read_text()


# stops cleanly when its stdin closes, as the tmrl services do under the supervisor (tmrl_common.stop_signals)
STOPS_WHEN_ASKED = """
import pathlib, threading
from tmrl_common.stop_signals import install_stop_signals
stopped = threading.Event()
install_stop_signals(lambda signum: stopped.set())
pathlib.Path("started").touch()
if stopped.wait(60):
    pathlib.Path("stopped-cleanly").write_text("saved the final checkpoint here")
"""


def _stop_after_start(supervisor, tmp_path) -> float:
    import threading
    import time

    def stop_once_started() -> None:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        supervisor.stop()

    threading.Thread(target=stop_once_started, daemon=True).start()
    started = time.monotonic()
    assert supervisor.run() == 0
    return time.monotonic() - started


def test_stop_asks_the_child_to_stop_and_it_finishes_its_own_shutdown(tmp_path) -> None:
    supervisor = _supervisor(SCRIPT.parent, tmp_path, STOPS_WHEN_ASKED)
    assert _stop_after_start(supervisor, tmp_path) < 30
    assert (tmp_path / "stopped-cleanly").read_text() == "saved the final checkpoint here"
    assert supervisor.starts == 1 and supervisor._child.returncode == 0  # its own exit, not a termination
    log = (tmp_path / "logs" / "child.log").read_text()
    assert "asking python to stop (its stdin closed)" in log and "python stopped with code 0" in log
    assert "terminating" not in log


def test_a_child_that_does_not_stop_when_asked_is_terminated_after_the_timeout(tmp_path) -> None:
    supervisor = _supervisor(SCRIPT.parent, tmp_path, "import pathlib, time; pathlib.Path('started').touch(); "
                             "time.sleep(60)", stop_timeout_s=1.0)
    assert _stop_after_start(supervisor, tmp_path) < 20
    assert supervisor.starts == 1 and supervisor._child.poll() not in (None, 0)
    assert "python did not stop within 1s: terminating it" in (tmp_path / "logs" / "child.log").read_text()


def test_a_trainer_under_the_supervisor_stops_cleanly_when_the_service_stops(tmp_path) -> None:
    """The whole chain of a Windows service stop, on real processes: supervisor → stdin closed → the trainer's stop
    flag → its own shutdown and exit 0 (before, the supervisor terminated it: no final checkpoint)."""
    import threading
    import time

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from tmrl_supervisor import Supervisor
    finally:
        sys.path.remove(str(SCRIPT.parent))
    trainer = Path(sys.executable).with_name("tmrl-trainer")
    log_file = tmp_path / "logs" / "tmrl-trainer.log"
    supervisor = Supervisor([str(trainer), "run", "--insecure", "--env", "gym:Pendulum-v1", "--device", "cpu",
                             "--relay-host", "127.0.0.1", "--trainer-port", "1", "--run-dir", str(tmp_path / "run")],
                            log_file, tmp_path, stop_timeout_s=60.0)

    def stop_once_training() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log_file.exists() and "training on cpu" in log_file.read_text():
                break
            time.sleep(0.1)
        supervisor.stop()

    threading.Thread(target=stop_once_training, daemon=True).start()
    assert supervisor.run() == 0
    log = log_file.read_text()
    assert "stdin closed by the supervisor: stopping" in log and "trainer stopped after 0 updates" in log, log
    assert supervisor._child.returncode == 0 and "terminating" not in log
