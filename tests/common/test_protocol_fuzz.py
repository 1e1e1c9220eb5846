"""Fuzzing the decoder: whatever arrives, decode() either returns a valid message or raises ProtocolError.

Any other exception (TypeError, KeyError, RecursionError, MemoryError, a msgpack or zlib error leaking out...)
would crash a service loop that only catches ProtocolError, so it fails these tests. Every input goes through both
body decoders (msgpack's C unpacker and the zero-copy reader), which must reach the same verdict.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tmrl_common.arrays import WireArray
from tmrl_common.errors import ProtocolError, RejectReason
from tmrl_common.protocol import MESSAGE_TYPES, DecodeLimits, SampleBatch, _ZeroCopyReader, decode, encode

from .wire_samples import SENDER, SENT_AT, Pairs, pack_tree, valid_messages

REASONS = set(RejectReason.__args__)  # type: ignore[attr-defined]
VALID_FRAMES = {case: encode(message, SENDER, sent_at=SENT_AT) for case, message in valid_messages().items()}
CASES = sorted(VALID_FRAMES)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_STRUCTURED = settings(FUZZ, max_examples=80)  # generating nested msgpack values is the slow part


MSGPACK_PATH = DecodeLimits(zero_copy_min_body_bytes=2**62)
ZERO_COPY_PATH = DecodeLimits(zero_copy_min_body_bytes=0)


def _outcome(frames: list[bytes], limits: DecodeLimits) -> tuple[str, list[bytes] | None]:
    try:
        envelope, message = decode(frames, limits)
    except ProtocolError as exc:
        assert exc.reason in REASONS, exc
        return exc.reason, None
    assert isinstance(message, MESSAGE_TYPES[envelope.type])
    if isinstance(message, SampleBatch):
        for array in (message.first, message.actions, message.rewards, *message.observations.values()):
            assert array.array.shape[0] == message.steps
    reencoded = encode(message, envelope.sender, envelope.sent_at)
    again_envelope, again = decode(reencoded)  # a valid message re-encodes to a valid message
    assert again_envelope == envelope and type(again) is type(message)
    return "ok", reencoded


def decode_or_reject(frames: list[bytes]) -> str:
    """``"ok"`` when ``frames`` decode to a valid message, else the reject reason. Anything else fails the test.

    Both body decoders (msgpack's C unpacker and the zero-copy reader) run on every input and must agree: same
    reject reason, or the same message.
    """
    by_msgpack = _outcome(frames, MSGPACK_PATH)
    by_zero_copy = _outcome(frames, ZERO_COPY_PATH)
    assert by_msgpack == by_zero_copy, f"msgpack path: {by_msgpack[0]}, zero-copy path: {by_zero_copy[0]}"
    return by_msgpack[0]


# ------------------------------------------------------------------------------------------- byte-level mutations

INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6,
                     0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One random byte-level change: bit flips, truncation, splice, insertion, deletion or a type-byte overwrite."""
    data = bytearray(frame)
    op = rng.randrange(7)
    if op == 0 and data:  # flip 1..8 bits
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del data[rng.randrange(len(data) + 1):]
    elif op == 2:  # splice: our prefix, another valid frame's suffix
        other = VALID_FRAMES[rng.choice(CASES)][rng.randrange(2)]
        data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]
    elif op == 3:  # insert random bytes
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif op == 4 and data:  # delete a range
        at = rng.randrange(len(data))
        del data[at: at + rng.randint(1, 16)]
    elif op == 5 and data:  # overwrite with msgpack type bytes
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.choice(INTERESTING_BYTES)
    elif data:  # overwrite a run with random bytes
        at = rng.randrange(len(data))
        data[at: at + 4] = rng.randbytes(4)
    return bytes(data)


def mutated_message(rng: random.Random) -> list[bytes]:
    envelope, body = VALID_FRAMES[rng.choice(CASES)]
    roll = rng.random()
    if roll < 0.15:
        envelope = mutate(envelope, rng)
    elif roll < 0.25:  # a valid envelope of another type in front of this body
        envelope = VALID_FRAMES[rng.choice(CASES)][0]
    elif roll < 0.95:
        body = mutate(body, rng)
        if rng.random() < 0.3:
            body = mutate(body, rng)
    else:
        envelope, body = mutate(envelope, rng), mutate(body, rng)
    frames = [envelope, body]
    if rng.random() < 0.02:  # wrong frame counts
        frames = frames[: rng.randrange(2)] if rng.random() < 0.5 else [*frames, rng.randbytes(3)]
    return frames


