"""Why a client cannot reach the relay: read from its socket's monitor events, said in one error line with the fix.

CurveZMQ gives a refused client no message of its own: its ``hello`` simply goes nowhere. The socket monitor tells
the cases apart (measured with libzmq 4.3.5):

* ``HANDSHAKE_FAILED_AUTH`` (status 400): the relay's ZAP handler refused this client's public key: it is not in the
  allow-list (workers: ``<allow-dir>``, trainers: ``<allow-dir>/trainers``, both through ``keys add --role``);
* ``HANDSHAKE_FAILED_PROTOCOL``: the two sides speak different mechanisms: one runs ``--insecure``, the other CurveZMQ;
* ``HANDSHAKE_FAILED_NO_DETAIL``, again and again: the relay drops the connection during the handshake because it
  cannot read our ``HELLO``: ``--server-key`` is not the public key of the relay's ``--secret-key``;
* ``HANDSHAKE_FAILED_NO_DETAIL`` with ``EAGAIN``, or any failure ``handshake_timeout_s`` or more after the TCP
  connection (libzmq's errno can then be a stale one): libzmq's own handshake time limit (30 s) passed with the relay
  silent: a network path that carries no bytes, or a paused or overloaded relay (``timed_out``; an outside probe's
  90 s partition was reported as "run both with --insecure" before this was told apart);
* ``HANDSHAKE_FAILED_NO_DETAIL`` with ``ECONNRESET``: the other end closed the connection mid-handshake, as a relay
  being stopped or restarted does (``closed``; a wrong ``--server-key`` gives ``EPIPE``, measured; a listener that
  closed its connections was reported as "the relay speaks CurveZMQ" before);
* TCP connected but no handshake after ``handshake_timeout_s``: whatever listens there is not answering ZMTP;
* handshake done, but nothing at all from the relay after ``reply_timeout_s`` (it answers every heartbeat): the relay
  drops what we send (its log and ``tmrl_relay_rejects_total`` say why).

After the first two, libzmq never reconnects that socket: :meth:`HandshakeWatch.due_for_new_socket` tells its owner to
build a new one after ``retry_s``, so a key allowed later (``tmrl-relay keys add``) is picked up without a restart.
After the third, libzmq retries by itself but with the same keys, so the socket is rebuilt ``retry_s`` after the first
drop too (unless a retry got through meanwhile): building it reads the key files again, and a client whose
``--server-key`` file was replaced by the relay's new public key (a key rotation) reconnects without a restart.
libzmq's own retries of a dropped handshake come every ``reconnect_ivl_ms`` (its back-off only applies to TCP
connections that fail), about five a second, each costing the relay a handshake that cannot succeed with those keys:
after :data:`DROPS_BEFORE_PAUSE` in a row :meth:`HandshakeWatch.pause_due` tells the owner to disconnect the endpoint
until the rebuild, so a misconfigured client tries a few times per ``retry_s``.

:class:`HandshakeWatch` only reads events and logs; the owner (:class:`~tmrl_common.relay_client.RelayClient`, the
worker's weights feed) feeds it every monitor event and asks it once per loop turn.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from tmrl_common.curve import PUBLIC_SUFFIX, SECRET_SUFFIX
from tmrl_common.sockets import RelayEndpoint, tcp_endpoint

log = logging.getLogger(__name__)

DROPS_BEFORE_PAUSE = 3
"""Dropped handshakes in a row after which a socket stops libzmq's retries until it is rebuilt: enough for a relay
restart's transient drop to be retried at once, few enough that a wrong ``--server-key`` costs the relay a handful of
handshakes per ``retry_s`` instead of about fifty."""

WATCHED_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
"""Monitor events a client socket must report for :class:`HandshakeWatch`."""

FAILURE_KINDS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "mechanism",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "dropped",
}


@dataclass
class HandshakeCounters:
    """Failed handshakes by kind: ``refused`` (key not allow-listed), ``mechanism`` (plain text against CurveZMQ),
    ``dropped`` (the relay could not read our handshake), ``timed_out`` (libzmq's handshake time limit passed),
    ``closed`` (the other end closed the connection mid-handshake),
    ``silent`` (TCP up, no handshake in time), ``unanswered`` (handshake done, no reply in time); ``new_sockets``:
    sockets rebuilt after libzmq gave one up."""

    refused: int = 0
    mechanism: int = 0
    dropped: int = 0
    timed_out: int = 0
    silent: int = 0
    unanswered: int = 0
    closed: int = 0
    new_sockets: int = 0


class HandshakeWatch:
    """Diagnoses one client socket's failed handshakes from its monitor events (see the module docstring).

    ``role`` ("worker" or "trainer") picks the allow-list named in the advice; ``report`` False counts without
    logging (a second socket of the same client, whose first socket already says it); ``reply_timeout_s`` None: no
    reply is expected (a SUB socket), else :meth:`heard_from_relay` is called on every message received."""

    def __init__(self, owner_id: str, endpoint: RelayEndpoint, role: str, *, handshake_timeout_s: float = 5.0,
                 reply_timeout_s: float | None = None, retry_s: float = 10.0, report_every_s: float = 30.0,
                 report: bool = True) -> None:
        self.owner_id = owner_id
        self.endpoint = endpoint
        self.role = role
        self.handshake_timeout_s = handshake_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.retry_s = retry_s
        self.report_every_s = report_every_s
        self.report = report
        self.counters = HandshakeCounters()
        self._tcp_since: float | None = None  # TCP connected, handshake not done yet
        self._connected_at: float | None = None  # the latest TCP connection's start (kept after "silent" is said)
        self._dead_since: float | None = None  # libzmq gave this socket up (refused, mechanism)
        self._quiet_since: float | None = None  # handshake done, nothing received since
        self._drops_in_a_row = 0  # dropped handshakes since the last success or new socket
        self._established = False  # the socket's connection finished its handshake and has not closed since
        self._last_report: dict[str, float] = {}
        self.last_failure: str | None = None
        """The kind of the latest failed handshake (``refused``, ``mechanism``, ``dropped``, ``silent``...), for a
        summary at the end: :meth:`advice` says what it means."""
        self.path_down = False
        """Set by the owner when it replaced a connection that went silent, cleared by the next handshake: the
        handshake time-outs in between are logged as warnings (and ``RelayClient.unconnected_hint`` names the path)."""
        self.connection_lost = False
        """A connection that had finished its handshake closed (the owner logs that as a lost connection); cleared by
        the next handshake: like :attr:`path_down`, the time-outs in between are that outage, logged as warnings."""
        self.handshakes = 0
        """Handshakes this socket completed: after one, a relay that goes silent mid-handshake is the same relay
        paused, overloaded or restarting, not a wrong port."""

    # ------------------------------------------------------------------------------------------------- events

    def on_event(self, event: int, value: int = 0, now: float | None = None) -> None:
        """Feed one monitor event (``zmq.EVENT_*``) of the watched socket."""
        now = time.monotonic() if now is None else now
        if event == zmq.EVENT_CONNECTED:
            self._tcp_since = self._connected_at = now
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes += 1
            self.path_down = self.connection_lost = False
            self._established = True
            self._tcp_since = self._dead_since = None  # a dropped handshake that libzmq's retry got through
            self._drops_in_a_row = 0
            self._quiet_since = now
            self._last_report.clear()  # a later failure is news again
        elif event in FAILURE_KINDS:
            kind = FAILURE_KINDS[event]
            waited = now - self._connected_at if self._connected_at is not None else 0.0
            if kind == "dropped" and (value == errno.EAGAIN or waited >= self.handshake_timeout_s):
                # libzmq's handshake time limit, not a refusal (a relay refuses a key within milliseconds): it
                # reconnects by itself, with nothing to rebuild. Its errno can be a stale one: a live check saw the
                # ECONNREFUSED of the connect before, 30 s after this connection's start
                kind = "timed_out"
            elif kind == "dropped" and value == errno.ECONNRESET:  # closed by the other end: libzmq reconnects
                kind = "closed"
            setattr(self.counters, kind, getattr(self.counters, kind) + 1)
            self._tcp_since = None
            if kind in ("refused", "mechanism"):
                self._dead_since = now
            elif kind == "dropped":
                self._drops_in_a_row += 1
                if self._dead_since is None:
                    # libzmq retries a dropped handshake itself, with the same keys: a socket rebuilt after retry_s
                    # reads the key files again, so a client given the relay's new public key (a rotation) needs no
                    # restart
                    self._dead_since = now
            self._say(kind, now)

        elif event == zmq.EVENT_DISCONNECTED:
            if self._established:  # not a connection whose handshake failed
                self.connection_lost, self._established = True, False
            self._tcp_since = self._quiet_since = None

    def heard_from_relay(self) -> None:
        """A message arrived: the relay answers."""
        self._quiet_since = None

    def process_resumed(self, now: float) -> None:
        """This process did not run until ``now`` (SIGSTOP, a paused VM): the handshake's and the first reply's waits
        start again from now, since the relay could not be heard meanwhile."""
        if self._tcp_since is not None:
            self._tcp_since = now
        if self._quiet_since is not None:
            self._quiet_since = now

    def check(self, now: float | None = None) -> None:
        """Call once per loop turn: reports a connection without a handshake, or a relay that never answers."""
        now = time.monotonic() if now is None else now
        if self._tcp_since is not None and now - self._tcp_since >= self.handshake_timeout_s:
            self.counters.silent += 1
            self._tcp_since = None
            self._say("silent", now)
        if (self.reply_timeout_s is not None and self._quiet_since is not None
                and now - self._quiet_since >= self.reply_timeout_s):
            self.counters.unanswered += 1
            self._quiet_since = None
            self._say("unanswered", now)

    def pause_due(self) -> bool:
        """True once, at the :data:`DROPS_BEFORE_PAUSE`-th dropped handshake in a row: the owner disconnects the
        socket's endpoint (``socket.disconnect``), which ends libzmq's retries; :meth:`due_for_new_socket` still comes
        ``retry_s`` after the first drop and the new socket tries again, with the key files read again."""
        if self._drops_in_a_row != DROPS_BEFORE_PAUSE:
            return False
        self._drops_in_a_row += 1  # once per streak
        return True

    def due_for_new_socket(self, now: float | None = None) -> bool:
        """True once, ``retry_s`` after libzmq gave the socket up (it never reconnects after a refusal): the owner
        closes it and connects a new one, counted in ``counters.new_sockets``."""
        now = time.monotonic() if now is None else now
        if self._dead_since is None or now - self._dead_since < self.retry_s:
            return False
        self._dead_since = None
        self._drops_in_a_row = 0
        self.counters.new_sockets += 1
        return True

    # ------------------------------------------------------------------------------------------------ advice

    def advice(self, kind: str, retrying: bool = True) -> str:
        """The error line for a failure ``kind``: what is wrong, the likely cause, the command that fixes it, and
        (``retrying``, the live log line's) when the client tries again."""
        where = tcp_endpoint(self.endpoint.host, self.endpoint.port)
        retry = f"; retrying every {self.retry_s:.0f}s" if retrying else ""
        if kind == "refused":
            # A worker's key given to the trainer is refused the same way, and `keys add --role trainer` then refuses
            # it too (one key, one role): the trainer's advice names its own pair first.
            own_pair = ("If that is a worker's key, do not allow it as the trainer: start the trainer with its own pair "
                        "(`tmrl-relay keys init` makes keys/trainer.key_secret on a one-machine setup, `tmrl-relay "
                        "keys generate --name trainer` on another host). Otherwise, on" if self.role == "trainer"
                        else "If that is the trainer's key, do not allow it as a worker: give this worker its own pair "
                        "(`tmrl-relay keys generate`). If it was removed on purpose, stop this worker. Otherwise, on")
            return (f"the relay at {where} refused this {self.role}'s key {self._public_key_file()}: either port "
                    f"{self.endpoint.port} is not the relay's {self.role}_port (each port admits its own role's keys "
                    f"only; the relay's log names the port that allows this key), or the key is not in its "
                    f"{self.role} allow-list. {own_pair} the relay host run `tmrl-relay keys add "
                    f"{self._public_key_file()} --allow-dir ALLOW --role {self.role}` (ALLOW: the relay's "
                    f"--allow-dir; from another host, copy that file there first){retry}")
        if kind == "timed_out":
            return (f"the relay at {where} did not finish the handshake within libzmq's 30 s: the network path "
                    "carries no bytes (a partition, a link that died without closing the connection), or the relay "
                    f"is paused or overloaded{'; libzmq connects again by itself' if retrying else ''}")
        if kind == "closed":
            if self.handshakes:
                return (f"the relay at {where} closed the connection during the handshake, as a relay that is stopping "
                        f"or restarting does{'; libzmq connects again by itself' if retrying else ''}")
            return (f"the other end at {where} closed the connection during the handshake: is a tmrl relay listening "
                    "on that port (not another service), with the same --insecure or keys as this "
                    f"{self.role}?{' libzmq connects again by itself' if retrying else ''}")
        if kind == "mechanism" or (kind == "dropped" and self.endpoint.security.insecure):
            # a plain-text client against a CurveZMQ relay sees a drop before the mechanism mismatch: no server key
            # is involved
            mine = "plain text (--insecure)" if self.endpoint.security.insecure else "CurveZMQ"
            theirs = "CurveZMQ" if self.endpoint.security.insecure else "plain text (--insecure)"
            return (f"the relay at {where} speaks {theirs}, this {self.role} {mine}: run both with --insecure or both "
                    f"with keys{retry}")
        if kind == "dropped":
            return (f"the relay at {where} drops the CurveZMQ handshake: --server-key "
                    f"({self.endpoint.security.server_public_key_file}) is most likely not the public key of the "
                    f"relay's --secret-key (copy the relay's public key, the .key file beside its --secret-key, over "
                    f"it again: the file is read again every {self.retry_s:.0f}s, no restart needed), or the relay "
                    f"runs --insecure (then run this {self.role} with --insecure too: its log says which){retry}")
        if kind == "unanswered":
            return (f"connected to {where}, but the relay has not answered our hello and heartbeats for "
                    f"{self.reply_timeout_s:.0f}s: it drops what this {self.role} sends; its log (and "
                    "tmrl_relay_rejects_total) says why, e.g. a worker key on the trainer port")
        if self.handshakes:
            return (f"connected to {where} again, but the relay has not finished the handshake in "
                    f"{self.handshake_timeout_s:.0f}s, as it did before: it is paused, overloaded or restarting, or "
                    "the network path stopped carrying bytes; retrying")
        return (f"connected to {where}, but no handshake after {self.handshake_timeout_s:.0f}s: is a tmrl relay "
                "listening on that port (not another service, not the relay's weights or metrics port)?")

    def _public_key_file(self) -> Path:
        secret = self.endpoint.security.secret_key_file
        if secret is None:
            return Path(f"{self.owner_id}{PUBLIC_SUFFIX}")
        name = secret.name.removesuffix(SECRET_SUFFIX) if secret.name.endswith(SECRET_SUFFIX) else secret.stem
        return secret.with_name(f"{name}{PUBLIC_SUFFIX}")

    def _say(self, kind: str, now: float) -> None:
        self.last_failure = kind
        if not self.report or now - self._last_report.get(kind, float("-inf")) < self.report_every_s:
            return
        self._last_report[kind] = now
        # while the path is known to be down (the owner replaced a silent connection, or lost one, and said so), the
        # handshakes that time out meanwhile are that same outage, not a new fault: warnings (a network probe counted
        # 5 ERROR lines per 90 s black hole)
        outage = self.path_down or self.connection_lost
        level = logging.WARNING if outage and kind in ("silent", "timed_out", "closed") else logging.ERROR
        log.log(level, "%s: %s", self.owner_id, self.advice(kind))
