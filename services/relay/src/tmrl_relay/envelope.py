"""Checks the relay runs on every frame before routing it: the envelope, and the head of a ``sample_batch`` body.

:func:`check_envelope` accepts and rejects exactly what :func:`tmrl_common.protocol.decode_envelope` does, with
the same reject reasons (a property test holds the two together), but without building a pydantic model: the
relay checks every message, and the model costs more than forwarding a 64 KiB batch.

:func:`read_batch_head` reads ``seq`` and the number of steps from a ``sample_batch`` body without decoding the
arrays, for the relay's counters and error messages; the trainer validates the whole body. :func:`read_batch_seq`
finds the ``seq`` of a body that is broken, so that the relay's ``error`` about it names the batch.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import msgpack
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import (
    DEFAULT_LIMITS,
    MAX_MAP_ENTRIES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SENDER_PATTERN,
    SUPPORTED_VERSIONS,
    DecodeLimits,
    DuplicateKeyError,
    batch_seq_of,
    dict_refusing_duplicate_keys,
)

_ENVELOPE_KEYS = frozenset({"v", "type", "sender", "sent_at"})
_TYPE_MAX_LENGTH = 32
_sender_match = SENDER_PATTERN.fullmatch


class EnvelopeFields(NamedTuple):
    """The two envelope fields the relay routes on."""

    type: str
    sender: str


_FLOAT64 = 0xCB
_CACHE_LIMIT = 4096
_double = struct.Struct(">d")


class EnvelopeChecker:
    """:func:`check_envelope` with a cache of canonical envelope prefixes already accepted.

    ``encode_envelope`` packs ``{"v", "type", "sender", "sent_at"}`` in that order, ``sent_at`` last as a msgpack
    float64 (``0xcb`` and 8 bytes), so one peer's envelopes differ only in those 8 bytes. When a frame passed the
    full check and is byte for byte that canonical encoding, its prefix (everything before ``0xcb``) is remembered;
    a later frame made of a remembered prefix, ``0xcb`` and 8 bytes decodes to the same fields with a new
    ``sent_at``, so only that float is checked (finite, >= 0). Same verdicts as the full check, less work.
    Other frames always get the full check. At most 4096 prefixes are kept (emptied when full).
    """

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self._accepted: dict[bytes, EnvelopeFields] = {}

    def __call__(self, frame: Any) -> EnvelopeFields:
        size = len(frame)
        if not 9 < size <= self.limits.max_envelope_bytes or frame[size - 9] != _FLOAT64:
            return check_envelope(frame, self.limits)
        prefix = bytes(frame[: size - 9])
        fields = self._accepted.get(prefix)
        if fields is not None:
            sent_at = _double.unpack_from(frame, size - 8)[0]
            if sent_at >= 0 and math.isfinite(sent_at):
                return fields
        fields = check_envelope(frame, self.limits)
        if prefix == _canonical_prefix(fields):
            if len(self._accepted) >= _CACHE_LIMIT:
                self._accepted.clear()
            self._accepted[prefix] = fields
        return fields


def _canonical_prefix(fields: EnvelopeFields) -> bytes:
    """The bytes ``encode_envelope`` writes before the ``sent_at`` float64 for these fields."""
    packed = msgpack.packb({"v": PROTOCOL_VERSION, "type": fields.type, "sender": fields.sender, "sent_at": 0.0},
                           use_bin_type=True)
    return packed[:-9]


def check_envelope(frame: Any, limits: DecodeLimits) -> EnvelopeFields:
    """Validate an envelope frame (bytes or buffer); raise :class:`ProtocolError` like ``decode_envelope`` would."""
    size = len(frame)
    if size > limits.max_envelope_bytes:
        raise ProtocolError("oversized", f"envelope frame is {size} bytes, limit {limits.max_envelope_bytes}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
                              max_str_len=size, max_array_len=size, max_map_len=min(size, MAX_MAP_ENTRIES),
                              object_pairs_hook=dict_refusing_duplicate_keys)
    except DuplicateKeyError as exc:
        raise ProtocolError(exc.reason, f"envelope frame: {exc.detail}") from exc
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


def sent_at_of(frame: Any) -> float:
    """The ``sent_at`` of an envelope frame that :func:`check_envelope` accepted (decoded whole: the error path
    reads it, never the routing path)."""
    return float(msgpack.unpackb(frame, raw=False)["sent_at"])


class BatchHead(NamedTuple):
    """``seq`` and step count of a ``sample_batch``, read from the head of its body."""

    seq: int
    steps: int
    """``N`` of ``first.shape == [N]``; 0 when ``first`` is missing, is not an array map, or its shape is not
    ``[N]`` with ``1 <= N <= max_steps``. The relay forwards such a batch: the trainer refuses it (``schema``) in a
    ``sample_ack`` naming its ``seq``, which the worker takes as final (``docs/protocol.md`` §5.3.1)."""


_HEAD_BYTES = 512  # a canonically encoded body (tmrl_common.protocol.encode) has seq and first.shape well within this


def read_batch_head(body: Any, max_steps: int = DEFAULT_LIMITS.max_batch_steps) -> BatchHead:
    """``seq`` and the number of steps of a ``sample_batch`` body, skipping every array's bytes.

    Raises :class:`ProtocolError`: ``malformed`` when the body is not a msgpack map, or its bytes stop being msgpack
    before ``seq`` and ``first`` are read; ``schema`` when the map has no ``seq`` or one that is not an int63. Any
    other field is the trainer's to judge (a bad ``first`` gives ``steps == 0``, see :class:`BatchHead`). Reads only
    the first bytes when the fields come first, as ``encode`` writes them. Of a key given twice the first counts: a
    body with two ``seq`` is counted under the first, which the trainer's refusal (``malformed``) names too.
    """
    view = memoryview(body)
    head = _canonical_batch_head(bytes(view[:_CANONICAL_HEAD_BYTES]), max_steps)
    if head is not None:
        return head
    size = len(view)
    head = _walk_batch_head(view[:_HEAD_BYTES], size, max_steps, complete=size <= _HEAD_BYTES)
    if head is None:  # fields not in the first bytes: walk the whole body
        head = _walk_batch_head(view, size, max_steps, complete=True)
    if head is None:  # pragma: no cover - a complete walk always decides
        raise ProtocolError("malformed", "sample_batch body: seq/first not found")
    return head


def read_batch_seq(body: Any) -> int | None:
    """The ``seq`` of a ``sample_batch`` body however broken the rest of it is, so that an ``error`` about the batch
    can name it (``ref_seq``); None when the body holds no int63 ``seq`` before its first problem.

    The trainer's own reading, :func:`tmrl_common.protocol.batch_seq_of`, first on the body's first bytes (where
    ``encode`` writes ``seq``): a seq found there is the one the whole body gives, and only a body that does not
    answer there is read whole.
    """
    view = memoryview(body)
    if len(view) > _HEAD_BYTES:
        seq = batch_seq_of(view[:_HEAD_BYTES])
        if seq is not None:
            return seq
    return batch_seq_of(view)


def _unpacker(size: int) -> msgpack.Unpacker:
    """A C unpacker for a body of ``size`` bytes (fed whole or in part) with the caps of ``docs/protocol.md`` §2, those
    of the trainer's decoder: no ext types; str up to 1 MiB, arrays up to 1 Mi elements, maps up to 64 entries."""
    return msgpack.Unpacker(None, raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
                            max_buffer_size=max(size, 1), max_str_len=min(size, 1 << 20),
                            max_array_len=min(size, 1 << 20), max_map_len=min(size, MAX_MAP_ENTRIES))


