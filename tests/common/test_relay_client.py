"""The relay client shared by the worker's and the trainer's links, over real loopback sockets (a bare ROUTER plays
the relay): (re)connections and disconnections are seen, counted and answered with the link's hello, heartbeats go out
when due and only while connected, refused sends are counted, reads are bounded per turn, and an error in a link's
callable is kept as the failure with the sockets closed."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import zmq
from loopback_relay import bind_router, wait_for
from tmrl_common.relay_client import RelayClient
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

FAST = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0)


@dataclass
class Counters:
    connections: int = 0
    disconnections: int = 0
    send_blocked: int = 0


@dataclass
class RecordingLink:
    """The callables a link gives the client: says hello on connection, records the rest."""

    messages: list[list[bytes]] = field(default_factory=list)
    per_turn: list[int] = field(default_factory=list)
    heartbeats: int = 0
    turns: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: RelayClient | None = None
    to_send_on_turn: int = 0
    send_results: list[bool] = field(default_factory=list)

    def on_connected(self) -> str:
        assert self.client is not None
        self.client.send([b"hello"])
        return "hello sent"

    def on_message(self, frames: list[bytes]) -> None:
        if frames == [b"boom"]:
            raise ValueError("the link could not handle this")
        with self.lock:
            self.messages.append(frames)
            self.per_turn[-1] += 1

    def on_turn(self) -> None:
        assert self.client is not None
        with self.lock:
            self.turns += 1
            self.per_turn.append(0)
        while self.to_send_on_turn:
            self.to_send_on_turn -= 1
            self.send_results.append(self.client.send([b"payload"]))

    def send_heartbeat(self) -> None:
        assert self.client is not None
        self.heartbeats += 1
        self.client.send([b"heartbeat"])


def make_client(context, port: int, transport: TransportConfig = FAST, **options) -> tuple[RelayClient, RecordingLink,
                                                                                          Counters]:
    link, counters = RecordingLink(), Counters()
    # per_turn[-1] is the current turn's count; messages read before the first turn land in this slot
    link.per_turn.append(0)
    link.client = RelayClient(
        "peer-1", "test", RelayEndpoint("127.0.0.1", port, transport, SecurityConfig(insecure=True)), counters,
        on_connected=link.on_connected, on_message=link.on_message, on_turn=link.on_turn,
        send_heartbeat=link.send_heartbeat, while_away="holding on until it comes back", context=context, **options,
    )
    return link.client, link, counters


@pytest.fixture
def unused_port():
    """A loopback port nobody listens on, held for the test by a bound, non-listening socket: connections to it are
    refused, and the kernel never picks it as the source port of a connect. A port merely closed again is not enough:
    it lies in the ephemeral range, so ZeroMQ's reconnects now and then connect the DEALER to itself (a TCP
    self-connect, about 1 in 8,000 tries measured here), and the client then counts a connection and heartbeats."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def receive(router: zmq.Socket, timeout_s: float = 5.0) -> tuple[bytes, list[bytes]]:
    if not router.poll(int(timeout_s * 1000)):
        raise AssertionError(f"the router received nothing within {timeout_s}s")
    routing_id, *frames = router.recv_multipart()
    return routing_id, frames


def test_each_connection_is_counted_and_greeted_and_each_disconnection_counted_and_logged(context, caplog):
    caplog.set_level(logging.INFO, logger="tmrl_common.relay_client")
    router, port = bind_router(context)
    client, _, counters = make_client(context, port)
    client.start()
    try:
        assert receive(router)[1] == [b"hello"]
        wait_for(lambda: client.connected)
        assert (counters.connections, counters.disconnections) == (1, 0)
        router.close(linger=0)  # the relay goes away...
        wait_for(lambda: not client.connected)
        assert counters.disconnections == 1
        router, _ = bind_router(context, port)  # ...and comes back on the same port: a fresh hello
        assert receive(router)[1] == [b"hello"]
        wait_for(lambda: client.connected)
        assert (counters.connections, counters.disconnections) == (2, 1)
    finally:
        client.stop()
        router.close(linger=0)
    assert not client.connected and not client.is_alive() and client.failure is None
    lines = [r.getMessage() for r in caplog.records]
    connected = f"peer-1: connected to the relay (tcp://127.0.0.1:{port} plain text); hello sent"
    assert lines.count(connected) == 2
    assert lines.count("peer-1: lost the relay connection (the relay stopped, or the network dropped); holding on "
                       "until it comes back") == 1


