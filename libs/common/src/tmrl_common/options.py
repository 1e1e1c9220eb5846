"""Help texts of the options the three command lines share, so one option reads the same in every ``--help``.

Each CLI (``tmrl-relay``, ``tmrl-worker``, ``tmrl-trainer``) declares its own typer options and takes their help
from here; ``tests/common/test_service_cli.py`` checks that an option of the same name has the same help everywhere.
"""

from __future__ import annotations

import enum
import faulthandler
import logging
import signal
import sys
from pathlib import Path

from tmrl_common.errors import ConfigError


class LogLevel(enum.StrEnum):
    """``--log-level`` choices (typer lists them in ``--help`` and refuses others before anything starts)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


LOG_LEVELS = tuple(level.value for level in LogLevel)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

HELP = {
    "show_config": "Print the effective config (file, then TMRL_* environment variables, then flags) as TOML and exit.",
    "insecure": "Plain-text ZeroMQ, no CurveZMQ keys: only on one trusted machine; relay, trainer and workers must agree.",
    "secret_key": "This process's own key pair, NAME.key_secret (CurveZMQ; from `tmrl-relay keys init` or `keys generate`).",
    "server_key": "The relay's public key, relay.key (CurveZMQ; from the relay host).",
    "relay_host": "Host name or IP address of the relay.",
    "worker_port": "The relay's port for workers: samples in, acks out.",
    "trainer_port": "The relay's port for the trainer: samples out, acks and weights in.",
    "weights_port": "The relay's port that publishes weights to workers.",
    "seed": "Random seed.",
    "max_steps": "Stop after this many environment steps.",
    "torch_threads": "torch CPU threads (config: torch_threads).",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N.",
    "log_level": "How much to log (any case).",
    "env": "sim, sim-fast, tm20-lidar, tm20-lidar-progress, tm20-full, module:Class or gym:<id>.",
    "save_memory": "Save the replay memory with each checkpoint.",
}


def config_help(section: str) -> str:
    """``--config``'s help for the service that reads table ``section``."""
    return (f"TOML config file; its \\[{section}] table is read. TMRL_{section.upper()}__<FIELD> environment "
            "variables override it, flags override both.")


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (one of :data:`LOG_LEVELS`, any case); :class:`ConfigError` for another.

    Where the OS has ``SIGUSR1`` (not Windows), that signal also makes the service print every thread's stack to
    stderr and go on (``kill -USR1 PID``): what a process that does not stop is doing."""
    name = str(level).upper()
    if name not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=name, format=LOG_FORMAT)
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        try:  # the process's own stderr: a test harness may have replaced sys.stderr by a buffer without a file
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        except (OSError, ValueError):  # no usable file descriptor: the service runs on without the dump
            pass


def folder_value(value: str) -> Path:
    """typer's ``parser`` for a folder option (:data:`FOLDER_OPTION`): the folder, refusing an empty value, which
    ``Path("")`` turns into the current folder without a word (a CLI probe's ``--run-dir ""`` wrote a run into the
    repository root, and ``keys init --dir ""`` the secret keys; the same value from a config file was refused), and
    an existing file."""
    import typer

    if not value.strip():
        raise typer.BadParameter('is empty; give a folder ("." for the current one)')
    path = Path(value)
    try:
        is_a_file = path.exists() and not path.is_dir()
    except OSError:  # a name too long for the file system...: the command's own checks say so
        is_a_file = False
    if is_a_file:
        raise typer.BadParameter(f"{value!r} is a file, not a folder")
    return path


FOLDER_OPTION = {"parser": folder_value, "metavar": "<path>"}
"""Keyword arguments of ``typer.Option`` for a folder: ``typer.Option(None, "--run-dir", **FOLDER_OPTION, ...)``."""
