"""A device-resident mirror of the replay memory, sampled on the device: the batch of a CUDA-graph update is drawn and
gathered inside the graph (issue 16).

:class:`DeviceReplay` holds, in device tensors, a copy of every row of a :class:`~tmrl_trainer.memory.ReplayMemory`
ring (newest frames, actions, rewards, termination flags, the ring position of each row's predecessor, and what
makes its transition sampleable), and an **index of sampleable rows** on the device: the ring positions where
``complete & (oldest >= total - capacity)``, in ascending order, and their count. With these,
:meth:`DeviceReplay.sample` is a fixed sequence of device operations with fixed shapes and no host synchronisation:

1. ``k = floor(u * count)`` for ``u`` uniform in [0, 1) (float64, drawn from :attr:`DeviceReplay.generator`):
   uniform, with replacement, over the sampleable rows, as :meth:`ReplayMemory.sample` draws;
2. the transition's rows: hop 0 is ``index[k]``, hop ``j`` is ``prev[hop j-1]``, as in
   :meth:`ReplayMemory.transitions`;
3. each stored column gathered at those rows, and the same views taken (observation: hops ``history … 1``, next
   observation: hops ``history - 1 … 0``; the action buffer likewise; the replayed action at hop 0).

With n-step returns (the memory's ``n_step > 1``), step 2 is taken from the sampled row and again from the end of
its walk forward along ``next`` (:func:`~tmrl_trainer.memory.n_step_returns`, the host's function on tensors).

So the batch for given positions is the host sampler's batch, component by component and bit for bit, and the index
is the host's :meth:`ReplayMemory.sampleable_positions` (``tests/trainer/test_device_replay.py``, on the cases of
``test_memory_histories.py``: gaps, reordering, orphans, episode ends, a ring that wrapped). The rule that histories
are never invented is the host memory's: the mirror copies the host's verdict per row (``complete``, ``oldest``) and
recomputes nothing.

**Keeping the mirror current** (:meth:`DeviceReplay.sync`, called by the learner's thread between updates): rows
never change after the host stores them (only the ring overwrites them), so the mirror copies the rows added since
its last sync, at most :attr:`DeviceReplay.chunk_rows` at a time. Under the memory's lock (the one the ingest thread
holds while storing a batch) a chunk is copied from the host ring into a staging buffer, host memory to host memory;
the lock is then released, and the staging buffer goes to a buffer on the device with a ``non_blocking`` copy on a
side stream, which overlaps the updates in flight. On CUDA the staging buffers are pinned, two of them take turns,
and a buffer is written again only once its previous copy has finished (the learner's thread waits for that outside
the lock): the ingest thread never waits for the GPU. Then, still on the side stream but only after the updates
already queued (they read the ring), the landed rows are copied into the ring, their successor links are set from
their predecessors (the only stored field that changes after a row is stored is its successor, so the mirror
derives it rather than copying it), and the index is rebuilt with fixed-shape operations (``cumsum`` and a scatter; O(capacity), once per sync that brought rows); the updates queued
after the sync wait for that. These are waits between streams on the GPU, not on the host. A memory that was loaded
from a file (its ``generation`` changed) is copied again whole.

The same code runs on a CPU device (plain tensors, no stream): that is how it is tested here. On CPU it is not the
default: the rebuild of the index costs O(capacity) per sync, and host sampling (:meth:`ReplayMemory.sample`) is
faster there (0.08 against 0.14 ms per batch of 256, ``benchmarks/README.md``).

Limits: the mirror is as of its last sync (the updates between two syncs do not see rows stored in between), and
an empty index gives whatever row ``index[0]`` names. :meth:`DeviceReplay.ready` (one synchronisation) says whether
the index holds a row, and the trainer asks it until it does, not after: an index that held rows empties again only
if the ring is overwritten whole by rows none of which ends a complete transition (every batch an orphan shorter
than the history depth, say), which nothing in the trainer checks for on the device.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch

from tmrl_trainer.memory import ReplayMemory, TransitionBatch, gather_histories, link_rows, n_step_returns

DEFAULT_CHUNK_ROWS = 16_384
"""Rows copied per staging buffer (a sync that is further behind copies several chunks)."""

_TORCH_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


class _Column(NamedTuple):
    """One mirrored array: the host ring array's key in :meth:`ReplayMemory.ring_arrays`, and the device tensor
    (``None``: staged for the upload only, not kept)."""

    host: str
    device: torch.Tensor | None
    ring_positions: bool = False
    """The host holds absolute row indices, the device ring positions."""


class _Chunk(NamedTuple):
    """Rows staged for one upload: the staging buffer, ring segments ``(ring_start, staging_start, rows)``, and the
    absolute indices of its first row and of the row after its last."""

    staging: int
    segments: list[tuple[int, int, int]]
    first: int
    stop: int


class DeviceReplay:
    """The rows of ``memory`` in tensors on ``device``, an index of its sampleable transitions there, and a sampler
    that needs neither the host nor a host synchronisation (see the module docstring)."""

    def __init__(self, memory: ReplayMemory, device: str | torch.device, seed: int = 0,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.memory = memory
        self.layout = memory.layout
        self.capacity = memory.capacity
        self.depth = memory.depth
        self.device = torch.device(device)
        self.chunk_rows = max(1, min(int(chunk_rows), self.capacity))
        cuda = self.device.type == "cuda"

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        capacity = self.capacity
        self.frames = {c.name: zeros(capacity, *c.frame_shape, dtype=_TORCH_DTYPES[c.dtype])
                       for c in self.layout.components}
        self.actions = zeros(capacity, self.layout.action_dim, dtype=torch.float32)
        self.rewards = zeros(capacity, dtype=torch.float32)
        self.terminated = zeros(capacity, dtype=torch.float32)
        """1.0 / 0.0, as the batch carries it."""
        self.truncated = zeros(capacity, dtype=torch.float32)
        self.prev = zeros(capacity, dtype=torch.int64)
        """Ring position of each row's predecessor in its episode (the host holds absolute indices)."""
        self.next = torch.full((capacity + 1,), -1, dtype=torch.int64, device=self.device)
        """Ring position of each row's successor in its episode, -1 while none is stored (n-step returns walk it):
        rebuilt from each chunk's predecessors as the host builds its own (:func:`~tmrl_trainer.memory.link_rows`).
        The last slot takes the writes of rows that link nothing."""
        self.complete = zeros(capacity, dtype=torch.bool)
        self.oldest = zeros(capacity, dtype=torch.int64)
        """Absolute index of the oldest row the transition ending at each row needs."""
        self.total = zeros(dtype=torch.int64)
        """Rows ever added to the memory as of the last sync (``rows_added``), on the device."""
        self.index = zeros(capacity + 1, dtype=torch.int64)
        """Sampleable ring positions in ascending order in ``index[:count]``; the last slot takes the scatter's
        writes of rows that are not sampleable."""
        self.count = zeros(dtype=torch.int64)
        self._positions = torch.arange(capacity, device=self.device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        """The source of :meth:`sample`'s draws (register it with a CUDA graph that captures :meth:`sample`)."""

        self._columns = [_Column(f"frames.{name}", tensor) for name, tensor in self.frames.items()]
        self._columns += [_Column(name, getattr(self, name), ring_positions=name == "prev") for name in
                          ("actions", "rewards", "terminated", "truncated", "prev", "complete", "oldest")]
        self._columns.append(_Column("prev", None))  # absolute: what links each chunk's rows (see _upload)
        self._staging = [[torch.empty((self.chunk_rows, *self._row_shape(column)), dtype=self._dtype(column),
                                      pin_memory=cuda) for column in self._columns] for _ in range(2)]
        self._landing = [[torch.empty_like(buffer, device=self.device) for buffer in buffers]
                         for buffers in self._staging]
        """Per staging buffer, its copy on the device: the host-to-device copy lands here while updates run."""
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        """Per staging buffer: recorded after its last upload (the buffer may be written again once it completes)."""
        self._next_staging = 0
        self._synced_rows = 0
        """``memory.rows_added`` as of the last staged chunk."""
        self._target: int | None = None
        """The row count the sync in progress copies up to (see :meth:`_stage`)."""
        self._generation = memory.generation
        self._reindex = False
        self._ready = False

    def _row_shape(self, column: _Column) -> tuple[int, ...]:
        return tuple(column.device.shape[1:]) if column.device is not None else ()

    def _dtype(self, column: _Column) -> torch.dtype:
        return column.device.dtype if column.device is not None else torch.int64

    # ------------------------------------------------------------------------------------------------------ sync

    def sync(self, lock: contextlib.AbstractContextManager | None = None) -> int:
        """Copy the rows the memory gained since the last sync and rebuild the index; return the rows copied.

        ``lock`` is the lock that guards the memory against the ingest thread (held only while a chunk is copied
        host to host; see the module docstring)."""
        lock = lock if lock is not None else contextlib.nullcontext()
        copied, self._target = 0, None
        while True:
            staging = self._next_staging
            if self._copied[staging] is not None:
                self._copied[staging].synchronize()  # outside the lock: ingest goes on meanwhile
            with lock:
                chunk = self._stage(staging)
            if chunk is None:
                break
            self._next_staging = 1 - staging
            self._upload(chunk)
            copied += sum(rows for _, _, rows in chunk.segments)
        self._target = None
        if copied or self._reindex:
            self._reindex = False
            with self._on_side_stream():
                self.total.fill_(self._synced_rows)
                self._rebuild_index()
        return copied

    def _stage(self, staging: int) -> _Chunk | None:
        """Copy the next chunk of new rows into staging buffer ``staging`` (call with the memory's lock held).

        The chunks of one sync run up to the memory's row count when the sync began (its target), so that a sync
        ends; if the ring has meanwhile overwritten rows not copied yet, the copy skips to the oldest row still
        stored and the target moves to the current count: when the sync ends, every row the ring holds as of the
        target has been copied."""
        memory = self.memory
        total = memory.rows_added
        if memory.generation != self._generation or total < self._synced_rows:  # loaded from a file: all rows new
            self._generation, self._synced_rows, self._reindex = memory.generation, 0, True
            self.complete.zero_()  # ring positions the loaded memory does not fill hold nothing sampleable
            self.next.fill_(-1)
        if self._target is None:
            self._target = total
        first = max(self._synced_rows, total - self.capacity)
        if first > self._synced_rows:
            self._target = total
        if first >= self._target:
            return None
        stop = min(self._target, first + self.chunk_rows)
        start_position, rows = first % self.capacity, stop - first
        head = min(rows, self.capacity - start_position)
        segments = [(start_position, 0, head)] + ([(0, head, rows - head)] if rows > head else [])
        host = memory.ring_arrays()
        for column, buffer in zip(self._columns, self._staging[staging], strict=True):
            array = host[column.host]
            for ring_start, staged_start, count in segments:
                source = array[ring_start : ring_start + count]
                if column.ring_positions:
                    source = np.remainder(source, self.capacity)
                buffer[staged_start : staged_start + count].copy_(torch.from_numpy(np.ascontiguousarray(source)))
        self._synced_rows = stop
        return _Chunk(staging, segments, first, stop)

    def _upload(self, chunk: _Chunk) -> None:
        """Copy a staged chunk into the device tensors: host to a device staging buffer first (on CUDA, on the side
        stream, overlapping the updates in flight), then, once those updates are done with the ring, into it."""
        landed = self._landing[chunk.staging]
        with self._on_side_stream(wait_for_updates=False):
            for buffer, target in zip(self._staging[chunk.staging], landed, strict=True):
                target.copy_(buffer, non_blocking=True)
            if self._copied[chunk.staging] is not None:
                self._copied[chunk.staging].record()
        with self._on_side_stream():
            for column, buffer in zip(self._columns, landed, strict=True):
                if column.device is None:
                    continue
                for ring_start, staged_start, count in chunk.segments:
                    column.device[ring_start : ring_start + count].copy_(buffer[staged_start : staged_start + count])
            rows = chunk.stop - chunk.first
            for ring_start, _, count in chunk.segments:
                self.next[ring_start : ring_start + count].fill_(-1)
            absolute = torch.arange(chunk.first, chunk.stop, device=self.device)
            link_rows(self.next, absolute, landed[-1][:rows], self.capacity, chunk.stop)

    @contextlib.contextmanager
    def _on_side_stream(self, wait_for_updates: bool = True):
        """On CUDA, run the block on the side stream; with ``wait_for_updates``, after the updates queued so far
        (they read what it overwrites), and before the ones queued from now on (they read what it wrote)."""
        if self._stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        if wait_for_updates:
            self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            yield
        if wait_for_updates:
            compute.wait_stream(self._stream)

    def _rebuild_index(self) -> None:
        """``index[:count]`` = the sampleable ring positions, ascending: fixed shapes, no host synchronisation."""
        sampleable = self.complete & (self.oldest >= self.total - self.capacity)
        rank = sampleable.cumsum(0)
        slot = torch.where(sampleable, rank - 1, self.capacity)
        self.index.scatter_(0, slot, self._positions)
        self.count.copy_(rank[-1])

    # --------------------------------------------------------------------------------------------------- sampling

    def ready(self) -> bool:
        """Whether the index holds a sampleable row (reads the device count, one synchronisation, until it does)."""
        if not self._ready:
            self._ready = int(self.count) > 0
        return self._ready

    def forget_ready(self) -> None:
        """The host memory holds no sampleable row any more (rows that form no transition overwrote the ring): the
        next :meth:`ready` reads the device count again instead of trusting that it once was positive."""
        self._ready = False

    def sampleable_positions(self) -> torch.Tensor:
        """The sampleable ring positions as of the last sync (``index[:count]``; reads the count: for tests/tools)."""
        return self.index[: int(self.count)].clone()

    def sample_positions(self, batch_size: int) -> torch.Tensor:
        """``batch_size`` ring positions drawn uniformly, with replacement, from the index (device ops only)."""
        draw = torch.rand(batch_size, dtype=torch.float64, generator=self.generator, device=self.device)
        k = (draw * self.count).long()  # float64: exact for any count a ring holds
        k = torch.minimum(k, self.count - 1).clamp_(min=0)
        return self.index[k]

    def sample(self, batch_size: int) -> TransitionBatch:
        """``batch_size`` transitions drawn uniformly from the sampleable ones, gathered on the device."""
        return self.gather(self.sample_positions(batch_size))

    def gather(self, positions: torch.Tensor) -> TransitionBatch:
        """The transitions of ring ``positions`` (sampleable ones; over the memory's ``n_step`` rewards), as
        :meth:`ReplayMemory.transitions` builds them from the host arrays: the same components, shapes, dtypes and
        values."""
        positions = torch.as_tensor(positions, dtype=torch.int64, device=self.device)
        observation, next_observation, action = self._gather(positions)
        reward, discount, end = self.rewards[positions], None, positions
        if self.memory.n_step > 1:
            end, reward, discount = n_step_returns(positions, self.next, self.rewards, self._ended, self.memory.n_step,
                                                   self.memory.gamma)
            next_observation = self._gather(end)[1]
        return TransitionBatch(
            observation=tuple(observation),
            action=action,
            reward=reward,
            next_observation=tuple(next_observation),
            terminated=self.terminated[end],
            truncated=self.truncated[end],
            discount=discount,
        )

    def _ended(self, positions: torch.Tensor) -> torch.Tensor:
        return (self.terminated[positions] + self.truncated[positions]) > 0.0

    def _gather(self, positions: torch.Tensor) -> tuple[list, list, torch.Tensor]:
        """(observation, next observation, replayed action) of the one-step transitions ending at ``positions``."""
        hops = [positions]  # hop k: k rows back along the episode
        for _ in range(self.depth):
            hops.append(self.prev[hops[-1]])
        oldest_first = torch.stack(hops[::-1], dim=1)  # (B, depth + 1): column j is hop depth - j
        return gather_histories(self.layout, self.frames, self.actions, oldest_first)
