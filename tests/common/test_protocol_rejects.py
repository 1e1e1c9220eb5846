"""decode() rejects every kind of bad input with a ProtocolError whose ``reason`` names the cause."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zlib

import msgpack
import numpy as np
import pytest
from tmrl_common.arrays import WireArray
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationComponent, ObservationLayout, tm20_lidar_layout, tm20_lidar_progress_layout
from tmrl_common.protocol import (
    DecodeLimits,
    Heartbeat,
    SampleAck,
    SampleBatch,
    WeightsUpdate,
    decode,
    encode,
    encode_envelope,
)
from tmrl_common.weights import tensors_from_bytes, tensors_to_bytes

from .wire_samples import SENDER, SENT_AT, Pairs, pack_tree, sample_batch, valid_messages, weights_update

pack = msgpack.packb


def envelope_map(type_name: str = "heartbeat", **changes) -> dict:
    return {"v": 1, "type": type_name, "sender": SENDER, "sent_at": SENT_AT, **changes}


def body_map(case: str) -> dict:
    """The msgpack map a valid message of ``case`` is sent as (arrays as plain dicts with bytes data)."""
    return msgpack.unpackb(encode(valid_messages()[case], SENDER)[1])


def reason_of(frames, limits: DecodeLimits | None = None) -> str:
    """The reject reason; the msgpack path and the zero-copy path of the body decoder must agree on it."""
    limits = limits or DecodeLimits()
    reasons = []
    for path_limits in (limits, dataclasses.replace(limits, zero_copy_min_body_bytes=0)):
        with pytest.raises(ProtocolError) as info:
            decode(frames, path_limits)
        assert info.value.detail and str(info.value).startswith(f"[{info.value.reason}]")
        reasons.append(info.value.reason)
    assert reasons[0] == reasons[1], f"msgpack path says {reasons[0]}, zero-copy path says {reasons[1]}"
    return reasons[0]


def body_reason(type_name: str, body: dict, limits: DecodeLimits | None = None) -> str:
    return reason_of([pack(envelope_map(type_name)), pack(body)], limits)


HEARTBEAT_BODY = {"role": "worker", "uptime_s": 1.0, "counters": {}}


# ------------------------------------------------------------------------------------------------- sizes


def test_envelope_over_its_limit_is_oversized():
    big = pack(envelope_map(padding="x" * 2000))
    assert reason_of([big, pack(HEARTBEAT_BODY)]) == "oversized"
    assert reason_of([pack(envelope_map()), pack(HEARTBEAT_BODY)], DecodeLimits(max_envelope_bytes=10)) == "oversized"


def test_body_over_its_limit_is_oversized():
    frames = encode(sample_batch(), SENDER)
    assert reason_of(frames, DecodeLimits(max_body_bytes=len(frames[1]) - 1)) == "oversized"
    decode(frames, DecodeLimits(max_body_bytes=len(frames[1])))


def test_array_over_its_limit_is_oversized():
    frames = encode(sample_batch(steps=20), SENDER)  # lidar: 20 x 19 float32 = 1520 bytes
    assert reason_of(frames, DecodeLimits(max_array_bytes=1519)) == "oversized"
    decode(frames, DecodeLimits(max_array_bytes=1520))


def test_zlib_bomb_in_a_batch_with_a_lying_shape_is_malformed():
    body = body_map("sample_batch_raw")
    body["observations"]["lidar"] = {"dtype": "float32", "shape": [5, 19], "codec": "zlib",
                                     "data": zlib.compress(b"\0" * (32 * 1024 * 1024), 9)}
    assert len(pack(body)) < 100_000
    assert body_reason("sample_batch", body) == "malformed"


def test_zlib_arrays_that_inflate_past_the_message_total_are_oversized():
    steps = 64
    body = body_map("sample_batch_raw")
    frames = np.zeros((steps, 16 * 1024), dtype=np.uint8)  # 1 MiB each once inflated, ~1 KB on the wire
    zipped = WireArray.from_numpy(frames, codec="zlib", level=9).to_wire()
    body = {**body, "first": {**body["first"], "shape": [steps], "data": bytes(steps)},
            "actions": {**body["actions"], "shape": [steps, 3], "data": bytes(steps * 12)},
            "rewards": {**body["rewards"], "shape": [steps], "data": bytes(steps * 4)},
            "terminated": {**body["terminated"], "shape": [steps], "data": bytes(steps)},
            "truncated": {**body["truncated"], "shape": [steps], "data": bytes(steps)},
            "observations": {f"c{i}": zipped for i in range(8)}}
    assert len(pack(body)) < 20_000
    assert body_reason("sample_batch", body, DecodeLimits(max_decoded_bytes=3 * 1024 * 1024)) == "oversized"
    body["observations"] = {"c0": zipped, "c1": zipped}
    decode([pack(envelope_map("sample_batch")), pack(body)], DecodeLimits(max_decoded_bytes=3 * 1024 * 1024))


def test_more_steps_than_allowed_is_a_schema_error():
    frames = encode(sample_batch(steps=6), SENDER)
    assert reason_of(frames, DecodeLimits(max_batch_steps=5)) == "schema"
    decode(frames, DecodeLimits(max_batch_steps=6))


# ------------------------------------------------------------------------------------------------- envelope


@pytest.mark.parametrize("version", [0, 2, -1, 2**64 - 1, "1", True, False, 1.0, None, b"\x01", [1]])
def test_unsupported_protocol_versions_are_bad_version(version):
    assert reason_of([pack(envelope_map(v=version)), pack(HEARTBEAT_BODY)]) == "bad_version"


def test_envelope_without_a_version_is_bad_version():
    env = envelope_map()
    del env["v"]
    assert reason_of([pack(env), pack(HEARTBEAT_BODY)]) == "bad_version"


@pytest.mark.parametrize("type_name", ["sample", "Heartbeat", "", "heartbeat ", "hello\x00"])
def test_unknown_message_types_are_unknown_type(type_name):
    assert reason_of([pack(envelope_map(type_name)), pack(HEARTBEAT_BODY)]) == "unknown_type"


def test_type_name_longer_than_32_characters_is_a_schema_error():
    assert reason_of([pack(envelope_map("x" * 33)), pack(HEARTBEAT_BODY)]) == "schema"


@pytest.mark.parametrize("frames", [[], [b"\x80"], [b"\x80", b"\x80", b"\x80"], [pack(envelope_map())]],
                         ids=["none", "one-empty-map", "three", "envelope-only"])
def test_wrong_frame_count_is_malformed(frames):
    assert reason_of(frames) == "malformed"


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x84\xa1v", b"\xdf\xff\xff\xff\xff", pack(envelope_map()) + b"\x00"],
                         ids=["empty", "never-used-byte", "truncated", "huge-map-header", "trailing-byte"])
def test_envelope_that_is_not_msgpack_is_malformed(frame):
    assert reason_of([frame, pack(HEARTBEAT_BODY)]) == "malformed"


@pytest.mark.parametrize("frame", [b"", b"\xc1", pack(HEARTBEAT_BODY)[:-3], pack(HEARTBEAT_BODY) + b"\xc0",
                                   b"\x83\xa4role\xc6\xff\xff\xff\xff", b"\xd4\x01\x00"],
                         ids=["empty", "never-used-byte", "truncated", "trailing-byte", "bin-past-end", "ext"])
def test_body_that_is_not_msgpack_is_malformed(frame):
    assert reason_of([pack(envelope_map()), frame]) == "malformed"


@pytest.mark.parametrize("value", [[1, 2], 7, "heartbeat", None, b"\x80"], ids=["array", "int", "str", "nil", "bin"])
def test_msgpack_that_is_not_a_map_is_malformed(value):
    assert reason_of([pack(value), pack(HEARTBEAT_BODY)]) == "malformed"
    assert reason_of([pack(envelope_map()), pack(value)]) == "malformed"


@pytest.mark.parametrize("key", [1, b"role", 1.5], ids=["int", "bin", "float"])
def test_map_keys_that_are_not_strings_are_malformed(key):
    assert reason_of([pack(envelope_map()), pack({key: "worker", "uptime_s": 1.0})]) == "malformed"
    env = envelope_map()
    env[key] = 1
    assert reason_of([pack(env), pack(HEARTBEAT_BODY)]) == "malformed"


@pytest.mark.parametrize("where", ["envelope", "body", "observations", "array_map"])
def test_a_key_twice_in_one_map_is_malformed_in_the_same_words_on_both_paths(where):
    """§2: msgpack alone keeps a repeated key's last value, a reader stopping at the first key its first one: any
    frame holding a key twice in one map is refused instead, even when both values are the same."""
    envelope, body = Pairs(envelope_map("sample_batch").items()), body_map("sample_batch_raw")
    if where == "envelope":
        key, envelope = "sender", Pairs([*envelope, ("sender", "worker-2")])
    elif where == "body":
        key, body = "seq", Pairs([("seq", body["seq"]), *body.items()])
    elif where == "observations":
        key, body["observations"] = "lidar", Pairs([*body["observations"].items(), ("lidar", body["observations"]["lidar"])])
    else:
        key, body["rewards"] = "dtype", Pairs([("dtype", "float32"), *body["rewards"].items()])
    frames = [pack_tree(envelope), pack_tree(body)]
    assert reason_of(frames) == "malformed"
    details = set()
    for limits in (DecodeLimits(), DecodeLimits(zero_copy_min_body_bytes=0)):
        with pytest.raises(ProtocolError) as info:
            decode(frames, limits)
        details.add(info.value.detail)
    frame = "envelope frame" if where == "envelope" else "sample_batch body frame"
    assert details == {f"{frame}: duplicate key {key!r} in one map"}


@pytest.mark.parametrize("field", ["type", "sender", "sent_at"])
def test_envelope_missing_a_field_is_a_schema_error(field):
    env = envelope_map()
    del env[field]
    assert reason_of([pack(env), pack(HEARTBEAT_BODY)]) == "schema"


def test_envelope_with_an_extra_field_is_a_schema_error():
    assert reason_of([pack(envelope_map(route="x")), pack(HEARTBEAT_BODY)]) == "schema"


@pytest.mark.parametrize("field,value", [("type", 3), ("type", b"heartbeat"), ("sender", 5), ("sent_at", "now"),
                                         ("sent_at", -1.0), ("sent_at", True), ("sender", None)])
def test_envelope_fields_of_the_wrong_type_or_range_are_schema_errors(field, value):
    assert reason_of([pack(envelope_map(**{field: value})), pack(HEARTBEAT_BODY)]) == "schema"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sent_at_is_non_finite(value):
    assert reason_of([pack(envelope_map(sent_at=value)), pack(HEARTBEAT_BODY)]) == "non_finite"


BAD_SENDERS = ["", "-worker", ".hidden", "worker 1", "worker-1\n", "wörker", "a" * 65, "worker/1", "w\x00"]


@pytest.mark.parametrize("sender", BAD_SENDERS)
def test_bad_sender_ids_are_schema_errors(sender):
    assert reason_of([pack(envelope_map(sender=sender)), pack(HEARTBEAT_BODY)]) == "schema"
    assert body_reason("sample_ack", {"worker": sender, "seqs": [1]}) == "schema"
    with pytest.raises(ValueError):
        encode_envelope("heartbeat", sender)


@pytest.mark.parametrize("sender", ["w", "worker-1", "trainer", "relay.a:1_b", "9" * 64])
def test_good_sender_ids_are_accepted(sender):
    envelope, _ = decode([encode_envelope("heartbeat", sender, SENT_AT), pack(HEARTBEAT_BODY)])
    assert envelope.sender == sender


# ------------------------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("case", sorted(valid_messages()))
def test_body_missing_a_required_field_is_a_schema_error(case):
    message = valid_messages()[case]
    body = body_map(case)
    required = [name for name, field in type(message).model_fields.items() if field.is_required()]
    for name in required:
        partial = {k: v for k, v in body.items() if k != name}
        assert body_reason(message.type_name, partial) == "schema", name


@pytest.mark.parametrize("case", sorted(valid_messages()))
def test_body_with_an_extra_field_is_a_schema_error(case):
    message = valid_messages()[case]
    assert body_reason(message.type_name, {**body_map(case), "unexpected": 1}) == "schema"


@pytest.mark.parametrize("type_name,field,value", [
    ("heartbeat", "uptime_s", "1.5"),
    ("heartbeat", "role", "player"),
    ("heartbeat", "counters", {"a": "1"}),
    ("heartbeat", "counters", {"a": 1.5}),
    ("heartbeat", "counters", [1]),
    ("sample_batch", "seq", "7"),
    ("sample_batch", "seq", 7.0),
    ("sample_batch", "seq", True),
    ("sample_batch", "seq", -1),
    ("sample_batch", "seq", 2**63),
    ("sample_batch", "weights_version", "3"),
    ("sample_batch", "actions", b"\x00" * 60),
    ("sample_batch", "observations", {}),
    ("sample_ack", "seqs", ["1"]),
    ("sample_ack", "seqs", [-1]),
    ("sample_ack", "seqs", []),
    ("sample_ack", "seqs", 1),
    ("hello", "role", "admin"),
    ("hello", "next_seq", "0"),
    ("hello", "next_seq", -5),
    ("hello", "software", "x" * 65),
    ("hello", "layout", {"components": [], "action_dim": 3}),
    ("hello", "layout", "tm20"),
    ("weights_update", "version", "12"),
    ("weights_update", "tensors", "not bytes"),
    ("weights_update", "sha256", "ABC"),
    ("weights_update", "architecture", {"nested": {"a": 1}}),
    ("weights_update", "architecture", {"hidden": [1.5]}),
    ("error", "ref_seq", "7"),
    ("error", "ref_seq", -1),
    ("error", "message", "m" * 1025),
    ("error", "reason", 3),
])
def test_body_fields_of_the_wrong_type_or_range_are_schema_errors(type_name, field, value):
    case = {"heartbeat": "heartbeat", "sample_batch": "sample_batch_raw", "sample_ack": "sample_ack",
            "hello": "hello_worker_with_layout", "weights_update": "weights_update", "error": "error"}[type_name]
    body = body_map(case)
    body[field] = value
    if type_name == "weights_update" and field != "sha256" and isinstance(body.get("tensors"), bytes):
        body["sha256"] = hashlib.sha256(body["tensors"]).hexdigest()
    assert body_reason(type_name, body) == "schema"


MANY = 60_000


@pytest.mark.parametrize("type_name,field,value", [
    ("hello", None, {f"k{i}": None for i in range(MANY)}),  # the whole body one huge map
    ("hello", "layout", {"components": [{f"k{i}": 1 for i in range(5_000)} for _ in range(10)], "action_dim": 3}),
    ("heartbeat", "counters", {f"c{i}": "x" for i in range(MANY)}),
    ("sample_batch", "observations", {f"o{i}": 1 for i in range(MANY)}),
    ("weights_update", "architecture", {f"k{i}": 1 for i in range(65)}),
])
def test_a_map_larger_than_any_schema_takes_is_refused_before_its_entries_are_checked(type_name, field, value):
    """A hostile-peer probe: hellos and heartbeats of 50,000-65,000 wrong map entries (0.3-0.5 MB, under the control
    frame cap) made one validation error per entry and held the relay's loop 0.4-3 s each; 100 of them stalled it for
    180 s. No schema takes a map of more than 64 entries, so the unpackers refuse one, on both decoding paths."""
    case = {"hello": "hello_worker_with_layout", "heartbeat": "heartbeat", "sample_batch": "sample_batch_raw",
            "weights_update": "weights_update"}[type_name]
    body = value if field is None else {**body_map(case), field: value}
    assert body_reason(type_name, body) == "malformed"
    for zero_copy_min in (DecodeLimits().zero_copy_min_body_bytes, 0):
        with pytest.raises(ProtocolError, match=r"exceeds max_map_len\(64\)"):
            decode([pack(envelope_map(type_name)), pack(body)], DecodeLimits(zero_copy_min_body_bytes=zero_copy_min))


@pytest.mark.parametrize("type_name,field,value", [
    ("sample_ack", "seqs", ["a"] * 65_536),
    ("weights_update", "architecture", {"hidden": ["x"] * MANY}),
    ("weights_update", "architecture", {f"k{i}": ["x"] * 1_000 for i in range(64)}),
])
def test_a_long_list_of_wrong_entries_stops_at_the_first(type_name, field, value):
    """65,536 string seqs made as many errors (0.3-2.2 s); a list in ``architecture`` too, through each of the
    union's branches."""
    case = {"sample_ack": "sample_ack", "weights_update": "weights_update"}[type_name]
    body = {**body_map(case), field: value}
    with pytest.raises(ProtocolError) as info:
        decode([pack(envelope_map(type_name)), pack(body)])
    assert info.value.reason == "schema"
    errors = int(re.search(r"\((\d+) error\(s\)\)$", info.value.detail).group(1))
    assert errors <= 6 * len(value if isinstance(value, dict) else [0]), info.value.detail


