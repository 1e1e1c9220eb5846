"""A client that cannot reach the relay learns why within seconds, over real CurveZMQ sockets (a ROUTER with the
relay's ZAP authenticator plays the relay): a refused key, a wrong ``--server-key``, ``--insecure`` on one side only,
a port where nothing speaks ZMTP and a relay that never answers each give one error naming the cause and the fix; a
refused client connects by itself once its key is allowed (libzmq never reconnects a refused socket)."""

from __future__ import annotations

import errno
import logging
import shutil
import socket as socketlib
import struct
import threading
import time
from pathlib import Path

import pytest
import zmq
from loopback_relay import wait_for
from tmrl_common.curve import generate_key_pair, load_secret_key, reload_authenticator, start_authenticator
from tmrl_common.handshake import DROPS_BEFORE_PAUSE, HandshakeWatch
from tmrl_common.relay_client import RelayClient
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig
from zmq.utils.monitor import recv_monitor_message

from .test_relay_client import FAST, Counters


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("relay", "other-relay", "worker-9"):
        generate_key_pair(tmp_path / "keys", name)
    (tmp_path / "allow").mkdir()
    return tmp_path


@pytest.fixture
def curve_relay(context: zmq.Context, keys: Path):
    """``(port, authenticator)`` of a CURVE ROUTER admitting the keys in ``keys/allow``, as the relay's workers socket."""
    authenticator = start_authenticator(context, {"tmrl-workers": keys / "allow"})
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.zap_domain = b"tmrl-workers"
    router.curve_publickey, router.curve_secretkey = load_secret_key(keys / "keys" / "relay.key_secret")
    router.curve_server = True
    yield router.bind_to_random_port("tcp://127.0.0.1"), authenticator
    router.close()
    authenticator.stop()


@pytest.fixture
def start_client(context: zmq.Context):
    """Starts clients (stopped after the test) that send a heartbeat every 0.2 s when ``heartbeat``, else nothing."""
    clients: list[RelayClient] = []

    def start(port: int, security: SecurityConfig, role: str = "worker", heartbeat: bool = False) -> RelayClient:
        client = RelayClient("worker-9", "test", RelayEndpoint("127.0.0.1", port, FAST, security), Counters(),
                             on_connected=lambda: "", on_message=lambda frames: None, on_turn=lambda: None,
                             send_heartbeat=lambda: heartbeat and client.send([b"heartbeat"]), role=role,
                             heartbeat_interval_s=0.2, context=context)
        client.handshake.retry_s = 0.3
        client.handshake.handshake_timeout_s = 0.5
        client.handshake.reply_timeout_s = 0.8
        clients.append(client)
        client.start()
        return client

    yield start
    for client in clients:
        client.stop()


def client_keys(keys: Path, server: str = "relay") -> SecurityConfig:
    return SecurityConfig(secret_key_file=keys / "keys" / "worker-9.key_secret",
                          server_public_key_file=keys / "keys" / f"{server}.key")


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "tmrl_common.handshake"]


def test_a_refused_key_is_reported_with_the_keys_add_command_and_connects_once_allowed(keys, curve_relay, start_client,
                                                                                       caplog):
    caplog.set_level(logging.INFO)
    port, authenticator = curve_relay
    client = start_client(port, client_keys(keys))
    wait_for(lambda: client.handshake.counters.refused >= 1, 5)
    assert not client.connected
    [message] = errors(caplog)
    assert "refused this worker's key" in message
    # the public key's path as the client has it: pasted on the same host, the command works as it is
    assert f"tmrl-relay keys add {keys / 'keys' / 'worker-9.key'} --allow-dir ALLOW --role worker" in message

    shutil.copy(keys / "keys" / "worker-9.key", keys / "allow" / "worker-9.key")
    reload_authenticator(authenticator, {"tmrl-workers": keys / "allow"})
    assert client.wait_connected(5), "the client never retried after its key was allowed"
    assert client.handshake.counters.new_sockets >= 1


def test_a_refused_trainer_key_names_the_trainers_allow_list(keys, curve_relay, start_client, caplog):
    start_client(curve_relay[0], client_keys(keys), role="trainer")
    wait_for(lambda: errors(caplog), 5)
    assert "--allow-dir ALLOW --role trainer" in errors(caplog)[0]