SEEDED_FUZZ_INPUTS = 20_000  # each one decoded by both body decoders


def test_twenty_thousand_mutated_messages_only_ever_decode_or_raise_protocol_error():
    rng = random.Random(20241125)
    outcomes: Counter[str] = Counter()
    started = time.perf_counter()
    for _ in range(SEEDED_FUZZ_INPUTS):
        outcomes[decode_or_reject(mutated_message(rng))] += 1
    elapsed = time.perf_counter() - started
    assert sum(outcomes.values()) == SEEDED_FUZZ_INPUTS
    # the mutations reach deep into the decoder: some survive, and rejects come from several different checks
    assert outcomes["ok"] > 100, outcomes
    assert {"malformed", "schema", "unknown_type", "bad_version"} <= set(outcomes), outcomes
    print(f"{SEEDED_FUZZ_INPUTS} mutated messages in {elapsed:.2f} s: {dict(outcomes)}")


def test_every_valid_example_still_decodes():
    for frames in VALID_FRAMES.values():
        assert decode_or_reject(frames) == "ok"


# ------------------------------------------------------------------------------------------- hypothesis strategies


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=3))
def test_random_bytes_never_escape_protocol_error(frames):
    assert decode_or_reject(frames) != "ok" or len(frames) == 2


@FUZZ
@given(st.sampled_from(CASES), st.binary(max_size=300))
def test_random_body_after_a_valid_envelope_never_escapes_protocol_error(case, body):
    decode_or_reject([VALID_FRAMES[case][0], body])


@FUZZ
@given(st.sampled_from(CASES), st.randoms(use_true_random=False), st.integers(1, 4))
def test_repeatedly_mutated_frames_never_escape_protocol_error(case, rng, rounds):
    envelope, body = VALID_FRAMES[case]
    for _ in range(rounds):
        body = mutate(body, rng)
    decode_or_reject([envelope, body])
    decode_or_reject([mutate(envelope, rng), VALID_FRAMES[case][1]])


FIELD_NAMES = sorted({name for cls in MESSAGE_TYPES.values() for name in cls.model_fields}
                     | set(WireArray.model_fields) | {"v", "type", "sender", "sent_at", "speed", "lidar", "image"})
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=24)
           | st.binary(max_size=48) | st.sampled_from(["float32", "uint8", "bool", "raw", "zlib", "worker", "heartbeat"]))
MSGPACK_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
                              max_leaves=12)


@FUZZ_STRUCTURED
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.dictionaries(KEYS, MSGPACK_VALUES, max_size=8))
def test_arbitrary_msgpack_maps_as_bodies_never_escape_protocol_error(type_name, body):
    envelope = msgpack.packb({"v": 1, "type": type_name, "sender": SENDER, "sent_at": SENT_AT})
    decode_or_reject([envelope, msgpack.packb(body)])


@FUZZ_STRUCTURED
@given(st.dictionaries(KEYS, MSGPACK_VALUES, max_size=6))
def test_arbitrary_msgpack_maps_as_envelopes_never_escape_protocol_error(envelope):
    decode_or_reject([msgpack.packb(envelope), VALID_FRAMES["heartbeat"][1]])


