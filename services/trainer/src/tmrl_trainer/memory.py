"""Replay memory that stores each frame once and rebuilds observation histories when sampling.

Rows arrive as :class:`~tmrl_common.protocol.SampleBatch` es (newest frame per step, see :mod:`tmrl_common.layout`).
Each stored row remembers the absolute index of the previous row *of the same worker's episode* (``prev``);
an episode's first row points at itself. Rebuilding the observation at a row is then a few vectorised hops along
``prev``: a history component of length ``h`` takes the frames at hops ``h-1 … 0`` (oldest to newest) and the action
buffer of length ``k`` takes the actions at hops ``k-1 … 0``. Because a first row points at itself, entries before
an episode's start repeat its first row, which is the layout's rule (rtgym fills its buffers that way at reset).
Rows of several workers may interleave freely.

**Histories are never invented.** Batches are linked by ``seq``, not by arrival order: the first row of batch ``s``
continues the last row of batch ``s - 1`` of the same worker, and only if that batch is stored (its tail is kept for
the last :data:`TAILS_KEPT` seqs of each worker). A non-first row whose predecessor is not stored (a batch lost or
still in flight, a trainer restarted without its memory, a worker that joined mid-episode) is an *orphan*: it starts
a chain with no real frames behind it. Each row counts the real rows behind it (``known``: an episode's first row
counts as complete, by the layout's rule; an orphan counts 0; any other row one more than its predecessor), and a
transition is sampleable only once both its observations are made of real frames (``known >= depth``). A late batch
that fills a gap is linked to its own predecessor and stored; the batch after it, stored earlier with an orphan
first row, is **not relinked**: its first ``depth`` rows stay unsampleable, so nothing wrong is built from either
(the price: at most ``depth`` transitions per reordered batch).

A transition is ``(observation at prev[t], action[t], reward[t], observation at t, terminated[t], truncated[t])``
for every complete row ``t``: it never crosses a reset or a gap. It can be sampled only while every row its two
observations need is still in the ring buffer.

**n-step returns** (``n_step > 1``): the transition starting at a sampled row ``t`` runs forward along the episode
(each stored row also knows its successor, ``next``) for up to ``n_step`` rows ``t = t_0, t_1, …, t_{k-1}``, stopping
early at the row that ended the episode and at the newest row stored of an episode still running; its reward is
``r[t_0] + γ r[t_1] + … + γ^(k-1) r[t_{k-1}]``, its next observation the one at ``t_{k-1}``, its termination flags
that row's, and it carries ``discount = γ^k`` for the bootstrap (:attr:`TransitionBatch.discount`). The walk follows
the same links as the histories, so it never crosses a reset or a gap either (a late batch that fills a gap links
forward to nothing after it: walks stop at its end). Each sampleable row starts exactly one transition, so the rows
are drawn as uniformly as with one-step transitions.

**A saved memory is checked before it replaces anything** (:meth:`ReplayMemory.load_bytes`): besides its layout,
capacity and array shapes, every stored value must be one a sound file holds: float arrays finite (and, given the
ingest's :class:`~tmrl_trainer.ingest.ValueBounds`, within the bounds ingested batches are held to), flags 0 or 1,
``prev`` and ``oldest`` at the row itself or an earlier one, ``known`` within ``[0, depth]``. A file that fails any
check is refused whole, not row by row: the damage that made one value invalid also leaves values no check can see
(bytes that decode to finite, plausible floats; links into the wrong episode; any byte of a ``uint8`` frame), so no
row of it can be trusted, and the caller's fallback for an unreadable file applies. Those invisible values are
caught by a CRC-32 of each array, written in the header when the memory is saved and compared after the value
checks when it is loaded (a file saved before the CRCs were written has none, and loads on the value checks alone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tmrl_common.atomic_file import read_regular_file
from tmrl_common.layout import ObservationLayout, observation_digest
from tmrl_common.protocol import SampleBatch, observation_bounds

from tmrl_trainer.ingest import ValueBounds
from tmrl_trainer.tensor_file import TensorFileError, crc32_of, crc32_problem, pack, unpack, write_atomically

log = logging.getLogger(__name__)

MEMORY_FORMAT = "tmrl-replay-memory-2"
TAILS_KEPT = 64
"""Per worker, the tails of this many most recent seqs are kept, so a batch arriving that late still links."""
CHECK_CHUNK_ROWS = 65_536
"""A saved memory's values are checked this many rows at a time (:meth:`ReplayMemory.load_bytes`)."""