def test_a_wrong_server_key_is_reported_as_such(keys, curve_relay, start_client, caplog):
    shutil.copy(keys / "keys" / "worker-9.key", keys / "allow" / "worker-9.key")
    client = start_client(curve_relay[0], client_keys(keys, server="other-relay"))
    wait_for(lambda: errors(caplog), 5)
    assert "--server-key" in errors(caplog)[0] and "other-relay.key" in errors(caplog)[0]
    assert client.handshake.counters.dropped >= 1 and not client.connected


def test_insecure_client_against_a_curve_relay_is_told_to_match_the_other_side(curve_relay, start_client, caplog):
    client = start_client(curve_relay[0], SecurityConfig(insecure=True))
    wait_for(lambda: errors(caplog), 5)
    assert "speaks CurveZMQ, this worker plain text (--insecure)" in errors(caplog)[0]
    assert client.handshake.counters.mechanism >= 1
    time.sleep(0.5)
    assert not [e for e in errors(caplog) if "--server-key" in e]  # a plain-text client has no server key to blame


def test_a_refused_key_may_also_be_a_client_on_the_other_roles_port():
    """An outside probe pointed a trainer at the workers' port: the advice named only `keys add --role trainer`,
    which then said the key was already allowed."""
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=False))
    for role in ("trainer", "worker"):
        advice = HandshakeWatch("t", endpoint, role).advice("refused")
        assert f"either port 5555 is not the relay's {role}_port (each port admits its own role's keys only; the " \
               "relay's log names the port that allows this key), or the key is not in its" in advice
    trainer = HandshakeWatch("t", endpoint, "trainer").advice("refused")
    assert "`tmrl-relay keys generate --name trainer` on another host" in trainer  # not only the one-machine keys init


def test_a_dropped_handshake_of_a_plain_text_client_is_blamed_on_the_mechanism_not_a_server_key():
    """The probe's --insecure worker against a CurveZMQ relay first logged '--server-key (None) is most likely not
    the public key of the relay's --secret-key': libzmq may report a drop before the mechanism mismatch."""
    plain = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    advice = HandshakeWatch("w", plain, "worker").advice("dropped")
    assert "speaks CurveZMQ, this worker plain text (--insecure)" in advice and "--server-key" not in advice


def test_a_port_where_nothing_speaks_zmtp_is_reported_after_the_handshake_timeout(start_client, caplog):
    with socketlib.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = start_client(listener.getsockname()[1], SecurityConfig(insecure=True))
        wait_for(lambda: errors(caplog), 5)
        assert "no handshake after" in errors(caplog)[0]
        assert client.handshake.counters.silent == 1


def test_a_listener_that_closes_connections_mid_handshake_is_not_blamed_on_the_mechanism(start_client, caplog):
    """A connection reset during the handshake (ECONNRESET: a relay being stopped or restarted, or another service)
    was reported to a plain-text client as "the relay speaks CurveZMQ"; a wrong --server-key gives EPIPE instead."""
    with socketlib.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closing = threading.Event()

        def close_each_connection() -> None:
            listener.settimeout(0.2)
            while not closing.is_set():
                try:
                    connection = listener.accept()[0]
                except OSError:
                    continue
                time.sleep(0.2)  # TCP up, then closed before any greeting: a reset during the handshake
                connection.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()

        thread = threading.Thread(target=close_each_connection, daemon=True)
        thread.start()
        try:
            client = start_client(listener.getsockname()[1], SecurityConfig(insecure=True))
            wait_for(lambda: client.handshake.counters.closed >= 1, 5)
        finally:
            closing.set()
            thread.join(2)
    message = errors(caplog)[-1]
    assert "closed the connection during the handshake" in message and "is a tmrl relay listening" in message
    assert "speaks CurveZMQ" not in " ".join(errors(caplog))
    assert client.handshake.counters.dropped == 0


def test_a_relay_that_never_answers_is_reported_and_one_that_answers_is_not(context, start_client, caplog):
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = start_client(port, SecurityConfig(insecure=True), heartbeat=True)
    assert client.wait_connected(5)
    wait_for(lambda: errors(caplog), 5)
    assert "has not answered" in errors(caplog)[0]
    client.stop()
    caplog.clear()
    answered = start_client(port, SecurityConfig(insecure=True), heartbeat=True)
    assert answered.wait_connected(5)
    deadline = time.monotonic() + 2.0  # more than twice reply_timeout_s, answering every heartbeat
    while time.monotonic() < deadline:
        if router.poll(50):
            routing_id, *_ = router.recv_multipart()
            router.send_multipart([routing_id, b"heartbeat"])
    assert answered.handshake.counters.unanswered == 0 and not errors(caplog)


