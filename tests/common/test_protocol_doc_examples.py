"""The byte examples in docs/protocol.md are what the real encoder produces, and decode back to the stated values."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
from tmrl_common.arrays import WireArray
from tmrl_common.protocol import Heartbeat, decode, encode

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def hex_runs(text: str) -> str:
    """All two-digit hex bytes of the document's code blocks as one space-separated string."""
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    tokens = []
    for block in blocks:
        for line in block.splitlines():
            tokens.extend(re.findall(r"(?<![\w\"])([0-9a-f]{2})(?![\w\"])", line.split("  ")[0]))
    return " ".join(tokens)


def test_worked_heartbeat_example_is_the_encoders_output():
    frames = encode(Heartbeat(role="worker", uptime_s=12.5, counters={"sent": 3}), "worker-1", sent_at=1732500000.25)
    text = DOC.read_text()
    assert f"envelope, {len(frames[0])} bytes" in text and f"body, {len(frames[1])} bytes" in text
    doc_bytes = hex_runs(text)
    for frame in frames:
        assert frame.hex(" ") in doc_bytes
    envelope, body = decode(frames)
    assert (envelope.sender, envelope.sent_at, body.uptime_s, body.counters) == ("worker-1", 1732500000.25, 12.5, {"sent": 3})


def test_array_example_is_the_encoders_output():
    wire = WireArray.from_numpy(np.array([[1.0, -0.5]], dtype=np.float32)).to_wire()
    packed = msgpack.packb(wire, use_bin_type=True)
    assert packed.hex(" ") in hex_runs(DOC.read_text())
    assert f"({len(packed)} bytes, real output of the encoder)" in DOC.read_text()
