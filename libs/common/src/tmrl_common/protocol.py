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
from tmrl_common.errors import ProtocolError, RejectReason
from tmrl_common.layout import ObservationLayout

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

SENDER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
Role = Literal["worker", "trainer", "relay"]
SeqNumber = Annotated[int, Field(ge=0, lt=2**63)]
"""A batch sequence number: non-negative, fits a signed 64-bit integer."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied before and while decoding. Anything larger is rejected with reason ``oversized``."""

    max_envelope_bytes: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_array_bytes: int = 64 * 1024 * 1024
    max_batch_steps: int = 100_000
    max_decoded_bytes: int = 256 * 1024 * 1024
    """Total decoded size of all arrays in one message (bounds zlib inflation of a small body)."""


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


class Hello(Message):
    """Sent once by a worker or trainer when it (re)connects to the relay."""

    type_name: ClassVar[str] = "hello"

    role: Role
    software: str = Field(max_length=64)
    layout: ObservationLayout | None = None
    """Workers say which observation layout their samples follow; the trainer rejects batches from a mismatch."""
    next_seq: int = Field(default=0, ge=0, lt=2**63)
    """Sequence number of the next batch the worker will send (after a restart: continues, never reuses)."""


class SampleBatch(Message):
    """Consecutive environment steps from one worker, newest frame only per step (see :mod:`tmrl_common.layout`).

    Row ``t`` holds the observation frames reached at step ``t`` and how they were reached:
    ``first[t]`` marks a reset observation (its action is the environment's default action, its reward 0);
    otherwise ``actions[t]`` was applied, ``rewards[t]`` received, and ``terminated[t]``/``truncated[t]`` say whether
    the episode ended with that step.
    """

    type_name: ClassVar[str] = "sample_batch"

    seq: int = Field(ge=0, lt=2**63)
    weights_version: int = Field(ge=0, lt=2**63)
    first: WireArray
    observations: dict[str, WireArray] = Field(min_length=1, max_length=16)
    actions: WireArray
    rewards: WireArray
    terminated: WireArray
    truncated: WireArray

    @property
    def steps(self) -> int:
        return int(self.first.shape[0])

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
        for name, frames in self.observations.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise ValueError(f"observation name {name!r} is not a component name")
            if frames.dtype not in ("float32", "uint8") or not frames.shape or frames.shape[0] != steps:
                raise ValueError(f"observations[{name!r}] must be float32/uint8 with {steps} rows, got {frames.dtype}{frames.shape}")
        return self

    def check_layout(self, layout: ObservationLayout) -> None:
        """Raise :class:`ProtocolError` (reason ``schema``) unless this batch matches ``layout``."""
        expected = {c.name: c for c in layout.components}
        if set(self.observations) != set(expected):
            raise ProtocolError("schema", f"batch has components {sorted(self.observations)}, layout expects {sorted(expected)}")
        for name, component in expected.items():
            frames = self.observations[name]
            if frames.shape[1:] != component.frame_shape or frames.dtype != component.dtype:
                raise ProtocolError(
                    "schema",
                    f"observations[{name!r}] frames are {frames.dtype}{frames.shape[1:]}, "
                    f"layout expects {component.dtype}{component.frame_shape}",
                )
        if self.actions.shape[1] != layout.action_dim:
            raise ProtocolError("schema", f"actions have {self.actions.shape[1]} dims, layout expects {layout.action_dim}")


def _expect(array: WireArray, name: str, dtype: str, ndim: int, rows: int | None = None) -> None:
    if array.dtype != dtype or len(array.shape) != ndim or (rows is not None and array.shape[0] != rows):
        want = f"{dtype} with {ndim} dims" + (f" and {rows} rows" if rows is not None else "")
        raise ValueError(f"{name} must be {want}, got {array.dtype}{array.shape}")


class SampleAck(Message):
    """Trainer → relay → worker: these batches of ``worker`` are stored (or were duplicates); drop them from the spool."""

    type_name: ClassVar[str] = "sample_ack"

    worker: str
    seqs: list[SeqNumber] = Field(min_length=1, max_length=65536)

    _worker_ok = field_validator("worker")(classmethod(lambda cls, v: _check_sender(v)))


ArchitectureValue = bool | int | float | str | list[int]


