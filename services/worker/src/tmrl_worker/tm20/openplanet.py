"""Telemetry from TrackMania 2020 through the TMRL OpenPlanet plugin (``services/worker/openplanet/``).

Wire format (the single Python definition; the plugin's ``Telemetry.as`` mirrors it, and
``services/worker/openplanet/README.md`` documents it): the plugin listens on ``127.0.0.1:<port>`` (9000 by default).
To each client that connects it first writes a greeting of :data:`HELLO_BYTES` = 16 bytes, four little-endian
uint32: ``b"TMHI"``, the protocol version (:data:`PROTOCOL_VERSION`), the packet size (60) and ``b"IHMT"``. The
client refuses a plugin whose greeting is missing (a version-1 plugin starts with a packet) or carries another
version, with a message that says which plugin file to install (:class:`PluginVersionError`). Then the plugin
writes one packet per game frame. A packet is :data:`PACKET_FLOATS` = 15 little-endian float32 slots
(:data:`PACKET_BYTES` = 60 bytes):

====  ===========  ==========================================================================
slot  name         meaning
====  ===========  ==========================================================================
0     magic        the 4 bytes ``b"TMRL"`` (written as uint32 0x4C524D54)
1     version      :data:`PROTOCOL_VERSION` (2.0)
2     sequence     frame counter, 0 .. 2**24 - 1 then wraps (exact in float32)
3     speed        car speed as the game's script API reports it (m/s)
4     distance     distance driven since the start of the run (m)
5-7   x, y, z      car position in the map (m; y is up)
8     steer        steering input, -1 (left) .. 1 (right)
9     gas          gas input, 0 .. 1
10    brake        1.0 while braking, else 0.0
11    finished     1.0 once the finish line is crossed, else 0.0
12    gear         current gear
13    rpm          engine rpm
14    end          the 4 bytes ``b"LRMT"`` (written as uint32 0x544D524C)
====  ===========  ==========================================================================

Resynchronisation: a packet is accepted only if it starts with ``b"TMRL"``, ends with ``b"LRMT"``, has version 2,
an integral sequence in range, 0/1 flags, finite values, a speed of at most :data:`MAX_SPEED_M_S`, a position within
:data:`MAX_COORDINATE_M` of the origin and a distance driven of at most :data:`MAX_DISTANCE_M`. Anything else is
garbage: the reader drops bytes up to the next ``b"TMRL"`` and tries again, counting what it dropped
(:attr:`TelemetryStats.garbage_bytes`). A valid packet whose sequence is the one of the packet before on the same
connection is no new game frame (the plugin counts one per frame): the client drops it, counted in
:attr:`TelemetryStats.repeated_packets`, so a plugin that resends one packet goes stale as one that stopped.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

PROTOCOL_VERSION = 2
DEFAULT_PORT = 9000
MAGIC = b"TMRL"
END = b"LRMT"
HELLO_MAGIC = b"TMHI"
HELLO_END = b"IHMT"
HELLO_FIELDS = ("magic", "version", "packet_bytes", "end")
_HELLO = struct.Struct("<4sII4s")
HELLO_BYTES = _HELLO.size
PLUGIN_SOURCE = "services/worker/openplanet/Telemetry.as"
FIELDS = ("magic", "version", "sequence", "speed", "distance", "x", "y", "z", "steer", "gas", "brake", "finished",
          "gear", "rpm", "end")
PACKET_FLOATS = len(FIELDS)
PACKET_BYTES = 4 * PACKET_FLOATS
SEQUENCE_MODULO = 1 << 24
MAX_COORDINATE_M = 1e6
"""A packet whose position is further than this from the map's origin on any axis is garbage (maps span a few
kilometres; float32 can hold up to 3e38)."""
MAX_DISTANCE_M = 1e7
"""A packet whose distance driven is larger than this is garbage (10,000 km: no run is that long; one such packet
would otherwise be read as a race restarted when the next, true one comes)."""
MAX_SPEED_M_S = 500.0
"""A packet whose speed is larger than this (1,800 km/h) is garbage: TrackMania's cars top out at 1,000 km/h (278 m/s).
Such a speed would otherwise excuse any teleport (:func:`position_jump`) and reach the observation as the bound it
is clipped to (a probe's plugin sent 1e6 m/s while the car drove at 10)."""
MAX_NEGATIVE_DISTANCE_M = 1.0
"""The distance driven counts up from 0; a packet more than this below 0 is garbage (a probe's -5,000 km passed as
valid, and the race restart after it then failed for 25 s, blamed on a paused game)."""
_SLOT = {name: i for i, name in enumerate(FIELDS)}
_PACKET = struct.Struct("<" + "f" * PACKET_FLOATS)
log = logging.getLogger(__name__)

INTERLEAVED_GARBAGE_PACKETS = 50
"""After this many valid packets on one connection, a byte of garbage per two packets or more is logged once
(:meth:`TelemetryClient._warn_of_interleaved_garbage`): a plugin of another build whose packets are longer than
:data:`PACKET_BYTES` passes the framing checks, its extra bytes dropped between packets without a word (a probe's
64-byte packets)."""

BUMPED_CLOSES = 3
BUMPED_WINDOW_S = 10.0
"""The plugin closing a client's connection this many times within this many seconds is read as another client
taking turns with it on the same port (:meth:`TelemetryClient._bumped`)."""


class TelemetryError(RuntimeError):
    """Telemetry cannot be read."""


class TelemetryTimeoutError(TelemetryError):
    """No (fresh) telemetry packet arrived in time; the message names the likely cause."""


class PluginVersionError(TelemetryTimeoutError):
    """The program on the telemetry port is not the TMRL plugin of this version (no greeting, or another version),
    so no telemetry can come from it."""


class NoGreetingError(PluginVersionError):
    """A connection was taken but no greeting came in time: a stranger on the port, or the TMRL plugin of a game that
    is frozen or loading (its script does not run), which greets once it runs again: tried again soon."""


def encode_hello(version: int = PROTOCOL_VERSION, packet_bytes: int | None = None) -> bytes:
    """The greeting the plugin writes to each new client (used by the fake plugin and tests)."""
    return _HELLO.pack(HELLO_MAGIC, version, PACKET_BYTES if packet_bytes is None else packet_bytes, HELLO_END)


def check_hello(data: bytes, port: int) -> None:
    """Raise :class:`PluginVersionError` unless ``data`` is this version's greeting (``len(data) == HELLO_BYTES``)."""
    install = (f"install the plugin of this tmrl ({PLUGIN_SOURCE}, version {PROTOCOL_VERSION}) into "
               f"OpenplanetNext/Plugins/TMRL_Telemetry/ and reload it")
    if data[:4] == MAGIC:
        raise PluginVersionError(f"the plugin on port {port} speaks protocol 1 (it sends packets without a "
                                 f"greeting): {install}")
    magic, version, packet_bytes, end = _HELLO.unpack(data[:HELLO_BYTES])
    if magic != HELLO_MAGIC or end != HELLO_END:
        raise PluginVersionError(f"the program on port {port} is not the TMRL plugin (it sent {data[:16]!r} instead "
                                 f"of a greeting): check --telemetry-port, or {install}")
    if version != PROTOCOL_VERSION or packet_bytes != PACKET_BYTES:
        raise PluginVersionError(f"the plugin on port {port} speaks protocol {version} ({packet_bytes}-byte packets); "
                                 f"this worker speaks {PROTOCOL_VERSION} ({PACKET_BYTES} bytes): {install}")


@dataclass(frozen=True)
class Telemetry:
    """One decoded packet."""

    sequence: int
    speed: float
    distance: float
    position: tuple[float, float, float]
    steer: float
    gas: float
    brake: float
    finished: bool
    gear: float
    rpm: float
    received_at: float = 0.0
    """``time.monotonic()`` when the packet was read."""


JUMP_SLACK_M = 10.0
"""How much further than it drove (and than its speed took it) the car may move between two packets before the move
counts as a jump (:func:`position_jump`): room for rounding, a packet's timing and a bump off a wall."""


def position_jump(previous: Telemetry, current: Telemetry) -> str | None:
    """Why the move from ``previous`` to ``current`` cannot have been driven, or None when it can.

    A car cannot get further from where it was than the distance it drove in between (the game's ``Distance``,
    which the emulated game also counts), nor than its speed carried it in the time between the two packets' arrival
    (should the game's distance not count a flight); a move beyond both, by more than :data:`JUMP_SLACK_M`, is a
    jump. Nor, whatever distance the packets report, faster than :data:`MAX_SPEED_M_S` (a probe's plugin moved the
    car and its distance 50 m in one 50 ms step, paid as progress). The env ends an episode on one;
    ``record-reward`` starts over, as after a respawn at a checkpoint."""
    moved = math.dist(current.position, previous.position)
    driven = abs(current.distance - previous.distance)
    elapsed = max(current.received_at - previous.received_at, 0.0)
    carried = 1.5 * min(max(abs(current.speed), abs(previous.speed)), MAX_SPEED_M_S) * elapsed
    if moved > max(driven, carried) + JUMP_SLACK_M:
        return (f"the car's position jumped {moved:.0f} m between two packets while it drove {driven:.1f} m (a "
                "respawn at a checkpoint, a teleport, or a wrong position from the plugin)")
    if moved > MAX_SPEED_M_S * elapsed + JUMP_SLACK_M:
        return (f"the car's position moved {moved:.0f} m in {elapsed:.2f} s between two packets, faster than any car "
                f"drives ({MAX_SPEED_M_S:g} m/s), though their distances driven say {driven:.1f} m (a teleport, or "
                "wrong positions and distances from the plugin)")
    return None


def encode_packet(sequence: int, speed: float = 0.0, distance: float = 0.0,
                  position: tuple[float, float, float] = (0.0, 0.0, 0.0), steer: float = 0.0, gas: float = 0.0,
                  brake: float = 0.0, finished: bool = False, gear: float = 1.0, rpm: float = 0.0) -> bytes:
    """The bytes the plugin sends for these values (used by the replay server, fakes and tests)."""
    values = [0.0] * PACKET_FLOATS
    values[_SLOT["version"]] = PROTOCOL_VERSION
    values[_SLOT["sequence"]] = float(sequence % SEQUENCE_MODULO)
    values[_SLOT["speed"]], values[_SLOT["distance"]] = speed, distance
    values[_SLOT["x"]], values[_SLOT["y"]], values[_SLOT["z"]] = position
    values[_SLOT["steer"]], values[_SLOT["gas"]], values[_SLOT["brake"]] = steer, gas, brake
    values[_SLOT["finished"]] = 1.0 if finished else 0.0
    values[_SLOT["gear"]], values[_SLOT["rpm"]] = gear, rpm
    packed = bytearray(_PACKET.pack(*values))
    packed[0:4] = MAGIC
    packed[-4:] = END
    return bytes(packed)


def packet_problem(data: bytes) -> str | None:
    """Why ``data[:PACKET_BYTES]`` is no valid packet (e.g. ``"gear is nan"``), or None when it is one."""
    return _checked_values(data)[1]


def _checked_values(data: bytes) -> tuple[tuple[float, ...], None] | tuple[None, str]:
    """``data[:PACKET_BYTES]`` unpacked, with None, when it is a valid packet; else None and why it is not (one
    unpacking serves the check and the decoding)."""
    if len(data) < PACKET_BYTES:
        return None, f"{len(data)} bytes, short of a {PACKET_BYTES}-byte packet"
    if bytes(data[0:4]) != MAGIC:
        return None, f"it starts with {bytes(data[0:4])!r}, not {MAGIC!r}"
    if bytes(data[PACKET_BYTES - 4:PACKET_BYTES]) != END:
        return None, (f"no {END!r} at byte {PACKET_BYTES - 4} (packets of another size, {PACKET_BYTES} bytes each "
                      f"in protocol {PROTOCOL_VERSION}?)")
    v = _PACKET.unpack_from(data)
    for name, value in zip(FIELDS[1:-1], v[1:-1], strict=True):
        if not math.isfinite(value):
            return None, f"{name} is {value}"
    if v[_SLOT["version"]] != PROTOCOL_VERSION:
        return None, f"version is {v[_SLOT['version']]:g}, not {PROTOCOL_VERSION}"
    if abs(v[_SLOT["speed"]]) > MAX_SPEED_M_S:  # it would excuse any jump and be paid as progress
        return None, f"speed is {v[_SLOT['speed']]:g} m/s, beyond the {MAX_SPEED_M_S:g} m/s no car reaches"
    for axis in ("x", "y", "z"):
        if abs(v[_SLOT[axis]]) > MAX_COORDINATE_M:  # no map is that large: it would be paid as progress
            return None, f"{axis} is {v[_SLOT[axis]]:g} m, beyond the {MAX_COORDINATE_M:g} m any map spans"
    distance = v[_SLOT["distance"]]
    if not -MAX_NEGATIVE_DISTANCE_M <= distance <= MAX_DISTANCE_M:
        return None, f"distance is {distance:g} m, outside [{-MAX_NEGATIVE_DISTANCE_M:g}, {MAX_DISTANCE_M:g}]"
    seq = v[_SLOT["sequence"]]
    if seq != int(seq) or not 0 <= seq < SEQUENCE_MODULO:
        return None, f"sequence is {seq:g}, not a whole number in [0, {SEQUENCE_MODULO})"
    for flag in ("brake", "finished"):
        if v[_SLOT[flag]] not in (0.0, 1.0):
            return None, f"{flag} is {v[_SLOT[flag]]:g}, not 0 or 1"
    return v, None


def decode_packet(data: bytes, received_at: float = 0.0) -> Telemetry | None:
    """The packet in ``data[:PACKET_BYTES]``, or None when those bytes are not a valid packet
    (:func:`packet_problem` says why)."""
    values, _ = _checked_values(data)
    return None if values is None else _telemetry(values, received_at)


def _telemetry(v: tuple[float, ...], received_at: float) -> Telemetry:
    """The packet of unpacked values that :func:`_checked_values` passed."""
    return Telemetry(sequence=int(v[_SLOT["sequence"]]), speed=v[_SLOT["speed"]], distance=v[_SLOT["distance"]],
                     position=(v[_SLOT["x"]], v[_SLOT["y"]], v[_SLOT["z"]]), steer=v[_SLOT["steer"]],
                     gas=v[_SLOT["gas"]], brake=v[_SLOT["brake"]], finished=v[_SLOT["finished"]] == 1.0,
                     gear=v[_SLOT["gear"]], rpm=v[_SLOT["rpm"]], received_at=received_at)


class PacketParser:
    """Splits a byte stream into packets, skipping garbage up to the next ``b"TMRL"`` (see the module docstring)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.packets = 0
        self.garbage_bytes = 0
        self.last_problem: str | None = None
        """Why the last candidate packet (bytes from a ``b"TMRL"`` on) since the last valid one was refused (None:
        none was), for the client's messages: a wrong size and a NaN in some field look alike otherwise."""

    def feed(self, data: bytes, received_at: float = 0.0) -> list[Telemetry]:
        """Add received bytes; returns the complete valid packets they finish, oldest first."""
        self._buffer += data
        out: list[Telemetry] = []
        buf = self._buffer
        start = 0
        while True:
            found = buf.find(MAGIC, start)
            if found < 0:  # keep up to 3 trailing bytes: they may be the start of a magic split across reads
                keep = max(start, len(buf) - (len(MAGIC) - 1))
                self.garbage_bytes += keep - start
                start = keep
                break
            self.garbage_bytes += found - start
            start = found
            if len(buf) - start < PACKET_BYTES:
                break
            values, problem = _checked_values(bytes(buf[start:start + PACKET_BYTES]))
            if values is None:  # a false magic inside garbage: skip one byte and search again
                self.last_problem = problem
                self.garbage_bytes += 1
                start += 1
                continue
            self.last_problem = None
            out.append(_telemetry(values, received_at))
            self.packets += 1
            start += PACKET_BYTES
        del buf[:start]
        return out

    def reset(self) -> None:
        """Forget a partial packet (after a disconnect)."""
        self.garbage_bytes += len(self._buffer)
        self._buffer.clear()


@dataclass
class TelemetryStats:
    packets: int = 0
    garbage_bytes: int = 0
    connects: int = 0
    disconnects: int = 0
    last_error: str = ""
    connected: bool = False
    version_errors: int = 0
    """Connections refused because the plugin's greeting was missing or of another version."""
    repeated_packets: int = 0
    """Valid packets dropped because they repeated the sequence of the packet before them on their connection: no
    new game frame (a plugin that resends one packet, or another program that does not count its packets)."""
    extra: dict = field(default_factory=dict)


class TelemetryClient:
    """Connects to the plugin, keeps the newest packet from a background thread, reconnects on its own.

    ``client.latest()`` returns the newest packet if it is at most ``timeout`` seconds old, else raises
    :class:`TelemetryTimeoutError` naming the likely cause. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 5.0,
                 reconnect_delay: float = 0.25, start: bool = True, hello_timeout: float = 2.0,
                 version_retry_delay: float = 5.0) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.hello_timeout = hello_timeout
        self.version_retry_delay = version_retry_delay
        """A plugin of another version does not change by itself: retry less often (and log once per message)."""
        self.stats = TelemetryStats()
        self._parser = PacketParser()
        self._latest: Telemetry | None = None
        """The newest packet of the current connection (None: not connected, or nothing received on it yet)."""
        self._newest: Telemetry | None = None
        """The newest packet of any connection, this one or a lost one (None: nothing received yet)."""
        self._version_problem: PluginVersionError | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = time.monotonic()
        self._garbage_at_connect = 0
        """:attr:`PacketParser.garbage_bytes` when the current connection was made (what it sent that was no packet)."""
        self._garbage_at_latest = 0
        """:attr:`PacketParser.garbage_bytes` when the newest packet was delivered."""
        self._repeats_since_latest = 0
        """Packets dropped since the newest one was delivered, for repeating its sequence."""
        self._packets_at_connect = 0
        """:attr:`TelemetryStats.packets` when the current connection was made."""
        self._garbage_warned = False
        """Whether garbage between the current connection's packets was logged (once per connection)."""
        self._greeting_since: float | None = None
        """When the connection now waiting for the plugin's greeting was made (None: none is waiting)."""
        self._closed_by_plugin: deque[float] = deque(maxlen=BUMPED_CLOSES)
        """When the plugin last closed this client's connections (it replaces a client when another connects)."""
        self._bumped_warned_at = -math.inf
        if start:
            self.start()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"tm20-telemetry-{self.port}", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reader thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError as exc:
                self.stats.last_error = f"connection to {self.host}:{self.port} failed: {exc}"
                self._stop.wait(self.reconnect_delay)
                continue
            self._greeting_since = time.monotonic()
            try:
                leftover = self._greeting(sock)
            except (PluginVersionError, OSError) as exc:
                self._greeting_since = None
                sock.close()
                if isinstance(exc, PluginVersionError):
                    if str(exc) != self.stats.last_error:
                        log.error("tm20 telemetry: %s", exc)
                    self.stats.version_errors += 1
                self._version_problem = exc if isinstance(exc, PluginVersionError) else None
                self.stats.last_error = str(exc)
                # another version does not change by itself; a frozen or loading game greets once it runs again
                other_version = isinstance(exc, PluginVersionError) and not isinstance(exc, NoGreetingError)
                self._stop.wait(self.version_retry_delay if other_version else self.reconnect_delay)
                continue
            self._greeting_since = None
            self.stats.connects += 1
            self._garbage_at_connect = self._parser.garbage_bytes
            self._packets_at_connect = self.stats.packets
            self._garbage_warned = False
            self.stats.connected = True
            self._version_problem = None
            try:
                self._read(sock, leftover)
            finally:
                sock.close()
                with self._cond:  # what the lost connection sent is history now: latest() must not serve it
                    self.stats.connected = False
                    self._latest = None
                self.stats.disconnects += 1
                self._parser.reset()
                self.stats.garbage_bytes = self._parser.garbage_bytes
            self._stop.wait(self.reconnect_delay)

    def _greeting(self, sock: socket.socket) -> bytes:
        """Read and check the plugin's greeting; returns any bytes received after it (the first packets)."""
        data = b""
        deadline = time.monotonic() + self.hello_timeout
        while len(data) < HELLO_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                raise NoGreetingError(f"no greeting from port {self.port} in {self.hello_timeout:.0f} s: is the "
                                         f"TMRL plugin (protocol {PROTOCOL_VERSION}) the program listening there, and is the game "
                                         "not frozen or loading?")
            sock.settimeout(min(remaining, 0.25))
            try:
                chunk = sock.recv(HELLO_BYTES - len(data))
            except TimeoutError:
                continue
            if not chunk:
                raise OSError("the plugin closed the connection before its greeting")
            data += chunk
            if data[:4] == MAGIC:
                break  # a version-1 plugin: packets straight away, no greeting
        check_hello(data, self.port)
        return data[HELLO_BYTES:]

    def _read(self, sock: socket.socket, leftover: bytes = b"") -> None:
        sock.settimeout(0.25)
        if leftover:
            self._deliver(self._parser.feed(leftover, time.monotonic()))
        while not self._stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.stats.last_error = f"connection lost: {exc}"
                return
            if not chunk:
                self.stats.last_error = "the plugin closed the connection"
                self._closed_by_plugin.append(time.monotonic())
                if self._bumped() and time.monotonic() - self._bumped_warned_at >= 60.0:
                    self._bumped_warned_at = time.monotonic()
                    log.warning("tm20 telemetry: %s", self._bumped_hint())
                return
            self._deliver(self._parser.feed(chunk, time.monotonic()))

    def _deliver(self, packets: list[Telemetry]) -> None:
        self.stats.garbage_bytes = self._parser.garbage_bytes
        sequence = self._latest.sequence if self._latest is not None else None
        fresh = []
        for packet in packets:  # the plugin counts one packet per game frame: the same sequence again is no new one
            if packet.sequence == sequence:
                self.stats.repeated_packets += 1
                self._repeats_since_latest += 1
                continue
            fresh.append(packet)
            sequence = packet.sequence
        if fresh:
            with self._cond:
                self.stats.packets += len(fresh)
                self._latest = self._newest = fresh[-1]
                self._garbage_at_latest = self._parser.garbage_bytes
                self._repeats_since_latest = 0
                self._cond.notify_all()
            self._warn_of_interleaved_garbage()

    def _warn_of_interleaved_garbage(self) -> None:
        packets = self.stats.packets - self._packets_at_connect
        garbage = self._parser.garbage_bytes - self._garbage_at_connect
        # at least one byte per two packets: a packet one byte too long leaves packets - 1 (the last one's byte is
        # still buffered), which a re-check's 61-byte packets showed never reached one per packet
        if not self._garbage_warned and packets >= INTERLEAVED_GARBAGE_PACKETS and 2 * garbage >= packets:
            self._garbage_warned = True
            log.warning("tm20 telemetry: %d bytes that are no packet came between the first %d valid packets from "
                        "port %d (%s): packets of another size than %d bytes, from a plugin of another build? Install "
                        "the plugin of this tmrl (%s); its values may be read wrong", garbage, packets, self.port,
                        self._refusal(), PACKET_BYTES, PLUGIN_SOURCE)

    def _bumped(self) -> bool:
        """The plugin closed this client's connection :data:`BUMPED_CLOSES` times within :data:`BUMPED_WINDOW_S`:
        it serves one client and a newcomer replaces it, so another client is most likely connected too."""
        closes = self._closed_by_plugin
        return len(closes) == BUMPED_CLOSES and time.monotonic() - closes[0] <= BUMPED_WINDOW_S

    def _bumped_hint(self) -> str:
        return (f"the plugin on port {self.port} closed this connection {BUMPED_CLOSES} times within "
                f"{BUMPED_WINDOW_S:.0f} s: it serves one client at a time and a newly connected one replaces the "
                "other, so another client is most likely connected to the same port (a second worker, or check-env?); "
                "give each worker its own game and plugin port (env_options telemetry_port); if none is, the plugin "
                "itself is restarting or crashing (OpenPlanet's log says)")

    # consumer side ---------------------------------------------------------------------------------------------
    def _since(self) -> float:
        """When the newest packet arrived (on this or the lost connection), or when the client was created."""
        return self._newest.received_at if self._newest is not None else self._created

    def _connected_state(self) -> str:
        """Why a connected plugin gives no fresh packet: it stopped sending, sends only garbage, or sent nothing."""
        garbage = self._parser.garbage_bytes - self._garbage_at_connect
        if self._latest is not None:
            age = time.monotonic() - self._latest.received_at
            if self._repeats_since_latest:
                return (f"connected, but its newest new packet is {age:.1f} s old: the {self._repeats_since_latest} "
                        f"received since all repeat its sequence {self._latest.sequence} ({self._not_counting()})")
            since = self._parser.garbage_bytes - self._garbage_at_latest
            if since > 0:
                return (f"connected, but its newest valid packet is {age:.1f} s old and the {since} bytes received "
                        f"since are no valid packet ({self._refusal()})")
            return (f"connected, but its newest packet is {age:.1f} s old: the plugin stopped sending (game paused, "
                    "loading or frozen?)")
        if garbage > 0:
            return (f"connected, but the {garbage} bytes received are no valid packet ({self._refusal()}; another "
                    "program on this port?)")
        return "connected, but no packet arrived (is a map loaded and the car on track?)"

    def _not_counting(self) -> str:
        return (f"the program there does not count its packets as the TMRL plugin does, one per game frame "
                f"({PLUGIN_SOURCE}; a modified or another plugin?)")

    def _refusal(self) -> str:
        """Why the bytes received since the last valid packet are none, as the parser saw them."""
        problem = self._parser.last_problem
        return f"the last one refused: {problem}" if problem else f"no {MAGIC!r} packet start among them"

    def _timeout_error(self, waited: float) -> TelemetryTimeoutError:
        greeting_since = self._greeting_since
        state = (self._connected_state() if self.stats.connected else
                 f"connected {time.monotonic() - greeting_since:.1f} s ago, waiting for the plugin's greeting"
                 if greeting_since is not None else self.stats.last_error or "not connected")
        if self._version_problem is not None and not self.stats.connected:
            return PluginVersionError(f"no telemetry from 127.0.0.1:{self.port} for {waited:.1f} s: "
                                      f"{self._version_problem}")
        hint = ""
        if self._bumped():
            hint = f" Likely cause: {self._bumped_hint()}"
        elif not self.stats.connected and "refused" in (self.stats.last_error or "").lower():
            # nothing listens: the most frequent upstream complaint, the plugin not loaded or on another port
            hint = (" Nothing listens on that port: load TMRL Telemetry from the OpenPlanet overlay (F3, Developer "
                    "menu, signature mode Developer) and check that its port setting is the same")
        return TelemetryTimeoutError(
            f"no telemetry from 127.0.0.1:{self.port} for {waited:.1f} s ({state}): is the game running with the "
            f"TMRL OpenPlanet plugin enabled, on port {self.port}?{hint}")

    def latest(self, timeout: float | None = None) -> Telemetry:
        """The newest packet of the current connection, waiting up to ``timeout`` (default: the client's) for one
        no older than that; :class:`TelemetryTimeoutError` after that."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._latest is not None and now - self._latest.received_at <= timeout:
                    return self._latest
                if now >= deadline:
                    raise self._timeout_error(now - self._since())
                self._cond.wait(deadline - now)

    def current(self, max_age: float) -> Telemetry:
        """The newest packet received, on this connection or a lost one, if it is no older than ``max_age``; else
        :class:`TelemetryTimeoutError` at once. A real-time step never waits here: a plugin that stalls or whose
        connection drops (and is being made again) gives the same packet again, a repeated step, until that packet
        is ``max_age`` old. Unlike :meth:`latest`, which waits for a packet of the current connection."""
        with self._cond:
            newest = self._newest
            if newest is not None and time.monotonic() - newest.received_at <= max_age:
                return newest
            raise self._timeout_error(time.monotonic() - self._since())

    def newer_than(self, sequence: int | None, timeout: float | None = None) -> Telemetry:
        """The first packet whose sequence differs from ``sequence`` (a fresh game frame), waiting up to ``timeout``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.sequence == sequence:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self._latest is not None and self._repeats_since_latest:
                        raise TelemetryTimeoutError(  # packets come, but never a new one: not a plugin gone quiet
                            f"packets from 127.0.0.1:{self.port} keep arriving, but their sequence has stayed at "
                            f"{sequence} for {timeout:.1f} s: {self._not_counting()}")
                    raise self._timeout_error(time.monotonic() - self._since())
                self._cond.wait(remaining)
            return self._latest