def test_a_refused_trainer_key_warns_against_allowing_a_workers_key_as_the_trainer(tmp_path):
    # Found by hand (README quick start, a worker's key given to `tmrl-trainer run --secret-key`): the advice was only
    # `keys add worker-1.key --role trainer`, which `keys add` refuses (one key, one role): a second wrong step.
    security = SecurityConfig(secret_key_file=tmp_path / "keys" / "worker-1.key_secret",
                              server_public_key_file=tmp_path / "keys" / "relay.key")
    watch = HandshakeWatch("trainer", RelayEndpoint("127.0.0.1", 5556, TransportConfig(), security), "trainer")
    advice = watch.advice("refused")
    assert f"keys add {tmp_path / 'keys' / 'worker-1.key'} --allow-dir ALLOW --role trainer" in advice
    assert "a worker's key" in advice and "trainer.key_secret" in advice


def test_a_relay_that_stalls_mid_handshake_after_an_earlier_one_is_not_called_a_wrong_port(caplog):
    """A soak probe SIGSTOPped the relay for 20 s: every client then logged 'is a tmrl relay listening on that port
    (not another service ...)?', which sends an operator looking for a wrong port on a relay that was only paused."""
    watch = HandshakeWatch("worker-1", RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True)),
                           "worker")
    assert "is a tmrl relay listening on that port" in watch.advice("silent")  # never shook hands: maybe the port
    watch.on_event(zmq.EVENT_CONNECTED, now=0.0)
    watch.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=0.1)
    watch.on_event(zmq.EVENT_DISCONNECTED, now=50.0)
    watch.on_event(zmq.EVENT_CONNECTED, now=51.0)  # the paused relay's kernel still accepts the TCP connection
    with caplog.at_level("WARNING", logger="tmrl_common.handshake"):
        watch.check(now=57.0)
    assert watch.counters.silent == 1
    assert "the relay has not finished the handshake in 5s, as it did before: it is paused, overloaded or " \
           "restarting" in caplog.text and "listening on that port" not in caplog.text
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # the lost connection was reported: its outage


def test_a_dropped_handshake_rebuilds_the_socket_after_the_retry_delay_unless_a_retry_gets_through():
    """A rebuilt socket reads the key files again: a client given the rotated relay's new public key in place then
    reconnects without a restart (an outside probe restarted the clients, and one lost its in-memory spool)."""
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    watch = HandshakeWatch("worker-1", endpoint, "worker", retry_s=10.0, report=False)
    for second in range(12):  # libzmq's own retries, all dropped
        watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, now=float(second))
        assert watch.due_for_new_socket(now=float(second)) is (second == 10), second
    assert watch.counters.dropped == 12 and watch.counters.new_sockets == 1
    transient = HandshakeWatch("worker-1", endpoint, "worker", retry_s=10.0, report=False)
    transient.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, now=0.0)
    transient.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=1.0)  # a retry got through
    assert not transient.due_for_new_socket(now=20.0)


def test_dropped_handshakes_pause_libzmqs_retries_until_the_socket_is_rebuilt():
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    watch = HandshakeWatch("worker-1", endpoint, "worker", retry_s=10.0, report=False)
    pauses = []
    for second in range(DROPS_BEFORE_PAUSE + 2):
        watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, now=0.1 * second)
        pauses.append(watch.pause_due())
    assert pauses == [False] * (DROPS_BEFORE_PAUSE - 1) + [True, False, False]  # once per streak
    assert watch.due_for_new_socket(now=10.0)
    for _ in range(DROPS_BEFORE_PAUSE):  # the new socket's drops start a new streak
        watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, now=10.1)
    assert watch.pause_due()
    through = HandshakeWatch("worker-1", endpoint, "worker", retry_s=10.0, report=False)
    for _ in range(DROPS_BEFORE_PAUSE - 1):
        through.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, now=0.0)
    through.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=0.1)  # a retry got through: the streak is over
    through.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, now=0.2)
    assert not through.pause_due()


