"""The relay's copy of the latest weights, and the bound on how often it publishes.

The trainer's validated ``weights_update`` frames are kept as they arrived (zero-copy). They are published on the
weights socket at most once per ``min_interval_s``: an update arriving sooner replaces the waiting one and goes out
when the interval ends, so only the latest is ever sent and no peer can make the relay publish faster. Subscriptions
never trigger a publication (issue 14: 2,000 subscribes from one XSUB once gave every subscriber 116 copies in 2 s);
a worker gets the latest weights over its own link after its ``hello`` instead (:meth:`owed_to`).
"""

from __future__ import annotations

from typing import Any

from tmrl_relay.peers import Peer


class WeightsCache:
    """Latest weights frames, their version, and whether they still wait to be published."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self.frames: tuple[Any, Any] | None = None
        self.version = -1
        self.waiting = False
        self._next_publish = 0.0

    def store(self, envelope: Any, body: Any, version: int) -> None:
        """Keep a validated update as the latest; it waits for :meth:`publish_due`."""
        self.frames = (envelope, body)
        self.version = version
        self.waiting = True

    def publish_due(self, now: float) -> bool:
        """The latest update waits and the interval since the last publication has passed."""
        return self.waiting and now >= self._next_publish

    def mark_published(self, now: float) -> None:
        self.waiting = False
        self._next_publish = now + self.min_interval_s

    def owed_to(self, peer: Peer) -> bool:
        """This connection has not been handed the latest weights yet (once per version and connection)."""
        return self.frames is not None and peer.weights_version < self.version