def test_a_frame_over_the_clients_own_cap_is_named_when_the_connection_drops(context, caplog):
    """ZeroMQ drops a frame over ``max_frame_bytes`` together with the connection and says nothing more: the
    warning names the setting, since nothing else would."""
    caplog.set_level(logging.INFO, logger="tmrl_common.relay_client")
    router, port = bind_router(context)
    client, _, counters = make_client(context, port, FAST.model_copy(update={"max_frame_bytes": 4096}))
    client.start()
    try:
        routing_id, frames = receive(router)
        wait_for(lambda: client.connected)
        router.send_multipart([routing_id, b"x" * 10_000])
        wait_for(lambda: counters.disconnections >= 1)
    finally:
        client.stop()
        router.close(linger=0)
    assert any("lost the relay connection (the relay stopped, or the network dropped; or the relay sent a frame over "
               "this side's transport.max_frame_bytes (4096 bytes)" in record.getMessage() for record in caplog.records)


def test_heartbeats_go_out_when_due_while_connected(context):
    router, port = bind_router(context)
    client, link, _ = make_client(context, port, heartbeat_interval_s=0.1, poll_ms=5)
    client.start()
    try:
        assert receive(router)[1] == [b"hello"]
        beats = [receive(router)[1] for _ in range(3)]
        assert beats == [[b"heartbeat"]] * 3
    finally:
        client.stop()
        router.close(linger=0)
    assert link.heartbeats >= 3 and link.turns >= 2 * link.heartbeats  # once per interval, not once per turn


def test_no_heartbeat_while_no_relay_is_there(context, unused_port):
    client, link, counters = make_client(context, unused_port, heartbeat_interval_s=0.05)
    client.start()
    try:
        wait_for(lambda: link.turns >= 10)
        time.sleep(0.2)  # four intervals
    finally:
        client.stop()
    assert link.heartbeats == 0 and counters.connections == 0 and not client.connected


def test_a_send_zeromq_refuses_returns_false_and_is_counted_without_blocking(context, unused_port):
    # nobody listens and the queue holds one message: the rest of the sends are refused (EAGAIN)
    client, link, counters = make_client(context, unused_port, FAST.model_copy(update={"send_hwm": 1}))
    link.to_send_on_turn = 5
    client.start()
    try:
        wait_for(lambda: len(link.send_results) == 5)
    finally:
        client.stop()
    refused = link.send_results.count(False)
    assert refused >= 3 and counters.send_blocked == refused and client.failure is None


def test_reads_are_bounded_per_turn_and_delivered_in_order(context):
    router, port = bind_router(context)
    client, link, _ = make_client(context, port, max_receive_per_turn=7)
    client.start()
    try:
        routing_id, _ = receive(router)
        sent = [[b"message", str(i).encode()] for i in range(60)]
        for frames in sent:
            router.send_multipart([routing_id, *frames])
        wait_for(lambda: len(link.messages) == 60)
    finally:
        client.stop()
        router.close(linger=0)
    with link.lock:
        assert link.messages == sent
        assert max(link.per_turn) <= 7 and sum(link.per_turn) == 60


def test_an_error_in_a_callable_ends_the_thread_as_its_failure_and_closes_the_socket(context, caplog):
    router, port = bind_router(context)
    watch = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    client, _, _ = make_client(context, port)
    client.start()
    try:
        routing_id, _ = receive(router)
        router.send_multipart([routing_id, b"boom"])
        wait_for(lambda: not client.is_alive())
        assert isinstance(client.failure, ValueError) and not client.connected
        assert watch.poll(5000), "the relay side never saw the connection close"
        assert "peer-1: test thread stopped on an unexpected error" in caplog.text
    finally:
        client.stop()
        watch.close(linger=0)
        router.close(linger=0)


def test_send_outside_the_loop_says_so(context, unused_port):
    client, _, _ = make_client(context, unused_port)
    with pytest.raises(RuntimeError, match="outside the test thread's loop"):
        client.send([b"too early"])


def test_wake_runs_the_next_turn_at_once_instead_of_at_the_end_of_the_poll(context):
    router, port = bind_router(context)
    client, link, _ = make_client(context, port, poll_ms=3000)
    client.start()
    try:
        assert receive(router)[1] == [b"hello"]
        wait_for(lambda: link.turns >= 1)
        time.sleep(0.2)  # the loop is now inside a 3 s poll
        turns = link.turns
        woken_at = time.monotonic()
        client.wake()
        wait_for(lambda: link.turns > turns, 2.0)
        assert time.monotonic() - woken_at < 1.0  # far less than the 3 s poll it cut short
        for _ in range(10_000):  # wake-ups pile up faster than the loop turns: none blocks, none raises
            client.wake()
        wait_for(lambda: link.turns > turns + 1, 2.0)
    finally:
        client.stop()
        router.close(linger=0)
    assert not client.is_alive()
    client.wake()  # after the loop ended (its socket pair closed): a no-op


