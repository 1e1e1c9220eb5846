"""Lazy access to the Windows-only packages (dxcam, vgamepad, pywin32) and to Win32 through ctypes.

Nothing in ``tmrl_worker.tm20`` imports a Windows-only package at module level: the LIDAR, the telemetry client,
the rtgym interfaces and every fake used in tests run on any OS. A backend that needs Windows calls
:func:`import_windows_module` (or :func:`require_windows`) when it is built, and gets a :class:`WindowsOnlyError`
that names the feature, the package and the way out on other systems.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_ALTERNATIVES = {
    "dxcam": "on Linux (Proton) use the mss capture backend (--capture mss)",
    "vgamepad": "on Linux use the keyboard controller backend (--controller keyboard)",
    "win32gui": "on Linux give the capture region explicitly or let xdotool find the window",
    "ctypes.windll": "this call only exists on Windows",
}


class WindowsOnlyError(RuntimeError):
    """A TrackMania backend that only works on Windows was requested on another OS (or its package is missing)."""

    def __init__(self, feature: str, package: str, detail: str = "") -> None:
        alternative = _ALTERNATIVES.get(package, "")
        message = f"{feature} needs Windows and the '{package}' package"
        message += f" (this is {sys.platform})" if sys.platform != "win32" else ""
        if detail:
            message += f": {detail}"
        if alternative:
            message += f"; {alternative}"
        super().__init__(message)
        self.feature = feature
        self.package = package


def is_windows() -> bool:
    """True on Windows (``sys.platform == 'win32'``)."""
    return sys.platform == "win32"


def require_windows(feature: str, package: str = "ctypes.windll") -> None:
    """Raise :class:`WindowsOnlyError` unless running on Windows."""
    if not is_windows():
        raise WindowsOnlyError(feature, package)


def import_windows_module(name: str, feature: str) -> ModuleType:
    """Import the Windows-only package ``name`` for ``feature``; a clear :class:`WindowsOnlyError` otherwise."""
    require_windows(feature, name)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise WindowsOnlyError(feature, name, f"it is not installed ({exc}); run `pip install {name}`") from exc
