"""NumPy arrays on the wire without pickle.

An array travels as a msgpack map ``{"dtype": str, "shape": [int], "codec": "raw"|"zlib", "data": bin}``.
``data`` holds the C-order, little-endian bytes of the array (zlib-compressed when ``codec == "zlib"``).
Decoded arrays are read-only. For large bodies (``DecodeLimits.zero_copy_min_body_bytes``, 1 MiB by default)
:func:`tmrl_common.protocol.decode` hands ``data`` over as a read-only ``memoryview`` of the received body frame and
the NumPy array of a ``raw`` array is a view on it: no copy at all.

Validation happens when the model is built from wire data (see :meth:`WireArray.model_validate`): the dtype
must be on the allow-list, the byte count must match ``shape``, the decoded size must stay under the limit in
the validation context (``max_array_bytes`` per array and, when the context carries a :class:`DecodeBudget`,
a total over the whole message), zlib data must end exactly where the announced shape does, bool bytes must be
0 or 1, and float arrays must be finite.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from tmrl_common.errors import ProtocolError

WireDtype = Literal[
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"
]
Codec = Literal["raw", "zlib"]

#: Default bound on one decoded array when the caller gives no limit (64 MiB).
DEFAULT_MAX_ARRAY_BYTES = 64 * 1024 * 1024
MAX_NDIM = 8


class DecodeBudget:
    """Decoded bytes left for the arrays of one message, shared through the validation context (key ``budget``).

    Bounds what a small body can make the decoder allocate: each zlib array may inflate up to ``max_array_bytes``,
    but all arrays of one message together stay under ``remaining``.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.remaining = total_bytes

    def spend(self, nbytes: int, what: str) -> None:
        if nbytes > self.remaining:
            raise ProtocolError(
                "oversized", f"{what} would bring the message's decoded arrays past {self.total_bytes} bytes"
            )
        self.remaining -= nbytes


def _numpy_dtype(name: str) -> np.dtype:
    dtype = np.dtype(name)
    return dtype if dtype.itemsize == 1 else dtype.newbyteorder("<")


class WireArray(BaseModel):
    """A validated NumPy array in its wire form. Use :meth:`from_numpy` to build one and :attr:`array` to read it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, arbitrary_types_allowed=True)

    dtype: WireDtype
    shape: list[int] = Field(max_length=MAX_NDIM)
    codec: Codec = "raw"
    data: bytes | memoryview
    """The encoded bytes; a read-only ``memoryview`` into the body frame when decoded, so no copy is made."""

    _array: np.ndarray | None = PrivateAttr(default=None)
    _range: tuple[float, float] | None = PrivateAttr(default=None)

    @classmethod
    def from_numpy(cls, array: np.ndarray, codec: Codec = "raw", level: int = 1) -> WireArray:
        """Wrap ``array`` for sending. ``codec="zlib"`` trades CPU for bytes on slow links."""
        array = np.asarray(array)
        if array.dtype.name not in WireDtype.__args__:  # type: ignore[attr-defined]
            raise ProtocolError("schema", f"dtype {array.dtype} cannot be sent; allowed: {WireDtype.__args__}")  # type: ignore[attr-defined]
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # np.ascontiguousarray would turn a 0-d array into shape (1,)
        raw = memoryview(array.reshape(-1).view(np.uint8))  # flat byte view: works for 0-d and empty arrays
        data = zlib.compress(raw, level) if codec == "zlib" else raw
        wire = cls.model_construct(dtype=array.dtype.name, shape=list(array.shape), codec=codec, data=data)
        wire._array = array
        return wire

    @property
    def array(self) -> np.ndarray:
        """The decoded array (read-only when it came off the wire)."""
        # read through __pydantic_private__: pydantic's own lookup of a private attribute took about 5 us here,
        # 100x the dict lookup, and the trainer reads every array of every batch (benchmarks/ingest_checks.py)
        private = self.__pydantic_private__
        array = private["_array"]
        if array is None:  # built with model_construct from wire data; decode without limits
            array, private["_range"] = _decode(self.dtype, self.shape, self.codec, self.data, DEFAULT_MAX_ARRAY_BYTES)
            private["_array"] = array
        return array

    def value_range(self) -> tuple[float, float]:
        """Smallest and largest value (of a non-empty array). For float arrays off the wire it comes free: decoding
        computes it while checking that every value is finite."""
        private = self.__pydantic_private__
        extremes = private["_range"]
        if extremes is None:
            array = self.array
            extremes = private["_range"] = (float(array.min()), float(array.max()))
        return extremes

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready map (``data`` may be a memoryview: msgpack packs it without an extra copy)."""
        return {"dtype": self.dtype, "shape": self.shape, "codec": self.codec, "data": self.data}

    @model_validator(mode="after")
    def _decode_and_check(self, info: ValidationInfo) -> WireArray:
        context = info.context or {}
        limit = int(context.get("max_array_bytes", DEFAULT_MAX_ARRAY_BYTES))
        private = self.__pydantic_private__
        private["_array"], private["_range"] = _decode(self.dtype, self.shape, self.codec, self.data, limit,
                                                       context.get("budget"))
        return self