def test_a_client_with_a_wrong_server_key_stops_retrying_between_rebuilds(keys, curve_relay, context):
    """libzmq retries a dropped handshake every reconnect interval (50 ms here), whatever its back-off: without the
    pause this client made about 20 attempts a second; with it, DROPS_BEFORE_PAUSE per rebuild."""
    shutil.copy(keys / "keys" / "worker-9.key", keys / "allow" / "worker-9.key")
    client = RelayClient("worker-9", "test", RelayEndpoint("127.0.0.1", curve_relay[0], FAST,
                                                           client_keys(keys, server="other-relay")),
                         Counters(), on_connected=lambda: "", on_message=lambda frames: None, on_turn=lambda: None,
                         send_heartbeat=lambda: None, role="worker", heartbeat_interval_s=0.2, context=context)
    client.handshake.retry_s = 1.5
    client.start()
    try:
        time.sleep(2.5)  # one rebuild at about 1.5 s
        dropped = client.handshake.counters.dropped
    finally:
        client.stop()
    assert client.handshake.counters.new_sockets == 1
    assert DROPS_BEFORE_PAUSE <= dropped <= 2 * DROPS_BEFORE_PAUSE, dropped


def test_a_client_given_the_relays_new_public_key_in_place_reconnects_without_a_restart(keys, curve_relay,
                                                                                        start_client):
    """A key rotation, end to end: the client's --server-key file held another relay's key (dropped handshakes);
    once the file holds this relay's key, the rebuilt socket reads it and connects."""
    shutil.copy(keys / "keys" / "worker-9.key", keys / "allow" / "worker-9.key")
    port, authenticator = curve_relay
    reload_authenticator(authenticator, {"tmrl-workers": keys / "allow"})
    server_key = keys / "keys" / "server.key"
    shutil.copy(keys / "keys" / "other-relay.key", server_key)  # the old relay's public key
    client = start_client(port, SecurityConfig(secret_key_file=keys / "keys" / "worker-9.key_secret",
                                               server_public_key_file=server_key))
    wait_for(lambda: client.handshake.counters.dropped >= 1, 5)
    assert not client.connected
    shutil.copy(keys / "keys" / "relay.key", server_key)  # the operator copies the new one over it
    assert client.wait_connected(10), "the client kept the old server key"
    assert client.handshake.counters.new_sockets >= 1


def test_libzmqs_handshake_time_limit_is_told_apart_from_a_mechanism_mismatch(context):
    """A network probe black-holed a plain-text worker's path for 90 s: libzmq's handshake time limit (a drop with
    EAGAIN) was reported as "the relay speaks CurveZMQ, this worker plain text: run both with --insecure"."""
    with socketlib.socket() as listener:  # takes the TCP connection, never speaks ZMTP: as a path carrying nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = RelayEndpoint("127.0.0.1", listener.getsockname()[1], TransportConfig(), SecurityConfig(insecure=True))
        watch = HandshakeWatch("worker-1", endpoint, "worker", report=False)
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.HANDSHAKE_IVL, 300)  # libzmq's limit, 30 s by default
        monitor = dealer.get_monitor_socket()
        dealer.connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        try:
            deadline = time.monotonic() + 5
            while watch.counters.timed_out == 0 and time.monotonic() < deadline:
                if monitor.poll(100):
                    event = recv_monitor_message(monitor)
                    watch.on_event(event["event"], event["value"])
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)
    assert (watch.counters.timed_out, watch.counters.dropped, watch.counters.mechanism) == (1, 0, 0)
    advice = watch.advice(watch.last_failure)
    assert "did not finish the handshake within libzmq's 30 s" in advice and "--insecure" not in advice


def test_handshake_time_outs_after_a_silent_connection_are_warnings_not_errors(caplog):
    """A network probe counted 5 ERROR lines per 90 s black hole: the handshake time-outs of an outage the client
    had already reported (its silent connection replaced) read as new faults. They are warnings until a handshake
    succeeds again; the same time-out without that outage stays an error."""
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    watch = HandshakeWatch("worker-1", endpoint, "worker", report_every_s=0.0)
    caplog.set_level(logging.WARNING, logger="tmrl_common.handshake")
    watch.path_down = True
    watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EAGAIN, now=100.0)
    watch.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=101.0)  # the path is back
    watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EAGAIN, now=200.0)
    assert [(r.levelname, "within libzmq's 30 s" in r.getMessage()) for r in caplog.records] == [
        ("WARNING", True), ("ERROR", True)]