def test_an_architecture_string_longer_than_64_kib_is_refused_before_a_worker_parses_it():
    """A recheck probe: a layout JSON of 100,000 unknown keys inside ``architecture`` took each worker 0.49 s to
    refuse, at every weights version; the longest real one (the layout) is a few KB."""
    body = body_map("weights_update")
    body["architecture"] = {**body["architecture"], "layout": "{" + " " * 70_000 + "}"}
    with pytest.raises(ProtocolError) as info:
        decode([pack(envelope_map("weights_update")), pack(body)])
    assert info.value.reason == "schema" and "architecture.layout" in info.value.detail


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_heartbeat_uptime_is_non_finite(value):
    assert body_reason("heartbeat", {**HEARTBEAT_BODY, "uptime_s": value}) == "non_finite"


def test_non_finite_architecture_value_is_non_finite():
    body = body_map("weights_update")
    body["architecture"]["scale"] = float("nan")
    assert body_reason("weights_update", body) == "non_finite"


@pytest.mark.parametrize("field", ["actions", "rewards", "obs:speed", "obs:lidar"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("codec", ["raw", "zlib"])
def test_non_finite_values_in_each_float_array_are_non_finite(field, value, codec):
    body = body_map("sample_batch_raw" if codec == "raw" else "sample_batch_zlib")
    target = body["observations"][field[4:]] if field.startswith("obs:") else body[field]
    array = np.frombuffer(zlib.decompress(target["data"]) if codec == "zlib" else target["data"], dtype="<f4").copy()
    array[-1] = value
    target["data"] = zlib.compress(array.tobytes()) if codec == "zlib" else array.tobytes()
    assert body_reason("sample_batch", body) == "non_finite"


@pytest.mark.parametrize("field", ["actions", "rewards", "terminated", "truncated", "obs:lidar"])
def test_arrays_with_a_row_count_other_than_first_are_schema_errors(field):
    body = body_map("sample_batch_raw")  # 5 rows
    target = body["observations"][field[4:]] if field.startswith("obs:") else body[field]
    row_bytes = len(target["data"]) // target["shape"][0]
    target["shape"][0] = 4
    target["data"] = target["data"][: 4 * row_bytes]
    assert body_reason("sample_batch", body) == "schema"


@pytest.mark.parametrize("field,dtype", [("first", "uint8"), ("actions", "float64"), ("rewards", "float16"),
                                         ("terminated", "int8"), ("obs:speed", "float64"), ("obs:lidar", "int32")])
def test_arrays_of_the_wrong_dtype_are_schema_errors(field, dtype):
    body = body_map("sample_batch_raw")
    original = body["observations"][field[4:]] if field.startswith("obs:") else body[field]
    source = np.zeros(original["shape"], dtype=np.bool_ if original["dtype"] == "bool" else original["dtype"])
    replaced = WireArray.from_numpy(source.astype(dtype)).to_wire()
    replaced["data"] = bytes(replaced["data"])
    if field.startswith("obs:"):
        body["observations"][field[4:]] = replaced
    else:
        body[field] = replaced
    assert body_reason("sample_batch", body) == "schema"


def test_array_dims_other_than_the_contract_are_schema_errors():
    body = body_map("sample_batch_raw")
    body["actions"] = {**body["actions"], "shape": [15]}  # flattened actions
    assert body_reason("sample_batch", body) == "schema"
    body = body_map("sample_batch_raw")
    body["observations"]["speed"] = {"dtype": "float32", "shape": [], "codec": "raw", "data": b"\0\0\0\0"}
    assert body_reason("sample_batch", body) == "schema"


def test_empty_batch_is_a_schema_error():
    body = body_map("sample_batch_raw")
    for name in ("first", "rewards", "terminated", "truncated"):
        body[name] = {**body[name], "shape": [0], "data": b""}
    body["actions"] = {**body["actions"], "shape": [0, 3], "data": b""}
    body["observations"] = {k: {**v, "shape": [0, *v["shape"][1:]], "data": b""} for k, v in body["observations"].items()}
    assert body_reason("sample_batch", body) == "schema"


@pytest.mark.parametrize("name", ["Speed", "1speed", "speed\n", "sp eed", "s" * 33, ""])
def test_observation_names_that_are_not_component_names_are_schema_errors(name):
    body = body_map("sample_batch_raw")
    body["observations"][name] = body["observations"].pop("speed")
    assert body_reason("sample_batch", body) == "schema"


def test_weights_update_whose_sha256_does_not_match_is_a_schema_error():
    body = body_map("weights_update")
    body["sha256"] = hashlib.sha256(body["tensors"] + b"x").hexdigest()
    assert body_reason("weights_update", body) == "schema"
    tampered = body_map("weights_update")
    tampered["tensors"] = tampered["tensors"][:-1] + bytes([tampered["tensors"][-1] ^ 1])
    assert body_reason("weights_update", tampered) == "schema"


def test_weights_update_build_computes_the_digest_and_refuses_a_wrong_one():
    update = weights_update()
    assert update.sha256 == hashlib.sha256(update.tensors).hexdigest()
    with pytest.raises(ValueError):
        WeightsUpdate(version=1, architecture={}, tensors=b"abc", sha256="0" * 64)


def test_tensor_bytes_that_are_not_safetensors_are_malformed():
    with pytest.raises(ProtocolError) as info:
        tensors_from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert info.value.reason == "malformed"


def test_safetensors_holding_nan_are_non_finite():
    data = tensors_to_bytes({"w": np.array([1.0, np.nan], dtype=np.float32)})
    with pytest.raises(ProtocolError) as info:
        tensors_from_bytes(data)
    assert info.value.reason == "non_finite"
    # a digest-correct update still decodes: the receiver checks the tensors when it loads them
    _, update = decode(encode(WeightsUpdate.build(1, {}, data), "trainer"))
    with pytest.raises(ProtocolError):
        tensors_from_bytes(update.tensors)


# ------------------------------------------------------------------------------------------------- layout


def lidar_batch() -> SampleBatch:
    return sample_batch("raw")


def test_batch_matching_its_layout_passes_check_layout():
    lidar_batch().check_layout(tm20_lidar_layout())


@pytest.mark.parametrize("layout", [
    tm20_lidar_progress_layout(),  # an extra component
    ObservationLayout(components=[ObservationComponent(name="speed", frame_shape=[1])], action_dim=3),  # one missing
    tm20_lidar_layout(beams=20),  # frame shape
    ObservationLayout(components=[ObservationComponent(name="speed", frame_shape=[1]),
                                  ObservationComponent(name="lidar", frame_shape=[19], dtype="uint8", history=4)],
                      action_dim=3, action_history=2),  # dtype
    ObservationLayout(components=[ObservationComponent(name="speed", frame_shape=[1]),
                                  ObservationComponent(name="lidar", frame_shape=[19], history=4)],
                      action_dim=2, action_history=2),  # action dims
], ids=["extra-component", "missing-component", "frame-shape", "dtype", "action-dim"])
def test_batch_not_matching_its_layout_fails_check_layout(layout):
    with pytest.raises(ProtocolError) as info:
        lidar_batch().check_layout(layout)
    assert info.value.reason == "schema"


def test_history_length_does_not_change_the_wire_frames():
    lidar_batch().check_layout(tm20_lidar_layout(img_hist_len=1, act_buf_len=0))


def test_message_constructors_validate_like_the_decoder():
    with pytest.raises(ValueError):
        SampleAck(worker="bad id", seqs=[1])
    with pytest.raises(ValueError):
        Heartbeat(role="worker", uptime_s=float("nan"))


def test_a_heartbeat_counter_name_over_64_characters_is_rejected_at_decode():
    frames = encode(Heartbeat(role="worker", uptime_s=1.0, counters={"c" * 64: 1}), "worker-1")
    assert decode(frames)[1].counters == {"c" * 64: 1}
    long_name = msgpack.packb({"role": "worker", "uptime_s": 1.0, "counters": {"c" * 65: 1}})
    with pytest.raises(ProtocolError) as info:
        decode([frames[0], long_name])
    assert info.value.reason == "schema"


@pytest.mark.parametrize("value", [-1, -2**63, 2**63, 2**64 - 1])
def test_a_heartbeat_counter_outside_0_to_2_63_is_rejected_at_decode(value):
    """A hostile-worker probe's `stored` = 2**64 - 1 and `batches` = -2**63 reached the relay's
    tmrl_relay_worker_reported metrics as 1.8e19 and -9.2e18."""
    frames = encode(Heartbeat(role="worker", uptime_s=1.0, counters={"stored": 2**63 - 1, "batches": 0}), "worker-1")
    assert decode(frames)[1].counters == {"stored": 2**63 - 1, "batches": 0}
    body = msgpack.packb({"role": "worker", "uptime_s": 1.0, "counters": {"stored": value}})
    with pytest.raises(ProtocolError) as info:
        decode([frames[0], body])
    assert info.value.reason == "schema"


@pytest.mark.parametrize("bound", ["low", "high"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_layout_bound_in_a_hello_is_non_finite(bound, value):
    """A new client written from protocol.md sent a layout bound of NaN and was answered `schema`, where §2 and §9
    say NaN and infinity in a float field are `non_finite`."""
    body = body_map("hello_worker_with_layout")
    body["layout"]["components"][0][bound] = value
    with pytest.raises(ProtocolError) as info:
        decode([pack(envelope_map("hello")), pack(body)])
    assert info.value.reason == "non_finite", info.value
    assert "bounds must be finite (leave one out for none)" in info.value.detail
    # outside a message it stays an ordinary ValueError with the same words (an env's declared layout)
    with pytest.raises(ValueError, match=r"^1 validation error(.|\n)*bounds must be finite"):
        ObservationComponent(name="speed", frame_shape=[1], **{bound: value})


def test_a_batch_whose_actions_are_of_another_size_says_so():
    """The same client sent actions of shape [50, 2] for an action size of 1: told `actions have 2 dims`."""
    batch = sample_batch()
    with pytest.raises(ProtocolError) as info:
        batch.check_layout(tm20_lidar_layout().model_copy(update={"action_dim": 2}))
    assert info.value.reason == "schema"
    assert info.value.detail == "actions are [rows, 3]: action size 3, layout expects 2"
