"""Run the tmrl relay or trainer as a Windows service (pywin32's service framework).

The service host keeps the service's CLI (``tmrl-relay run`` / ``tmrl-trainer run``) running as a child process with
:class:`tmrl_supervisor.Supervisor` (next to this file): restarted after an error exit with a back-off (5 s doubling
to 60 s), not restarted after exit 0 (finished) or 2 (a config error a restart cannot fix), asked to stop when Windows
stops the service (its stdin closed: the trainer saves its final checkpoint; terminated after 120 s if still running),
also during the back-off.

``install`` records, in the service's registry parameters, the absolute path of the CLI next to the python.exe that
ran it (``<venv>\\Scripts\\tmrl-relay.exe``) and the config file: the running service is hosted by pywin32's
``pythonservice.exe``, which pywin32 copies to the venv's root (``sys.exec_prefix``), so it cannot find the venv's
scripts from its own location. ``install`` also copies the DLLs that ``pythonservice.exe`` must load next to it
(``python3XX.dll``, ``python3.dll`` and the VC runtime from the base Python, ``pywintypes3XX.dll`` and
``pythoncom3XX.dll`` from pywin32): under LocalSystem the DLL search path holds neither a per-user Python's folder
nor the venv, and without them the service fails to start with error 1053. The CLI's output goes to
``<config folder>\\logs\\tmrl-<role>.log`` (a service has no console) and it runs in the config file's folder, so
relative paths in the config (``run_dir``) land there rather than in ``C:\\Windows\\System32``.

Usage (from an elevated prompt, with the tmrl venv's python.exe; install-services.ps1 does all of it):
    python tmrl_windows_service.py relay install --config C:\\ProgramData\\tmrl\\tmrl.toml
    python tmrl_windows_service.py relay start | stop | remove
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tmrl_supervisor, also when pythonservice.exe imports us
from tmrl_supervisor import STOP_TIMEOUT_S, Supervisor  # noqa: E402

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


class _TmrlService(win32serviceutil.ServiceFramework):
    """Keeps one tmrl service CLI running until the service is stopped."""

    role = ""

    def __init__(self, args):
        super().__init__(args)
        self._stop_event = win32event.CreateEvent(None, 0, 0, None)
        self._supervisor: Supervisor | None = None

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
        return self._work_dir() / "logs" / f"{self._svc_name_}.log"

    def _stop_requested(self, seconds: float) -> bool:
        return win32event.WaitForSingleObject(self._stop_event, int(seconds * 1000)) == win32event.WAIT_OBJECT_0

    def SvcStop(self) -> None:
        # the supervisor asks the child to stop and waits for it (the trainer's final checkpoint) before terminating it
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=int((STOP_TIMEOUT_S + 10) * 1000))
        win32event.SetEvent(self._stop_event)
        if self._supervisor is not None:
            self._supervisor.stop()

    def SvcDoRun(self) -> None:
        self._supervisor = Supervisor(self._command(), self._log_file(), self._work_dir(), wait=self._stop_requested)
        servicemanager.LogInfoMsg(f"{self._svc_name_} starting: {' '.join(self._command())}; log {self._log_file()}")
        code = self._supervisor.run()
        if code == 2:
            servicemanager.LogErrorMsg(f"{self._svc_name_}: usage or config error, not restarted; see {self._log_file()}")


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


def host_dlls(base_prefix: Path, pywin32_dir: Path, version: tuple[int, int]) -> list[Path]:
    """The DLLs ``pythonservice.exe`` loads: the base Python's and pywin32's (see the module docstring)."""
    tag = f"{version[0]}{version[1]}"
    required = [Path(base_prefix) / f"python{tag}.dll", Path(pywin32_dir) / f"pywintypes{tag}.dll"]
    missing = [str(path) for path in required if not path.is_file()]
    if missing:
        raise SystemExit(f"cannot find {', '.join(missing)}: the service host needs them; is this the venv's python.exe "
                         "of a python.org (or Microsoft Store) Python with pywin32 installed?")
    optional = [Path(base_prefix) / name for name in ("python3.dll", "vcruntime140.dll", "vcruntime140_1.dll")]
    optional.append(Path(pywin32_dir) / f"pythoncom{tag}.dll")
    return required + [path for path in optional if path.is_file()]


def stage_host_dlls(target: Path, dlls: list[Path]) -> list[Path]:
    """Copy ``dlls`` next to ``pythonservice.exe`` in ``target`` (skipping identical copies); returns those copied."""
    copied = []
    for dll in dlls:
        destination = Path(target) / dll.name
        if destination.is_file() and destination.stat().st_size == dll.stat().st_size:
            continue
        shutil.copy2(dll, destination)
        copied.append(destination)
    return copied


def _pywin32_dir() -> Path:
    import pywintypes  # its __file__ is pywintypes3XX.dll, in site-packages\\pywin32_system32

    return Path(pywintypes.__file__).parent


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
    dlls = host_dlls(Path(sys.base_prefix), _pywin32_dir(), sys.version_info[:2]) if installing else []
    error = win32serviceutil.HandleCommandLine(service, argv=[argv[0], "--startup", "auto", *rest] if installing
                                               else [argv[0], *rest])
    if error:  # pywin32 prints what failed and returns its error code; the caller (install-services.ps1) checks it
        raise SystemExit(error)
    if installing:
        win32serviceutil.SetServiceCustomOption(service._svc_name_, EXECUTABLE_KEY, str(executable))
        if config:
            win32serviceutil.SetServiceCustomOption(service._svc_name_, CONFIG_KEY, config)
        for copied in stage_host_dlls(Path(sys.exec_prefix), dlls):
            print(f"copied {copied.name} next to pythonservice.exe ({copied.parent})")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        servicemanager.Initialize()
        servicemanager.StartServiceCtrlDispatcher()
    else:
        main(sys.argv)