def _decode(
    dtype_name: str, shape: list[int], codec: str, data: bytes | memoryview, limit: int, budget: DecodeBudget | None = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The array, and for a non-empty float array its (min, max), both finite (else ``non_finite``)."""
    if any(d < 0 for d in shape):
        raise ProtocolError("schema", f"negative dimension in shape {shape}")
    dtype = _numpy_dtype(dtype_name)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise ProtocolError("oversized", f"array of shape {shape} and dtype {dtype_name} is {nbytes} bytes, limit {limit}")
    if budget is not None:
        if nbytes > budget.remaining:  # (no message formatting on the accept path: this runs for every array)
            budget.spend(nbytes, f"array of shape {shape} and dtype {dtype_name} ({nbytes} bytes)")
        budget.remaining -= nbytes
    if codec == "zlib":
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data, nbytes + 1)  # bounded: a zip bomb stops at nbytes + 1
        except zlib.error as exc:
            raise ProtocolError("malformed", f"zlib data does not decompress: {exc}") from exc
        if inflater.unconsumed_tail or (inflater.eof is False and len(raw) > nbytes):
            raise ProtocolError("malformed", f"zlib data inflates past the {nbytes} bytes its shape announces")
        if not inflater.eof:
            raise ProtocolError("malformed", "zlib stream is truncated (no end-of-stream marker)")
        if inflater.unused_data:
            raise ProtocolError("malformed", f"{len(inflater.unused_data)} bytes follow the end of the zlib stream")
    else:
        raw = data
    if len(raw) != nbytes:
        raise ProtocolError("malformed", f"array data has {len(raw)} bytes, shape {shape} of {dtype_name} needs {nbytes}")
    if dtype.kind == "b" and not _only_zeros_and_ones(raw):
        raise ProtocolError("malformed", f"bool array of shape {shape} holds bytes other than 0 and 1")
    if type(raw) is memoryview and not raw.readonly:
        raw = raw.toreadonly()  # the array is a view on the received frame: never written to
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)  # read-only: bytes and read-only views give read-only arrays
    if dtype.kind != "f" or not array.size:
        return array, None
    extremes = float(array.min()), float(array.max())  # NaN propagates, inf is an extreme: one check for both
    if not (math.isfinite(extremes[0]) and math.isfinite(extremes[1])):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ProtocolError("non_finite", f"float array of shape {shape} holds {bad} NaN/inf values")
    return array, extremes


def _only_zeros_and_ones(raw: bytes | memoryview) -> bool:
    if len(raw) <= 4096:  # the usual per-row flags: a bytes scan is ~20x cheaper than a NumPy reduction here
        return not bytes(raw).translate(None, b"\x00\x01")
    return int(np.frombuffer(raw, dtype=np.uint8).max()) <= 1
