"""The tmrl wire protocol, version 1: every message between relay, workers and trainer.

A message is two ZeroMQ frames, each one msgpack map (see ``docs/protocol.md`` for the byte-level contract):

1. the **envelope**: ``{"v": 1, "type": "sample_batch", "sender": "worker-1", "sent_at": 1732500000.25}``;
   small and cheap to check, so the relay can route and count without touching the body;
2. the **body**: the fields of the message type named in the envelope.

:func:`encode` builds the two frames; :func:`decode` checks both against the limits in :class:`DecodeLimits` and
returns validated pydantic models or raises :class:`~tmrl_common.errors.ProtocolError` with a reason to count.
No pickle is involved anywhere: arrays are raw bytes plus dtype and shape (:mod:`tmrl_common.arrays`),
weights are safetensors bytes (:mod:`tmrl_common.weights`).
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgpack
import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tmrl_common.arrays import DecodeBudget, WireArray
from tmrl_common.errors import NonFiniteValue, ProtocolError, RejectReason
from tmrl_common.layout import DIGEST_BYTES, ObservationLayout

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

SENDER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
Role = Literal["worker", "trainer", "relay"]
RESERVED_WORKER_IDS = frozenset({"relay", "trainer"})
"""Sender ids no worker may take: the relay's own messages carry ``relay`` and ``trainer`` is the trainer's default id,
so a worker under either would be mistaken for them in logs, metrics and the trainer's per-worker counts."""
SeqNumber = Annotated[int, Field(ge=0, lt=2**63)]
"""A batch sequence number: non-negative, fits a signed 64-bit integer."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied before and while decoding. Anything larger is rejected with reason ``oversized``
    (except ``max_batch_steps``: a batch with more rows is a ``schema`` error)."""

    max_envelope_bytes: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_array_bytes: int = 64 * 1024 * 1024
    max_batch_steps: int = 100_000
    max_decoded_bytes: int = 256 * 1024 * 1024
    """Total decoded size of all arrays in one message (bounds zlib inflation of a small body)."""
    zero_copy_min_body_bytes: int = 1024 * 1024
    """Bodies from this size on are parsed without copying ``raw`` array data: arrays are read-only views on the
    body frame. Smaller bodies go through msgpack's C unpacker, which copies array data but is faster below ~1 MiB."""


DEFAULT_LIMITS = DecodeLimits()


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def _check_sender(value: str) -> str:
    if not isinstance(value, str) or not SENDER_PATTERN.fullmatch(value):
        raise ValueError(f"sender id {value!r} must match {SENDER_PATTERN.pattern}")
    return value


class Envelope(_Strict):
    """First frame of every message."""

    v: int
    type: str = Field(max_length=32)
    sender: str
    sent_at: float = Field(ge=0)

    _sender_ok = field_validator("sender")(classmethod(lambda cls, v: _check_sender(v)))


class Message(_Strict):
    """Base of every message body. ``type_name`` is the envelope's ``type``."""

    type_name: ClassVar[str]
    wire_optional: ClassVar[frozenset[str]] = frozenset()
    """Fields added to version 1 after it was published: left off the wire while they hold their default, so a
    message that does not use them is exactly what a first-release version-1 peer sends and accepts."""


class Hello(Message):
    """Sent once by a worker or trainer when it (re)connects to the relay."""

    type_name: ClassVar[str] = "hello"

    role: Role
    software: str = Field(max_length=64)
    layout: ObservationLayout | None = None
    """Workers say which observation layout their samples follow; the trainer rejects batches from a mismatch."""
    next_seq: int = Field(default=0, ge=0, lt=2**63)
    """The lowest ``seq`` this worker may still send: its oldest unacknowledged batch, else the number of its next new
    batch (every lower seq was acknowledged or will never be sent). Reported by the trainer, not used to decide
    duplicates (``docs/protocol.md`` §5.3.1)."""


