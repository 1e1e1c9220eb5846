"""A stand-in for the OpenPlanet plugin: serves recorded (or synthetic) telemetry over TCP on loopback.

It behaves like the plugin: listens on ``127.0.0.1:<port>``, serves one client at a time, greets each client with
the plugin's greeting (:func:`~tmrl_worker.tm20.openplanet.encode_hello`), writes one chunk per tick
(``rate_hz``), and when the client goes away waits for the next one, resuming the stream where it stopped. Chunks
are normally packets (:func:`~tmrl_worker.tm20.openplanet.encode_packet` or a recording read with
:func:`~tmrl_worker.tm20.recording.load_packets`) but may be any bytes, which is how tests inject garbage.
Used by the tests, and by ``tmrl-worker benchmark --replay`` to exercise the env without the game.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Sequence

from tmrl_worker.tm20.openplanet import encode_hello

ChunkSource = Callable[[int], bytes | None]


class TelemetryReplayServer:
    """Serve ``chunks`` (a list, or a function ``tick -> bytes | None``) at ``rate_hz`` to one client at a time; as
    the plugin does, a client that connects while another is served replaces it (the old connection is closed).

    ``loop``: start again after the last chunk (list source). ``port=0`` picks a free port (see :attr:`port`).
    ``hello``: the greeting written to each new client first (default: this version's; ``b""``: none, like a
    version-1 plugin).
    """

    def __init__(self, chunks: Sequence[bytes] | ChunkSource, rate_hz: float = 100.0, port: int = 0,
                 loop: bool = True, hello: bytes | None = None) -> None:
        self.hello = encode_hello() if hello is None else hello
        self._source: ChunkSource = chunks if callable(chunks) else self._list_source(list(chunks), loop)
        self.period = 1.0 / rate_hz
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(1)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.tick = 0
        self.connections = 0
        self.chunks_sent = 0
        self._client: socket.socket | None = None
        self._drop = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"tm20-replay-{self.port}", daemon=True)

    @staticmethod
    def _list_source(chunks: list[bytes], loop: bool) -> ChunkSource:
        def source(tick: int) -> bytes | None:
            if not chunks or (not loop and tick >= len(chunks)):
                return None
            return chunks[tick % len(chunks)]
        return source

    def start(self) -> TelemetryReplayServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._listener.close()

    def __enter__(self) -> TelemetryReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def disconnect_client(self) -> None:
        """Drop the current connection (like a game that stops the plugin); the stream resumes for the next client."""
        self._drop.set()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._drop.clear()
            with client:
                self._stream(client)

    def _stream(self, client: socket.socket) -> None:
        if self.hello:
            try:
                client.sendall(self.hello)
            except OSError:
                return
        while not self._stop.is_set() and not self._drop.is_set():
            if select.select([self._listener], [], [], 0)[0]:  # a new client: it replaces this one (_serve accepts)
                return
            chunk = self._source(self.tick)
            if chunk is None:
                self._stop.wait(self.period)
                continue
            try:
                client.sendall(chunk)
            except OSError:
                return
            self.tick += 1
            self.chunks_sent += 1
            self._stop.wait(self.period)
