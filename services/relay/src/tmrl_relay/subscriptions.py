"""The weights socket's subscriptions as the relay sees them, and the bound that has it re-open the socket.

Workers subscribe to the empty topic (every publication). libzmq keeps every subscription a peer sends in the XPUB
socket's subscription tree, with no limit, until that peer disconnects, and the relay cannot drop one connection's
subscriptions: a peer subscribing to fresh topics would grow the relay's memory for as long as it stays connected.

The socket is ``XPUB_VERBOSER``, so libzmq hands the relay one notification per subscribe and per cancel, also for
each topic of a peer that disconnects. :class:`SubscriptionLedger` keeps the live topics other than the empty one
(each with its subscribe count less its cancels: a cancel of a topic never subscribed frees nothing and counts for
nothing) and their bytes. Past :data:`FOREIGN_TOPICS_MAX` topics or :data:`FOREIGN_TOPIC_BYTES_MAX` bytes the relay
re-opens the socket on the same port: libzmq frees the whole tree, and the workers' SUB sockets reconnect on their own
and subscribe again. The ledger's own memory is bounded by the same two numbers.
"""

from __future__ import annotations

from collections import Counter

FOREIGN_TOPICS_MAX = 4096
"""Live subscriptions to topics other than the empty one, past which the weights socket is re-opened."""
FOREIGN_TOPIC_BYTES_MAX = 256 * 1024
"""Bytes of those topics, past which the weights socket is re-opened (libzmq's tree takes tens of bytes per byte)."""
_PEERS_KEPT = 64
"""Peers the ledger names (the most subscriptions first); more are summed under ``"others"``."""

SUBSCRIBE, CANCEL = 1, 0


class SubscriptionLedger:
    """Live foreign topics on the current weights socket, who sent them, and whether the socket must be re-opened."""

    def __init__(self, max_topics: int | None = None, max_bytes: int | None = None) -> None:
        self.max_topics = FOREIGN_TOPICS_MAX if max_topics is None else max_topics
        self.max_bytes = FOREIGN_TOPIC_BYTES_MAX if max_bytes is None else max_bytes
        self._live: dict[bytes, int] = {}
        self.topic_bytes = 0
        self.by_peer: Counter[str] = Counter()
        """Foreign subscriptions per peer (its address, and its key under CurveZMQ) since the socket opened."""

    @property
    def topics(self) -> int:
        return len(self._live)

    def subscribed(self, topic: bytes, peer: str) -> None:
        """A subscription to ``topic`` (not the empty one) from ``peer``."""
        count = self._live.get(topic, 0)
        if count == 0:
            self.topic_bytes += len(topic)
        self._live[topic] = count + 1
        if peer in self.by_peer or len(self.by_peer) < _PEERS_KEPT:
            self.by_peer[peer] += 1
        else:
            self.by_peer["others"] += 1

    def cancelled(self, topic: bytes) -> None:
        """A cancel of ``topic``; one of a topic not live changes nothing."""
        count = self._live.get(topic, 0)
        if count > 1:
            self._live[topic] = count - 1
        elif count == 1:
            del self._live[topic]
            self.topic_bytes -= len(topic)

    def over_limit(self) -> bool:
        return len(self._live) > self.max_topics or self.topic_bytes > self.max_bytes

    def busiest_peer(self) -> tuple[str, int]:
        """The peer with the most foreign subscriptions since the socket opened, and their number."""
        if not self.by_peer:
            return "?", 0
        return self.by_peer.most_common(1)[0]

    def reset(self) -> None:
        """The socket was re-opened: its tree, and so every live topic, is gone."""
        self._live.clear()
        self.topic_bytes = 0
        self.by_peer.clear()