class SampleBatch(Message):
    """Consecutive environment steps from one worker, newest frame only per step (see :mod:`tmrl_common.layout`).

    Row ``t`` holds the observation frames reached at step ``t`` and how they were reached:
    ``first[t]`` marks a reset observation (its action is the environment's default action, its reward 0);
    otherwise ``actions[t]`` was applied, ``rewards[t]`` received, and ``terminated[t]``/``truncated[t]`` say whether
    the episode ended with that step.
    """

    type_name: ClassVar[str] = "sample_batch"
    wire_optional: ClassVar[frozenset[str]] = frozenset({"digests"})

    seq: int = Field(ge=0, lt=2**63)
    weights_version: int = Field(ge=0, lt=2**63)
    first: WireArray
    observations: dict[str, WireArray] = Field(min_length=1, max_length=16)
    actions: WireArray
    rewards: WireArray
    terminated: WireArray
    truncated: WireArray
    digests: WireArray | None = None
    """Verification mode only: ``uint8 [N, 8]``, the :func:`~tmrl_common.layout.observation_digest` of the full
    observation the env returned at each row. The trainer compares the observation it rebuilds."""

    @property
    def steps(self) -> int:
        return int(self.first.shape[0])

    @model_validator(mode="before")
    @classmethod
    def _headers_fit_the_receivers_layout(cls, data: Any, info: ValidationInfo) -> Any:
        """With the receiver's ``layout`` in the decoding context (the trainer's: :func:`decode`), the parts' names,
        dtypes and frame shapes, the action width and the row count are checked from the arrays' headers before any
        array is inflated or scanned (:meth:`check_layout`'s verdict, earlier). An outside probe sent zlib bodies of
        251 KB that inflate to 256 MiB of parts no layout has: each cost the trainer 1.75 s before its refusal, and
        40 of them held up every honest worker's batches for 70 s. Headers that are not well formed are left to the
        fields' own validation, which says what is wrong with them."""
        context = info.context or {}
        layout = context.get("layout")
        if layout is None or not isinstance(data, dict):
            return data
        headers = {name: _array_header(value) for name, value in (data.get("observations") or {}).items()} \
            if isinstance(data.get("observations"), dict) else None
        first, actions = _array_header(data.get("first")), _array_header(data.get("actions"))
        if headers is None or None in headers.values() or first is None or actions is None or not first[1]:
            return data
        limits: DecodeLimits = context.get("limits", DEFAULT_LIMITS)
        rows = first[1][0]
        if not 1 <= rows <= limits.max_batch_steps:
            raise ProtocolError("schema", f"batch has {rows} steps, allowed 1..{limits.max_batch_steps}")
        mismatch = _layout_mismatch(headers, actions[1][1] if len(actions[1]) == 2 else None, layout)
        if mismatch is not None:
            raise ProtocolError("schema", mismatch)
        for name, (_, shape) in headers.items():
            if not shape or shape[0] != rows:
                raise ProtocolError("schema", f"observations[{name!r}] has {shape[0] if shape else 0} rows, the "
                                              f"batch {rows}")
        return data

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> SampleBatch:
        limits: DecodeLimits = (info.context or {}).get("limits", DEFAULT_LIMITS)
        _expect(self.first, "first", "bool", 1)
        steps = self.first.shape[0]
        if not 1 <= steps <= limits.max_batch_steps:
            raise ValueError(f"batch has {steps} steps, allowed 1..{limits.max_batch_steps}")
        _expect(self.actions, "actions", "float32", 2, steps)
        _expect(self.rewards, "rewards", "float32", 1, steps)
        _expect(self.terminated, "terminated", "bool", 1, steps)
        _expect(self.truncated, "truncated", "bool", 1, steps)
        if self.digests is not None:
            _expect(self.digests, "digests", "uint8", 2, steps)
            if self.digests.shape[1] != DIGEST_BYTES:
                raise ValueError(f"digests must have {DIGEST_BYTES} bytes per row, got {self.digests.shape[1]}")
        for name, frames in self.observations.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise ValueError(f"observation name {name!r} is not a component name")
            if frames.dtype not in ("float32", "uint8") or not frames.shape or frames.shape[0] != steps:
                raise ValueError(f"observations[{name!r}] must be float32/uint8 with {steps} rows, got {frames.dtype}{frames.shape}")
        return self

    def check_layout(self, layout: ObservationLayout) -> None:
        """Raise :class:`ProtocolError` (reason ``schema``) unless this batch matches ``layout``."""
        mismatch = _layout_mismatch({name: (frames.dtype, list(frames.shape)) for name, frames in self.observations.items()},
                                    self.actions.shape[1], layout)
        if mismatch is not None:
            raise ProtocolError("schema", mismatch)

    def check_first_rows(self) -> None:
        """Raise :class:`ProtocolError` (reason ``schema``) when a row marked ``first`` (what ``reset()`` returned)
        holds a reward other than 0 or a termination flag (docs/protocol.md section 6.2): a receiver would store a
        reward for no step, or an episode that ends where it starts."""
        first = self.first.array
        if not first.any():
            return
        rewards, terminated, truncated = self.rewards.array, self.terminated.array, self.truncated.array
        bad = first & ((rewards != 0) | terminated | truncated)
        if bad.any():
            row = int(np.argmax(bad))
            raise ProtocolError("schema", f"row {row} starts an episode (first) but holds reward {float(rewards[row]):g}"
                                          f", terminated {bool(terminated[row])}, truncated {bool(truncated[row])}: a "
                                          "first row is what reset() returned, with reward 0 and neither flag")

    def check_bounds(self, layout: ObservationLayout, max_abs_reward: float, max_abs_observation: float) -> None:
        """Raise :class:`ProtocolError` unless every value is one an honest worker can send (call after
        :meth:`check_layout`): each observation frame within its component's declared ``[low, high]`` (``±
        max_abs_observation`` where a bound is not declared; reason ``observation_out_of_bounds``), each action within
        the policy's action space ``[-1, 1]`` (``action_out_of_bounds``), each reward within ``±max_abs_reward``
        (``reward_out_of_bounds``). Finite but absurd values (3e38 rewards) would otherwise reach the learner."""
        for name, (low, high) in observation_bounds(layout, max_abs_observation).items():
            _check_range(self.observations[name], low, high, "observation_out_of_bounds", f"observations[{name!r}]")
        _check_range(self.actions, -1.0, 1.0, "action_out_of_bounds", "actions")
        _check_range(self.rewards, -max_abs_reward, max_abs_reward, "reward_out_of_bounds", "rewards")


