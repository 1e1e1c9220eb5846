"""OpenPlanet telemetry: packet format, resynchronisation on garbage, and the client against a fake plugin
(real sockets on loopback, random ports) that disconnects mid-stream and sends garbage."""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest
from tmrl_worker.tm20.openplanet import (
    END,
    MAGIC,
    PACKET_BYTES,
    PACKET_FLOATS,
    PacketParser,
    PluginVersionError,
    TelemetryClient,
    TelemetryTimeoutError,
    decode_packet,
    encode_hello,
    encode_packet,
    packet_problem,
)
from tmrl_worker.tm20.replay_server import TelemetryReplayServer


def drive(n: int, start: int = 0) -> list[bytes]:
    """Synthetic recording: a car accelerating along x."""
    return [encode_packet(start + i, speed=0.5 * i, distance=0.1 * i * i, position=(10.0 + i, 9.5, -3.0 - i),
                          steer=-0.25, gas=1.0, brake=0.0, finished=(i == n - 1), gear=2.0, rpm=5000.0 + i)
            for i in range(n)]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_packet_is_fifteen_little_endian_float32_framed_by_magic_bytes():
    data = encode_packet(7, speed=12.5, distance=3.0, position=(1.0, 2.0, 3.0), steer=-1.0, gas=0.5, brake=1.0,
                         finished=True, gear=3.0, rpm=9000.0)
    assert PACKET_FLOATS == 15 and PACKET_BYTES == 60 and len(data) == 60
    assert data[:4] == MAGIC == b"TMRL" and data[-4:] == END == b"LRMT"
    floats = struct.unpack("<15f", data)
    assert floats[1:14] == (2.0, 7.0, 12.5, 3.0, 1.0, 2.0, 3.0, -1.0, 0.5, 1.0, 1.0, 3.0, 9000.0)
    packet = decode_packet(data)
    assert packet.sequence == 7 and packet.position == (1.0, 2.0, 3.0) and packet.finished and packet.gear == 3.0


def test_parser_splits_packets_arriving_in_arbitrary_pieces():
    stream = b"".join(drive(20))
    parser = PacketParser()
    got = []
    for i in range(0, len(stream), 7):
        got += parser.feed(stream[i:i + 7])
    assert [p.sequence for p in got] == list(range(20))
    assert parser.garbage_bytes == 0


def test_parser_resynchronises_after_garbage_and_false_magic():
    packets = drive(4)
    truncated = packets[1][:25]  # a packet cut short by a reconnect
    false_magic = MAGIC + b"\x00" * 70  # looks like a header but is not a packet
    stream = b"\xff\x13garbage" + packets[0] + truncated + false_magic + packets[2] + b"TM" + packets[3]
    parser = PacketParser()
    got = parser.feed(stream)
    assert [p.sequence for p in got] == [0, 2, 3]
    assert parser.garbage_bytes == len(stream) - 3 * PACKET_BYTES


def test_parser_rejects_wrong_version_non_finite_values_and_bad_flags():
    good = bytearray(encode_packet(1))
    wrong_version = bytearray(good)
    wrong_version[4:8] = struct.pack("<f", 1.0)  # a version-1 packet
    nan_speed = bytearray(good)
    nan_speed[12:16] = struct.pack("<f", float("nan"))
    bad_flag = bytearray(good)
    bad_flag[44:48] = struct.pack("<f", 0.5)  # finished must be 0 or 1
    for bad in (wrong_version, nan_speed, bad_flag):
        assert decode_packet(bytes(bad)) is None
    assert decode_packet(bytes(good)) is not None


