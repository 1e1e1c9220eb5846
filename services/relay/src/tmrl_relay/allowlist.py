"""The relay's allow-lists under CurveZMQ: which keys each socket admits, who may be the trainer, live reloads.

Worker keys live in ``security.allowlist_dir`` (``NAME.key``) and admit a client on the workers and weights sockets;
trainer keys live in ``trainer_allowlist_dir`` (default ``<allowlist_dir>/trainers``) and are the only keys the
trainer socket admits. The relay refuses to start with no trainer key. The directories are checked every
``allowlist_reload_s``: an added key connects from then on, a removed key's new connections are refused. A file that
is not a valid key admits no one and is logged with the command that clears it; every other change applies all the
same (a removal above all). A directory that cannot be listed keeps the previous lists (logged). A key in both the
workers' and the trainer's list admits no one (one key, one role; logged). The relay's own public key in a list is
logged too: it is the key clients check the relay by, not a client's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq
from tmrl_common.curve import (
    KeyFileError,
    read_allowed_keys,
    reload_authenticator,
    start_authenticator,
)

from tmrl_relay.config import RelayConfig
from tmrl_relay.metrics import RelayMetrics

log = logging.getLogger(__name__)

ZAP_DOMAINS = {"workers": "tmrl-workers", "trainer": "tmrl-trainer", "weights": "tmrl-weights"}


class RelaySetupError(RuntimeError):
    """The relay cannot start (ports in use, keys missing...). The message says what to fix."""


def require_keys_configured(config: RelayConfig) -> None:
    """Raise :class:`RelaySetupError`, saying what to run, when CurveZMQ is on but a key setting is missing."""
    security = config.security
    missing = [name for name, value in (("security.secret_key_file", security.secret_key_file),
                                        ("security.allowlist_dir", security.allowlist_dir)) if value is None]
    if missing:
        raise RelaySetupError(
            f"CurveZMQ is on but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. "
            "Generate the relay's key pair with `tmrl-relay keys generate --dir KEYS --name relay` (then "
            "--secret-key KEYS/relay.key_secret), allow each client with `tmrl-relay keys add --allow-dir ALLOW "
            "CLIENT.key` (the trainer's with `--role trainer`; then --allow-dir ALLOW), or run with --insecure on a "
            "trusted network"
        )


class AllowlistWatcher:
    """Runs the ZAP authenticator over the allow-list directories and reloads it when they change."""

    def __init__(self, config: RelayConfig, metrics: RelayMetrics, relay_public_key: bytes | None = None) -> None:
        security = config.security
        assert security.allowlist_dir is not None
        self.worker_dir = Path(security.allowlist_dir)
        self.trainer_dir = config.trainer_allowlist()
        self.reload_s = config.allowlist_reload_s
        self.metrics = metrics
        self.trainer_keys: frozenset[str] = frozenset()
        """Z85 public keys that may hold the trainer role."""
        self.worker_keys: frozenset[str] = frozenset()
        """Z85 public keys the workers' socket admits now (a removed key's open connection is refused by message)."""
        self.relay_public_key = relay_public_key
        """The relay's own public key (from its secret key file), which no allow-list should hold."""
        self.relay_key_file = security.secret_key_file
        self._authenticator = None
        self._signature: tuple = ()
        self._checked = 0.0

    def domains(self) -> dict[str, Path]:
        return {ZAP_DOMAINS["workers"]: self.worker_dir, ZAP_DOMAINS["weights"]: self.worker_dir,
                ZAP_DOMAINS["trainer"]: self.trainer_dir}

    @staticmethod
    def roles() -> tuple[set[str], set[str]]:
        """The two groups of domains no key may be in both of: the workers' sockets and the trainer's."""
        return {ZAP_DOMAINS["workers"], ZAP_DOMAINS["weights"]}, {ZAP_DOMAINS["trainer"]}

    def start(self, context: zmq.Context) -> None:
        """Check that a trainer key exists, then start the authenticator (raises :class:`RelaySetupError`)."""
        self._require_a_trainer_key()
        try:
            self._authenticator = start_authenticator(context, self.domains(), self.roles())
        except KeyFileError as exc:
            raise RelaySetupError(str(exc)) from exc
        self._signature = self._state()
        self._count_keys()

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def maybe_reload(self, now: float | None = None) -> bool:
        """Reload the authenticator if a directory changed since the last look (at most every ``reload_s``);
        True when the lists were reloaded."""
        now = time.monotonic() if now is None else now
        if self._authenticator is None or now - self._checked < self.reload_s:
            return False
        self._checked = now
        state = self._state()
        if state == self._signature:
            return False
        self._signature = state
        try:
            counts, problems = reload_authenticator(self._authenticator, self.domains(), self.roles())
        except KeyFileError as exc:
            log.error("allow-list changed but cannot be read, keeping the previous lists: %s", exc)
            return False
        for problem in problems:
            log.error("allow-list: %s", problem)
        log.info("allow-list reloaded: %s", counts)
        self._count_keys()
        return True

    def _require_a_trainer_key(self) -> None:
        if not self.trainer_dir.is_dir():
            keys, detail = [], " (the folder does not exist)"
        else:
            try:
                keys, problems = read_allowed_keys(self.trainer_dir)
            except KeyFileError as exc:  # the folder cannot be listed
                keys, problems = [], [str(exc)]
            detail = f" ({'; '.join(problems)})" if problems else ""
        if not keys:
            raise RelaySetupError(
                f"CurveZMQ is on but no trainer key is allowed in {self.trainer_dir}{detail}. Only keys there may be "
                f"the trainer. Run `tmrl-relay keys add trainer.key --allow-dir {self.worker_dir} --role trainer` "
                "(the trainer's public key), or run with --insecure on a trusted network")

    def _state(self) -> tuple:
        state = []
        for directory in sorted({self.worker_dir, self.trainer_dir}):
            try:
                state.extend((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.glob("*.key")))
            except OSError:
                state.append((str(directory), "missing"))
        return tuple(state)

    def _count_keys(self) -> None:
        """The metrics and :attr:`trainer_keys` from the sets the authenticator admits now."""
        assert self._authenticator is not None
        for link, domain in ZAP_DOMAINS.items():
            keys = self._authenticator.tmrl_keys.allowed(domain)
            self.metrics.allowed_keys.labels(link=link).set(len(keys))
            if link == "trainer":
                self.trainer_keys = frozenset(key.decode("ascii") for key in keys)
            elif link == "workers":
                self.worker_keys = frozenset(key.decode("ascii") for key in keys)
        self._warn_if_own_key_allowed()

    def _warn_if_own_key_allowed(self) -> None:
        """Log the allow-list entries holding the relay's own public key: an operator who ran ``keys add relay.key``
        meant a client's key (the relay's public key goes to the clients, as their ``--server-key``), and that
        client will be refused until its own key is added."""
        if self.relay_public_key is None:
            return
        try:  # the good entries, whatever the broken ones (which admit no one, and are logged as such)
            entries = [entry for directory in (self.worker_dir, self.trainer_dir) if directory.is_dir()
                       for entry in read_allowed_keys(directory)[0] if entry.public_key == self.relay_public_key]
        except (KeyFileError, OSError):  # the authenticator has logged an unreadable list
            return
        for entry in entries:
            role = "trainer" if entry.path.parent == self.trainer_dir else "worker"
            log.warning("the allow-list entry %s holds the relay's own public key (from %s), not a client's: clients "
                        "get the relay's public key as their --server-key; allow each client's own public key instead "
                        "(`tmrl-relay keys remove %s --allow-dir %s%s`, then `tmrl-relay keys add CLIENT.key ...`)",
                        entry.path, self.relay_key_file, entry.name, self.worker_dir,
                        " --role trainer" if role == "trainer" else "")