def _array_header(value: Any) -> tuple[str, list[int]] | None:
    """``(dtype, shape)`` of a wire array's map, read without decoding its data; ``None`` when it is not well formed."""
    if not isinstance(value, dict):
        return None
    dtype, shape = value.get("dtype"), value.get("shape")
    if type(dtype) is not str or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    return dtype, shape


def _layout_mismatch(parts: dict[str, tuple[str, list[int]]], action_width: int | None,
                     layout: ObservationLayout) -> str | None:
    """Why observation parts ``{name: (dtype, shape with rows first)}`` and actions ``action_width`` wide do not
    fit ``layout``, or ``None``: the one verdict of :meth:`SampleBatch.check_layout` and of its check before decoding."""
    expected = {c.name: c for c in layout.components}
    if set(parts) != set(expected):
        return f"batch has components {sorted(parts)}, layout expects {sorted(expected)}"
    for name, component in expected.items():
        dtype, shape = parts[name]
        if list(shape[1:]) != list(component.frame_shape) or dtype != component.dtype:
            return (f"observations[{name!r}] frames are {dtype}{list(shape[1:])}, "
                    f"layout expects {component.dtype}{component.frame_shape}")
    if action_width != layout.action_dim:
        shape = f"[rows, {action_width}]" if action_width is not None else "not [rows, action size]"
        return f"actions are {shape}: action size {action_width}, layout expects {layout.action_dim}"
    return None


def observation_bounds(layout: ObservationLayout, max_abs_observation: float) -> dict[str, tuple[float, float]]:
    """``{component name: (low, high)}`` every stored frame must lie in: its declared bounds, ``±max_abs_observation``
    where one is not declared; a ``uint8`` component whose bounds hold every byte is left out (nothing to check)."""
    bounds = {}
    for component in layout.components:
        low = -max_abs_observation if component.low is None else component.low
        high = max_abs_observation if component.high is None else component.high
        if not (component.dtype == "uint8" and low <= 0 and high >= 255):
            bounds[component.name] = (low, high)
    return bounds


def _value_text(value: float) -> str:
    """``value`` short (``1000``, ``-0.5``) when that reads back as it, else in full: a value just past a bound must
    not print as the bound (a probe's action nextafter(1) read "values in [-1, 1], outside the allowed [-1, 1]")."""
    value = float(value)
    short = f"{value:.6g}"
    return short if float(short) == value else repr(value)


