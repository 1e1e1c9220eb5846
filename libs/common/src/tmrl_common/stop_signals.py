"""SIGINT and SIGTERM as a callback on a thread of their own, never inside a Python signal handler.

CPython runs a Python signal handler in the main thread between two bytecodes, wherever that thread is. A handler
that calls ``threading.Event.set`` takes the Event's internal lock, a plain, non-reentrant ``Lock``; when the signal
lands while the main thread holds that very lock (inside ``stop.wait(timeout)``, just after the timed wait has taken
it back, which the trainer's loop does every few milliseconds while it waits for data), the handler waits for a lock
its own thread holds, and the process never stops: each further SIGTERM stacks one more blocked handler. A stress
probe hit it about once in 1,500 stops of a loop like the trainer's, and a trainer with the window widened hung on
every stop; it is the likeliest cause of a trainer once seen hanging after SIGTERM.

So the Python handler here does nothing. The interpreter's C-level handler writes the signal's number to a wake-up
socket (:func:`signal.set_wakeup_fd`), and a daemon thread reading that socket calls the callback: an ordinary
thread, which at worst waits a few microseconds for the main thread to let go of a lock.

A supervisor can also ask for a stop by closing the service's stdin, when it started the service with
``TMRL_STOP_ON_STDIN_CLOSE=1`` in its environment (:data:`STOP_ON_STDIN_CLOSE`). The Windows services' supervisor
does (``deploy/windows/tmrl_supervisor.py``): there a service's child has no console to send Ctrl-C or Ctrl-Break
to, and ``Popen.terminate`` is ``TerminateProcess``, a kill that leaves the trainer no time for its final checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_ON_STDIN_CLOSE = "TMRL_STOP_ON_STDIN_CLOSE"
"""Environment variable: ``1`` makes :func:`install_stop_signals` also stop the service when its stdin reaches its
end (the supervisor closed it), calling the callback with :data:`STDIN_CLOSED`."""
STDIN_CLOSED = 0
"""The ``signum`` the callback gets for a stop asked by closing stdin (no signal has number 0)."""

_installed: tuple[socket.socket, socket.socket, threading.Thread] | None = None
"""The wake-up socket pair and its reader thread, kept for the life of the process (a collected writer would close
the interpreter's wake-up fd under it); a new :func:`install_stop_signals` closes the previous ones."""
_stdin_callback: Callable[[int], None] | None = None
"""The callback of the latest :func:`install_stop_signals`, which the stdin watcher (one per process) calls."""
_stdin_watcher: threading.Thread | None = None


def install_stop_signals(on_signal: Callable[[int], None], name: str = "stop-signals") -> None:
    """From now on SIGINT and SIGTERM call ``on_signal(signum)`` on a daemon thread (call from the main thread; a
    second call replaces the first). ``on_signal`` may take locks: it runs outside any signal handler."""
    global _installed
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    wanted = {int(signum) for signum in STOP_SIGNALS}

    def watch() -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:  # closed by a later install
                return
            if not data:
                return
            for signum in data:
                if signum in wanted:
                    on_signal(signum)

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _do_nothing)  # a Python handler must be set for the C handler to write the wake-up byte
    previous, _installed = _installed, (reader, writer, thread)
    if previous is not None:
        previous[1].close()  # its reader sees the end of the stream and its thread returns
        previous[2].join(1.0)
        previous[0].close()
    if os.environ.get(STOP_ON_STDIN_CLOSE) == "1":
        _watch_stdin(on_signal)


def _watch_stdin(on_signal: Callable[[int], None]) -> None:
    """Call the latest ``on_signal`` with :data:`STDIN_CLOSED` once stdin reaches its end (module docstring)."""
    global _stdin_callback, _stdin_watcher
    _stdin_callback = on_signal
    if _stdin_watcher is not None:
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):  # a supervisor writes nothing; whatever comes is read and dropped
                pass
        except OSError:  # no usable stdin: nobody can ask for a stop this way
            return
        if _stdin_callback is not None:
            _stdin_callback(STDIN_CLOSED)

    _stdin_watcher = threading.Thread(target=watch, name="stop-on-stdin-close", daemon=True)
    _stdin_watcher.start()


def stopping(stop: Callable[[], None], logger: logging.Logger, finishing: str = "") -> Callable[[int], None]:
    """The ``on_signal`` of a service: log ``signal N: stopping`` to ``logger``, then call ``stop`` (an Event's
    ``set``, a relay's ``stop``). A further request says the service is already stopping, and ``finishing`` what it
    still does before it exits (``"it saves its final checkpoint first"``), rather than the same line again (a
    supervisor and a shell both sending SIGTERM once read as two stops)."""
    requests = 0

    def on_signal(signum: int) -> None:
        nonlocal requests
        requests += 1
        cause = "stdin closed by the supervisor" if signum == STDIN_CLOSED else f"signal {signum}"
        if requests == 1:
            logger.info("%s: stopping", cause)
        else:
            logger.info("%s again: already stopping%s", cause, f" ({finishing})" if finishing else "")
        stop()

    return on_signal


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on (a service that has stopped cleanly: a repeated signal during the
    interpreter's teardown, which puts back the default action of signals with a Python handler, would otherwise turn
    its exit status 0 into death by that signal)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_held: list[int] = []
"""Stop signals that came while :func:`hold_stop_signals` held them."""
_before_hold: dict[int, object] = {}


def hold_stop_signals() -> None:
    """Until :func:`release_held_stop_signals`, a SIGINT or SIGTERM is noted, not acted on (one that the process was
    started with ignored stays ignored). For a command's imports: torch's take a second or more, and a
    KeyboardInterrupt raised inside them printed a traceback or, caught by an import, was lost (a first-hour probe's
    trainer ran on for ten minutes after a Ctrl-C at 0.6 s)."""
    for signum in STOP_SIGNALS:
        previous = signal.getsignal(signum)
        if previous is not signal.SIG_IGN:
            _before_hold[signum] = previous
            signal.signal(signum, _hold)


def release_held_stop_signals(program: str) -> None:
    """Put back the handlers :func:`hold_stop_signals` replaced; if a stop signal came meanwhile, end the process now
    (nothing has started yet): one line on stderr, exit status 128 + the signal's number, as its default action
    would give."""
    for signum, previous in _before_hold.items():
        signal.signal(signum, previous)  # type: ignore[arg-type]
    _before_hold.clear()
    if _held:
        signum = _held[0]
        print(f"{program}: stopped by signal {signum} while starting", file=sys.stderr)
        raise SystemExit(128 + signum)


def run_command_line(program: str, load_app: Callable[[], Callable[[], object]]) -> None:
    """A service's console script: its CLI module (``load_app`` imports it and returns the typer app) is imported
    with the stop signals held (:func:`hold_stop_signals`), then the app runs; its ``run`` commands install their own
    handling (:func:`install_stop_signals`) first thing."""
    hold_stop_signals()
    try:
        app = load_app()
    finally:  # an import that failed leaves the handlers as they were, and its error stands
        release_held_stop_signals(program)
    app()


def _hold(signum: int, frame: object) -> None:  # noqa: ARG001 - a list append: no lock, no I/O
    _held.append(signum)


def _do_nothing(signum: int, frame: object) -> None:  # noqa: ARG001 - takes no lock and does no I/O: module docstring
    return None
