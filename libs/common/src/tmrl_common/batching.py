"""Accumulate environment steps into a :class:`~tmrl_common.protocol.SampleBatch` (newest frame per step only)."""

from __future__ import annotations

import numpy as np

from tmrl_common.arrays import Codec, WireArray
from tmrl_common.layout import DIGEST_BYTES, ObservationLayout, newest_frames, observation_digest
from tmrl_common.protocol import DEFAULT_LIMITS, DecodeLimits, SampleBatch

_ROW_FLAG_BYTES = 1 + 1 + 1 + 4
"""Per row besides the observations and actions: ``first``, ``terminated``, ``truncated`` (bool) and the reward."""
_BODY_OVERHEAD_BYTES = 64 * 1024
"""A margin for the body's msgpack map, array headers and names beside the arrays' bytes."""


def _array_row_bytes(layout: ObservationLayout, digests: bool) -> dict[str, int]:
    """Bytes per row of each array of a batch of ``layout`` (decoded; the flags and the reward aside)."""
    arrays = {f"observations[{c.name!r}]": c.frame_size * (1 if c.dtype == "uint8" else 4) for c in layout.components}
    arrays["actions"] = 4 * layout.action_dim
    if digests:
        arrays["digests"] = DIGEST_BYTES
    return arrays


def batch_row_bytes(layout: ObservationLayout, digests: bool = False) -> int:
    """Decoded bytes of one row of a batch of ``layout``: what a batch of N rows takes uncompressed, about."""
    return sum(_array_row_bytes(layout, digests).values()) + _ROW_FLAG_BYTES


def batch_steps_problem(layout: ObservationLayout, batch_steps: int, compressed: bool, digests: bool = False,
                        limits: DecodeLimits = DEFAULT_LIMITS) -> str | None:
    """Why batches of ``batch_steps`` rows of ``layout`` would be refused (or not built at all), else ``None``: an
    array past ``max_array_bytes`` or all of them past ``max_decoded_bytes`` (decoded sizes: compression does not
    help), or, uncompressed, a body past ``max_body_bytes``. An image worker with ``batch_steps`` 400 of 3x256x256
    frames (78.6 MB) stopped a few seconds in, on a traceback, losing its samples (an outside probe)."""
    arrays = _array_row_bytes(layout, digests)
    row_bytes = sum(arrays.values()) + _ROW_FLAG_BYTES  # as batch_row_bytes
    largest = max(arrays, key=arrays.__getitem__)
    fits = {f"its {largest} array past the {limits.max_array_bytes}-byte limit of one array":
            limits.max_array_bytes // arrays[largest],
            f"its arrays past the {limits.max_decoded_bytes}-byte limit of a batch's decoded arrays":
            limits.max_decoded_bytes // row_bytes}
    if not compressed:
        fits[f"its body past the {limits.max_body_bytes}-byte limit of a message body"] = (
            limits.max_body_bytes - _BODY_OVERHEAD_BYTES) // row_bytes
    why, most = min(fits.items(), key=lambda item: item[1])
    if batch_steps <= most:
        return None
    return (f"batch_steps = {batch_steps} would make batches of {batch_steps * row_bytes:,} bytes ({row_bytes:,} per "
            f"row of this env's layout), {why}: set batch_steps to at most {max(most, 1)}"
            + ("" if most >= 1 else " (one row of this layout is already too large to send)"))


class SampleBatchBuilder:
    """Collects rows for one worker; :meth:`build` turns them into a batch and starts over.

    Call :meth:`add_reset` with the observation ``reset()`` returned, then :meth:`add_step` after each ``step()``.
    """

    def __init__(self, layout: ObservationLayout, codec: Codec = "raw", digests: bool = False) -> None:
        self.layout = layout
        self.codec: Codec = codec
        self.digests = digests
        """Verification mode: also send each row's full-observation digest (``SampleBatch.digests``)."""
        self._clear()

    def _clear(self) -> None:
        self._frames: dict[str, list[np.ndarray]] = {c.name: [] for c in self.layout.components}
        self._first: list[bool] = []
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []
        self._terminated: list[bool] = []
        self._truncated: list[bool] = []
        self._digests: list[bytes] = []

    def __len__(self) -> int:
        return len(self._first)

    def _add(self, observation, action, reward: float, terminated: bool, truncated: bool, first: bool) -> None:
        for name, frame in newest_frames(self.layout, observation).items():
            self._frames[name].append(frame)
        if self.digests:
            self._digests.append(observation_digest(self.layout, observation))
        action = np.asarray(action, dtype=np.float32).reshape(self.layout.action_dim)
        self._first.append(first)
        self._actions.append(action)
        self._rewards.append(float(reward))
        self._terminated.append(bool(terminated))
        self._truncated.append(bool(truncated))

    def add_reset(self, observation, default_action=None) -> None:
        """Row for the observation returned by ``reset()``; ``default_action`` defaults to zeros (rtgym's default)."""
        if default_action is None:
            default_action = np.zeros(self.layout.action_dim, dtype=np.float32)
        self._add(observation, default_action, 0.0, False, False, first=True)

    def add_step(self, action, observation, reward: float, terminated: bool, truncated: bool) -> None:
        """Row for the observation returned by ``step(action)``."""
        self._add(observation, action, reward, terminated, truncated, first=False)

    def build(self, seq: int, weights_version: int) -> SampleBatch:
        """The rows collected so far as one batch; the builder is empty afterwards."""
        if not self._first:
            raise ValueError("no rows to build a batch from")

        def wire(values, dtype) -> WireArray:
            return WireArray.from_numpy(np.asarray(values, dtype=dtype), codec=self.codec)

        batch = SampleBatch(
            seq=seq,
            weights_version=weights_version,
            first=wire(self._first, np.bool_),
            observations={name: WireArray.from_numpy(np.stack(frames), codec=self.codec) for name, frames in self._frames.items()},
            actions=WireArray.from_numpy(np.stack(self._actions), codec=self.codec),
            rewards=wire(self._rewards, np.float32),
            terminated=wire(self._terminated, np.bool_),
            truncated=wire(self._truncated, np.bool_),
            digests=(WireArray.from_numpy(np.frombuffer(b"".join(self._digests), np.uint8).reshape(len(self._first), -1))
                     if self.digests else None),
        )
        self._clear()
        return batch