def _check_range(values: WireArray, low: float, high: float, reason: RejectReason, what: str) -> None:
    smallest, largest = values.value_range()  # computed while decoding: no second pass over the data
    if smallest < low or largest > high:
        raise ProtocolError(reason, f"{what} hold values in [{_value_text(smallest)}, {_value_text(largest)}], "
                                    f"outside the allowed [{_value_text(low)}, {_value_text(high)}]")


def _expect(array: WireArray, name: str, dtype: str, ndim: int, rows: int | None = None) -> None:
    if array.dtype != dtype or len(array.shape) != ndim or (rows is not None and array.shape[0] != rows):
        want = f"{dtype} with {ndim} dims" + (f" and {rows} rows" if rows is not None else "")
        raise ValueError(f"{name} must be {want}, got {array.dtype}{array.shape}")


AckOutcome = Literal["stored", "duplicate", "rejected"]


class SampleAck(Message):
    """Trainer → relay → worker: the trainer's one answer to each of these batches of ``worker``.

    ``stored`` (stored now) and ``duplicate`` (stored earlier): the worker drops them from its spool as delivered.
    ``rejected``: refused for ``reason`` (one of :data:`~tmrl_common.errors.RejectReason`) and never stored; the worker
    drops them from its spool, counts them by reason and never resends them. The three fields added to version 1
    are left off the wire at their defaults (:data:`Message.wire_optional`), so an answer ``stored`` is byte for byte
    the version-1 ``sample_ack``.
    """

    type_name: ClassVar[str] = "sample_ack"
    wire_optional: ClassVar[frozenset[str]] = frozenset({"outcome", "reason", "detail"})

    worker: str
    seqs: list[SeqNumber] = Field(min_length=1, max_length=65536, fail_fast=True)
    """(``fail_fast``: 65,536 wrong entries made as many validation errors, 0.3-2 s of the receiver's loop.)"""
    outcome: AckOutcome = "stored"
    reason: str = Field(default="", max_length=32)
    """Why the batches were rejected (``rejected`` only; empty otherwise)."""
    detail: str = Field(default="", max_length=1024)
    """Human-readable detail of a rejection."""

    _worker_ok = field_validator("worker")(classmethod(lambda cls, v: _check_sender(v)))

    @model_validator(mode="after")
    def _reason_iff_rejected(self) -> SampleAck:
        if (self.outcome == "rejected") != bool(self.reason):
            raise ValueError(f"a sample_ack has a reason exactly when its outcome is 'rejected' "
                             f"(outcome {self.outcome!r}, reason {self.reason!r})")
        return self


ArchitectureValue = (bool | int | float | Annotated[str, Field(max_length=65536)]
                     | Annotated[list[int], Field(max_length=64, fail_fast=True)])
"""(The longest string, the layout's JSON, is a few KB: a recheck probe's 1.3 MB one of 100,000 unknown keys took a
worker 0.49 s to refuse, at every weights version.)"""