class MemoryFileError(ValueError):
    """A saved replay memory could not be read back or does not fit this memory."""


class MemoryMismatchError(MemoryFileError):
    """A readable saved replay memory of another capacity or layout than this memory (a configuration change, not
    damage: ``saved_capacity`` says what to set back)."""

    def __init__(self, message: str, saved_capacity: int) -> None:
        super().__init__(message)
        self.saved_capacity = saved_capacity


class NoTransitionYet(ValueError):
    """The memory holds rows but none ends a transition that can be sampled (every row starts an episode, follows a
    gap, or needs rows the ring has overwritten): wait for more rows, nothing is wrong with the learner."""


class TransitionBatch(NamedTuple):
    """Transitions sampled from the memory, as tensors (CPU unless moved with :meth:`to`)."""

    observation: tuple[torch.Tensor, ...]
    action: torch.Tensor
    reward: torch.Tensor
    next_observation: tuple[torch.Tensor, ...]
    terminated: torch.Tensor
    """1.0 where the episode ended by reaching a terminal state (no bootstrap), else 0.0."""
    truncated: torch.Tensor
    """1.0 where the episode was cut by a time limit (the target still bootstraps), else 0.0."""
    discount: torch.Tensor | None = None
    """n-step returns: per transition, ``γ^k`` for its ``k`` summed rewards, the factor of the bootstrap term;
    ``None`` for one-step transitions (the learner's ``gamma``)."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, in field order (observation parts one by one; no ``discount`` when ``None``)."""
        return [t for field in self if field is not None for t in (field if isinstance(field, tuple) else (field,))]

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> TransitionBatch:
        """The batch with ``function`` applied to each of its tensors (a ``None`` discount stays ``None``)."""
        def apply(field):
            if field is None:
                return None
            return tuple(map(function, field)) if isinstance(field, tuple) else function(field)

        return TransitionBatch(*(apply(field) for field in self))

    def to(self, device: torch.device | str) -> TransitionBatch:
        """The same batch on ``device``."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        return self.map(lambda t: t.to(device, non_blocking=True))


MAX_WORKERS_COUNTED = 64
"""Workers named in :attr:`VerificationCounts.mismatched_by_worker` at most (ids are the workers' choice)."""


@dataclass
class VerificationCounts:
    """Rows of batches carrying digests: rebuilt observation equal to the env's, different, or not rebuildable."""

    verified_rows: int = 0
    mismatched_rows: int = 0
    """Must stay 0: a rebuilt observation that differs from what the env returned at that step."""
    unverifiable_rows: int = 0
    """Rows without enough real frames behind them (never sampled)."""
    mismatched_by_worker: dict[str, int] = field(default_factory=dict)
    """``mismatched_rows`` by the worker whose batch held them: one worker's wrong digests (a bug in its env's
    observation, or a forged digest) stand apart from a fault of the memory, which would show in every worker's."""


class _Tail(NamedTuple):
    """How one stored batch ends: the absolute indices of its episode's last ``depth + 1`` rows (empty when the
    episode ended with the batch) and the ``known`` count of its last row."""

    indices: list[int]
    known: int


def link_rows(successor, rows, prev, capacity: int, stored_until: int) -> None:
    """Record in ``successor`` (ring positions, -1 for none) that each of the absolute ``rows`` follows its ``prev``
    in its episode, once the memory holds every row before ``stored_until``: a first row (``prev`` is itself) links
    nothing, and neither does a row whose predecessor the ring has overwritten by then (``prev + capacity <
    stored_until``). Rows stored later reset their own positions before linking, so a position links to the
    successor of the row it holds. Works alike on numpy arrays and torch tensors (the mirror calls it per chunk)."""
    linked = (prev != rows) & (prev + capacity >= stored_until)
    if isinstance(rows, np.ndarray):
        successor[prev[linked] % capacity] = rows[linked] % capacity
    else:  # fixed shapes: the rows that link nothing write into the spare last slot
        successor.scatter_(0, torch.where(linked, prev % capacity, capacity), rows % capacity)


def gather_histories(layout, frames, actions, oldest_first):
    """Observation, next observation and replayed action of transitions, gathered from stored rows.

    ``oldest_first`` is ``(B, depth + 1)`` ring positions, column ``j`` the row ``depth - j`` hops back along each
    transition's episode (the last column the transition's own row). Each stored array is gathered once, at the rows
    both observations need (``(B, history + 1, *frame)``); the observation and next observation are overlapping views
    of it. Works alike on numpy arrays (the host sampler) and torch tensors (:mod:`tmrl_trainer.device_replay`).
    """
    depth = oldest_first.shape[1] - 1
    observation: list = []
    next_observation: list = []
    for component in layout.components:
        history = component.history
        gathered = frames[component.name][oldest_first[:, depth - history:]]  # (B, history + 1, *frame)
        if history == 1:
            observation.append(gathered[:, 0])
            next_observation.append(gathered[:, 1])
        else:
            observation.append(gathered[:, :history])
            next_observation.append(gathered[:, 1:])
    history = layout.action_history
    gathered_actions = actions[oldest_first[:, depth - max(history, 1):]]  # (B, max(history, 1) + 1, action_dim)
    for age in range(history):  # oldest first, like rtgym's act_buf
        observation.append(gathered_actions[:, age])
        next_observation.append(gathered_actions[:, age + 1])
    return observation, next_observation, gathered_actions[:, -1]


def n_step_returns(positions, successor, rewards, ended, n_step: int, gamma: float):
    """The n-step part of the transitions starting at ring ``positions`` (module docstring): ``(end rows, discounted
    reward sums, discounts γ^k)``. ``successor`` holds each row's successor in its episode (-1: none stored),
    ``ended(rows)`` says which rows ended their episode. The same operations, in the same order, on numpy arrays (the
    host sampler) and torch tensors (:mod:`tmrl_trainer.device_replay`, fixed shapes, no host synchronisation), so
    both give the same float32 values."""
    xp = np if isinstance(positions, np.ndarray) else torch
    end = positions
    reward = rewards[positions]
    discount = xp.full_like(reward, gamma)
    going = ~ended(positions)
    for _ in range(n_step - 1):
        after = successor[end]  # -1 reads the last row, which the mask below discards
        going = going & (after >= 0)
        end = xp.where(going, after, end)
        reward = reward + xp.where(going, discount * rewards[after], 0.0)
        discount = xp.where(going, discount * gamma, discount)
        going = going & ~ended(after)
    return end, reward, discount


class ReplayMemory:
    """Ring buffer of newest-frame rows from any number of workers; samples full transitions.

    ``capacity`` counts rows (one per environment step), not transitions. ``n_step`` rewards are summed per sampled
    transition, discounted by ``gamma`` (module docstring; 1: one-step transitions, ``gamma`` unused).
    """

    def __init__(self, layout: ObservationLayout, capacity: int = 1_000_000, seed: int = 0, n_step: int = 1,
                 gamma: float = 0.99) -> None:
        if capacity < 2:
            raise ValueError(f"replay memory capacity must be at least 2 rows, got {capacity}")
        if n_step < 1:
            raise ValueError(f"n_step must be at least 1, got {n_step}")
        self.layout = layout
        self.n_step = int(n_step)
        self.gamma = float(gamma)
        self.capacity = int(capacity)
        self.depth = max([c.history for c in layout.components] + [layout.action_history, 1])
        """Rows an observation spans: hops 0 … depth-1 along ``prev``."""
        self._rng = np.random.default_rng(seed)
        self._frames = {c.name: np.zeros((self.capacity, *c.frame_shape), dtype=c.dtype) for c in layout.components}
        self._actions = np.zeros((self.capacity, layout.action_dim), dtype=np.float32)
        self._rewards = np.zeros(self.capacity, dtype=np.float32)
        self._terminated = np.zeros(self.capacity, dtype=bool)
        self._truncated = np.zeros(self.capacity, dtype=bool)
        self._prev = np.zeros(self.capacity, dtype=np.int64)
        self._next = np.full(self.capacity, -1, dtype=np.int64)
        """Ring position of each row's successor in its episode; -1 while none is stored (see :func:`link_rows`)."""
        self._known = np.zeros(self.capacity, dtype=np.int16)
        """Real rows behind this one (capped at ``depth``); its observation is rebuilt from real frames when this is at
        least ``depth - 1``."""
        self._complete = np.zeros(self.capacity, dtype=bool)
        """The transition ending at this row is made of real frames only (see the module docstring)."""
        self._oldest = np.zeros(self.capacity, dtype=np.int64)
        """Absolute index of the oldest row the transition ending at this row needs."""
        self._total = 0
        self._max_complete_oldest = -1
        """The largest ``oldest`` of any complete row stored: a sampleable row exists exactly while it is at least
        ``rows_added - capacity`` (that row itself is then sampleable), which :meth:`has_transition` reads in O(1)."""
        self._tails: dict[str, dict[int, _Tail]] = {}
        """Per worker, per stored seq: how that batch ends (for the batch ``seq + 1``)."""
        self.verification = VerificationCounts()
        """Batches with ``digests`` (workers in verification mode): rebuilt observations compared with the env's."""
        self.orphan_rows = 0
        """Non-first rows whose predecessor is not stored (see the module docstring); they start a chain with no real
        frames behind it, and the ``depth`` rows after them give no transition."""
        self.generation = 0
        """Bumped when :meth:`load_bytes` replaces the content: a mirror (:mod:`tmrl_trainer.device_replay`) then copies
        every stored row again instead of the rows added since its last copy."""

    # ---------------------------------------------------------------------------------------------------- storing

    @property
    def nbytes_when_full(self) -> int:
        """Bytes of the memory's arrays once every row is written: they are allocated zeroed, so the operating system
        commits their pages as rows come, and a trainer's memory grows for hours up to this (a soak probe: +17 MB an
        hour over 7 h of the simulator at two workers, images far more)."""
        return sum(array.nbytes for array in self._saved_arrays().values()) + self._next.nbytes

    def __len__(self) -> int:
        """Rows currently stored."""
        return min(self._total, self.capacity)

    @property
    def rows_added(self) -> int:
        """Rows ever added (including overwritten ones)."""
        return self._total

    def add_batch(self, worker_id: str, batch: SampleBatch) -> int:
        """Store ``batch`` (rows of ``worker_id``, continuing its batch ``seq - 1`` when that one is stored); return
        the rows stored.

        Raises :class:`~tmrl_common.errors.ProtocolError` (reason ``schema``) if the batch does not match the layout;
        nothing is stored then.
        """
        batch.check_layout(self.layout)
        steps = batch.steps
        first = batch.first.array
        ended = batch.terminated.array | batch.truncated.array
        prev = np.empty(steps, dtype=np.int64)
        known_at = np.empty(steps, dtype=np.int16)
        complete = np.empty(steps, dtype=bool)
        oldest = np.empty(steps, dtype=np.int64)
        tails = self._tails.setdefault(worker_id, {})
        before = tails.get(batch.seq - 1)
        tail, known = (list(before.indices), before.known) if before is not None else ([], 0)
        depth, keep = self.depth, self.depth + 1
        for row in range(steps):
            index = self._total + row
            if first[row] or not tail:
                if not first[row]:
                    self.orphan_rows += 1
                tail, known = [index], (depth if first[row] else 0)
                prev[row], complete[row] = index, False
            else:
                prev[row] = tail[-1]
                known = min(depth, known + 1)
                complete[row] = known >= depth
                tail.append(index)
                if len(tail) > keep:
                    del tail[0]
            oldest[row] = tail[max(0, len(tail) - 1 - depth)]
            known_at[row] = known
            if ended[row]:
                tail, known = [], 0
        tails[batch.seq] = _Tail(tail, known)
        if len(tails) > TAILS_KEPT:
            del tails[min(tails)]

        stored = min(steps, self.capacity)
        positions = (self._total + np.arange(steps - stored, steps)) % self.capacity
        rows = slice(steps - stored, steps)
        for name, frames in self._frames.items():
            frames[positions] = batch.observations[name].array[rows]
        self._actions[positions] = batch.actions.array[rows]
        self._rewards[positions] = batch.rewards.array[rows]
        self._terminated[positions] = batch.terminated.array[rows]
        self._truncated[positions] = batch.truncated.array[rows]
        self._prev[positions] = prev[rows]
        self._known[positions] = known_at[rows]
        self._complete[positions] = complete[rows]
        self._oldest[positions] = oldest[rows]
        self._next[positions] = -1
        link_rows(self._next, self._total + np.arange(steps), prev, self.capacity, self._total + steps)
        self._total += steps
        if complete[rows].any():
            self._max_complete_oldest = max(self._max_complete_oldest, int(oldest[rows][complete[rows]].max()))
        if batch.digests is not None:
            self._verify(worker_id, batch.digests.array[rows], positions)
        return steps

    def _verify(self, worker_id: str, digests: np.ndarray, positions: np.ndarray) -> None:
        """Compare the observation rebuilt at each of ``positions`` (just stored) with the worker's digest of the
        env's. Rows whose observation cannot be rebuilt from real frames are never sampled: counted apart."""
        rebuildable = (self._known[positions] >= self.depth - 1) & (self._oldest[positions] >= self._total - self.capacity)
        counts = self.verification
        counts.unverifiable_rows += int((~rebuildable).sum())
        if not rebuildable.any():
            return
        rebuilt = self.transitions(positions[rebuildable], n_step=1).next_observation  # the observation at each row
        mismatched = 0
        for i, expected in enumerate(digests[rebuildable]):
            observation = [part[i].numpy() for part in rebuilt]
            if observation_digest(self.layout, observation) != expected.tobytes():
                mismatched += 1
            else:
                counts.verified_rows += 1
        if mismatched:  # logged per batch that holds some, not again for every clean batch after it
            counts.mismatched_rows += mismatched
            by_worker = counts.mismatched_by_worker
            if worker_id in by_worker or len(by_worker) < MAX_WORKERS_COUNTED:
                by_worker[worker_id] = by_worker.get(worker_id, 0) + mismatched
            log.warning("verification: %d rebuilt observation(s) of worker %s's batch differ from the digests it sent "
                        "(%d from this worker, %d in all so far)", mismatched, worker_id,
                        by_worker.get(worker_id, 0), counts.mismatched_rows)

    def ring_arrays(self) -> dict[str, np.ndarray]:
        """The storage itself, indexed by ring position (absolute row index modulo ``capacity``), for a mirror to
        copy (:mod:`tmrl_trainer.device_replay`); read it under the lock that guards :meth:`add_batch`. Rows never
        change after they are stored, only when the ring overwrites them. ``prev`` and ``oldest`` hold absolute row
        indices; ``complete`` says the transition ending at the row is made of real frames (sampleable while
        ``oldest >= rows_added - capacity``)."""
        arrays = {f"frames.{name}": frames for name, frames in self._frames.items()}
        arrays.update(actions=self._actions, rewards=self._rewards, terminated=self._terminated,
                      truncated=self._truncated, prev=self._prev, complete=self._complete, oldest=self._oldest)
        return arrays

    def forget_worker(self, worker_id: str) -> None:
        """Forget how ``worker_id``'s batches ended (e.g. it restarted): its next rows link to nothing stored before."""
        self._tails.pop(worker_id, None)

    # --------------------------------------------------------------------------------------------------- sampling

    def _sampleable(self, positions: np.ndarray) -> np.ndarray:
        return self._complete[positions] & (self._oldest[positions] >= self._total - self.capacity)

    def has_transition(self) -> bool:
        """Whether any stored row ends a sampleable transition (O(1); :meth:`sample` raises
        :class:`NoTransitionYet` exactly when this is False and rows are stored)."""
        return self._max_complete_oldest >= max(0, self._total - self.capacity)

    def sampleable_positions(self) -> np.ndarray:
        """Ring positions of every row that currently ends a sampleable transition (O(capacity); for tests/tools)."""
        positions = np.arange(len(self))
        return positions[self._sampleable(positions)]

    def sample(self, batch_size: int) -> TransitionBatch:
        """``batch_size`` transitions drawn uniformly (with replacement) from the sampleable ones."""
        stored = len(self)
        if stored == 0:
            raise ValueError("cannot sample from an empty replay memory")
        if not self.has_transition():
            raise NoTransitionYet(f"the replay memory holds {stored} rows but none ends a complete transition")
        positions = self._rng.integers(0, stored, size=batch_size)
        bad = ~self._sampleable(positions)
        for _ in range(32):  # rejection sampling: cheap while most rows are sampleable, which is the normal case
            if not bad.any():
                break
            positions[bad] = self._rng.integers(0, stored, size=int(bad.sum()))
            bad = ~self._sampleable(positions)
        if bad.any():
            valid = self.sampleable_positions()  # not empty: has_transition() said so
            positions[bad] = valid[self._rng.integers(0, valid.size, size=int(bad.sum()))]
        return self.transitions(positions)

    def transitions(self, positions: np.ndarray, n_step: int | None = None) -> TransitionBatch:
        """The transitions starting at ring ``positions`` (which must be sampleable), over ``n_step`` rewards (``None``:
        the memory's ``n_step``; 1: the transitions ending at ``positions``).

        Each stored array is gathered once, at the rows both observations need (``(B, hops, *frame)``, oldest hop
        first); the observation and next observation are then overlapping views of it (no further copies), and the
        replayed action is the newest hop of the action gather. With n-step returns the next observation is gathered
        again, at the end of each walk.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n_step = self.n_step if n_step is None else n_step
        observation, next_observation, action = self._gather(positions)
        reward, discount, end = self._rewards[positions], None, positions
        if n_step > 1:
            end, reward, discount = n_step_returns(positions, self._next, self._rewards, self._ended, n_step, self.gamma)
            next_observation = self._gather(end)[1]
        tensor = torch.from_numpy
        return TransitionBatch(
            observation=tuple(map(tensor, observation)),
            action=tensor(action),
            reward=tensor(reward),
            next_observation=tuple(map(tensor, next_observation)),
            terminated=tensor(self._terminated[end].astype(np.float32)),
            truncated=tensor(self._truncated[end].astype(np.float32)),
            discount=None if discount is None else tensor(discount),
        )

    def _ended(self, positions: np.ndarray) -> np.ndarray:
        return self._terminated[positions] | self._truncated[positions]

    def _gather(self, positions: np.ndarray) -> tuple[list, list, np.ndarray]:
        """(observation, next observation, replayed action) of the one-step transitions ending at ``positions``."""
        depth = self.depth
        hops = np.empty((depth + 1, positions.size), dtype=np.int64)  # hop k: k rows back along the episode
        hops[0] = positions
        for hop in range(1, depth + 1):
            np.remainder(self._prev[hops[hop - 1]], self.capacity, out=hops[hop])
        oldest_first = hops[::-1].T  # (B, depth + 1): column j is hop depth - j
        return gather_histories(self.layout, self._frames, self._actions, oldest_first)

    # ----------------------------------------------------------------------------------------------- save / load

    def to_bytes(self) -> bytes:
        """The whole memory as a tensor file (:mod:`tmrl_trainer.tensor_file`): arrays plus counters and RNG state."""
        stored = len(self)
        arrays = {name: array[:stored] for name, array in self._saved_arrays().items()}
        tails = {worker: {str(seq): [tail.known, *tail.indices] for seq, tail in by_seq.items()}
                 for worker, by_seq in self._tails.items()}
        meta = {"format": MEMORY_FORMAT, "layout": self.layout.model_dump(mode="json"), "capacity": self.capacity,
                "total": self._total, "tails": tails, "orphan_rows": self.orphan_rows,
                "rng": self._rng.bit_generator.state, "crc32": {name: crc32_of(array) for name, array in arrays.items()}}
        return pack(arrays, meta)

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        """The ring's arrays a saved memory holds, by their name in the file (``_next`` is rebuilt on load)."""
        arrays = {f"frames.{name}": frames for name, frames in self._frames.items()}
        arrays.update({name: getattr(self, f"_{name}") for name in
                       ("actions", "rewards", "terminated", "truncated", "prev", "known", "complete", "oldest")})
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_bytes` to ``path`` atomically."""
        return write_atomically(path, self.to_bytes())

    def load_bytes(self, data: bytes, bounds: ValueBounds | None = None) -> None:
        """Replace this memory's content with a saved one (same layout and capacity); raise :class:`MemoryFileError`
        and change nothing when the file is not one, does not fit, or holds a value no stored row can hold (module
        docstring): NaN or inf, a flag other than 0/1, a link to a later row. With ``bounds`` (the ingest's), values
        outside the bounds a batch is held to are refused too (:meth:`SampleBatch.check_bounds
        <tmrl_common.protocol.SampleBatch.check_bounds>`)."""
        try:
            arrays, meta = unpack(data)
        except TensorFileError as exc:
            raise MemoryFileError(f"not a saved tmrl replay memory: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != MEMORY_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            if isinstance(found, str) and found.startswith("tmrl-replay-memory-"):  # an upgrade probe's 11-27 memory
                raise MemoryFileError(f"saved memory format {found[:40]!r} is not this build's {MEMORY_FORMAT!r}: a "
                                      "memory saved by another build of tmrl cannot be converted")
            raise MemoryFileError(f"saved memory format is not {MEMORY_FORMAT!r}")
        try:
            # bounds may change between runs (the values are checked against this memory's below); nothing else
            saved_layout = ObservationLayout.model_validate(meta["layout"]).without_bounds()
            same = saved_layout == self.layout.without_bounds() and meta["capacity"] == self.capacity
            total, orphan_rows = int(meta["total"]), int(meta["orphan_rows"])
            tails = {str(worker): {int(seq): _Tail([int(i) for i in saved[1:]], int(saved[0]))
                                   for seq, saved in by_seq.items()}
                     for worker, by_seq in meta["tails"].items()}
            rng = np.random.default_rng()
            rng.bit_generator.state = meta["rng"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
            raise MemoryFileError(f"saved memory header is malformed: {type(exc).__name__}: {exc}") from exc
        if not same:
            raise MemoryMismatchError(f"saved memory has a different layout or capacity than this one (saved capacity "
                                      f"{meta['capacity']}, configured {self.capacity}; set memory_capacity back to "
                                      "restore it: a memory cannot be resized on resume)", int(meta["capacity"]))
        stored = min(total, self.capacity)
        targets = self._saved_arrays()
        loaded = {}
        for name, target in targets.items():
            array = arrays[name].numpy() if name in arrays else None
            if array is None or array.shape != (stored, *target.shape[1:]) or array.dtype != target.dtype:
                found = "missing" if array is None else f"{array.dtype}{list(array.shape)}"
                raise MemoryFileError(f"saved memory array {name!r} is {found}, expected "
                                      f"{target.dtype}{[stored, *target.shape[1:]]} (the header says {total} rows)")
            loaded[name] = array
        self._check_values(loaded, total, bounds)
        _check_crc32(loaded, meta.get("crc32"))
        for name, target in targets.items():  # everything checked: nothing is half-loaded on error
            target[:stored] = loaded[name]
        self._total, self._tails, self.orphan_rows, self._rng = total, tails, orphan_rows, rng
        complete_oldest = self._oldest[:stored][self._complete[:stored]]
        self._max_complete_oldest = int(complete_oldest.max()) if complete_oldest.size else -1
        self._next.fill(-1)
        rows = np.arange(total - stored, total)
        link_rows(self._next, rows, self._prev[rows % self.capacity], self.capacity, total)
        self.generation += 1

    def _check_values(self, arrays: dict[str, np.ndarray], total: int, bounds: ValueBounds | None) -> None:
        """Raise :class:`MemoryFileError` naming the first array of a saved memory (``arrays`` by name, indexed by ring
        position, of a memory that added ``total`` rows) that holds a value no stored row can hold."""
        stored = min(total, self.capacity)
        absolute = np.empty(stored, dtype=np.int64)  # the absolute row index held at each ring position
        rows = np.arange(total - stored, total)
        absolute[rows % self.capacity] = rows

        def refuse(name: str, is_bad: Callable[[slice], np.ndarray], what: str) -> None:
            """Raise unless ``is_bad(rows)`` (elementwise, for a slice of ring positions) is false everywhere; checked
            in chunks of rows, so the temporary arrays stay small for a memory of any size."""
            bad_rows = 0
            first = None
            for begin in range(0, stored, CHECK_CHUNK_ROWS):
                chunk = slice(begin, min(begin + CHECK_CHUNK_ROWS, stored))
                bad = is_bad(chunk).reshape(chunk.stop - begin, -1).any(axis=1)
                if bad.any():
                    bad_rows += int(bad.sum())
                    first = begin + int(np.argmax(bad)) if first is None else first
            if bad_rows:
                raise MemoryFileError(f"saved memory array {name!r} holds {what} in {bad_rows} of its {stored} rows "
                                      f"(the first at ring position {first}): the file is corrupt, none of it is "
                                      "loaded")

        for name, array in arrays.items():
            if array.dtype.kind == "f":
                refuse(name, lambda chunk, array=array: ~np.isfinite(array[chunk]), "NaN or inf")
        if bounds is not None:  # the ranges SampleBatch.check_bounds holds every ingested batch to
            limits = {"actions": (-1.0, 1.0), "rewards": (-bounds.max_abs_reward, bounds.max_abs_reward),
                      **{f"frames.{name}": limit
                         for name, limit in observation_bounds(self.layout, bounds.max_abs_observation).items()}}
            for name, (low, high) in limits.items():
                array = arrays[name]
                refuse(name, lambda chunk, array=array, low=low, high=high: (array[chunk] < low) | (array[chunk] > high),
                       f"values outside the ingest's bounds [{low:.6g}, {high:.6g}]")
        for name in ("terminated", "truncated", "complete"):
            flags = arrays[name].view(np.uint8)
            refuse(name, lambda chunk, flags=flags: flags[chunk] > 1, "flags other than 0 or 1")
        for name in ("prev", "oldest"):  # a row of the same episode: an earlier one, or the row itself
            links = arrays[name]
            refuse(name, lambda chunk, links=links: (links[chunk] < 0) | (links[chunk] > absolute[chunk]),
                   "links to no earlier row")
        known = arrays["known"]
        refuse("known", lambda chunk: (known[chunk] < 0) | (known[chunk] > self.depth), f"counts outside [0, {self.depth}]")

    def load(self, path: str | Path, bounds: ValueBounds | None = None) -> None:
        """Read a memory written by :meth:`save` (checked as :meth:`load_bytes` says)."""
        self.load_bytes(read_regular_file(path), bounds)


def _check_crc32(arrays: dict[str, np.ndarray], saved: object) -> None:
    """Raise :class:`MemoryFileError` naming the first array whose bytes differ from the CRC-32 saved with it
    (``saved``: the header's ``crc32`` map; ``None`` for a file saved before it was written)."""
    problem = crc32_problem(arrays, saved)
    if problem is None:
        return
    kind, name = problem
    if kind == "malformed":
        raise MemoryFileError("saved memory header is malformed: its crc32 map does not name every array once")
    raise MemoryFileError(f"saved memory array {name!r} does not match the CRC-32 saved with it: the file was "
                          "damaged after it was written, none of it is loaded")