def _bytes_from_buffer(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


WireBytes = Annotated[bytes, BeforeValidator(_bytes_from_buffer)]
"""A msgpack ``bin`` field; the zero-copy decoder hands it over as a ``memoryview``, stored as ``bytes``."""


class WeightsUpdate(Message):
    """Trainer → relay → every worker: a new policy. The relay keeps the latest one for late joiners."""

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


class Heartbeat(Message):
    """Sent periodically by every peer; a peer silent for several intervals is considered gone."""

    type_name: ClassVar[str] = "heartbeat"

    role: Role
    uptime_s: float = Field(ge=0)
    counters: dict[str, int] = Field(default_factory=dict, max_length=64)


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
        return {name: _to_wire(getattr(value, name)) for name in type(value).model_fields}
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


def _unpack_map(frame: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(frame) > limit:
        raise ProtocolError("oversized", f"{what} frame is {len(frame)} bytes, limit {limit}")
    try:
        obj = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
            max_str_len=min(len(frame), 1 << 20), max_array_len=min(len(frame), 1 << 20), max_map_len=min(len(frame), 1 << 16),
        )
    except Exception as exc:  # msgpack raises several unrelated exception types on hostile input
        raise ProtocolError("malformed", f"{what} frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"{what} frame must be a msgpack map, got {type(obj).__name__}")
    if not all(isinstance(key, str) for key in obj):
        raise ProtocolError("malformed", f"{what} frame: map keys must be msgpack str")
    return obj


_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # bin 8/16/32: bytes of big-endian length after the type byte
_MAP16, _MAP32 = 0xDE, 0xDF
_WALK_MAX_DEPTH = 4  # body -> observations -> array map is depth 2; deeper maps are unpacked whole
_WALK_MAX_MAP_LEN = 64  # larger maps are unpacked whole (in C): no message map that holds arrays is larger
_WALK_MAX_NODES = 2048  # bound on the Python-level work per body, whatever the input


class _ZeroCopyWalk:
    """Unpack a body map, returning every ``bin`` inside nested maps as a read-only memoryview of the frame.

    msgpack's own ``unpackb`` copies each ``bin`` into a new ``bytes`` object; for sample batches that would copy
    every observation. Here maps are walked with :class:`msgpack.Unpacker`'s header API, ``bin`` values are
    skipped by the unpacker and sliced out of the frame instead. Everything else is unpacked by msgpack itself.
    """

    def __init__(self, frame: memoryview) -> None:
        self.frame = frame
        self.nodes = 0
        self.unpacker = msgpack.Unpacker(
            None, raw=False, strict_map_key=True, use_list=True, max_ext_len=0, max_buffer_size=max(len(frame), 1),
            max_str_len=min(len(frame), 1 << 20), max_array_len=min(len(frame), 1 << 20),
            max_map_len=min(len(frame), 1 << 16),
        )
        self.unpacker.feed(frame)

    def _header(self, position: int, width: int) -> int:
        end = position + 1 + width
        if end > len(self.frame):
            raise ProtocolError("malformed", f"frame ends inside a msgpack header at byte {position}")
        return int.from_bytes(self.frame[position + 1:end], "big")

    def value(self, depth: int) -> Any:
        self.nodes += 1
        position = self.unpacker.tell()
        if position >= len(self.frame):
            raise ProtocolError("malformed", "frame ends where a msgpack value was expected")
        kind = self.frame[position]
        if kind in _BIN_HEADERS:
            width = _BIN_HEADERS[kind]
            start = position + 1 + width
            end = start + self._header(position, width)
            if end > len(self.frame):
                raise ProtocolError("malformed", f"bin at byte {position} runs past the end of the frame")
            self.unpacker.skip()
            return self.frame[start:end]
        if 0x80 <= kind <= 0x8F or kind in (_MAP16, _MAP32):
            length = kind & 0x0F if kind <= 0x8F else self._header(position, 2 if kind == _MAP16 else 4)
            if depth < _WALK_MAX_DEPTH and length <= _WALK_MAX_MAP_LEN and self.nodes + 2 * length <= _WALK_MAX_NODES:
                return self.map(depth)
        return self.unpacker.unpack()

    def map(self, depth: int) -> dict[str, Any]:
        length = self.unpacker.read_map_header()
        result: dict[str, Any] = {}
        for _ in range(length):
            key = self.unpacker.unpack()
            if not isinstance(key, str):
                raise ProtocolError("malformed", f"map keys must be msgpack str, got {type(key).__name__}")
            result[key] = self.value(depth + 1)
        return result


def _unpack_body(frame: Any, limit: int, what: str) -> dict[str, Any]:
    """Like :func:`_unpack_map`, but ``bin`` values in maps are zero-copy memoryviews of ``frame``."""
    view = memoryview(frame).cast("B").toreadonly()
    if len(view) > limit:
        raise ProtocolError("oversized", f"{what} frame is {len(view)} bytes, limit {limit}")
    if not len(view) or not (0x80 <= view[0] <= 0x8F or view[0] in (_MAP16, _MAP32)):
        return _unpack_map(bytes(view), limit, what)  # reports "not valid msgpack" or "must be a map"
    try:
        walk = _ZeroCopyWalk(view)
        obj = walk.value(depth=0)
        trailing = len(view) - walk.unpacker.tell()
    except ProtocolError as exc:
        raise ProtocolError(exc.reason, f"{what} frame: {exc.detail}") from exc
    except Exception as exc:  # msgpack raises several unrelated exception types on hostile input
        raise ProtocolError("malformed", f"{what} frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if trailing:
        raise ProtocolError("malformed", f"{what} frame is not valid msgpack: {trailing} bytes follow the map")
    if not isinstance(obj, dict):  # pragma: no cover - the first byte was a map header
        raise ProtocolError("malformed", f"{what} frame must be a msgpack map, got {type(obj).__name__}")
    return obj


def _schema_error(exc: ValidationError, what: str) -> ProtocolError:
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ProtocolError):
            return ProtocolError(cause.reason, f"{what}: {cause.detail}")
    errors = exc.errors()
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


def decode_body(envelope: Envelope, frame: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Message:
    """Validate the body frame of a message whose envelope was already checked."""
    raw = _unpack_body(frame, limits.max_body_bytes, f"{envelope.type} body")
    cls = MESSAGE_TYPES[envelope.type]
    context = {
        "limits": limits,
        "max_array_bytes": limits.max_array_bytes,
        "budget": DecodeBudget(limits.max_decoded_bytes),
    }
    try:
        return cls.model_validate(raw, context=context)
    except ValidationError as exc:
        raise _schema_error(exc, f"{envelope.type} from {envelope.sender}") from exc


def decode(frames: list[bytes], limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[Envelope, Message]:
    """Validate a whole message ``[envelope, body]``; raise :class:`ProtocolError` on anything unacceptable."""
    if len(frames) != 2:
        raise ProtocolError("malformed", f"a message has 2 frames (envelope, body), got {len(frames)}")
    envelope = decode_envelope(frames[0], limits)
    return envelope, decode_body(envelope, frames[1], limits)
