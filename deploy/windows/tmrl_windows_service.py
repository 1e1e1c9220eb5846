"""Run the tmrl relay or trainer as a Windows service (pywin32's service framework).

The service host starts the service's CLI (``tmrl-relay run`` / ``tmrl-trainer run``) as a child process, restarts it
if it exits with an error, and stops it when Windows asks the service to stop. Install with install-services.ps1.

``install`` records, in the service's registry parameters, the absolute path of the CLI next to the python.exe that
ran it (``<venv>\\Scripts\\tmrl-relay.exe``) and the config file: the running service is hosted by pywin32's
``pythonservice.exe``, which lives elsewhere, so it cannot find the venv's scripts from its own location. The CLI's
output goes to ``<config folder>\\logs\\tmrl-<role>.log`` (a service has no console) and it runs in the config
file's folder, so relative paths in the config (``run_dir``) land there rather than in ``C:\\Windows\\System32``.

Usage (from an elevated prompt, inside the tmrl virtual environment):
    python tmrl_windows_service.py relay install --config C:\\ProgramData\\tmrl\\tmrl.toml
    python tmrl_windows_service.py relay start | stop | remove
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

try:
    import servicemanager
    import win32event
    import win32service
    import win32serviceutil
except ImportError as exc:  # pragma: no cover - exercised on Windows only
    raise SystemExit(
        f"tmrl_windows_service needs pywin32 on Windows ({exc}). Install it in the tmrl venv: pip install pywin32"
    ) from exc

SERVICES = {"relay": "tmrl-relay", "trainer": "tmrl-trainer"}
CONFIG_KEY = "TmrlConfigPath"
EXECUTABLE_KEY = "TmrlExecutable"
RESTART_DELAY_S = 5.0


class _TmrlService(win32serviceutil.ServiceFramework):
    """Keeps one tmrl service CLI running until the service is stopped."""

    role = ""

    def __init__(self, args):
        super().__init__(args)
        self._stop_event = win32event.CreateEvent(None, 0, 0, None)
        self._child: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        executable = win32serviceutil.GetServiceCustomOption(self._svc_name_, EXECUTABLE_KEY, None)
        if not executable:
            raise RuntimeError(f"{self._svc_name_} has no {EXECUTABLE_KEY} parameter: reinstall it with install-services.ps1")
        config = win32serviceutil.GetServiceCustomOption(self._svc_name_, CONFIG_KEY, None)
        return [executable, "run"] + (["--config", config] if config else [])

    def _work_dir(self) -> Path:
        """The config file's folder: relative paths in the config (run_dir, state_dir) resolve against it."""
        config = win32serviceutil.GetServiceCustomOption(self._svc_name_, CONFIG_KEY, None)
        return Path(config).parent if config else Path(sys.exec_prefix)

    def _log_file(self) -> Path:
        (self._work_dir() / "logs").mkdir(parents=True, exist_ok=True)
        return self._work_dir() / "logs" / f"{self._svc_name_}.log"

    def SvcStop(self) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        win32event.SetEvent(self._stop_event)
        if self._child is not None and self._child.poll() is None:
            self._child.terminate()

    def SvcDoRun(self) -> None:
        servicemanager.LogInfoMsg(f"{self._svc_name_} starting: {' '.join(self._command())}")
        while True:
            with open(self._log_file(), "ab") as log:
                self._child = subprocess.Popen(self._command(), cwd=self._work_dir(), stdout=log,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            while self._child.poll() is None:
                if win32event.WaitForSingleObject(self._stop_event, 1000) == win32event.WAIT_OBJECT_0:
                    try:
                        self._child.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        self._child.kill()
                    return
            servicemanager.LogErrorMsg(f"{self._svc_name_} exited with code {self._child.returncode}; restarting")
            time.sleep(RESTART_DELAY_S)


class TmrlRelayService(_TmrlService):
    _svc_name_ = "tmrl-relay"
    _svc_display_name_ = "tmrl relay"
    _svc_description_ = "Forwards sample batches from tmrl workers to the trainer and policy weights back."
    role = "relay"


class TmrlTrainerService(_TmrlService):
    _svc_name_ = "tmrl-trainer"
    _svc_display_name_ = "tmrl trainer"
    _svc_description_ = "Trains tmrl policies with Soft Actor-Critic and publishes their weights."
    role = "trainer"


def cli_executable(role: str) -> Path:
    """The venv's ``tmrl-<role>.exe``: next to the python.exe running this script (``<venv>\\Scripts``)."""
    executable = Path(sys.executable).with_name(f"{SERVICES[role]}.exe")
    if not executable.is_file():
        raise SystemExit(f"{executable} does not exist: run this script with the python.exe of the venv where tmrl "
                         "is installed (<venv>\\Scripts\\python.exe)")
    return executable


def main(argv: list[str]) -> None:
    classes = {"relay": TmrlRelayService, "trainer": TmrlTrainerService}
    if len(argv) < 3 or argv[1] not in classes:
        raise SystemExit("usage: tmrl_windows_service.py relay|trainer install|start|stop|remove [--config FILE]")
    service = classes[argv[1]]
    rest = argv[2:]
    config = None
    if "--config" in rest:
        index = rest.index("--config")
        config = str(Path(rest[index + 1]).resolve())
        del rest[index:index + 2]
    installing = rest[0] == "install"
    executable = cli_executable(argv[1]) if installing else None
    win32serviceutil.HandleCommandLine(service, argv=[argv[0], "--startup", "auto", *rest] if installing else [argv[0], *rest])
    if installing:
        win32serviceutil.SetServiceCustomOption(service._svc_name_, EXECUTABLE_KEY, str(executable))
        if config:
            win32serviceutil.SetServiceCustomOption(service._svc_name_, CONFIG_KEY, config)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        servicemanager.Initialize()
        servicemanager.StartServiceCtrlDispatcher()
    else:
        main(sys.argv)
