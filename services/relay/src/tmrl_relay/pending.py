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
    alone, so a trainer that comes back gets it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._queue: deque[PendingBatch] = deque()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._queue)

    def append(self, batch: PendingBatch) -> list[PendingBatch]:
        """Add ``batch`` at the back; return the batches dropped from the front to stay within the bound."""
        self._queue.append(batch)
        self.nbytes += batch.nbytes
        dropped: list[PendingBatch] = []
        while self.nbytes > self.max_bytes and len(self._queue) > 1:
            oldest = self._queue.popleft()
            self.nbytes -= oldest.nbytes
            dropped.append(oldest)
        return dropped

    def peek(self) -> PendingBatch:
        return self._queue[0]

    def pop(self) -> PendingBatch:
        batch = self._queue.popleft()
        self.nbytes -= batch.nbytes
        return batch
