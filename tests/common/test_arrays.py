"""WireArray: every allowed dtype round-trips bit-exactly; bad shapes, sizes, zlib data and NaN/inf are rejected."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from pydantic import ValidationError
from tmrl_common.arrays import DEFAULT_MAX_ARRAY_BYTES, MAX_NDIM, DecodeBudget, WireArray, WireDtype
from tmrl_common.errors import ProtocolError

ALL_DTYPES = list(WireDtype.__args__)  # type: ignore[attr-defined]


def from_wire(wire: dict, **context) -> WireArray:
    return WireArray.model_validate(wire, context=context or None)


def reject_reason(wire: dict, **context) -> str:
    with pytest.raises(ValidationError) as info:
        from_wire(wire, **context)
    cause = info.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, ProtocolError)
    return cause.reason


@pytest.mark.parametrize("codec", ["raw", "zlib"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_wire_dtype_round_trips_bit_exactly(dtype, codec):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2, size=(3, 4)) if dtype == "bool" else rng.integers(0, 100, size=(3, 4))
    array = values.astype(dtype)
    wire = WireArray.from_numpy(array, codec=codec).to_wire()
    assert wire["dtype"] == dtype and wire["shape"] == [3, 4] and wire["codec"] == codec
    received = from_wire({**wire, "data": bytes(wire["data"])}).array
    assert received.dtype == np.dtype(dtype) and received.shape == (3, 4)
    np.testing.assert_array_equal(received, array)


def test_raw_data_is_little_endian_c_order_bytes():
    array = np.array([[1, 2], [3, 256]], dtype=np.int16)
    assert bytes(WireArray.from_numpy(array).data) == b"\x01\x00\x02\x00\x03\x00\x00\x01"
    assert bytes(WireArray.from_numpy(array.T).data) == b"\x01\x00\x03\x00\x02\x00\x00\x01"  # transposed: copied to C order


def test_big_endian_arrays_are_sent_little_endian():
    array = np.array([1.5, -2.0], dtype=">f4")
    wire = WireArray.from_numpy(array)
    assert bytes(wire.data) == np.array([1.5, -2.0], dtype="<f4").tobytes()
    np.testing.assert_array_equal(from_wire({**wire.to_wire(), "data": bytes(wire.data)}).array, array)


@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (2, 0, 5), (1,) * MAX_NDIM])
def test_scalar_and_empty_shapes_round_trip(shape):
    array = np.full(shape, 2.5, dtype=np.float32)
    wire = WireArray.from_numpy(array)
    assert wire.shape == list(shape)
    received = from_wire({**wire.to_wire(), "data": bytes(wire.data)}).array
    assert received.shape == shape
    np.testing.assert_array_equal(received, array)


def test_from_numpy_refuses_dtypes_without_a_wire_name():
    for array in (np.zeros(2, np.complex64), np.array(["a"]), np.array([object()])):
        with pytest.raises(ProtocolError) as info:
            WireArray.from_numpy(array)
        assert info.value.reason == "schema"


@pytest.mark.parametrize("dtype", ["object", "complex64", "<f4", "float", "str", ""])
def test_unknown_dtype_names_are_schema_errors(dtype):
    with pytest.raises(ValidationError):
        from_wire({"dtype": dtype, "shape": [1], "codec": "raw", "data": b"\0\0\0\0"})


@pytest.mark.parametrize("wire", [
    {"dtype": "uint8", "shape": [1], "codec": "lz4", "data": b"\0"},
    {"dtype": "uint8", "shape": [1], "codec": "raw", "data": "\0"},
    {"dtype": "uint8", "shape": ["1"], "codec": "raw", "data": b"\0"},
    {"dtype": "uint8", "shape": [1.0], "codec": "raw", "data": b"\0"},
    {"dtype": "uint8", "shape": 1, "codec": "raw", "data": b"\0"},
    {"dtype": "uint8", "shape": [1] * (MAX_NDIM + 1), "codec": "raw", "data": b"\0"},
    {"dtype": "uint8", "shape": [1], "codec": "raw", "data": b"\0", "extra": 1},
    {"dtype": "uint8", "shape": [1], "codec": "raw"},
], ids=["codec", "data-str", "shape-str", "shape-float", "shape-int", "ndim", "extra", "missing"])
def test_malformed_array_maps_are_rejected(wire):
    with pytest.raises(ValidationError):
        from_wire(wire)


def test_negative_dimension_is_a_schema_error():
    assert reject_reason({"dtype": "uint8", "shape": [-1], "codec": "raw", "data": b""}) == "schema"


@pytest.mark.parametrize("data", [b"\0" * 5, b"\0" * 7, b""])
def test_raw_byte_count_must_match_the_shape(data):
    assert reject_reason({"dtype": "uint16", "shape": [3], "codec": "raw", "data": data}) == "malformed"


def test_array_larger_than_the_limit_is_oversized_before_any_data_is_read():
    assert reject_reason({"dtype": "float64", "shape": [2**40, 2**40], "codec": "raw", "data": b""}) == "oversized"
    assert reject_reason({"dtype": "uint8", "shape": [1025], "codec": "raw", "data": b"\0" * 1025}, max_array_bytes=1024) == "oversized"
    assert from_wire({"dtype": "uint8", "shape": [1024], "codec": "raw", "data": b"\0" * 1024}, max_array_bytes=1024).array.size == 1024
    assert DEFAULT_MAX_ARRAY_BYTES == 64 * 1024 * 1024


def test_zlib_bomb_with_a_lying_shape_stops_at_the_announced_size():
    bomb = zlib.compress(b"\0" * (50 * 1024 * 1024), 9)  # ~50 KB that inflates to 50 MiB
    assert len(bomb) < 100_000
    assert reject_reason({"dtype": "uint8", "shape": [16], "codec": "zlib", "data": bomb}) == "malformed"


def test_zlib_bomb_with_an_honest_huge_shape_is_oversized():
    bomb = zlib.compress(b"\0" * (8 * 1024 * 1024), 9)
    assert reject_reason({"dtype": "uint8", "shape": [8 * 1024 * 1024], "codec": "zlib", "data": bomb},
                         max_array_bytes=1024 * 1024) == "oversized"


@pytest.mark.parametrize("data,case", [
    (zlib.compress(b"abc") + b"junk", "trailing bytes"),
    (zlib.compress(b"abcdef")[:-3], "truncated stream"),
    (zlib.compress(b"ab"), "too short"),
    (b"not zlib at all", "not zlib"),
    (b"", "empty"),
])
def test_bad_zlib_data_is_malformed(data, case):
    assert reject_reason({"dtype": "uint8", "shape": [3], "codec": "zlib", "data": data}) == "malformed", case


def test_decode_budget_bounds_the_total_of_several_arrays():
    budget = DecodeBudget(100)
    wire = {"dtype": "uint8", "shape": [60], "codec": "raw", "data": b"\0" * 60}
    from_wire(wire, budget=budget)
    assert budget.remaining == 40
    assert reject_reason(wire, budget=budget) == "oversized"


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("codec", ["raw", "zlib"])
def test_non_finite_floats_are_rejected(dtype, bad, codec):
    array = np.array([0.0, bad, 1.0], dtype=dtype)
    wire = WireArray.from_numpy(array, codec=codec)
    assert reject_reason({**wire.to_wire(), "data": bytes(wire.data)}) == "non_finite"


def test_decoded_array_is_a_read_only_view_on_the_given_buffer():
    buffer = bytearray(np.arange(6, dtype="<i4").tobytes())
    received = from_wire({"dtype": "int32", "shape": [2, 3], "codec": "raw", "data": memoryview(buffer)}).array
    assert np.shares_memory(received, np.frombuffer(buffer, np.uint8))
    assert not received.flags.writeable
    np.testing.assert_array_equal(received, [[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("codec", ["raw", "zlib"])
def test_bool_bytes_other_than_zero_and_one_are_malformed(codec):
    data = b"\x00\x01\x02"
    wire = {"dtype": "bool", "shape": [3], "codec": codec, "data": zlib.compress(data) if codec == "zlib" else data}
    assert reject_reason(wire) == "malformed"
