"""The game window: find it by title (or by the game's process id), read its client area in screen pixels,
move/size it, focus it.

Two backends share :class:`GameWindow`:

* :class:`Win32GameWindow` (Windows): user32 through ``ctypes`` — ``FindWindowW``, ``GetClientRect`` +
  ``ClientToScreen`` for the client area (the picture without title bar and borders), ``AdjustWindowRectEx`` +
  ``SetWindowPos`` to give the *client* area an exact size. :func:`make_process_dpi_aware` must run before any
  of it, otherwise Windows scales coordinates on high-DPI screens and captures come out shifted.
* :class:`XdotoolGameWindow` (Linux, game under Proton/Wine): the ``xdotool`` command.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tmrl_worker.tm20.windows_only import WindowsOnlyError, is_windows, require_windows

DEFAULT_WINDOW_TITLE = "Trackmania"


class WindowNotFoundError(RuntimeError):
    """No open window has the expected title (or belongs to the expected process)."""

    def __init__(self, title: str, detail: str = "", pid: int | None = None) -> None:
        if pid is None:
            message = (f"no window titled {title!r} is open: start TrackMania 2020 in windowed mode "
                       f"(or give its title: env_options.window_title in [worker], --window-title for check-env "
                       f"and benchmark)")
        else:
            message = (f"no visible window belongs to process {pid}: is it the game's process id (Task Manager, "
                       f"Details), and the game running in windowed mode? A restarted game has a new id")
        super().__init__(message + (f"; {detail}" if detail else ""))
        self.title = title
        self.pid = pid


class WindowSearchUnavailableError(WindowNotFoundError):
    """The tool that finds windows on this OS is missing: no window was looked for (not "no window is open")."""

    def __init__(self, title: str, tool: str, install: str, pid: int | None = None) -> None:
        RuntimeError.__init__(self, f"cannot look for the game window: the {tool} command is not installed "
                                    f"({install}); on Linux the worker finds, places and focuses the game's window "
                                    f"with it")
        self.title = title
        self.pid = pid


@dataclass(frozen=True)
class ClientArea:
    """A rectangle in screen pixels: the part of a window the game draws into."""

    left: int
    top: int
    width: int
    height: int

    def as_mss_monitor(self) -> dict[str, int]:
        return {"left": self.left, "top": self.top, "width": self.width, "height": self.height}

    def as_ltrb(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)``, right and bottom exclusive (dxcam's region)."""
        return (self.left, self.top, self.left + self.width, self.top + self.height)


class GameWindow(Protocol):
    """What capture and the tools need from the game window."""

    title: str

    def client_area(self) -> ClientArea: ...

    def place(self, x: int, y: int, width: int, height: int) -> None:
        """Move the window so its client area starts at ``(x, y)`` on screen and is ``width x height``."""

    def focus(self) -> None:
        """Bring the window to the front and give it the keyboard focus."""

    def is_foreground(self) -> bool:
        """True when this window has the keyboard focus (input from the keyboard controller reaches it)."""


def make_process_dpi_aware() -> None:
    """Make this process per-monitor DPI aware (Windows), so window and capture coordinates are physical pixels."""
    require_windows("DPI awareness")
    try:
        ctypes.windll.shcore.SetProcessDpiAwareness(2)  # PROCESS_PER_MONITOR_DPI_AWARE (Windows 8.1+)
    except (AttributeError, OSError):
        ctypes.windll.user32.SetProcessDPIAware()  # Vista+: system DPI aware