def _bytes_from_buffer(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


WireBytes = Annotated[bytes, BeforeValidator(_bytes_from_buffer)]
"""A msgpack ``bin`` field; the zero-copy decoder hands it over as a ``memoryview``, stored as ``bytes``."""


class WeightsUpdate(Message):
    """Trainer → relay → every worker: a new policy. The relay keeps the latest one and hands it to each worker after
    its ``hello``, so a late joiner starts from it."""

    type_name: ClassVar[str] = "weights_update"

    version: int = Field(ge=0, lt=2**63)
    architecture: dict[str, ArchitectureValue] = Field(max_length=64)
    """Everything needed to rebuild the network before loading tensors (see :mod:`tmrl_common.networks`)."""
    tensors: WireBytes
    """A safetensors file, as bytes."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _digest_matches(self) -> WeightsUpdate:
        if hashlib.sha256(self.tensors).hexdigest() != self.sha256:
            raise ValueError("sha256 does not match the tensors bytes")
        return self

    @classmethod
    def build(cls, version: int, architecture: dict[str, ArchitectureValue], tensors: bytes) -> WeightsUpdate:
        return cls(version=version, architecture=architecture, tensors=tensors, sha256=hashlib.sha256(tensors).hexdigest())


WORKER_HEARTBEAT_COUNTERS: dict[str, str] = {
    "batches": "batches built since the worker started",
    "steps": "rows (environment steps) handed to the sender",
    "spooled": "batches in its spool now, not yet acknowledged",
    "dropped": "batches dropped from a full spool unacknowledged (oldest first)",
    "dropped_waiting": "batches dropped before they were numbered (a full or read-only state_dir, a slow disk)",
    "resent": "batches sent again (no answer in time, or after a reconnection)",
    "restored": "batches restored from its durable spool at start",
    "unreadable_spool_files": "durable-spool files of an earlier run that could not be read (set aside)",
    "spool_write_errors": "batches whose durable-spool file could not be written (kept in memory only)",
    "stored": "batches the trainer acknowledged as stored",
    "rejected": "batches refused for good (each reason also as rejected.<reason>)",
}
"""The counters a worker's ``heartbeat`` carries (its own totals since it started), by name: what the relay exports
per worker as ``tmrl_relay_worker_reported{worker,counter}``. A worker may send others (``rejected.<reason>``);
the relay exports these names only, so a worker cannot add labels of its choosing."""


class Heartbeat(Message):
    """Sent periodically by every peer; a peer silent for several intervals is considered gone."""

    type_name: ClassVar[str] = "heartbeat"

    role: Role
    uptime_s: float = Field(ge=0)
    counters: dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=0, lt=2**63)]] = Field(
        default_factory=dict, max_length=64)
    """Counts, never negative (a probe's 2**64 - 1 and -2**63 went to the relay's metrics as they came)."""


class Error(Message):
    """Sent back to a peer whose message was rejected, so it can log why (it is never retried blindly)."""

    type_name: ClassVar[str] = "error"

    reason: str = Field(max_length=32)
    message: str = Field(max_length=1024)
    ref_type: str = Field(default="", max_length=32)
    ref_seq: int | None = Field(default=None, ge=0)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.type_name: cls for cls in (Hello, SampleBatch, SampleAck, WeightsUpdate, Heartbeat, Error)
}


# --------------------------------------------------------------------------------------------------------- encoding


def _to_wire(value: Any) -> Any:
    if isinstance(value, WireArray):
        return value.to_wire()
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        optional = getattr(type(value), "wire_optional", frozenset())
        return {name: _to_wire(getattr(value, name)) for name, info in fields.items()
                if name not in optional or getattr(value, name) != info.default}
    if isinstance(value, dict):
        return {key: _to_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode_envelope(type_name: str, sender: str, sent_at: float | None = None) -> bytes:
    """The first frame for a message of ``type_name`` from ``sender``."""
    _check_sender(sender)
    envelope = {"v": PROTOCOL_VERSION, "type": type_name, "sender": sender, "sent_at": time.time() if sent_at is None else sent_at}
    return msgpack.packb(envelope, use_bin_type=True)


def encode(message: Message, sender: str, sent_at: float | None = None) -> list[bytes]:
    """The two frames ``[envelope, body]`` for ``message`` sent by ``sender`` (``sent_at`` defaults to now)."""
    body = msgpack.packb(_to_wire(message), use_bin_type=True)
    return [encode_envelope(message.type_name, sender, sent_at), body]


# --------------------------------------------------------------------------------------------------------- decoding


class DuplicateKeyError(ProtocolError):
    """A map holds the same key twice: ``malformed`` (``docs/protocol.md`` §2), whichever map of the frame it is."""

    def __init__(self, key: Any) -> None:
        super().__init__("malformed", f"duplicate key {repr(key)[:64]} in one map")


def dict_refusing_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """The ``object_pairs_hook`` of the msgpack unpackers that decode a frame (here and in the relay's envelope
    check): the map as a dict, or :class:`DuplicateKeyError` when a key appears twice in it. msgpack alone lets the
    last one win, while the readers that stop at a body's first ``seq`` see the first (:func:`batch_seq_of`):
    refusing such a map keeps every receiver on one verdict. One Python call per map, none per key."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return result


def _unpack_map(frame: bytes | memoryview, limit: int, what: str) -> dict[str, Any]:
    if len(frame) > limit:
        raise ProtocolError("oversized", f"{what} frame is {len(frame)} bytes, limit {limit}")
    try:
        obj = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
            max_str_len=min(len(frame), 1 << 20), max_array_len=min(len(frame), 1 << 20), max_map_len=MAX_MAP_ENTRIES,
            object_pairs_hook=dict_refusing_duplicate_keys,
        )
    except DuplicateKeyError as exc:
        raise ProtocolError(exc.reason, f"{what} frame: {exc.detail}") from exc
    except Exception as exc:  # msgpack raises several unrelated exception types on hostile input
        raise ProtocolError("malformed", f"{what} frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"{what} frame must be a msgpack map, got {type(obj).__name__}")
    if not set(map(type, obj)) <= _STR_ONLY:
        raise ProtocolError("malformed", f"{what} frame: map keys must be msgpack str")
    return obj


_STR_ONLY = frozenset({str})
_MAX_STR_BYTES = 1 << 20
MAX_MAP_ENTRIES = 64
"""No message holds a larger map (the schemas' largest, ``architecture`` and ``counters``, take 64 entries), and the
unpackers refuse one (``malformed``) before validation: pydantic makes one error per wrong entry, and a hostile-peer
probe's 0.3-0.5 MB hellos of 50,000-65,000 map entries each held the relay's loop for 0.4-3 s (100 of them stalled it
for 180 s, its trainer and workers reconnecting)."""
_WALK_MAX_DEPTH = 6  # body -> observations -> array map -> shape list is depth 3; deeper values go to msgpack itself
_WALK_MAX_MAP_LEN = MAX_MAP_ENTRIES  # larger maps go to msgpack itself, which refuses them
_WALK_MAX_ARRAY_LEN = 16  # longer lists (sample_ack seqs...) go to msgpack itself
_WALK_MAX_NODES = 2048  # bound on the Python-level work per body, whatever the input
_UNPACK_FLOAT32, _UNPACK_FLOAT64 = struct.Struct(">f").unpack_from, struct.Struct(">d").unpack_from
_INT_FORMATS = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
                0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}
