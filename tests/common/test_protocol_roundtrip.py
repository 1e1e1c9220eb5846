"""encode -> decode gives back every message type unchanged; raw arrays are decoded without copying."""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from tmrl_common.arrays import WireArray
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationComponent, ObservationLayout
from tmrl_common.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    DecodeLimits,
    Heartbeat,
    SampleBatch,
    WeightsUpdate,
    decode,
    decode_body,
    decode_envelope,
    encode,
)
from tmrl_common.weights import tensors_from_bytes

from .wire_samples import SENDER, SENT_AT, assert_same_message, sample_batch, valid_messages, weights_tensors

CASES = valid_messages()
ZERO_COPY = DecodeLimits(zero_copy_min_body_bytes=0)  # every body through the zero-copy reader
BOTH_PATHS = pytest.mark.parametrize("limits", [DecodeLimits(), ZERO_COPY], ids=["default", "zero-copy"])


def test_examples_cover_every_message_type():
    assert {message.type_name for message in CASES.values()} == set(MESSAGE_TYPES)


@BOTH_PATHS
@pytest.mark.parametrize("case", sorted(CASES))
def test_message_survives_encode_then_decode(case, limits):
    sent = CASES[case]
    frames = encode(sent, SENDER, sent_at=SENT_AT)
    assert len(frames) == 2 and all(isinstance(f, bytes) for f in frames)
    envelope, received = decode(frames, limits)
    assert (envelope.v, envelope.type, envelope.sender, envelope.sent_at) == (PROTOCOL_VERSION, sent.type_name, SENDER, SENT_AT)
    assert_same_message(received, sent)


@BOTH_PATHS
@pytest.mark.parametrize("case", sorted(CASES))
def test_decoded_message_encodes_to_the_same_body(case, limits):
    frames = encode(CASES[case], SENDER, sent_at=SENT_AT)
    _, received = decode(frames, limits)
    assert encode(received, SENDER, sent_at=SENT_AT) == frames


def test_envelope_is_a_four_key_map_and_body_holds_the_type_fields():
    frames = encode(CASES["heartbeat"], "relay", sent_at=SENT_AT)
    assert msgpack.unpackb(frames[0]) == {"v": 1, "type": "heartbeat", "sender": "relay", "sent_at": SENT_AT}
    assert msgpack.unpackb(frames[1]) == {"role": "relay", "uptime_s": 12.5, "counters": {"batches_in": 10, "rejects": 0}}


def test_envelope_and_body_decode_separately_like_the_relay_does():
    frames = encode(CASES["sample_ack"], SENDER, sent_at=SENT_AT)
    envelope = decode_envelope(frames[0])
    assert envelope.type == "sample_ack"
    assert_same_message(decode_body(envelope, frames[1]), CASES["sample_ack"])


def test_encode_stamps_the_current_time_when_sent_at_is_not_given():
    import time

    before = time.time()
    envelope, _ = decode(encode(CASES["heartbeat"], SENDER))
    assert before <= envelope.sent_at <= time.time()


def _all_arrays(batch: SampleBatch) -> list[WireArray]:
    return [batch.first, batch.actions, batch.rewards, batch.terminated, batch.truncated, *batch.observations.values()]


@pytest.mark.parametrize("case", ["sample_batch_raw", "sample_batch_raw_images"])
def test_raw_arrays_are_read_only_views_on_the_body_frame(case):
    frames = encode(CASES[case], SENDER, sent_at=SENT_AT)
    _, batch = decode(frames, ZERO_COPY)
    assert isinstance(batch, SampleBatch)
    body = np.frombuffer(frames[1], dtype=np.uint8)
    for wire in _all_arrays(batch):
        assert isinstance(wire.data, memoryview)
        assert np.shares_memory(wire.array, body), f"{wire.dtype}{wire.shape} was copied out of the body"
        assert not wire.array.flags.writeable
        with pytest.raises(ValueError):
            wire.array.flat[0] = 0


def test_bodies_from_one_mebibyte_are_zero_copy_with_the_default_limits():
    big = sample_batch("raw", images=True, steps=300, height=64, width=64)  # 300 x 64 x 64 uint8: 1.2 MB
    frames = encode(big, SENDER)
    assert len(frames[1]) >= DecodeLimits().zero_copy_min_body_bytes == 1024 * 1024
    _, batch = decode(frames)
    body = np.frombuffer(frames[1], dtype=np.uint8)
    assert all(np.shares_memory(wire.array, body) for wire in _all_arrays(batch))
    assert_same_message(batch, big)


def test_small_bodies_are_copied_by_msgpack_and_still_read_only():
    frames = encode(CASES["sample_batch_raw"], SENDER)
    assert len(frames[1]) < DecodeLimits().zero_copy_min_body_bytes
    _, batch = decode(frames)
    for wire in _all_arrays(batch):
        assert not np.shares_memory(wire.array, np.frombuffer(frames[1], dtype=np.uint8))
        assert not wire.array.flags.writeable


