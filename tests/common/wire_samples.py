"""Valid example messages of every type, and a deep equality check, shared by the tmrl_common tests."""

from __future__ import annotations

import msgpack
import numpy as np
from pydantic import BaseModel
from tmrl_common.arrays import WireArray
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationLayout, tm20_image_layout, tm20_lidar_layout
from tmrl_common.protocol import Error, Heartbeat, Hello, Message, SampleAck, SampleBatch, WeightsUpdate
from tmrl_common.weights import tensors_to_bytes

SENDER = "worker-1"
SENT_AT = 1732500000.25


def lidar_observation(rng: np.random.Generator, layout: ObservationLayout) -> tuple:
    speed = rng.uniform(0, 300, size=(1,)).astype(np.float32)
    lidar = rng.uniform(0, 1, size=layout.components[1].observation_shape).astype(np.float32)
    actions = [rng.uniform(-1, 1, size=(layout.action_dim,)).astype(np.float32) for _ in range(layout.action_history)]
    return (speed, lidar, *actions)


def image_observation(rng: np.random.Generator, layout: ObservationLayout) -> tuple:
    speed = rng.uniform(0, 300, size=(1,)).astype(np.float32)
    images = rng.integers(0, 256, size=layout.components[1].observation_shape, dtype=np.uint8)
    actions = [rng.uniform(-1, 1, size=(layout.action_dim,)).astype(np.float32) for _ in range(layout.action_history)]
    return (speed, images, *actions)


def sample_batch(codec: str = "raw", images: bool = False, steps: int = 5, seed: int = 0,
                 height: int = 8, width: int = 8) -> SampleBatch:
    """A batch built the way a worker builds one: a reset row, then ``steps - 1`` step rows."""
    rng = np.random.default_rng(seed)
    layout = tm20_image_layout(height=height, width=width) if images else tm20_lidar_layout()
    observe = image_observation if images else lidar_observation
    builder = SampleBatchBuilder(layout, codec=codec)  # type: ignore[arg-type]
    builder.add_reset(observe(rng, layout))
    for step in range(steps - 1):
        action = rng.uniform(-1, 1, size=(3,)).astype(np.float32)
        builder.add_step(action, observe(rng, layout), float(rng.normal()), False, step == steps - 2)
    return builder.build(seq=7, weights_version=3)


def weights_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "actor.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "actor.0.bias": np.zeros(4, dtype=np.float32),
        "log_alpha": np.array([0.5], dtype=np.float64),
    }


def weights_update() -> WeightsUpdate:
    return WeightsUpdate.build(
        version=12,
        architecture={"kind": "mlp", "hidden": [256, 256], "obs_dim": 83, "act_dim": 3, "squash": True, "scale": 1.5},
        tensors=tensors_to_bytes(weights_tensors(), metadata={"format": "tmrl"}),
    )


def valid_messages() -> dict[str, Message]:
    """One or more valid messages per type, keyed by a readable case name."""
    return {
        "hello_worker_with_layout": Hello(role="worker", software="tmrl-worker 0.1.0", layout=tm20_lidar_layout(), next_seq=41),
        "hello_trainer_without_layout": Hello(role="trainer", software="tmrl-trainer 0.1.0"),
        "sample_batch_raw": sample_batch("raw"),
        "sample_batch_zlib": sample_batch("zlib"),
        "sample_batch_raw_images": sample_batch("raw", images=True),
        "sample_batch_zlib_images": sample_batch("zlib", images=True),
        "sample_ack": SampleAck(worker="worker-1", seqs=[0, 1, 2, 2**63 - 1]),
        "weights_update": weights_update(),
        "heartbeat": Heartbeat(role="relay", uptime_s=12.5, counters={"batches_in": 10, "rejects": 0}),
        "heartbeat_no_counters": Heartbeat(role="worker", uptime_s=0.0),
        "error": Error(reason="schema", message="actions must be float32", ref_type="sample_batch", ref_seq=7),
        "error_minimal": Error(reason="oversized", message=""),
    }


class Pairs(list):
    """A msgpack map given as its ``(key, value)`` entries in order, so that it can hold a key twice (a dict cannot)."""


def pack_tree(value) -> bytes:
    """``msgpack.packb(value)``, except that a :class:`Pairs` anywhere in ``value`` is written as a map of exactly
    its entries, repeated keys included."""
    packer = msgpack.Packer(use_bin_type=True)
    if isinstance(value, dict):
        value = Pairs(value.items())
    if isinstance(value, Pairs):
        return packer.pack_map_header(len(value)) + b"".join(packer.pack(key) + pack_tree(item) for key, item in value)
    if isinstance(value, list):
        return packer.pack_array_header(len(value)) + b"".join(pack_tree(item) for item in value)
    return packer.pack(value)


def assert_same_message(received: BaseModel, sent: BaseModel) -> None:
    """Field-by-field equality; arrays compared by dtype, shape, codec and values."""
    assert type(received) is type(sent)
    for name in type(sent).model_fields:
        _assert_same_value(getattr(received, name), getattr(sent, name), name)


def _assert_same_value(received, sent, where: str) -> None:
    if isinstance(sent, WireArray):
        assert isinstance(received, WireArray), where
        assert (received.dtype, received.shape, received.codec) == (sent.dtype, sent.shape, sent.codec), where
        assert received.array.dtype == sent.array.dtype, where
        assert received.array.shape == tuple(sent.shape), where
        np.testing.assert_array_equal(received.array, sent.array, err_msg=where)
    elif isinstance(sent, BaseModel):
        assert_same_message(received, sent)
    elif isinstance(sent, dict):
        assert isinstance(received, dict) and received.keys() == sent.keys(), where
        for key in sent:
            _assert_same_value(received[key], sent[key], f"{where}[{key!r}]")
    else:
        assert type(received) is type(sent), f"{where}: {type(received)} != {type(sent)}"
        assert received == sent, where
