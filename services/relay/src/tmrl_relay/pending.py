"""Sample batches the relay holds for the trainer while it is away or busy: bounded in bytes, oldest dropped first."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PendingBatch:
    """One batch as received: its frames (zero-copy ``zmq.Frame`` objects) and what the logs need."""

    sender: str
    seq: int
    steps: int
    envelope: Any
    body: Any
    nbytes: int


class PendingBatches:
    """FIFO of :class:`PendingBatch` holding at most ``max_bytes`` (one batch larger than the bound is still kept
    alone, so a trainer that comes back gets it), each (worker, seq) once: a worker resends what is not acknowledged
    (every ``ack_timeout_s``, and after each reconnection), and while the trainer is away every resend used to be
    held as a new copy (a network probe: 308 held for about 118 distinct batches after 90 s, each copy taking room
    that the oldest distinct batches were then dropped for). A resend of a batch held already is not held again
    (:attr:`resends_not_held`); the trainer answers the one copy it gets, as it would a duplicate."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._queue: deque[PendingBatch] = deque()
        self._held: set[tuple[str, int]] = set()
        self.nbytes = 0
        self.resends_not_held = 0

    def __len__(self) -> int:
        return len(self._queue)

    def append(self, batch: PendingBatch) -> list[PendingBatch]:
        """Add ``batch`` at the back (unless a copy is held already); return the batches dropped from the front to
        stay within the bound."""
        key = (batch.sender, batch.seq)
        if key in self._held:
            self.resends_not_held += 1
            return []
        self._queue.append(batch)
        self._held.add(key)
        self.nbytes += batch.nbytes
        dropped: list[PendingBatch] = []
        while self.nbytes > self.max_bytes and len(self._queue) > 1:
            dropped.append(self.pop())
        return dropped

    def peek(self) -> PendingBatch:
        return self._queue[0]

    def pop(self) -> PendingBatch:
        batch = self._queue.popleft()
        self._held.discard((batch.sender, batch.seq))
        self.nbytes -= batch.nbytes
        return batch
