"""Who is connected: workers and the trainer that said ``hello``, keyed by their ZeroMQ routing id.

A sender id is bound to the connection (routing id) that said hello with it and, under CurveZMQ, to the public key
that connection authenticated with: a message whose routing id did not say hello, or says another sender id, or
comes from a different key than the one the sender id was first bound to, is rejected as ``unknown_sender``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tmrl_common.errors import ProtocolError

MAX_IDS_PER_KEY = 16
"""Sender ids one CurveZMQ key may bind (bounds the binding table by the allow-list's size)."""
MAX_DISPLACED = 4096
"""Connections remembered as displaced by a newer connection's hello under their id (oldest forgotten first)."""


@dataclass
class Peer:
    """A registered worker or trainer connection."""

    sender: str
    routing_id: bytes
    user_id: str | None
    """Z85 public key from CurveZMQ authentication (``None`` in --insecure mode)."""
    last_seen: float = field(default_factory=time.monotonic)
    weights_version: int = -1
    """Latest weights version handed over on this connection (-1: none yet); each version at most once."""
    hello: tuple[bytes, bytes] | None = None
    """The frames (envelope, body) of a worker's latest hello on this connection, passed to a trainer that takes the
    role later (a worker started before its trainer was otherwise never seen to announce its layout)."""
    reported: dict[str, int] = field(default_factory=dict)
    """The counters of its latest ``heartbeat`` that the relay exports (a worker's: ``WORKER_HEARTBEAT_COUNTERS``);
    replaced whole at each heartbeat, so the metrics thread reads one heartbeat's set."""


class DisplacedConnection(ProtocolError):
    """A message on a connection whose sender id a newer connection has said hello with since: a second process
    under one id, or bytes the peer sent on a connection it has replaced (a stalled network path delivering them
    late). :meth:`sent_before_replacement` tells the two apart by the message's ``sent_at``."""

    def __init__(self, sender: str, replaced_at: float | None) -> None:
        super().__init__("unknown_sender", f"{sender!r} said hello on another connection since this one did (two "
                                           "processes under one id?); say hello again to take it back")
        self.sender = sender
        self.replaced_at = replaced_at
        """The newer connection's hello's ``sent_at`` (None: not known)."""

    def sent_before_replacement(self, sent_at: float) -> float | None:
        """How long before the newer connection's hello a message sent at ``sent_at`` was sent, both by the sender's
        clock; None when it was sent after it (two processes), or that is not known. A peer replaces a connection it
        takes as dead (``tmrl_common.relay_client``) and does not send on it again, so such a message is late, not
        a second process; two hosts' clocks apart by more than their messages' gaps would be taken for it only
        until the other process's clock passes the hello's time."""
        if self.replaced_at is None or sent_at >= self.replaced_at:
            return None
        return self.replaced_at - sent_at


class PeerTable:
    """Registered peers of one link. ``max_peers`` bounds memory: beyond it the longest-silent peer is forgotten, if
    it has been silent for more than ``live_within_s``; while every registered peer has been heard from within it, a
    new peer's hello is refused instead (with ``live_within_s`` None, the longest-silent one is always forgotten)."""

    def __init__(self, role: str, max_peers: int, live_within_s: float | None = None, limit_name: str = "max_peers") -> None:
        self.role = role
        self.max_peers = max_peers
        self.live_within_s = live_within_s
        self.limit_name = limit_name
        """The setting that sets ``max_peers``, named in the refusal (the relay's ``[relay] max_workers``)."""
        self.forgotten_silent = 0
        """Peers forgotten to make room for a new one (each silent for more than ``live_within_s``)."""
        self.by_routing_id: dict[bytes, Peer] = {}
        self.by_sender: dict[str, Peer] = {}
        self.key_of_sender: dict[str, str] = {}
        """Sender id → public key it was first registered with; a different key may never use that id."""
        self._ids_of_key: dict[str, set[str]] = {}
        self._displaced: dict[bytes, tuple[str, float | None]] = {}
        """Routing id → the sender id a newer connection has said hello with since this one did, and that hello's
        ``sent_at``: what it is told when it sends again (two processes under one id, or its own late bytes), as
        against a connection that never said hello."""

    def register(self, routing_id: bytes, sender: str, user_id: str | None,
                 sent_at: float | None = None) -> tuple[Peer, Peer | None]:
        """Bind ``sender`` to this connection (its hello was sent at ``sent_at``, the sender's clock); returns the new
        peer and the one it replaced (a reconnection)."""
        bound_key = self.key_of_sender.get(sender)
        if user_id is not None and bound_key is not None and bound_key != user_id:
            role_flag = " --role trainer" if self.role == "trainer" else ""
            raise ProtocolError("unknown_sender", f"{self.role} id {sender!r} is bound to another CurveZMQ key (a new "
                                                  f"key pair for this {self.role}? remove the old key from the relay's "
                                                  f"allow-list, `tmrl-relay keys remove --allow-dir ALLOW NAME"
                                                  f"{role_flag}`, which frees the id at the relay's next reload)")
        if sender not in self.by_sender and routing_id not in self.by_routing_id:
            self._make_room(sender)
        if user_id is not None and bound_key is None:
            ids = self._ids_of_key.setdefault(user_id, set())
            if len(ids) >= MAX_IDS_PER_KEY:
                raise ProtocolError("unknown_sender", f"this CurveZMQ key already uses {len(ids)} {self.role} ids "
                                                      f"(at most {MAX_IDS_PER_KEY}); give each {self.role} its own key")
            ids.add(sender)
        previous = self.by_sender.pop(sender, None)
        if previous is not None:
            self.by_routing_id.pop(previous.routing_id, None)
            if previous.routing_id != routing_id:
                self._displaced[previous.routing_id] = (sender, sent_at)
                while len(self._displaced) > MAX_DISPLACED:
                    del self._displaced[next(iter(self._displaced))]
        self._displaced.pop(routing_id, None)
        stale = self.by_routing_id.pop(routing_id, None)  # this connection said hello before under another id
        if stale is not None and stale.sender != sender:
            self.by_sender.pop(stale.sender, None)
        peer = Peer(sender=sender, routing_id=routing_id, user_id=user_id)
        same_connection = [p for p in (previous, stale) if p is not None and p.routing_id == routing_id]
        if same_connection:  # a hello again on one connection is not owed the weights it already got
            peer.weights_version = same_connection[0].weights_version
        self.by_routing_id[routing_id] = peer
        self.by_sender[sender] = peer
        if user_id is not None:
            self.key_of_sender[sender] = user_id
        return peer, previous

    def _make_room(self, sender: str) -> None:
        """Room for one more peer: forget the longest-silent one when the table is full, unless every peer was heard
        from within ``live_within_s``: then refuse ``sender`` (``unknown_sender``). Forgetting a live peer instead
        (as before) made a fleet larger than the limit displace each other in turn, each told it had "sent before
        saying hello" (an outside probe: 5 workers against max_workers = 3, each re-registered 4-6 times in 90 s)."""
        while len(self.by_sender) >= self.max_peers:
            oldest = min(self.by_sender.values(), key=lambda p: p.last_seen)
            silent_s = time.monotonic() - oldest.last_seen
            if self.live_within_s is not None and silent_s <= self.live_within_s:
                raise ProtocolError("unknown_sender", f"the relay already registers {self.max_peers} {self.role}s "
                                    f"({self.limit_name}), all heard from within {self.live_within_s:g} s: {sender!r} is "
                                    f"not registered; it may say hello again when one stops, or raise {self.limit_name}")
            self.forget(oldest)
            self.forgotten_silent += 1

    def check(self, routing_id: bytes, sender: str, user_id: str | None) -> Peer:
        """The peer behind ``routing_id`` if it registered as ``sender`` with this key; else ``unknown_sender``."""
        peer = self.by_routing_id.get(routing_id)
        if peer is None:
            displaced_by = self._displaced.get(routing_id)
            if displaced_by is not None and displaced_by[0] == sender:  # a newer connection's hello took its id
                raise DisplacedConnection(sender, displaced_by[1])
            raise ProtocolError("unknown_sender", f"{sender!r} sent before saying hello on this connection (every new "
                                                  "connection, a reconnection too, says hello first)")
        if peer.sender != sender:
            raise ProtocolError("unknown_sender", f"this connection said hello as {peer.sender!r}, not {sender!r}")
        if peer.user_id != user_id:
            raise ProtocolError("unknown_sender", f"{sender!r}: the connection's CurveZMQ key changed since hello")
        return peer

    def said_hello_as(self, routing_id: bytes) -> str:
        """What a connection said hello as, for a log line: the sender id bound to it, the id a newer connection has
        taken from it since, or that it said none."""
        peer = self.by_routing_id.get(routing_id)
        if peer is not None:
            return peer.sender
        displaced = self._displaced.get(routing_id)
        if displaced is not None:
            return f"{displaced[0]}, since taken by a newer connection"
        return "nothing (no hello on it)"

    def release_keys(self, allowed: frozenset[str]) -> list[str]:
        """Unbind every sender id bound to a key no longer in ``allowed`` (a revoked key): the id may then be used by
        the worker's new key pair, as docs/security.md advises after a revocation. Returns the ids released."""
        released = [sender for sender, key in self.key_of_sender.items() if key not in allowed]
        for sender in released:
            del self.key_of_sender[sender]
        for key in [key for key in self._ids_of_key if key not in allowed]:
            del self._ids_of_key[key]
        return released

    def forget(self, peer: Peer) -> None:
        self.by_routing_id.pop(peer.routing_id, None)
        if self.by_sender.get(peer.sender) is peer:
            del self.by_sender[peer.sender]

    def alive(self, timeout_s: float, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for peer in self.by_sender.values() if now - peer.last_seen <= timeout_s)