def _set_path(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, child in node.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield (*prefix, index)
            yield from _paths(child, (*prefix, index))


@FUZZ_STRUCTURED
@given(st.sampled_from(CASES), st.data())
def test_one_field_of_a_valid_body_replaced_by_anything_never_escapes_protocol_error(case, data):
    envelope, body = VALID_FRAMES[case]
    tree = msgpack.unpackb(body)
    paths = list(_paths(tree))
    path = data.draw(st.sampled_from(paths))
    _set_path(tree, path, data.draw(MSGPACK_VALUES))
    decode_or_reject([envelope, msgpack.packb(tree)])


def _map_paths(node, prefix=()):
    """The path of every non-empty map in ``node``: ``()`` for ``node`` itself."""
    if isinstance(node, dict):
        if node:
            yield prefix
        for key, child in node.items():
            yield from _map_paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _map_paths(child, (*prefix, index))


@FUZZ_STRUCTURED
@given(st.sampled_from(CASES), st.integers(0, 1), st.data())
def test_a_key_repeated_in_any_map_of_a_valid_message_is_malformed_on_both_paths(case, frame_index, data):
    """docs/protocol.md §2: a key twice in one map is ``malformed``, at any depth, whether the repeat holds the same
    value or another one, before or after the first."""
    frames = list(VALID_FRAMES[case])
    tree = msgpack.unpackb(frames[frame_index])
    path = data.draw(st.sampled_from(list(_map_paths(tree))))
    node = tree
    for key in path:
        node = node[key]
    entries = Pairs(node.items())
    key, value = entries[data.draw(st.integers(0, len(entries) - 1))]
    repeat = value if data.draw(st.booleans()) else data.draw(MSGPACK_VALUES)
    entries.insert(data.draw(st.integers(0, len(entries))), (key, repeat))
    if path:
        _set_path(tree, path, entries)
    frames[frame_index] = pack_tree(tree if path else entries)
    too_large = frame_index == 0 and len(frames[0]) > DecodeLimits().max_envelope_bytes
    assert decode_or_reject(frames) == ("oversized" if too_large else "malformed")


def _nested(depth: int, innermost):
    return innermost if depth == 0 else {"a": _nested(depth - 1, innermost)}


REPEATED_KEY_IN_A_MAP_THE_READER_HANDS_TO_MSGPACK = {  # _ZeroCopyReader walks maps of <= 64 entries, lists of <= 16
    "map_with_more_entries": ("heartbeat", {"role": "worker", "uptime_s": 1.0,
                                            "counters": Pairs([(f"c{i}", i) for i in range(70)] + [("c3", 3)])}),
    "map_nested_deeper": ("heartbeat", {"role": "worker", "uptime_s": 1.0,
                                        "counters": _nested(8, Pairs([("c", 1), ("c", 2)]))}),
    "map_in_a_longer_list": ("sample_ack", {"worker": "worker-1", "seqs": [*range(20), Pairs([("s", 1), ("s", 1)])]}),
    "repeat_inside_the_larger_map": ("heartbeat", {"role": "worker", "uptime_s": 1.0, "counters": Pairs(
        [(f"c{i}", _nested(2, Pairs([("x", 0), ("x", 0)])) if i == 40 else i) for i in range(70)])}),
}


@pytest.mark.parametrize("case", sorted(REPEATED_KEY_IN_A_MAP_THE_READER_HANDS_TO_MSGPACK))
def test_a_key_repeated_in_a_map_left_to_msgpacks_unpacker_is_malformed_on_both_paths(case, monkeypatch):
    type_name, body = REPEATED_KEY_IN_A_MAP_THE_READER_HANDS_TO_MSGPACK[case]
    handed_to_msgpack = []
    read_with_msgpack = _ZeroCopyReader._read_with_msgpack
    monkeypatch.setattr(_ZeroCopyReader, "_read_with_msgpack",
                        lambda reader, start: handed_to_msgpack.append(start) or read_with_msgpack(reader, start))
    envelope = msgpack.packb({"v": 1, "type": type_name, "sender": SENDER, "sent_at": SENT_AT})
    assert decode_or_reject([envelope, pack_tree(body)]) == "malformed"
    assert handed_to_msgpack, "the zero-copy reader walked this map itself: the case does not test what it says"


@pytest.mark.parametrize("depth", [10, 200, 5000])
def test_deeply_nested_bodies_are_rejected_not_crashing(depth):
    nested = b"\x81\xa1a" * depth + b"\x01"
    assert decode_or_reject([VALID_FRAMES["heartbeat"][0], nested]) in ("schema", "malformed")
    nested_lists = b"\x91" * depth + b"\x01"
    assert decode_or_reject([VALID_FRAMES["heartbeat"][0], b"\x81\xa8counters" + nested_lists]) in ("schema", "malformed")
