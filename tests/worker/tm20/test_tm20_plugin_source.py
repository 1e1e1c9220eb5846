"""The AngelScript plugin writes exactly the packet the Python client decodes."""

from __future__ import annotations

import re
import struct
import tomllib
from pathlib import Path

from tmrl_worker.tm20.openplanet import END, FIELDS, MAGIC, PACKET_BYTES, PROTOCOL_VERSION, SEQUENCE_MODULO

PLUGIN = Path(__file__).resolve().parents[3] / "services" / "worker" / "openplanet"


def test_plugin_writes_the_python_fields_in_order_one_write_per_slot():
    source = (PLUGIN / "Telemetry.as").read_text()
    slots = re.findall(r"buf\.Write\(.*\);\s*// slot (\d+): (\w+)", source)
    assert [int(n) for n, _ in slots] == list(range(len(FIELDS)))
    assert tuple(name for _, name in slots) == FIELDS
    assert f"MemoryBuffer({PACKET_BYTES})" in source


def test_plugin_constants_match_the_python_protocol():
    source = (PLUGIN / "Telemetry.as").read_text()
    magic = int(re.search(r"const uint MAGIC = (0x[0-9A-Fa-f]+);", source).group(1), 16)
    end = int(re.search(r"const uint END = (0x[0-9A-Fa-f]+);", source).group(1), 16)
    assert struct.pack("<I", magic) == MAGIC and struct.pack("<I", end) == END
    assert float(re.search(r"PROTOCOL_VERSION = ([0-9.]+)f;", source).group(1)) == PROTOCOL_VERSION
    assert int(re.search(r"SEQUENCE_MODULO = (\d+);", source).group(1)) == SEQUENCE_MODULO
    assert re.search(r"int Setting_Port = 9000;", source)


def test_plugin_manifest_and_readme_document_the_layout():
    manifest = tomllib.loads((PLUGIN / "info.toml").read_text())
    assert manifest["meta"]["name"] == "TMRL Telemetry" and manifest["script"]["timeout"] == 0
    readme = (PLUGIN / "README.md").read_text()
    documented = re.findall(r"^\| (\d+) \| [0-9–]+ \| (\w+) \|", readme, flags=re.M)
    assert tuple(name for _, name in documented) == FIELDS