@pytest.mark.parametrize("field", ["gear", "rpm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_packet_with_a_non_finite_gear_or_rpm_is_garbage_not_telemetry(field, value):
    packet = encode_packet(1, **{field: value})
    assert decode_packet(packet) is None
    parser = PacketParser()  # dropped as garbage, the next packet read
    assert [p.sequence for p in parser.feed(packet + encode_packet(2))] == [2]
    assert parser.garbage_bytes == PACKET_BYTES


@pytest.mark.parametrize("distance", [3e38, -3e38, 2e7, -5e6, -1.5])
def test_a_packet_with_an_impossible_distance_driven_is_garbage_not_a_restarted_race(distance):
    """An outside probe: a plugin that sent 3e38 m once made the next, true packet look like a race restarted."""
    assert decode_packet(encode_packet(1, distance=distance)) is None
    assert decode_packet(encode_packet(1, distance=9.9e6)).distance == pytest.approx(9.9e6)
    assert decode_packet(encode_packet(1, distance=-0.5)).distance == -0.5  # rounding at the start line
    parser = PacketParser()
    packets = parser.feed(encode_packet(1, distance=22.0) + encode_packet(2, distance=distance)
                          + encode_packet(3, distance=22.5))
    assert [p.distance for p in packets] == [22.0, 22.5] and parser.garbage_bytes == PACKET_BYTES


def test_packet_problem_names_the_field_or_the_framing_that_makes_bytes_no_packet():
    """The TrackMania probe: wrong-size packets and a NaN in any one field all read `packets holding NaN, infinite or
    out-of-range values?`, so a plugin's author could not tell a framing error from a value."""
    longer = MAGIC + encode_packet(1)[4:-4] + b"\0" * 4 + END  # a 64-byte packet of a plugin with one more field
    assert packet_problem(encode_packet(1)) is None
    assert packet_problem(encode_packet(1, gear=float("nan"))) == "gear is nan"
    assert packet_problem(encode_packet(1, position=(0.0, 2e6, 0.0))) == "y is 2e+06 m, beyond the 1e+06 m any map spans"
    assert packet_problem(encode_packet(1, distance=-5e6)) == "distance is -5e+06 m, outside [-1, 1e+07]"
    assert packet_problem(longer).startswith(f"no {END!r} at byte 56 (packets of another size")
    parser = PacketParser()
    assert parser.feed(encode_packet(1, rpm=float("inf"))) == [] and parser.last_problem == "rpm is inf"
    assert len(parser.feed(encode_packet(2))) == 1 and parser.last_problem is None  # only since the last valid one


def test_a_plugin_sending_refused_packets_is_told_which_value_or_framing_is_wrong():
    nan_gear = [encode_packet(i, gear=float("nan")) for i in range(5)]
    with TelemetryReplayServer(nan_gear, rate_hz=100, loop=False) as server, \
            TelemetryClient(server.port, timeout=0.3) as client:
        wait_until(lambda: client.stats.garbage_bytes > 0)
        with pytest.raises(TelemetryTimeoutError, match=r"are no valid packet \(the last one refused: gear is nan; "):
            client.latest()


def test_packets_whose_sequence_never_advances_are_not_reported_as_a_plugin_that_stopped_sending():
    """The TrackMania probe: packets at 100 Hz, all with sequence 7, made record-reward say `no telemetry ... for
    0.0 s (connected, but its newest packet is 0.0 s old: the plugin stopped sending ...)`."""
    with TelemetryReplayServer(lambda tick: encode_packet(7, distance=0.01 * tick), rate_hz=100) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        first = client.latest()
        with pytest.raises(TelemetryTimeoutError, match="keep arriving, but their sequence has stayed at 7 for 0.3 s"):
            client.newer_than(first.sequence, timeout=0.3)


def test_client_follows_a_live_stream_and_keeps_the_newest_packet():
    with TelemetryReplayServer(drive(50), rate_hz=200) as server, \
            TelemetryClient(server.port, timeout=2.0, reconnect_delay=0.05) as client:
        first = client.latest()
        later = client.newer_than(first.sequence)
        assert later.sequence != first.sequence
        wait_until(lambda: client.stats.packets >= 20)
        assert client.latest().position[1] == 9.5
        assert client.stats.garbage_bytes == 0


def test_client_reconnects_after_the_plugin_drops_the_connection_mid_stream():
    with TelemetryReplayServer(drive(1000), rate_hz=200) as server, \
            TelemetryClient(server.port, timeout=2.0, reconnect_delay=0.05) as client:
        client.latest()
        server.disconnect_client()
        wait_until(lambda: server.connections >= 2 and client.stats.connects >= 2)
        before = client.latest().sequence
        assert client.newer_than(before).sequence > before
        assert client.stats.disconnects >= 1


BUMPED = "another client is most likely connected to the same port"
CRASHING = "if none is, the plugin itself is restarting or crashing"  # a probe's plugin that closed mid-packet


def test_two_clients_on_one_plugin_port_are_told_that_another_client_takes_turns_with_them(caplog):
    # the plugin (and its stand-in here) serves one client: one that connects replaces the one being served
    with TelemetryReplayServer(drive(1000), rate_hz=200) as server, \
            caplog.at_level(logging.WARNING, logger="tmrl_worker.tm20.openplanet"), \
            TelemetryClient(server.port, timeout=0.5, reconnect_delay=0.05) as first, \
            TelemetryClient(server.port, timeout=0.5, reconnect_delay=0.05) as second:
        wait_until(lambda: any(BUMPED in record.getMessage() for record in caplog.records), timeout=10.0)
        warning = next(record.getMessage() for record in caplog.records if BUMPED in record.getMessage())
        assert f"the plugin on port {server.port} closed this connection 3 times within 10 s" in warning
        assert "telemetry_port" in warning and CRASHING in warning
        assert first._bumped() or second._bumped()
        error = (first if first._bumped() else second)._timeout_error(0.5)
        assert BUMPED in str(error) and f"127.0.0.1:{server.port}" in str(error)


def test_a_plugin_reloaded_twice_is_not_taken_for_another_client(caplog):
    with TelemetryReplayServer(drive(1000), rate_hz=200) as server, \
            caplog.at_level(logging.WARNING, logger="tmrl_worker.tm20.openplanet"), \
            TelemetryClient(server.port, timeout=2.0, reconnect_delay=0.05) as client:
        for connections in (2, 3):
            client.latest()
            server.disconnect_client()
            wait_until(lambda connections=connections: server.connections >= connections)
        client.latest()
        assert client.stats.disconnects == 2 and not client._bumped()
        assert not any(BUMPED in record.getMessage() for record in caplog.records)


def test_client_survives_garbage_and_packets_split_at_a_disconnect():
    packets = drive(400)
    chunks: list[bytes] = []
    for i, packet in enumerate(packets):
        if i % 10 == 3:
            chunks.append(b"\x00\x01garbage\xfe")  # noise between packets
        if i % 25 == 7:
            chunks.append(packet[:30])  # half a packet, then the rest never comes
            continue
        chunks.append(packet)
    with TelemetryReplayServer(chunks, rate_hz=400, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0, reconnect_delay=0.02) as client:
        wait_until(lambda: client.stats.packets >= 50)
        server.disconnect_client()  # drop while the stream is full of junk
        wait_until(lambda: client.stats.packets >= 150)
        assert client.stats.garbage_bytes > 0
        assert client.latest(timeout=2.0).gas == 1.0


def test_client_with_nothing_listening_names_the_plugin_and_port():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with TelemetryClient(port, timeout=0.3, reconnect_delay=0.05) as client:
        with pytest.raises(TelemetryTimeoutError, match=rf"TMRL OpenPlanet plugin enabled, on port {port}\?"):
            client.latest()
        assert "refused" in client.stats.last_error.lower() or "failed" in client.stats.last_error
        with pytest.raises(TelemetryTimeoutError, match=r"Nothing listens on that port: load TMRL Telemetry .*F3"):
            client.latest()


def test_client_connected_to_a_silent_plugin_says_no_packet_arrived():
    with TelemetryReplayServer([], rate_hz=100) as server, TelemetryClient(server.port, timeout=0.3) as client:
        wait_until(lambda: client.stats.connected)
        with pytest.raises(TelemetryTimeoutError, match="connected, but no packet arrived"):
            client.latest()


def test_a_stale_packet_is_not_served_as_fresh():
    with TelemetryReplayServer(drive(5), rate_hz=100, loop=False) as server, \
            TelemetryClient(server.port, timeout=0.3) as client:
        wait_until(lambda: client.stats.packets == 5)
        time.sleep(0.4)  # the stream stopped: the newest packet is now too old
        with pytest.raises(TelemetryTimeoutError):
            client.latest()


def test_a_plugin_that_stops_sending_fails_a_step_read_as_its_packet_turns_stale_without_holding_the_step():
    with TelemetryReplayServer(drive(5), rate_hz=100, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        wait_until(lambda: client.stats.packets == 5)
        last = client.current(0.3)  # fresh: served at once
        assert last.sequence == 4
        time.sleep(max(0.0, last.received_at + 0.35 - time.monotonic()))
        started = time.monotonic()
        with pytest.raises(TelemetryTimeoutError, match=r"connected, but its newest packet is 0\.[3-9] s old: the "
                                                         r"plugin stopped sending"):
            client.current(0.3)
        assert time.monotonic() - started < 0.05  # the read does not wait a further 0.3 s for a packet


def test_a_step_read_while_the_connection_is_made_again_repeats_the_newest_packet_without_waiting():
    """An outside probe: a connection the plugin dropped held the next 20 Hz step for up to its full telemetry
    timeout (a 521 ms step for a 0.3 s reconnection; 24 of 140 steps 220 ms over with two clients on one port)."""
    with TelemetryReplayServer(drive(1000), rate_hz=100) as server, \
            TelemetryClient(server.port, timeout=2.0, reconnect_delay=1.0) as client:
        wait_until(lambda: client.stats.packets >= 5)
        server.disconnect_client()
        wait_until(lambda: not client.stats.connected)  # the reader saw the close; it connects again in 1 s
        held = client.current(0.3)
        started = time.monotonic()
        assert client.current(0.3) == held  # the lost connection's newest packet: a repeated step, paid nothing
        assert time.monotonic() - started < 0.05
        time.sleep(max(0.0, held.received_at + 0.35 - time.monotonic()))
        started = time.monotonic()
        with pytest.raises(TelemetryTimeoutError, match="the plugin closed the connection"):
            client.current(0.3)  # too old now: the step fails at once, as for a plugin that stopped sending
        assert time.monotonic() - started < 0.05
        wait_until(lambda: client.stats.connects >= 2 and client.stats.packets > 5)
        assert client.current(0.3).received_at > held.received_at  # fresh packets of the new connection


def test_a_plugin_sending_only_invalid_bytes_is_told_apart_from_one_sending_nothing():
    garbage = [b"TMRL" + b"\xff" * (PACKET_BYTES - 4)] * 3  # the magic, then values that are no packet (NaN)
    with TelemetryReplayServer(garbage, rate_hz=100, loop=False) as server, \
            TelemetryClient(server.port, timeout=0.3) as client:
        wait_until(lambda: client.stats.garbage_bytes > 0)
        with pytest.raises(TelemetryTimeoutError, match=r"connected, but the \d+ bytes received are no valid packet"):
            client.latest()


def test_a_version_1_plugin_without_greeting_is_refused_with_what_to_install(caplog):
    with TelemetryReplayServer(drive(50), rate_hz=200, hello=b"") as server, \
            TelemetryClient(server.port, timeout=0.5, version_retry_delay=0.2) as client:
        with pytest.raises(PluginVersionError, match=r"protocol 1 .*without a greeting.*Telemetry.as, version 2"):
            client.latest()
        assert client.stats.version_errors >= 1 and client.stats.packets == 0
        assert sum("speaks protocol 1" in r.getMessage() for r in caplog.records) == 1  # logged once, not per retry


@pytest.mark.parametrize(("chunks", "hello", "message"), [
    (drive(50), encode_hello(version=3), r"speaks protocol 3 .*this worker speaks 2"),
    ([b"HTTP/1.1 200 OK\r\n\r\n"], b"", "is not the TMRL plugin"),
], ids=["another version", "a stranger on the port"])
def test_a_plugin_of_another_version_or_a_stranger_on_the_port_is_refused_by_name(chunks, hello, message):
    with TelemetryReplayServer(chunks, rate_hz=100, hello=hello) as server, \
            TelemetryClient(server.port, timeout=0.5, version_retry_delay=0.2) as client:
        with pytest.raises(PluginVersionError, match=message):
            client.latest()


def test_a_plugin_that_took_the_connection_but_did_not_greet_yet_is_tried_again_soon():
    """An outside probe: a game frozen or loading takes the connection (the OS does) but its plugin greets only once
    its script runs again; the client waited the 5 s meant for a plugin of another version before trying again."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    frozen, stop = threading.Event(), threading.Event()
    frozen.set()

    def game() -> None:
        connections = []
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(connection)
            if not frozen.is_set():  # running again: greet, then packets
                connection.sendall(encode_hello() + b"".join(drive(20)))
        for connection in connections:
            connection.close()

    server = threading.Thread(target=game, daemon=True)
    server.start()
    try:
        with TelemetryClient(port, timeout=5.0, hello_timeout=0.3, reconnect_delay=0.05,
                             version_retry_delay=30.0) as client:
            wait_until(lambda: client.stats.version_errors >= 1)  # no greeting in 0.3 s
            frozen.clear()
            started = time.monotonic()
            wait_until(lambda: client.stats.packets > 0, timeout=5.0)
            assert time.monotonic() - started < 2.0  # not the 30 s kept for another version
    finally:
        stop.set()
        server.join(timeout=2.0)
        listener.close()


def test_the_greeting_of_this_version_is_accepted_and_packets_right_behind_it_are_read():
    with TelemetryReplayServer(drive(5), rate_hz=200, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        wait_until(lambda: client.stats.packets == 5)
        assert client.latest().sequence == 4 and client.stats.version_errors == 0


def test_a_connection_waiting_for_the_greeting_is_not_said_to_be_unconnected():
    """A probe's fake plugin accepted connections and sent nothing: the first time-out said `(not connected)`."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            TelemetryClient(listener.getsockname()[1], timeout=0.5, hello_timeout=5.0) as client:
        wait_until(lambda: client._greeting_since is not None)
        with pytest.raises(TelemetryTimeoutError, match=r"\(connected \d+\.\d s ago, waiting for the plugin's "
                                                        r"greeting\)"):
            client.latest()


@pytest.mark.parametrize("extra", [1, 4])
def test_packets_longer_than_the_protocol_says_are_logged_once_per_connection(caplog, extra):
    """A probe's plugin sent 64-byte packets (4 zero bytes after each): they passed the framing checks and the extra
    bytes were dropped as garbage without a word. A re-check's 61-byte ones left one byte fewer than packets."""
    longer = [encode_packet(i, speed=5.0, distance=0.1 * i) + b"\0" * extra for i in range(400)]
    with caplog.at_level(logging.WARNING, logger="tmrl_worker.tm20.openplanet"), \
            TelemetryReplayServer(longer, rate_hz=1000, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        wait_until(lambda: client.stats.packets >= 200)
    warnings = [r.getMessage() for r in caplog.records if "bytes that are no packet came between" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "packets of another size than 60 bytes" in warnings[0]


def test_a_few_garbage_bytes_among_many_packets_are_not_taken_for_packets_of_another_size(caplog):
    packets = [encode_packet(i) for i in range(200)]
    packets[3] = b"junk" + packets[3]
    with caplog.at_level(logging.WARNING, logger="tmrl_worker.tm20.openplanet"), \
            TelemetryReplayServer(packets, rate_hz=1000, loop=False) as server, \
            TelemetryClient(server.port, timeout=2.0) as client:
        wait_until(lambda: client.stats.packets >= 150)
        assert client.stats.garbage_bytes == 4
    assert not [r for r in caplog.records if "bytes that are no packet came between" in r.getMessage()]
