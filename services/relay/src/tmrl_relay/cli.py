"""``tmrl-relay``: the ZeroMQ broker between workers and the trainer."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import typer
from tmrl_common.config import load_config_for_command
from tmrl_common.curve import KeyFileError
from tmrl_common.options import FOLDER_OPTION, HELP, LogLevel, config_help, configure_logging
from tmrl_common.sockets import SecurityError
from tmrl_common.stop_signals import ignore_stop_signals, install_stop_signals, stopping

from tmrl_relay.config import RelayConfig
from tmrl_relay.keys import keys_app

app = typer.Typer(help="tmrl relay: forwards sample batches from workers to the trainer and weights back to workers.",
                  no_args_is_help=True)
app.add_typer(keys_app, name="keys")

log = logging.getLogger("tmrl_relay")


@app.callback()
def main() -> None:
    """tmrl relay service. Every command takes --config FILE; TMRL_RELAY__<FIELD> env vars override it."""


ConfigOption = typer.Option(None, "--config", "-c", help=config_help("relay"), exists=True, dir_okay=False)


@app.command()
def run(
    config: Path | None = ConfigOption,
    show_config: bool = typer.Option(False, "--show-config", help=HELP["show_config"]),
    insecure: bool = typer.Option(False, "--insecure", help=HELP["insecure"]),
    bind_host: str | None = typer.Option(None, "--bind-host", help="Interface to bind: * for all, 127.0.0.1 for this "
                                         "machine only [127.0.0.1]."),
    worker_port: int | None = typer.Option(None, "--worker-port", help=HELP["worker_port"] + " 0: any free port."),
    trainer_port: int | None = typer.Option(None, "--trainer-port", help=HELP["trainer_port"] + " 0: any free port."),
    weights_port: int | None = typer.Option(None, "--weights-port", help=HELP["weights_port"] + " 0: any free port."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Prometheus HTTP port (0: disabled)."),
    secret_key: Path | None = typer.Option(None, "--secret-key", help=HELP["secret_key"], exists=True, dir_okay=False),
    allow_dir: Path | None = typer.Option(None, "--allow-dir", **FOLDER_OPTION, help="Allow-list directory: workers' public keys in it, "
                                          "the trainer's in its trainers/ folder (`tmrl-relay keys init` / `keys add`)."),
    log_level: LogLevel = typer.Option(LogLevel.INFO, "--log-level", case_sensitive=False, help=HELP["log_level"]),
) -> None:
    """Run the relay in the foreground until SIGINT/SIGTERM."""
    overrides = {
        "bind_host": bind_host, "worker_port": worker_port, "trainer_port": trainer_port, "weights_port": weights_port,
        "metrics_port": metrics_port,
        "security": {"insecure": True if insecure else None, "secret_key_file": secret_key, "allowlist_dir": allow_dir},
    }
    effective = load_config_for_command(RelayConfig, "relay", config, overrides=overrides, show_config=show_config)
    configure_logging(log_level)
    raise typer.Exit(code=serve(effective))


_ADDRESS_NOT_UP_YET = frozenset({errno.EADDRNOTAVAIL, errno.ENODEV})
"""Bind errors of an address (or interface) this machine does not have *yet*: at boot before DHCP, or while an
interface is down. Exit status 1 for those, not 2 (a config error, which systemd's RestartPreventExitStatus=2 and
the Windows supervisor never restart), so a relay set to a LAN address comes up once the address does."""
_ADDRESS_NOT_UP_YET_HINT = (" (this machine has no such address or interface now: if it is still coming up, a service "
                            "manager restarts the relay, exit status 1; otherwise fix bind_host)")


def serve(config: RelayConfig) -> int:
    """Bind, serve until SIGINT/SIGTERM, shut down cleanly; returns the process exit code."""
    import prometheus_client

    from tmrl_relay.broker import Relay, RelaySetupError
    from tmrl_relay.metrics import MetricsServer, RelayMetrics

    prometheus_client.disable_created_metrics()  # no `_created` timestamp beside every counter: /metrics reads plainly
    metrics = RelayMetrics()
    relay = Relay(config, metrics)
    # Before bind: bind logs the "listening" line that launchers wait for, and a SIGTERM sent right after it must
    # stop the relay cleanly (exit 0), not kill it with the default action (seen as exit -15 in tests/stack).
    # (Through tmrl_common.stop_signals: relay.stop() sets an Event, which a Python signal handler must not do.)
    if threading.current_thread() is threading.main_thread():
        install_stop_signals(stopping(relay.stop, log))
    server = None
    if config.metrics_port:  # first: a busy metrics port stops the relay before it says it listens
        try:
            server = MetricsServer(metrics, config.metrics_host, config.metrics_port)
        except OSError as exc:
            not_up_yet = exc.errno in _ADDRESS_NOT_UP_YET
            hint = _ADDRESS_NOT_UP_YET_HINT if not_up_yet else (
                " (another relay?): choose another with --metrics-port N (metrics_port in [relay]), or 0 to turn the "
                "metrics off") if exc.errno == errno.EADDRINUSE else ""
            typer.echo(f"tmrl-relay: cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                       f"{exc.strerror or exc}{hint}", err=True)
            return 1 if not_up_yet else 2
    try:
        ports = relay.bind()
    except (RelaySetupError, SecurityError, KeyFileError) as exc:
        not_up_yet = getattr(exc.__cause__, "errno", None) in _ADDRESS_NOT_UP_YET
        typer.echo(f"tmrl-relay: cannot start: {exc}{_ADDRESS_NOT_UP_YET_HINT if not_up_yet else ''}", err=True)
        if server is not None:
            server.close()
        return 1 if not_up_yet else 2
    # One parseable line for scripts and tests that asked for port 0.
    print(f"tmrl-relay ready worker_port={ports.worker_port} trainer_port={ports.trainer_port} "
          f"weights_port={ports.weights_port} metrics_port={server.port if server else 0}", flush=True)
    try:
        relay.run()
    finally:
        if server is not None:
            server.close()
    if threading.current_thread() is threading.main_thread():
        ignore_stop_signals()  # stopped cleanly: a repeated SIGTERM must not turn exit 0 into death by that signal
    log.info("relay stopped: %s", relay.metrics.summary())
    return 0