def test_raw_arrays_are_read_only_even_when_the_body_frame_is_writable():
    frames = encode(CASES["sample_batch_raw"], SENDER, sent_at=SENT_AT)
    body = bytearray(frames[1])
    envelope = decode_envelope(frames[0])
    batch = decode_body(envelope, body, ZERO_COPY)
    assert np.shares_memory(batch.actions.array, np.frombuffer(body, dtype=np.uint8))
    assert not batch.actions.array.flags.writeable


def test_zlib_arrays_inflate_to_the_sent_values():
    sent = CASES["sample_batch_zlib_images"]
    frames = encode(sent, SENDER, sent_at=SENT_AT)
    _, received = decode(frames)
    image = received.observations["image"]
    assert image.codec == "zlib" and image.dtype == "uint8" and image.array.shape == (5, 8, 8)
    np.testing.assert_array_equal(image.array, sent.observations["image"].array)
    assert not image.array.flags.writeable


def test_zlib_batch_body_is_smaller_than_raw_for_compressible_frames():
    raw = encode(CASES["sample_batch_raw"], SENDER)[1]
    zeros = SampleBatch.model_validate(
        {**{k: getattr(CASES["sample_batch_raw"], k) for k in SampleBatch.model_fields},
         "observations": {"speed": WireArray.from_numpy(np.zeros((5, 1), np.float32), codec="zlib"),
                          "lidar": WireArray.from_numpy(np.zeros((5, 19), np.float32), codec="zlib")}})
    assert len(encode(zeros, SENDER)[1]) < len(raw)


def test_weights_update_carries_safetensors_bytes_with_their_digest():
    sent = CASES["weights_update"]
    _, received = decode(encode(sent, "trainer"))
    assert isinstance(received, WeightsUpdate)
    assert isinstance(received.tensors, bytes)
    assert received.sha256 == hashlib.sha256(received.tensors).hexdigest()
    tensors = tensors_from_bytes(received.tensors)
    expected = weights_tensors()
    assert tensors.keys() == expected.keys()
    for name, array in expected.items():
        assert tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(tensors[name], array)
    assert received.architecture == {"kind": "mlp", "hidden": [256, 256], "obs_dim": 83, "act_dim": 3,
                                     "squash": True, "scale": 1.5}
    assert type(received.architecture["squash"]) is bool and type(received.architecture["scale"]) is float


def test_hello_layout_round_trips_as_a_model():
    _, received = decode(encode(CASES["hello_worker_with_layout"], SENDER))
    assert received.layout is not None
    assert received.layout.observation_shapes() == [(1,), (4, 19), (3,), (3,)]
    assert received.next_seq == 41


def test_heartbeat_counters_keep_integer_values():
    _, received = decode(encode(Heartbeat(role="trainer", uptime_s=3, counters={"steps": 2**40}), "trainer"))
    assert received.counters == {"steps": 2**40} and received.uptime_s == 3.0


# ------------------------------------------------------------------------------------- property-based round trips


COMPONENTS = st.builds(
    ObservationComponent,
    name=st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
    frame_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype=st.sampled_from(["float32", "uint8"]),
    history=st.integers(1, 3),
)
LAYOUTS = st.builds(
    ObservationLayout,
    components=st.lists(COMPONENTS, min_size=1, max_size=3, unique_by=lambda c: c.name),
    action_dim=st.integers(1, 4),
    action_history=st.integers(0, 2),
)


@settings(max_examples=60, deadline=None)
@given(LAYOUTS, st.sampled_from(["raw", "zlib"]), st.lists(st.booleans(), min_size=1, max_size=12), st.integers(0, 2**32))
def test_any_built_batch_round_trips_and_matches_its_layout(layout, codec, resets, seed):
    rng = np.random.default_rng(seed)
    builder = SampleBatchBuilder(layout, codec=codec)

    def observation():
        parts = [rng.uniform(-1e6, 1e6, c.observation_shape) if c.dtype == "float32"
                 else rng.integers(0, 256, c.observation_shape) for c in layout.components]
        return (*parts, *[rng.uniform(-1, 1, layout.action_dim) for _ in range(layout.action_history)])

    builder.add_reset(observation())
    for reset in resets:
        if reset:
            builder.add_reset(observation())
        else:
            builder.add_step(rng.uniform(-1, 1, layout.action_dim), observation(), float(rng.normal()),
                             bool(rng.integers(2)), bool(rng.integers(2)))
    sent = builder.build(seq=int(rng.integers(2**62)), weights_version=int(rng.integers(2**62)))
    for limits in (DecodeLimits(), ZERO_COPY):
        _, received = decode(encode(sent, SENDER), limits)
        assert_same_message(received, sent)
        received.check_layout(layout)
    assert received.steps == len(resets) + 1


def test_zmq_frames_received_without_copy_decode_as_views_on_the_frame():
    envelope_frame, body_frame = (zmq.Frame(f) for f in encode(CASES["sample_batch_raw_images"], SENDER))
    for body in (body_frame, body_frame.buffer):
        batch = decode_body(decode_envelope(envelope_frame.bytes), body, ZERO_COPY)
        image = batch.observations["image"].array
        assert np.shares_memory(image, np.frombuffer(body_frame.buffer, dtype=np.uint8))
        assert not image.flags.writeable
    del body_frame
    np.testing.assert_array_equal(image, CASES["sample_batch_raw_images"].observations["image"].array)  # kept alive