def _is_int63(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


_CANONICAL_HEAD_BYTES = 96
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _uint(data: bytes, position: int) -> tuple[int, int]:
    """A msgpack unsigned integer at ``position``: (value, next position); (-1, -1) if it is not one."""
    if position >= len(data):  # a truncated head: not canonical, the general walk decides
        return -1, -1
    kind = data[position]
    if kind < 0x80:
        return kind, position + 1
    width = _UINT_WIDTH.get(kind)
    if width is None or position + 1 + width > len(data):
        return -1, -1
    return int.from_bytes(data[position + 1:position + 1 + width], "big"), position + 1 + width


def _canonical_batch_head(data: bytes, max_steps: int) -> BatchHead | None:
    """Fast path for bodies laid out as ``encode`` writes them: ``{seq, weights_version, first: {dtype: "bool",
    shape: [steps], ...}, ...}``. Returns None for anything else (the general walk then decides)."""
    if len(data) < 40 or not 0x83 <= data[0] <= 0x8F or not data.startswith(b"\xa3seq", 1):
        return None
    seq, position = _uint(data, 5)
    if position < 0 or seq >= 2**63 or not data.startswith(b"\xafweights_version", position):
        return None
    _, position = _uint(data, position + 16)
    if position < 0 or not data.startswith(b"\xa5first", position):
        return None
    position += 6
    if position >= len(data) or not 0x82 <= data[position] <= 0x8F:  # first: a map of at least dtype and shape
        return None
    position += 1
    if not data.startswith(b"\xa5dtype\xa4bool\xa5shape\x91", position):
        return None
    steps, position = _uint(data, position + 18)
    if position < 0 or not 1 <= steps <= max_steps:
        return None
    return BatchHead(seq, steps)


def _walk_batch_head(data: memoryview, size: int, max_steps: int, complete: bool) -> BatchHead | None:
    """The general reader, for fields in any order: walks the top-level map of the body (``data``: all ``size``
    bytes of it, or its first bytes when not ``complete``), skipping what it does not need. None when the first
    bytes end before it can decide."""
    if len(data) and not _is_map(data[0]):
        raise ProtocolError("malformed", f"sample_batch body must be a msgpack map, it starts with {_msgpack_kind(data[0])}")
    unpacker = _unpacker(size)
    unpacker.feed(data)
    seq: int | None = None
    steps: int | None = None
    try:
        for _ in range(_map_entries(unpacker)):
            key = unpacker.unpack()
            if key == "seq" and seq is None:  # a repeated key is skipped: the first one counts, as in batch_seq_of
                seq = _checked_seq(unpacker.unpack())
            elif key == "first" and steps is None:
                steps, unread = _first_steps(unpacker, data, max_steps)
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
    except Exception as exc:  # hostile input: bytes that are not msgpack, ext types, limits exceeded...
        raise ProtocolError("malformed", f"sample_batch body is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if seq is None:  # the whole map was read
        raise ProtocolError("schema", "sample_batch body has no seq field")
    return BatchHead(seq, 0)  # no first field: the trainer refuses the batch, naming seq


def _map_entries(unpacker: msgpack.Unpacker) -> int:
    """The entries of the map whose header is next; more than any schema takes is ``malformed``, as the trainer's
    decoder says (``read_map_header`` does not apply the unpacker's ``max_map_len``)."""
    entries = unpacker.read_map_header()
    if entries > MAX_MAP_ENTRIES:
        raise ProtocolError("malformed", f"sample_batch body is not valid msgpack: a map of {entries} entries, limit "
                                         f"{MAX_MAP_ENTRIES}")
    return entries


def _checked_seq(value: Any) -> int:
    if not _is_int63(value):
        raise ProtocolError("schema", f"sample_batch field seq must be an integer in [0, 2**63), got {type(value).__name__} "
                                      f"{repr(value)[:40]}")
    return value


def _first_steps(unpacker: msgpack.Unpacker, data: memoryview, max_steps: int) -> tuple[int, int]:
    """Steps from ``first.shape`` (0 unless ``first`` is a map whose shape is ``[N]``, ``1 <= N <= max_steps``), and
    how many entries of the ``first`` map are left unread after it."""
    if not _is_map(_next_byte(unpacker, data)):
        unpacker.skip()
        return 0, 0
    entries = _map_entries(unpacker)
    for index in range(entries):
        key = unpacker.unpack()
        if key == "shape":  # the first one counts, should the key be repeated
            if not _is_array(_next_byte(unpacker, data)):
                unpacker.skip()
                return 0, entries - index - 1
            shape = unpacker.unpack()
            valid = len(shape) == 1 and type(shape[0]) is int and 1 <= shape[0] <= max_steps
            return (shape[0] if valid else 0), entries - index - 1
        unpacker.skip()
    return 0, 0


def _next_byte(unpacker: msgpack.Unpacker, data: memoryview) -> int:
    """The first byte of the value the unpacker reads next (``data`` is what it was fed, from its start)."""
    position = unpacker.tell()
    if position >= len(data):
        raise msgpack.OutOfData
    return data[position]


def _is_map(first_byte: int) -> bool:
    return 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF)


def _is_array(first_byte: int) -> bool:
    return 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD)


def _msgpack_kind(first_byte: int) -> str:
    """What a msgpack value starting with this byte is, for error messages."""
    if first_byte <= 0x7F or first_byte >= 0xE0 or 0xCC <= first_byte <= 0xD3:
        return "an integer"
    if _is_array(first_byte):
        return "an array"
    if 0xA0 <= first_byte <= 0xBF or 0xD9 <= first_byte <= 0xDB:
        return "a str"
    if 0xC4 <= first_byte <= 0xC6:
        return "a bin"
    kinds = {0xC0: "nil", 0xC1: "byte 0xc1 (never used by msgpack)", 0xC2: "a boolean", 0xC3: "a boolean",
             0xCA: "a float", 0xCB: "a float"}
    return kinds.get(first_byte, "an ext type")