_LENGTH_WIDTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


def _msgpack_unpacker(size: int, refuse_duplicate_keys: bool = True) -> msgpack.Unpacker:
    """A C unpacker with the same caps as :func:`_unpack_map` (no ext types, bounded str/array/map sizes) and, unless
    told otherwise, the same refusal of duplicate keys."""
    return msgpack.Unpacker(
        None, raw=False, strict_map_key=True, use_list=True, max_ext_len=0, max_buffer_size=max(size, 1),
        max_str_len=min(size, _MAX_STR_BYTES), max_array_len=min(size, 1 << 20), max_map_len=MAX_MAP_ENTRIES,
        object_pairs_hook=dict_refusing_duplicate_keys if refuse_duplicate_keys else None,
    )


class _ZeroCopyReader:
    """Parse a msgpack body, returning every ``bin`` as a read-only memoryview of the frame (no copy at all).

    msgpack's own unpackers copy each ``bin`` into a new ``bytes`` object; for large sample batches that copies every
    observation. The body's skeleton (a few dozen maps, strings and numbers) is read here in Python; long lists,
    large maps and deep nesting are handed to msgpack's C unpacker, so the Python-level work stays bounded whatever
    the input. It accepts exactly what :func:`_unpack_map` accepts (the fuzz tests compare the two).
    """

    __slots__ = ("frame", "size", "position", "nodes")

    def __init__(self, frame: memoryview) -> None:
        self.frame = frame
        self.size = len(frame)
        self.position = 0
        self.nodes = 0

    def _truncated(self, what: str) -> ProtocolError:
        return ProtocolError("malformed", f"frame ends inside a msgpack {what} at byte {self.position}")

    def _text(self, start: int, end: int) -> str:
        if end > self.size:
            raise self._truncated("str")
        if end - start > _MAX_STR_BYTES:
            raise ProtocolError("malformed", f"string of {end - start} bytes, limit {_MAX_STR_BYTES}")
        self.position = end
        try:
            return str(self.frame[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("malformed", f"string at byte {start} is not UTF-8: {exc.reason}") from exc

    def read(self, depth: int = 0) -> Any:
        frame, position = self.frame, self.position
        if position >= self.size:
            raise self._truncated("value")
        kind = frame[position]
        self.nodes += 1
        if 0xA0 <= kind <= 0xBF:  # fixstr: most map keys
            return self._text(position + 1, position + 1 + (kind & 0x1F))
        if kind <= 0x7F:  # positive fixint
            self.position = position + 1
            return kind
        if kind >= 0xE0:  # negative fixint
            self.position = position + 1
            return kind - 0x100
        if kind <= 0x9F:  # fixmap / fixarray
            self.position = position + 1
            return self._map(kind & 0x0F, depth, position) if kind <= 0x8F else self._array(kind & 0x0F, depth, position)
        if kind in _LENGTH_WIDTHS:  # bin, str, array and map with an explicit length
            start = position + 1 + _LENGTH_WIDTHS[kind]
            if start > self.size:
                raise self._truncated("header")
            length = int.from_bytes(frame[position + 1:start], "big")
            self.position = start
            if kind <= 0xC6:
                if start + length > self.size:
                    raise self._truncated("bin")
                self.position = start + length
                return frame[start:start + length]
            if kind <= 0xDB:
                return self._text(start, start + length)
            return self._array(length, depth, position) if kind <= 0xDD else self._map(length, depth, position)
        if kind in _INT_FORMATS:
            width, signed = _INT_FORMATS[kind]
            if position + 1 + width > self.size:
                raise self._truncated("integer")
            self.position = position + 1 + width
            return int.from_bytes(frame[position + 1:position + 1 + width], "big", signed=signed)
        if kind in (0xCA, 0xCB):
            width = 4 if kind == 0xCA else 8
            if position + 1 + width > self.size:
                raise self._truncated("float")
            self.position = position + 1 + width
            return (_UNPACK_FLOAT32 if kind == 0xCA else _UNPACK_FLOAT64)(frame, position + 1)[0]
        if kind in (0xC0, 0xC2, 0xC3):
            self.position = position + 1
            return None if kind == 0xC0 else kind == 0xC3
        raise ProtocolError("malformed", f"msgpack type byte 0x{kind:02x} at byte {position} is not accepted")

    def _map(self, length: int, depth: int, start: int) -> Any:
        if depth >= _WALK_MAX_DEPTH or length > _WALK_MAX_MAP_LEN or self.nodes + 2 * length > _WALK_MAX_NODES:
            return self._read_with_msgpack(start)
        result: dict[Any, Any] = {}
        for _ in range(length):
            key = self.read(depth + 1)
            if type(key) is not str:  # like msgpack's strict_map_key: bin keys pass (the schema rejects them)
                if type(key) is not memoryview:
                    raise ProtocolError("malformed", f"map keys must be msgpack str, got {type(key).__name__}")
                key = bytes(key)
            if key in result:  # as dict_refusing_duplicate_keys does for the maps msgpack unpacks
                raise DuplicateKeyError(key)
            result[key] = self.read(depth + 1)
        return result

    def _array(self, length: int, depth: int, start: int) -> Any:
        if depth >= _WALK_MAX_DEPTH or length > _WALK_MAX_ARRAY_LEN or self.nodes + length > _WALK_MAX_NODES:
            return self._read_with_msgpack(start)
        return [self.read(depth + 1) for _ in range(length)]

    def _read_with_msgpack(self, start: int) -> Any:
        """The value at ``start``, unpacked by msgpack (which copies the rest of the frame once)."""
        rest = self.frame[start:]
        unpacker = _msgpack_unpacker(len(rest))
        unpacker.feed(rest)
        value = unpacker.unpack()
        self.position = start + unpacker.tell()
        return value


def _unpack_body(frame: Any, limits: DecodeLimits, what: str) -> dict[str, Any]:
    """The body map; from ``limits.zero_copy_min_body_bytes`` on, every ``bin`` is a memoryview of ``frame``."""
    data = frame if type(frame) is bytes else memoryview(frame).cast("B")
    if len(data) > limits.max_body_bytes:
        raise ProtocolError("oversized", f"{what} frame is {len(data)} bytes, limit {limits.max_body_bytes}")
    is_map = len(data) > 0 and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF))
    if len(data) < limits.zero_copy_min_body_bytes or not is_map:
        return _unpack_map(data, limits.max_body_bytes, what)  # also reports "not valid msgpack" / "must be a map"
    view = memoryview(data).toreadonly()
    reader = _ZeroCopyReader(view)
    try:
        obj = reader.read()
    except DuplicateKeyError as exc:  # the same words as _unpack_map
        raise ProtocolError(exc.reason, f"{what} frame: {exc.detail}") from exc
    except ProtocolError as exc:
        raise ProtocolError(exc.reason, f"{what} frame is not valid msgpack: {exc.detail}") from exc
    except Exception as exc:  # msgpack raises several unrelated exception types on hostile input
        raise ProtocolError("malformed", f"{what} frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if reader.position != len(view):
        raise ProtocolError("malformed", f"{what} frame is not valid msgpack: {len(view) - reader.position} bytes follow the map")
    if not set(map(type, obj)) <= _STR_ONLY:
        raise ProtocolError("malformed", f"{what} frame: map keys must be msgpack str")
    return obj


def _schema_error(exc: ValidationError, what: str) -> ProtocolError:
    errors = exc.errors(include_url=False, include_input=False)  # once: each call builds every error's dict
    for error in errors:
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ProtocolError):
            return ProtocolError(cause.reason, f"{what}: {cause.detail}")
        if isinstance(cause, NonFiniteValue):  # a validator's own finiteness check (a layout's bounds)
            return ProtocolError("non_finite", f"{what}: {cause}")
    non_finite = [e for e in errors if e["type"] == "finite_number"]
    first = non_finite[0] if non_finite else errors[0]  # NaN in a union field also fails its other branches
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    reason: RejectReason = "non_finite" if non_finite else "schema"
    return ProtocolError(reason, f"{what} field {where}: {first['msg']} ({exc.error_count()} error(s))")


