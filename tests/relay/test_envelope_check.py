"""The relay's fast envelope check agrees with tmrl_common.protocol.decode_envelope; batch heads are read right."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import DEFAULT_LIMITS, decode_envelope, encode, encode_envelope
from tmrl_relay.envelope import check_envelope, read_batch_head

from .relay_harness import make_batch


def _outcome(function, frame):
    try:
        result = function(frame, DEFAULT_LIMITS)
    except ProtocolError as exc:
        return ("reject", exc.reason)
    return ("ok", result.type, result.sender)


values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.binary(max_size=8), st.lists(st.integers(-100, 100), max_size=2),
    st.sampled_from(["sample_batch", "hello", "heartbeat", "worker-1", "relay", "bad id", "x" * 33]),
)
keys = st.sampled_from(["v", "type", "sender", "sent_at", "extra"])
envelopes = st.one_of(
    st.fixed_dictionaries({"v": st.one_of(st.just(1), values), "type": st.one_of(st.sampled_from(["hello", "sample_batch", "nope"]), values),
                           "sender": st.one_of(st.sampled_from(["worker-1", "a" * 64, "a" * 65, "-x"]), values),
                           "sent_at": st.one_of(st.floats(min_value=-1, max_value=2e9), values)}),
    st.dictionaries(keys, values, max_size=6),
)


@settings(max_examples=1000, deadline=None)
@given(envelopes)
def test_check_envelope_agrees_with_decode_envelope_on_maps(envelope):
    frame = msgpack.packb(envelope, use_bin_type=True)
    assert _outcome(check_envelope, frame) == _outcome(lambda f, limits: decode_envelope(f, limits), frame)


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=1200))
def test_check_envelope_agrees_with_decode_envelope_on_raw_bytes(frame):
    assert _outcome(check_envelope, frame) == _outcome(lambda f, limits: decode_envelope(f, limits), frame)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 60), st.integers(0, 255))
def test_check_envelope_agrees_on_mutated_valid_envelopes(position, byte):
    frame = bytearray(encode_envelope("sample_batch", "worker-1"))
    frame[position % len(frame)] = byte
    assert _outcome(check_envelope, bytes(frame)) == _outcome(lambda f, limits: decode_envelope(f, limits), bytes(frame))


def test_check_envelope_accepts_a_memoryview_of_the_frame():
    frame = encode_envelope("hello", "worker-7")
    assert check_envelope(memoryview(frame), DEFAULT_LIMITS) == ("hello", "worker-7")


@pytest.mark.parametrize("steps", [1, 5, 3000])
def test_batch_head_of_a_canonical_body(steps):
    batch = make_batch(12345, steps=steps)
    head = read_batch_head(encode(batch, "worker-1")[1])
    assert (head.seq, head.steps) == (12345, batch.steps)


def test_batch_head_when_fields_come_after_the_arrays():
    batch = make_batch(9, steps=300)
    body = msgpack.unpackb(encode(batch, "w")[1])
    reordered = {"observations": body["observations"], "first": dict(reversed(list(body["first"].items()))),
                 "actions": body["actions"], "seq": 9}
    head = read_batch_head(msgpack.packb(reordered, use_bin_type=True))
    assert (head.seq, head.steps) == (9, 300)


@pytest.mark.parametrize("body", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"seq": 1}), msgpack.packb({"first": {"shape": [2]}}),
    msgpack.packb({"seq": "1", "first": {"shape": [2]}}), msgpack.packb({"seq": 1, "first": {"shape": [0]}}),
    msgpack.packb({"seq": 1, "first": {"shape": [2, 2]}}), msgpack.packb({"seq": 1, "first": [2]}),
    msgpack.packb({"seq": 2**63, "first": {"shape": [1]}}), msgpack.packb({"seq": 1, "first": {"dtype": "bool"}}),
    msgpack.packb({"seq": 1, "first": {"shape": [1]}})[:-2],
])
def test_malformed_batch_heads_are_rejected(body):
    with pytest.raises(ProtocolError) as info:
        read_batch_head(body)
    assert info.value.reason == "malformed"


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_batch_head_never_raises_anything_but_protocol_error(body):
    try:
        read_batch_head(body)
    except ProtocolError:
        pass


def _checker_outcome(checker, frame):
    try:
        result = checker(frame)
    except ProtocolError as exc:
        return ("reject", exc.reason)
    return ("ok", result.type, result.sender)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["hello", "sample_batch", "heartbeat"]), st.sampled_from(["worker-1", "w2"]),
                          st.integers(0, 60), st.integers(0, 255), st.booleans()), min_size=1, max_size=8))
def test_cached_envelope_checker_agrees_with_decode_envelope(mutations):
    """Canonical envelopes seen before take the cached path; any byte changed must still get the full verdict."""
    from tmrl_relay.envelope import EnvelopeChecker

    checker = EnvelopeChecker(DEFAULT_LIMITS)
    for type_name, sender, position, byte, mutate in mutations:
        frame = bytearray(encode_envelope(type_name, sender))
        checker(bytes(frame))  # warm the cache with the unmutated envelope
        if mutate:
            frame[position % len(frame)] = byte
        expected = _outcome(lambda f, limits: decode_envelope(f, limits), bytes(frame))
        assert _checker_outcome(checker, bytes(frame)) == expected
        assert _checker_outcome(checker, memoryview(bytes(frame))) == expected


def test_cached_envelope_checker_still_rejects_bad_timestamps_of_a_known_prefix():
    import struct

    from tmrl_relay.envelope import EnvelopeChecker

    checker = EnvelopeChecker(DEFAULT_LIMITS)
    good = encode_envelope("sample_batch", "worker-1")
    assert checker(good) == ("sample_batch", "worker-1")
    for bad in (float("nan"), float("inf"), -1.0):
        frame = good[:-8] + struct.pack(">d", bad)
        with pytest.raises(ProtocolError) as info:
            checker(frame)
        assert info.value.reason == _outcome(lambda f, limits: decode_envelope(f, limits), frame)[1]


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 95), st.integers(0, 255), st.integers(1, 70000), st.integers(0, 2**63 - 1))
def test_fast_batch_head_agrees_with_the_general_walk(position, byte, steps, seq):
    from tmrl_relay.envelope import _canonical_batch_head, _walk_batch_head

    body = msgpack.packb({"seq": seq, "weights_version": 3, "first": {"dtype": "bool", "shape": [steps], "codec": "raw",
                                                                      "data": b"\x00" * 4}, "actions": 1}, use_bin_type=True)
    frame = bytearray(body)
    frame[position % len(frame)] = byte
    fast = _canonical_batch_head(bytes(frame[:96]))
    if fast is not None:  # whenever the fast path answers, the general walk gives the same answer
        assert _walk_batch_head(memoryview(bytes(frame)), complete=True) == fast
    assert _canonical_batch_head(body[:96]) == (seq, steps)


def test_batch_head_of_a_truncated_canonical_body_is_a_protocol_error_not_an_index_error():
    body = encode(make_batch(7), "worker-1")[1]
    for length in range(len(body)):  # every cut, including inside the fast path's fixed-offset fields
        try:
            head = read_batch_head(body[:length])
        except ProtocolError as exc:
            assert exc.reason == "malformed"
        else:
            assert head.seq == 7
