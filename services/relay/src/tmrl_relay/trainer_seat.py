"""The trainer's side of the relay: who holds the trainer role, whether it is alive, whether it is full.

There is one trainer at a time. Who may take the role (issue 14: a worker key once said hello as the trainer and
published its weights to every worker):

* under CurveZMQ only a key of the trainer allow-list reaches the trainer socket at all (the ZAP domain of that
  socket lists those keys only); :meth:`TrainerSeat.claim` also refuses a key the relay does not know as a trainer
  key, should the lists ever overlap;
* any hello on another connection is refused while the current trainer is alive (heard from within
  ``peer_timeout_s`` and its connection not gone: the relay asks the socket first), the **same identity** (the same
  CurveZMQ key; in ``--insecure`` mode the same sender id) too: a live connection under it is a second process,
  not a restart (a probe started a second trainer with the same config and another run directory; it took the
  role, and the first, having lost it three times, stopped). A restarted trainer's old connection is gone (a
  process that ends closes it) or silent, and the restart's hello, said again with backoff, gets the role then;
* once the holder is silent or gone, the first trainer to say hello takes the role; a hello again on the holder's
  own connection keeps it.

Refusals raise :class:`RoleRefused` (a ``ProtocolError`` with reason ``unknown_sender``: the relay answers it with an
``error``, and a trainer that gets one says hello again with backoff), and carry a ``why`` for the
``tmrl_relay_role_refusals_total`` counter.
"""

from __future__ import annotations

import time

from tmrl_common.errors import ProtocolError

from tmrl_relay.peers import Peer


def _identity(sender: str, user_id: str | None) -> str:
    """What makes two hellos the same trainer: the CurveZMQ key, or the sender id without CurveZMQ."""
    return user_id if user_id is not None else f"id:{sender}"


class RoleRefused(ProtocolError):
    """A peer asked for a role it may not have now; ``why`` labels the refusal counter."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__("unknown_sender", message)
        self.why = why


class TrainerSeat:
    """The trainer role: the peer holding it (``peer``), ``alive`` and ``backpressured`` (its queue is full)."""

    def __init__(self, peer_timeout_s: float) -> None:
        self.peer_timeout_s = peer_timeout_s
        self.peer: Peer | None = None
        self.alive = False
        self.backpressured = False

    def check_claim(self, sender: str, user_id: str | None, trainer_keys: frozenset[str] | None,
                    routing_id: bytes, now: float | None = None) -> None:
        """Raise :class:`RoleRefused` if the hello of ``sender`` on connection ``routing_id`` may not take the role."""
        if trainer_keys is not None and user_id not in trainer_keys:
            raise RoleRefused("not_a_trainer_key", "this CurveZMQ key is not in the relay's trainer allow-list; add it "
                                                   "with `tmrl-relay keys add trainer.key --allow-dir DIR --role trainer`")
        current = self.peer
        if current is None or current.routing_id == routing_id or not self.holds_live(now):
            return
        if _identity(sender, user_id) == _identity(current.sender, current.user_id):
            raise RoleRefused("trainer_alive", f"trainer {current.sender!r} holds the trainer role with this "
                                               f"{'CurveZMQ key' if user_id is not None else 'id'} on another "
                                               "connection and is alive: a second process with the same key or id? "
                                               "This one takes the role once that connection closes or is silent for "
                                               f"{self.peer_timeout_s:g} s (a restarted trainer's old one does); stop "
                                               "one of them if both are not meant to run")
        holder = (f"trainer {current.sender!r} (another CurveZMQ key: {current.user_id[:8]}...)"
                  if current.user_id is not None and current.user_id != user_id else f"trainer {current.sender!r}")
        raise RoleRefused("trainer_alive", f"{holder} holds the trainer role and is alive; a relay serves one "
                                           "trainer at a time: this one may take the role once that one is silent "
                                           "or gone (stop one of them if both are meant to run)")

    def holds_live(self, now: float | None = None) -> bool:
        """A trainer holds the role and was heard from within ``peer_timeout_s``."""
        now = time.monotonic() if now is None else now
        return self.peer is not None and self.alive and now - self.peer.last_seen <= self.peer_timeout_s

    def take(self, peer: Peer) -> None:
        """``peer`` holds the role now (its hello was accepted)."""
        self.peer = peer
        self.alive = True
        self.backpressured = False

    def heard_from(self) -> bool:
        """The holder sent something; True when it was silent until now (it is back)."""
        assert self.peer is not None
        self.peer.last_seen = time.monotonic()
        was_silent, self.alive = not self.alive, True
        return was_silent

    def mark_silent(self) -> None:
        """Nothing heard for ``peer_timeout_s``: hold batches, keep the holder (it may come back on this connection)."""
        self.alive = False
        self.backpressured = False

    def mark_gone(self) -> None:
        """The holder's connection is gone: nobody holds the role."""
        self.peer = None
        self.mark_silent()

    def is_silent(self, now: float) -> bool:
        """The holder was alive but has not been heard from for ``peer_timeout_s``."""
        return self.peer is not None and self.alive and now - self.peer.last_seen > self.peer_timeout_s

    def holds(self, peer: Peer) -> bool:
        return peer is self.peer

    @property
    def ready(self) -> bool:
        """Batches may be sent to the holder now."""
        return self.peer is not None and self.alive