def decode_envelope(frame: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Envelope:
    """Check the first frame only: version, type name and sender. Cheap enough for every message at the relay."""
    raw = _unpack_map(bytes(frame), limits.max_envelope_bytes, "envelope")
    version = raw.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:  # rejects True, 1.0 and "1" alike
        raise ProtocolError("bad_version", f"protocol version {version!r} is not supported (this build speaks {sorted(SUPPORTED_VERSIONS)})")
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise _schema_error(exc, "envelope") from exc
    if envelope.type not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"message type {envelope.type!r} is not one of {sorted(MESSAGE_TYPES)}")
    return envelope


def decode_body(envelope: Envelope, frame: bytes, limits: DecodeLimits = DEFAULT_LIMITS,
                layout: ObservationLayout | None = None) -> Message:
    """Validate the body frame of a message whose envelope was already checked. With ``layout`` (a receiver that
    stores samples), a sample batch whose array headers do not fit it is refused before its arrays are decoded."""
    raw = _unpack_body(frame, limits, f"{envelope.type} body")
    cls = MESSAGE_TYPES[envelope.type]
    context = {
        "limits": limits,
        "max_array_bytes": limits.max_array_bytes,
        "budget": DecodeBudget(limits.max_decoded_bytes),
        "layout": layout,
    }
    try:
        return cls.model_validate(raw, context=context)
    except ValidationError as exc:
        raise _schema_error(exc, f"{envelope.type} from {envelope.sender}") from exc