class Win32GameWindow:
    """The game window on Windows, through user32."""

    _GWL_STYLE = -16
    _GWL_EXSTYLE = -20
    _SWP_NOZORDER = 0x0004
    _SWP_NOACTIVATE = 0x0010
    _SW_RESTORE = 9

    def __init__(self, title: str = DEFAULT_WINDOW_TITLE, dpi_aware: bool = True, pid: int | None = None) -> None:
        require_windows("finding the game window")
        from ctypes import wintypes

        self._wintypes = wintypes
        self._user32 = ctypes.windll.user32
        if dpi_aware:
            make_process_dpi_aware()
        self.title = title
        self.hwnd = self._user32.FindWindowW(None, title) if pid is None else self._window_of_process(pid)
        if not self.hwnd:
            raise WindowNotFoundError(title, pid=pid)
        if pid is not None:
            buffer = ctypes.create_unicode_buffer(256)
            self._user32.GetWindowTextW(self.hwnd, buffer, len(buffer))
            self.title = buffer.value

    def _window_of_process(self, pid: int) -> int:
        """The first visible, titled top-level window of process ``pid`` (0: none)."""
        wintypes, user32, found = self._wintypes, self._user32, []

        def visit(hwnd: int, _: int) -> bool:
            owner = wintypes.DWORD()
            user32.GetWindowThreadProcessId(hwnd, ctypes.byref(owner))
            if owner.value == pid and user32.IsWindowVisible(hwnd) and user32.GetWindowTextLengthW(hwnd) > 0:
                found.append(hwnd)
                return False  # stop enumerating
            return True

        callback = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.HWND, wintypes.LPARAM)(visit)  # type: ignore[attr-defined]
        user32.EnumWindows(callback, 0)
        return found[0] if found else 0

    def client_area(self) -> ClientArea:
        rect = self._wintypes.RECT()
        if not self._user32.GetClientRect(self.hwnd, ctypes.byref(rect)):
            raise WindowNotFoundError(self.title, "the window closed")
        corner = self._wintypes.POINT(0, 0)
        self._user32.ClientToScreen(self.hwnd, ctypes.byref(corner))
        return ClientArea(corner.x, corner.y, rect.right - rect.left, rect.bottom - rect.top)

    def place(self, x: int, y: int, width: int, height: int) -> None:
        rect = self._wintypes.RECT(0, 0, width, height)
        style = self._user32.GetWindowLongW(self.hwnd, self._GWL_STYLE)
        exstyle = self._user32.GetWindowLongW(self.hwnd, self._GWL_EXSTYLE)
        self._user32.AdjustWindowRectEx(ctypes.byref(rect), style, False, exstyle)
        self._user32.SetWindowPos(self.hwnd, 0, x + rect.left, y + rect.top, rect.right - rect.left,
                                  rect.bottom - rect.top, self._SWP_NOZORDER | self._SWP_NOACTIVATE)

    def focus(self) -> None:
        if not self._user32.IsWindow(self.hwnd):
            raise WindowNotFoundError(self.title, "the window closed")
        if self._user32.IsIconic(self.hwnd):  # minimised: restore it first, or it stays an icon
            self._user32.ShowWindow(self.hwnd, self._SW_RESTORE)
        self._user32.SetForegroundWindow(self.hwnd)

    def is_foreground(self) -> bool:
        return int(self._user32.GetForegroundWindow() or 0) == int(self.hwnd)


Runner = Callable[[list[str]], str]


def _run_xdotool(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=5).stdout


class XdotoolGameWindow:
    """The game window on Linux/X11 (TrackMania under Proton), through the ``xdotool`` command."""

    def __init__(self, title: str = DEFAULT_WINDOW_TITLE, run: Runner | None = None, pid: int | None = None) -> None:
        if run is None:
            if shutil.which("xdotool") is None:
                raise WindowSearchUnavailableError(title, "xdotool", "apt install xdotool", pid=pid)
            run = _run_xdotool
        self._run = run
        self.title = title
        search = ["--name", f"^{title}$"] if pid is None else ["--onlyvisible", "--pid", str(pid)]
        try:
            found = self._run(["xdotool", "search", *search]).split()
        except subprocess.CalledProcessError:
            found = []
        if not found:
            raise WindowNotFoundError(title, pid=pid)
        self.window_id = found[0]
        if pid is not None:
            self.title = self._run(["xdotool", "getwindowname", self.window_id]).strip()

    def client_area(self) -> ClientArea:
        fields: dict[str, int] = {}
        for line in self._run(["xdotool", "getwindowgeometry", "--shell", self.window_id]).splitlines():
            key, _, value = line.partition("=")
            if key in ("X", "Y", "WIDTH", "HEIGHT"):
                fields[key] = int(value)
        if len(fields) != 4:
            raise WindowNotFoundError(self.title, "xdotool did not report its geometry")
        return ClientArea(fields["X"], fields["Y"], fields["WIDTH"], fields["HEIGHT"])

    def place(self, x: int, y: int, width: int, height: int) -> None:
        self._run(["xdotool", "windowsize", self.window_id, str(width), str(height),
                   "windowmove", self.window_id, str(x), str(y)])

    def focus(self) -> None:
        self._run(["xdotool", "windowactivate", self.window_id])

    def is_foreground(self) -> bool:
        try:
            return self._run(["xdotool", "getactivewindow"]).strip() == self.window_id
        except subprocess.CalledProcessError:
            return False


def find_game_window(title: str = DEFAULT_WINDOW_TITLE, pid: int | None = None) -> GameWindow:
    """The game window titled ``title`` — or, with ``pid``, the game process's window whatever its title (several
    games with the same title) — with this OS's backend (:class:`Win32GameWindow` or :class:`XdotoolGameWindow`)."""
    return Win32GameWindow(title, pid=pid) if is_windows() else XdotoolGameWindow(title, pid=pid)


__all__ = ["ClientArea", "DEFAULT_WINDOW_TITLE", "GameWindow", "Win32GameWindow", "WindowNotFoundError",
           "WindowsOnlyError", "XdotoolGameWindow", "find_game_window", "make_process_dpi_aware"]
