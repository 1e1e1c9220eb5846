"""Checks the relay runs on every frame before routing it: the envelope, and the head of a ``sample_batch`` body.

:func:`check_envelope` accepts and rejects exactly what :func:`tmrl_common.protocol.decode_envelope` does, with
the same reject reasons (a property test holds the two together), but without building a pydantic model: the
relay checks every message, and the model costs more than forwarding a 64 KiB batch.

:func:`read_batch_head` reads ``seq`` and the number of steps from a ``sample_batch`` body without decoding the
arrays, for the relay's counters and error messages; the trainer validates the whole body.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import msgpack

from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import MESSAGE_TYPES, SENDER_PATTERN, SUPPORTED_VERSIONS, DecodeLimits

_ENVELOPE_KEYS = frozenset({"v", "type", "sender", "sent_at"})
_TYPE_MAX_LENGTH = 32
_sender_match = SENDER_PATTERN.fullmatch


class EnvelopeFields(NamedTuple):
    """The two envelope fields the relay routes on."""

    type: str
    sender: str


def check_envelope(frame: Any, limits: DecodeLimits) -> EnvelopeFields:
    """Validate an envelope frame (bytes or buffer); raise :class:`ProtocolError` like ``decode_envelope`` would."""
    size = len(frame)
    if size > limits.max_envelope_bytes:
        raise ProtocolError("oversized", f"envelope frame is {size} bytes, limit {limits.max_envelope_bytes}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
                              max_str_len=size, max_array_len=size, max_map_len=size)
    except Exception as exc:  # msgpack raises several unrelated exception types on hostile input
        raise ProtocolError("malformed", f"envelope frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if type(raw) is not dict:
        raise ProtocolError("malformed", f"envelope frame must be a msgpack map, got {type(raw).__name__}")
    if not all(type(key) is str for key in raw):
        raise ProtocolError("malformed", "envelope frame: map keys must be msgpack str")
    version = raw.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError("bad_version", f"protocol version {version!r} is not supported (this build speaks {sorted(SUPPORTED_VERSIONS)})")
    type_name, sender, sent_at = raw.get("type"), raw.get("sender"), raw.get("sent_at")
    if type(sent_at) is float and not math.isfinite(sent_at):
        raise ProtocolError("non_finite", "envelope field sent_at: Input should be a finite number")
    if raw.keys() != _ENVELOPE_KEYS:
        missing, extra = sorted(_ENVELOPE_KEYS - raw.keys()), sorted(raw.keys() - _ENVELOPE_KEYS)
        raise ProtocolError("schema", f"envelope fields: missing {missing}, unexpected {extra}")
    if type(type_name) is not str or len(type_name) > _TYPE_MAX_LENGTH:
        raise ProtocolError("schema", f"envelope field type must be a string of at most {_TYPE_MAX_LENGTH} characters")
    if type(sender) is not str or not _sender_match(sender):
        raise ProtocolError("schema", f"envelope field sender: {sender!r} must match {SENDER_PATTERN.pattern}")
    if type(sent_at) not in (float, int) or sent_at < 0:
        raise ProtocolError("schema", f"envelope field sent_at must be a number >= 0, got {sent_at!r}")
    if type_name not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"message type {type_name!r} is not one of {sorted(MESSAGE_TYPES)}")
    return EnvelopeFields(type_name, sender)


class BatchHead(NamedTuple):
    """``seq`` and step count of a ``sample_batch``, read from the head of its body."""

    seq: int
    steps: int


_HEAD_BYTES = 512  # a canonically encoded body (tmrl_common.protocol.encode) has seq and first.shape well within this


def read_batch_head(body: Any) -> BatchHead:
    """``seq`` and ``len(first)`` of a ``sample_batch`` body, skipping every array's bytes.

    Raises :class:`ProtocolError` (``malformed``) if the body is not a map with an integer ``seq`` and a
    one-dimensional ``first`` array. Reads only the first bytes when the fields come first, as ``encode`` writes them.
    """
    view = memoryview(body)
    head = _walk_batch_head(view[:_HEAD_BYTES], complete=len(view) <= _HEAD_BYTES)
    if head is None:  # fields not in the first bytes: walk the whole body
        head = _walk_batch_head(view, complete=True)
    if head is None:  # pragma: no cover - a complete walk always decides
        raise ProtocolError("malformed", "sample_batch body: seq/first not found")
    return head


def _walk_batch_head(data: memoryview, complete: bool) -> BatchHead | None:
    unpacker = msgpack.Unpacker(None, raw=False, strict_map_key=True, max_ext_len=0, max_buffer_size=max(len(data), 1),
                                max_str_len=len(data), max_array_len=len(data), max_map_len=len(data))
    unpacker.feed(data)
    seq: int | None = None
    steps: int | None = None
    try:
        entries = unpacker.read_map_header()
        for _ in range(entries):
            key = unpacker.unpack()
            if key == "seq":
                seq = unpacker.unpack()
                if type(seq) is not int or not 0 <= seq < 2**63:
                    raise ProtocolError("malformed", f"sample_batch body: seq must be an integer in [0, 2**63), got {seq!r}")
            elif key == "first":
                steps, unread = _first_steps(unpacker)
                if seq is None:  # keep walking: skip the rest of first (its data) to reach seq
                    for _ in range(2 * unread):
                        unpacker.skip()
            else:
                unpacker.skip()
            if seq is not None and steps is not None:
                return BatchHead(seq, steps)
    except msgpack.OutOfData:
        if complete:
            raise ProtocolError("malformed", "sample_batch body: msgpack data ends early") from None
        return None
    except ProtocolError:
        raise
    except Exception as exc:  # hostile input: wrong header kinds, limits exceeded...
        raise ProtocolError("malformed", f"sample_batch body is not a msgpack map: {type(exc).__name__}: {exc}") from exc
    if complete:
        raise ProtocolError("malformed", "sample_batch body has no seq or no first field")
    return None


def _first_steps(unpacker: msgpack.Unpacker) -> tuple[int, int]:
    """Steps from ``first.shape``, and how many entries of the ``first`` map are left unread after it."""
    entries = unpacker.read_map_header()
    for index in range(entries):
        key = unpacker.unpack()
        if key == "shape":
            shape = unpacker.unpack()
            if type(shape) is not list or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 1:
                raise ProtocolError("malformed", f"sample_batch body: first.shape must be [steps >= 1], got {shape!r}")
            return shape[0], entries - index - 1
        unpacker.skip()
    raise ProtocolError("malformed", "sample_batch body: first has no shape")