def batch_seq_of(body: bytes | memoryview) -> int | None:
    """The ``seq`` of a ``sample_batch`` body that failed to decode, so the refusal can name the batch; ``None``
    when the body holds no valid seq (then no particular batch can be answered). Reads the map's entries in order
    and stops at ``seq``, which :func:`encode` writes first: a body holding ``seq`` twice (``malformed``) is named
    by the first one, as the relay counts it (``tmrl_relay.envelope.read_batch_head``)."""
    try:
        unpacker = _msgpack_unpacker(len(body), refuse_duplicate_keys=False)
        unpacker.feed(body)
        for _ in range(min(unpacker.read_map_header(), len(SampleBatch.model_fields))):
            if unpacker.unpack() == "seq":
                seq = unpacker.unpack()
                return seq if type(seq) is int and 0 <= seq < 2**63 else None
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated exception types on hostile input
        return None
    return None


def decode(frames: list[bytes], limits: DecodeLimits = DEFAULT_LIMITS,
           layout: ObservationLayout | None = None) -> tuple[Envelope, Message]:
    """Validate a whole message ``[envelope, body]``; raise :class:`ProtocolError` on anything unacceptable
    (``layout``: see :func:`decode_body`)."""
    if len(frames) != 2:
        raise ProtocolError("malformed", f"a message has 2 frames (envelope, body), got {len(frames)}")
    envelope = decode_envelope(frames[0], limits)
    return envelope, decode_body(envelope, frames[1], limits, layout)
