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
from typing import Any, ClassVar, Literal, Union

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tmrl_common.arrays import WireArray
from tmrl_common.errors import ProtocolError, RejectReason
from tmrl_common.layout import ObservationLayout

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

SENDER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
Role = Literal["worker", "trainer", "relay"]


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied before and while decoding. Anything larger is rejected with reason ``oversized``."""

    max_envelope_bytes: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_array_bytes: int = 64 * 1024 * 1024
    max_batch_steps: int = 100_000


DEFAULT_LIMITS = DecodeLimits()


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def _check_sender(value: str) -> str:
    if not SENDER_PATTERN.match(value):
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
    next_seq: int = Field(default=0, ge=0)
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
            if not re.match(r"^[a-z][a-z0-9_]{0,31}$", name):
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
    seqs: list[int] = Field(min_length=1, max_length=65536)

    _worker_ok = field_validator("worker")(classmethod(lambda cls, v: _check_sender(v)))


ArchitectureValue = Union[bool, int, float, str, list[int]]


class WeightsUpdate(Message):
    """Trainer → relay → every worker: a new policy. The relay keeps the latest one for late joiners."""

    type_name: ClassVar[str] = "weights_update"

    version: int = Field(ge=0, lt=2**63)
    architecture: dict[str, ArchitectureValue] = Field(max_length=64)
    """Everything needed to rebuild the network before loading tensors (see :mod:`tmrl_common.networks`)."""
    tensors: bytes
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


def encode(message: Message, sender: str) -> list[bytes]:
    """The two frames ``[envelope, body]`` for ``message`` sent by ``sender``."""
    body = msgpack.packb(_to_wire(message), use_bin_type=True)
    return [encode_envelope(message.type_name, sender), body]


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
    return obj


def _schema_error(exc: ValidationError, what: str) -> ProtocolError:
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ProtocolError):
            return ProtocolError(cause.reason, f"{what}: {cause.detail}")
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    reason: RejectReason = "non_finite" if first["type"] == "finite_number" else "schema"
    return ProtocolError(reason, f"{what} field {where}: {first['msg']} ({exc.error_count()} error(s))")


def decode_envelope(frame: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Envelope:
    """Check the first frame only: version, type name and sender. Cheap enough for every message at the relay."""
    raw = _unpack_map(bytes(frame), limits.max_envelope_bytes, "envelope")
    version = raw.get("v")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
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
    raw = _unpack_map(frame, limits.max_body_bytes, f"{envelope.type} body")
    cls = MESSAGE_TYPES[envelope.type]
    try:
        return cls.model_validate(raw, context={"limits": limits, "max_array_bytes": limits.max_array_bytes})
    except ValidationError as exc:
        raise _schema_error(exc, f"{envelope.type} from {envelope.sender}") from exc


def decode(frames: list[bytes], limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[Envelope, Message]:
    """Validate a whole message ``[envelope, body]``; raise :class:`ProtocolError` on anything unacceptable."""
    if len(frames) != 2:
        raise ProtocolError("malformed", f"a message has 2 frames (envelope, body), got {len(frames)}")
    envelope = decode_envelope(frames[0], limits)
    return envelope, decode_body(envelope, frames[1], limits)
