"""The relay's fast envelope check agrees with tmrl_common.protocol.decode_envelope; batch heads are read right."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tmrl_common.errors import ProtocolError
from tmrl_common.protocol import (
    DEFAULT_LIMITS,
    DecodeLimits,
    batch_seq_of,
    decode,
    decode_envelope,
    encode,
    encode_envelope,
)
from tmrl_relay.envelope import EnvelopeChecker, check_envelope, read_batch_head, read_batch_seq

from .relay_harness import batch_body_with, make_batch


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


def _packed_pairs(pairs) -> bytes:
    """A msgpack map of exactly these ``(key, value)`` entries, in order: a key may come twice."""
    return msgpack.Packer(use_bin_type=True).pack_map_pairs(pairs)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(keys, st.one_of(values, st.sampled_from(["hello", "worker-1", 1, 1.5]))), max_size=7))
def test_check_envelope_agrees_with_decode_envelope_on_maps_with_repeated_keys(pairs):
    """docs/protocol.md §2: a key twice in the envelope is ``malformed`` for both, never the last (or first) value."""
    frame = _packed_pairs(pairs)
    outcome = _outcome(check_envelope, frame)
    assert outcome == _outcome(lambda f, limits: decode_envelope(f, limits), frame)
    if len({key for key, _ in pairs}) < len(pairs) and len(frame) <= DEFAULT_LIMITS.max_envelope_bytes:
        assert outcome == ("reject", "malformed")


CANONICAL_ENVELOPE = [("v", 1), ("type", "sample_batch"), ("sender", "worker-1"), ("sent_at", 1.0)]
ENVELOPES_WITH_A_KEY_TWICE = {
    "same_value_again": [*CANONICAL_ENVELOPE, ("sender", "worker-1")],
    "other_sender_last": [*CANONICAL_ENVELOPE[:3], ("sender", "worker-2"), ("sent_at", 1.0)],
    "version_twice_before_the_rest": [("v", 1), *CANONICAL_ENVELOPE],
    "sent_at_twice_last": [*CANONICAL_ENVELOPE, ("sent_at", 2.0)],  # ends like a canonical one: 0xcb and 8 bytes
}


@pytest.mark.parametrize("case", sorted(ENVELOPES_WITH_A_KEY_TWICE))
def test_an_envelope_with_a_key_twice_is_malformed_for_every_envelope_check(case):
    frame = _packed_pairs(ENVELOPES_WITH_A_KEY_TWICE[case])
    checker = EnvelopeChecker(DEFAULT_LIMITS)
    checker(encode_envelope("sample_batch", "worker-1"))  # the canonical prefix of this sender is cached
    for check in (check_envelope, lambda f, limits: decode_envelope(f, limits), lambda f, limits: checker(f)):
        with pytest.raises(ProtocolError) as info:
            check(frame, DEFAULT_LIMITS)
        assert info.value.reason == "malformed"
        assert "duplicate key" in info.value.detail


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
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("seq"), msgpack.packb({"seq": 1, "first": {"shape": [1]}})[:-2],
    msgpack.packb({"seq": 1, "first": {"shape": [1]}})[:1],
])
def test_batch_bodies_that_are_not_msgpack_maps_are_malformed(body):
    with pytest.raises(ProtocolError) as info:
        read_batch_head(body)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("huge", ["top", "nested"])
def test_a_batch_holding_a_map_of_more_than_64_entries_is_malformed_at_the_relay_as_at_the_trainer(huge):
    """The trainer's decoder refuses any map larger than a schema takes (a hostile-peer probe's 60,000-entry maps
    cost it seconds): the relay reads a batch head with the same cap, so it refuses the body too, not forwards it."""
    many = {f"k{i}": 1 for i in range(60_000)}
    body = msgpack.packb({"seq": 3, **many} if huge == "top" else {"seq": 3, "first": many})
    with pytest.raises(ProtocolError) as at_relay:
        read_batch_head(body)
    with pytest.raises(ProtocolError) as at_trainer:
        decode([encode_envelope("sample_batch", "worker-1"), body])
    assert at_relay.value.reason == at_trainer.value.reason == "malformed"
    assert read_batch_seq(body) == batch_seq_of(body) == 3  # the refusal can still name the batch


def test_the_malformed_message_says_what_the_body_is_instead_of_a_map():
    with pytest.raises(ProtocolError, match="must be a msgpack map, it starts with an array"):
        read_batch_head(msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="byte 0xc1"):
        read_batch_head(b"\xc1" * 8)


@pytest.mark.parametrize("seq", [None, "1", 5.0, -1, 2**63, True])
def test_a_missing_or_invalid_seq_is_a_schema_error(seq):
    """docs/protocol.md §2, §9: a field missing, of the wrong type or out of range is ``schema``."""
    with pytest.raises(ProtocolError) as info:
        read_batch_head(batch_body_with(seq=seq))
    assert info.value.reason == "schema"
    assert "seq" in str(info.value)


@pytest.mark.parametrize("first", [
    None,  # missing
    "nope",
    [5],
    {"dtype": "bool", "codec": "raw", "data": b"\x00"},  # no shape
    {"dtype": "bool", "shape": [5, 1], "codec": "raw", "data": b"\x00" * 5},
    {"dtype": "bool", "shape": [0], "codec": "raw", "data": b""},
    {"dtype": "bool", "shape": ["5"], "codec": "raw", "data": b"\x00" * 5},
    {"dtype": "bool", "shape": [100_001], "codec": "raw", "data": b"\x00" * 100_001},
])
def test_a_batch_with_a_wrong_first_is_read_with_its_seq_and_zero_steps(first):
    """The trainer judges every field but seq: the relay forwards the batch, and the trainer refuses it with
    ``schema`` in an answer naming its seq (what tmrl_common.protocol.decode and batch_seq_of give it)."""
    body = batch_body_with(seq=77, first=first)
    assert read_batch_head(body) == (77, 0)
    with pytest.raises(ProtocolError) as info:
        decode([encode_envelope("sample_batch", "worker-1"), body])
    assert info.value.reason == "schema"
    assert batch_seq_of(body) == 77


def _batch_with_seq_twice(case: str) -> bytes:
    """The body of :func:`make_batch` ``(5)``, 20 steps, holding ``seq`` a second time (9, or not an int)."""
    entries = list(msgpack.unpackb(encode(make_batch(5, steps=20), "worker-1")[1]).items())
    if case == "second_after_the_arrays":  # the head reads as a canonical one
        entries.append(("seq", 9))
    elif case == "second_right_after_the_first":
        entries.insert(1, ("seq", 9))
    elif case == "second_not_an_int":
        entries.insert(1, ("seq", "nine"))
    else:  # both after the observations, beyond the first bytes the relay reads, and before first
        entries = [entries[3], entries[0], ("seq", 9), *entries[1:3], *entries[4:]]
    return _packed_pairs(entries)


@pytest.mark.parametrize("case", ["second_after_the_arrays", "second_right_after_the_first", "second_not_an_int",
                                  "both_after_the_observations"])
def test_a_batch_with_seq_twice_is_malformed_for_the_trainer_and_named_by_its_first_seq_everywhere(case):
    """docs/protocol.md §2: the relay counts and forwards the batch under its first seq; the trainer refuses it
    (``malformed``, on both of its body decoders) and names that same seq in its answer (batch_seq_of)."""
    body = _batch_with_seq_twice(case)
    frames = [encode_envelope("sample_batch", "worker-1"), body]
    for limits in (DEFAULT_LIMITS, DecodeLimits(zero_copy_min_body_bytes=0)):
        with pytest.raises(ProtocolError) as info:
            decode(frames, limits)
        assert info.value.reason == "malformed"
        assert "duplicate key 'seq'" in info.value.detail
    assert read_batch_head(body) == (5, 20)
    assert read_batch_seq(body) == 5 == batch_seq_of(body)


def test_a_batch_head_takes_its_steps_from_the_first_of_a_repeated_first_or_shape():
    first = {"dtype": "bool", "shape": [20], "codec": "raw", "data": bytes(20)}
    assert read_batch_head(_packed_pairs([("first", {**first, "shape": [3]}), ("first", first), ("seq", 5)])) == (5, 3)
    shape_twice = _packed_pairs([("dtype", "bool"), ("shape", "20"), ("shape", [20]), ("codec", "raw"), ("data", bytes(20))])
    body = b"\x82" + msgpack.packb("first") + shape_twice + msgpack.packb("seq") + msgpack.packb(5)
    assert read_batch_head(body) == (5, 0)


def test_a_batch_head_counts_up_to_max_steps_rows():
    assert read_batch_head(batch_body_with(seq=3), max_steps=4) == (3, 4)
    assert read_batch_head(batch_body_with(seq=3), max_steps=3) == (3, 0)


@pytest.mark.parametrize("body", [
    msgpack.packb({"seq": 9, "first": {"shape": [1]}})[:-3],  # truncated
    msgpack.packb({"seq": 9, "weights_version": 0}),  # fields missing
    b"\x83\xa3seq\x09\xafweights_version\xc1\xc1",  # not msgpack after seq
    b"\x82\xa3seq\x09\xa5first" + msgpack.packb(msgpack.ExtType(1, b"x")),
    msgpack.packb({"observations": {"x": b"\x00" * 2000}, "seq": 9, "first": "nope"}),  # seq after the first bytes
])
def test_read_batch_seq_finds_the_seq_of_a_broken_body(body):
    assert read_batch_seq(body) == 9 == batch_seq_of(body)


@pytest.mark.parametrize("body", [
    b"", b"\xc1", msgpack.packb([9]), msgpack.packb({"seq": -9}), msgpack.packb({"seq": 9.0}),
    msgpack.packb({"first": b"x", "seq": True}), msgpack.packb({"observations": b"\xc1" * 600})[:-1],
    msgpack.packb({f"k{i}": 0 for i in range(9)} | {"seq": 9}),  # beyond the fields a sample_batch has
])
def test_read_batch_seq_is_none_without_an_int63_seq_before_the_first_problem(body):
    assert read_batch_seq(body) is None
    assert batch_seq_of(body) is None


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 255), st.integers(0, 3000), st.booleans())
def test_read_batch_seq_agrees_with_batch_seq_of_on_mutated_bodies(position, byte, cut, reorder):
    body = msgpack.unpackb(encode(make_batch(31, steps=40), "worker-1")[1])
    if reorder:  # seq after the arrays, beyond the first bytes
        body = {"observations": body.pop("observations"), **body}
    frame = bytearray(msgpack.packb(body, use_bin_type=True))
    frame[position % len(frame)] = byte
    del frame[len(frame) - cut % len(frame):]
    assert read_batch_seq(bytes(frame)) == batch_seq_of(bytes(frame))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_read_batch_seq_agrees_with_batch_seq_of_on_random_bytes(body):
    assert read_batch_seq(body) == batch_seq_of(body)


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
    fast = _canonical_batch_head(bytes(frame[:96]), 100_000)
    if fast is not None:  # whenever the fast path answers, the general walk gives the same answer
        assert _walk_batch_head(memoryview(bytes(frame)), len(frame), 100_000, complete=True) == fast
    assert _canonical_batch_head(body[:96], 100_000) == (seq, steps)


def test_batch_head_of_a_truncated_canonical_body_is_a_protocol_error_not_an_index_error():
    body = encode(make_batch(7), "worker-1")[1]
    for length in range(len(body)):  # every cut, including inside the fast path's fixed-offset fields
        try:
            head = read_batch_head(body[:length])
        except ProtocolError as exc:
            assert exc.reason == "malformed"
        else:
            assert head.seq == 7