def test_a_client_stopped_without_starting_closes_its_wake_up_pair(context, unused_port):
    client, _, _ = make_client(context, unused_port)
    client.stop()
    assert client._wake_reader.fileno() == client._wake_writer.fileno() == -1
    client.wake()  # a no-op, not an error


def test_a_key_file_that_breaks_before_a_socket_is_rebuilt_is_the_failure_reported(context, monkeypatch):
    """An outside probe corrupted a worker's own key file while it ran: the socket rebuilt after a refusal raised
    KeyFileError, and closing the old, already closed socket again then raised over it, so the worker's last line
    named a closed zmq.Socket instead of the key file."""
    from tmrl_common.curve import KeyFileError

    router, port = bind_router(context)
    client, _, _ = make_client(context, port)
    real_connect, calls = RelayEndpoint.connect, []

    def connect(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyFileError("keys/worker-1.key_secret is not a ZeroMQ certificate")
        return real_connect(self, *args, **kwargs)

    monkeypatch.setattr(RelayEndpoint, "connect", connect)
    due = iter([False, True])
    monkeypatch.setattr(client.handshake, "due_for_new_socket", lambda now=None: next(due, False))
    client.start()
    try:
        wait_for(lambda: not client.is_alive())
    finally:
        client.stop()
        router.close(linger=0)
    assert isinstance(client.failure, KeyFileError), client.failure


def test_a_connection_the_relay_answered_on_then_left_silent_is_replaced(context, caplog):
    """An outside probe held a worker's TCP connection open and stopped forwarding its bytes (a NAT or Wi-Fi link
    that died): the worker noticed nothing in 30 s, and 43 s into 90 s. The relay answers every heartbeat, so a
    connection it answered on and then left silent past ``silence_s`` is taken as dead and a new one connected."""
    router, port = bind_router(context)
    client, link, counters = make_client(context, port, heartbeat_interval_s=0.05)
    client.silence_s = 0.5
    caplog.set_level(logging.WARNING, logger="tmrl_common.relay_client")
    client.start()
    try:
        first, frames = receive(router)
        assert frames == [b"hello"]
        for _ in range(3):  # answered for a while: heartbeats come and go
            while receive(router)[1] != [b"heartbeat"]:
                pass
            router.send_multipart([first, b"answer"])
        # then the path goes silent: nothing more from the "relay"; the client must give up on this connection
        deadline = time.monotonic() + 10
        while True:
            routing_id, frames = receive(router, timeout_s=max(0.01, deadline - time.monotonic()))
            if routing_id != first:
                break
        assert frames == [b"hello"]  # a new connection, greeted again
        assert client.silent_links == 1 and counters.connections == 2
        assert "no message from the relay" in caplog.text and "taken as dead" in caplog.text
    finally:
        client.stop()
        router.close(linger=0)


def test_a_connection_the_relay_never_answered_on_is_not_replaced_for_silence(context):
    """Silence counts only once the relay has answered on a connection: one that never answers is the handshake
    watch's ``unanswered`` case (the relay drops what this peer sends), not a dead path."""
    router, port = bind_router(context)
    client, link, counters = make_client(context, port, heartbeat_interval_s=0.05)
    client.silence_s = 0.3
    client.start()
    try:
        first, _ = receive(router)
        time.sleep(1.0)  # heartbeats only, never answered
        assert client.silent_links == 0 and counters.connections == 1
    finally:
        client.stop()
        router.close(linger=0)


def test_after_a_silent_connection_the_status_hint_points_at_the_network_not_the_setup(context, unused_port):
    """A second network probe: while a worker reconnected after its connection went silent, its status lines asked
    "is it running there, on that port, with the same --insecure or keys?"."""
    client, _, _ = make_client(context, unused_port)
    try:
        assert client.unconnected_hint() == "is it running there, on that port, with the same --insecure or keys?"
        client._heard_at = time.monotonic() - 30.0  # answered once, then 30 s of nothing
        client._replace_silent_link(time.monotonic())
        assert client.silent_links == 1 and "went silent: a network path" in client.unconnected_hint()
        assert client.handshake.path_down  # its handshake time-outs until the path is back are warnings
    finally:
        client.stop()


def test_after_a_connection_the_kernel_closed_the_status_hint_points_at_the_relay_and_network(context, unused_port):
    """A third network probe: a partition closed the connection at tcp_max_retransmit_ms (10 s), before the 20 s
    silence check, so every status line of the outage asked about ports and keys on a link that had worked for
    minutes."""
    import zmq

    client, _, _ = make_client(context, unused_port)
    try:
        client.handshake.on_event(zmq.EVENT_CONNECTED)
        client.handshake.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        assert client.unconnected_hint() == "is it running there, on that port, with the same --insecure or keys?"
        client.handshake.on_event(zmq.EVENT_DISCONNECTED)  # the kernel gave up on unacknowledged data
        assert client.unconnected_hint() == ("it was reached until that connection closed: is the relay still "
                                             "running, and the network up?")
        client.handshake.on_event(zmq.EVENT_CONNECTED)
        client.handshake.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # back: a later failure is a set-up question again
        assert client.unconnected_hint() == "is it running there, on that port, with the same --insecure or keys?"
    finally:
        client.stop()


def test_every_client_socket_gives_up_a_connection_attempt_after_connect_timeout_ms(context):
    """A network probe's trainer, whose path dropped every packet for 60 s, reconnected 21 s after it healed: its
    connect waited out the kernel's SYN back-off. ZMQ_CONNECT_TIMEOUT bounds each attempt."""
    import zmq
    from tmrl_common.sockets import TransportConfig, apply_transport

    socket = context.socket(zmq.DEALER)
    try:
        apply_transport(socket, TransportConfig())
        assert socket.getsockopt(zmq.CONNECT_TIMEOUT) == 5000
        apply_transport(socket, TransportConfig(connect_timeout_ms=1500))
        assert socket.getsockopt(zmq.CONNECT_TIMEOUT) == 1500
    finally:
        socket.close(linger=0)


class BulkLink(RecordingLink):
    """Sends ``bulk`` 1 MB messages, one per turn, while connected."""

    bulk: int = 0

    def on_turn(self) -> None:
        assert self.client is not None
        if self.bulk and self.client.connected and self.client.send([b"bulk", bytes(1 << 20)]):
            self.bulk -= 1


def test_what_a_lost_connection_had_queued_never_goes_out_ahead_of_the_next_hello(context):
    """A pause probe: libzmq kept a DEALER's queue across reconnections, so what a relay that stopped reading had not
    taken (weights updates, acks, heartbeats) went out on the next connection ahead of its hello, each refused as
    unknown_sender (233 weights updates after one pause), each refused ack costing a resend."""
    router = context.socket(zmq.ROUTER)
    router.linger, router.rcvhwm = 0, 1  # its own libzmq stops reading too: the client's queue holds what is unread
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link, counters = BulkLink(), Counters()
    link.per_turn.append(0)
    client = link.client = RelayClient(
        "peer-1", "test", RelayEndpoint("127.0.0.1", port, FAST, SecurityConfig(insecure=True)), counters,
        on_connected=link.on_connected, on_message=link.on_message, on_turn=link.on_turn,
        send_heartbeat=lambda: None, context=context)
    client.start()
    try:
        assert receive(router)[1] == [b"hello"]
        link.bulk = 40  # 40 MB the relay does not read: the kernel's buffers hold a few, libzmq's queue the rest
        wait_for(lambda: link.bulk == 0)
        router.close(linger=0)  # the relay goes away with them unread...
        wait_for(lambda: counters.disconnections == 1)
        router, _ = bind_router(context, port)  # ...and comes back: the first message of the new connection
        assert receive(router)[1] == [b"hello"]
    finally:
        client.stop()
        router.close(linger=0)


def test_a_process_that_did_not_run_says_so_instead_of_taking_the_relays_silence_for_a_dead_link(context, caplog,
                                                                                                unused_port):
    """A pause probe SIGSTOPped a worker for 30 s: once resumed it took the relay's silence over that time for a dead
    connection ('... or a paused relay'), reconnected and resent. A poll that returns seconds past its time-out means
    this process did not run: said once, and the relay's silence counts from then."""
    from tmrl_common.relay_client import SUSPENDED_GAP_S

    client, _, _ = make_client(context, unused_port)
    caplog.set_level(logging.WARNING, logger="tmrl_common.relay_client")
    client._heard_at = time.monotonic() - 31.0  # the relay's last message, before the pause
    client._noticed_suspension(time.monotonic() - 1.0)  # a poll of 20 ms that took a second: starved, not stopped
    assert client.suspensions == 0 and not caplog.records and client._suspended_note == ""
    client._noticed_suspension(time.monotonic() - 30.0)  # one that took 30 s
    assert client.suspensions == 1 and time.monotonic() - client._heard_at < 1.0
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("peer-1: this process did not run for 30 s (suspended: SIGSTOP") and SUSPENDED_GAP_S <= 30
    assert client._suspended_note == ("; this process had just not run for 30 s, and a relay closes a connection "
                                      "that stops reading, unless it stopped itself meanwhile")
    client._noticed_suspension(time.monotonic())  # the next turn: the disconnection may be seen only now
    assert client._suspended_note != ""
    client._resumed_at -= 6.0  # 6 s later: a lost connection is no longer said to follow the pause
    client._noticed_suspension(time.monotonic())
    assert client._suspended_note == ""
    client.stop()