def test_handshake_time_outs_after_a_lost_connection_are_warnings_and_without_one_errors(caplog):
    """The same for a connection that closed after its handshake (the owner logs "lost the relay connection"): the
    handshakes that then hang are that outage. A connection whose own handshake failed is no lost connection."""
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    caplog.set_level(logging.WARNING, logger="tmrl_common.handshake")

    def hang_twice(watch: HandshakeWatch, start: float) -> None:
        watch.on_event(zmq.EVENT_CONNECTED, now=start)
        watch.check(now=start + 6.0)  # TCP up, no handshake within 5 s: "silent"
        watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EAGAIN, now=start + 30.0)  # libzmq's limit
        watch.on_event(zmq.EVENT_DISCONNECTED, now=start + 30.0)

    lost = HandshakeWatch("worker-1", endpoint, "worker", report_every_s=0.0)
    lost.on_event(zmq.EVENT_CONNECTED, now=0.0)
    lost.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=0.1)
    lost.on_event(zmq.EVENT_DISCONNECTED, now=50.0)  # the relay's connection closed
    hang_twice(lost, 51.0)
    hang_twice(lost, 90.0)  # still the same outage: its own failed handshakes did not end it
    assert lost.connection_lost
    lost.on_event(zmq.EVENT_CONNECTED, now=130.0)
    lost.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=130.1)  # back
    assert not lost.connection_lost
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 4
    assert "as it did before" in caplog.records[0].getMessage()
    assert "within libzmq's 30 s" in caplog.records[1].getMessage()
    caplog.clear()
    never = HandshakeWatch("worker-2", endpoint, "worker", report_every_s=0.0)  # never connected: maybe a wrong port
    hang_twice(never, 0.0)
    hang_twice(never, 40.0)
    assert [r.levelname for r in caplog.records] == ["ERROR"] * 4 and not never.connection_lost


def test_a_reset_mid_handshake_after_a_lost_connection_is_a_warning_naming_a_restart(caplog):
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    watch = HandshakeWatch("worker-1", endpoint, "worker", report_every_s=0.0)
    caplog.set_level(logging.WARNING, logger="tmrl_common.handshake")
    watch.on_event(zmq.EVENT_CONNECTED, now=0.0)
    watch.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, now=0.1)
    watch.on_event(zmq.EVENT_DISCONNECTED, now=50.0)  # the relay stopped
    watch.on_event(zmq.EVENT_CONNECTED, now=51.0)
    watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET, now=51.1)  # killed again mid-handshake
    assert [(r.levelname, "as a relay that is stopping or restarting does" in r.getMessage())
            for r in caplog.records] == [("WARNING", True)]
    assert (watch.counters.closed, watch.counters.dropped) == (1, 0)
    assert not watch.due_for_new_socket(now=100.0)  # libzmq reconnects by itself: nothing to rebuild


def test_a_handshake_that_fails_long_after_its_connection_is_a_time_out_whatever_its_errno(caplog):
    """A live check: a relay killed, then something on its port that accepts TCP and never speaks ZMTP. libzmq's 30 s
    handshake limit came with errno 111 (the ECONNREFUSED of the connect before, stale), and a plain-text worker was
    told 'the relay speaks CurveZMQ'. A relay refusing a key or a mechanism does so within milliseconds."""
    endpoint = RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True))
    watch = HandshakeWatch("worker-1", endpoint, "worker", report_every_s=0.0)
    caplog.set_level(logging.WARNING, logger="tmrl_common.handshake")
    watch.on_event(zmq.EVENT_CONNECTED, now=0.0)
    watch.check(now=6.0)  # "silent", said at 5 s
    watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNREFUSED, now=30.0)
    assert (watch.counters.timed_out, watch.counters.dropped) == (1, 0) and not watch.due_for_new_socket(now=60.0)
    assert "within libzmq's 30 s" in caplog.records[-1].getMessage()
    watch.on_event(zmq.EVENT_CONNECTED, now=70.0)  # a drop at once is still a drop (a wrong --server-key: EPIPE)
    watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE, now=70.01)
    assert watch.counters.dropped == 1
