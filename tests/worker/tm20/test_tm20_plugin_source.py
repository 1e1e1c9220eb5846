"""The AngelScript plugin writes exactly the packet the Python client decodes."""

from __future__ import annotations

import re
import struct
import tomllib
from pathlib import Path

from tmrl_worker.tm20.openplanet import (
    END,
    FIELDS,
    HELLO_END,
    HELLO_FIELDS,
    HELLO_MAGIC,
    MAGIC,
    PACKET_BYTES,
    PROTOCOL_VERSION,
    SEQUENCE_MODULO,
)

PLUGIN = Path(__file__).resolve().parents[3] / "services" / "worker" / "openplanet"


def test_plugin_writes_the_python_fields_in_order_one_write_per_slot():
    source = (PLUGIN / "Telemetry.as").read_text()
    slots = re.findall(r"buf\.Write\(.*\);\s*// slot (\d+): (\w+)", source)
    assert [int(n) for n, _ in slots] == list(range(len(FIELDS)))
    assert tuple(name for _, name in slots) == FIELDS
    assert re.search(rf"const uint PACKET_BYTES = {PACKET_BYTES};", source) and "MemoryBuffer(PACKET_BYTES)" in source


def test_plugin_greets_each_client_with_the_python_hello_fields_in_order():
    source = (PLUGIN / "Telemetry.as").read_text()
    slots = re.findall(r"hello\.Write\(.*\);\s*// hello (\d+): (\w+)", source)
    assert [int(n) for n, _ in slots] == list(range(len(HELLO_FIELDS)))
    assert tuple(name for _, name in slots) == HELLO_FIELDS
    assert "MemoryBuffer(16)" in source and "WriteHello(client)" in source


def test_plugin_null_checks_the_player_and_notices_a_hung_up_or_replaced_client():
    source = (PLUGIN / "Telemetry.as").read_text()
    assert "auto player = playground.Arena.Players[0];" in source and "if (player is null) return null;" in source
    serve = source[source.index("Net::Socket@ Serve("):source.index("void Main()")]
    assert "client.IsHungUp()" in serve and "listener.Accept()" in serve  # hung up: leave; newcomer: replace
    assert "while (client !is null) @client = Serve(listener, client);" in source


def test_plugin_constants_match_the_python_protocol():
    source = (PLUGIN / "Telemetry.as").read_text()
    magic = int(re.search(r"const uint MAGIC = (0x[0-9A-Fa-f]+);", source).group(1), 16)
    end = int(re.search(r"const uint END = (0x[0-9A-Fa-f]+);", source).group(1), 16)
    assert struct.pack("<I", magic) == MAGIC and struct.pack("<I", end) == END
    hello = int(re.search(r"const uint HELLO_MAGIC = (0x[0-9A-Fa-f]+);", source).group(1), 16)
    hello_end = int(re.search(r"const uint HELLO_END = (0x[0-9A-Fa-f]+);", source).group(1), 16)
    assert struct.pack("<I", hello) == HELLO_MAGIC and struct.pack("<I", hello_end) == HELLO_END
    assert int(re.search(r"const uint PROTOCOL_VERSION = (\d+);", source).group(1)) == PROTOCOL_VERSION
    assert int(re.search(r"SEQUENCE_MODULO = (\d+);", source).group(1)) == SEQUENCE_MODULO
    assert re.search(r"int Setting_Port = 9000;", source)


def test_plugin_manifest_and_readme_document_the_layout():
    manifest = tomllib.loads((PLUGIN / "info.toml").read_text())
    assert manifest["meta"]["name"] == "TMRL Telemetry" and manifest["script"]["timeout"] == 0
    assert int(manifest["meta"]["version"].split(".")[0]) == PROTOCOL_VERSION
    readme = (PLUGIN / "README.md").read_text()
    greeting, packet = readme.split("## Packet layout")
    documented = re.findall(r"^\| (\d+) \| [0-9–]+ \| (\w+) \|", packet, flags=re.M)
    assert tuple(name for _, name in documented) == FIELDS
    hello = re.findall(r"^\| (\d+) \| [0-9–]+ \| (\w+) \|", greeting.split("## Greeting")[1], flags=re.M)
    assert tuple(name for _, name in hello) == HELLO_FIELDS
