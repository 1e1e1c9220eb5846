"""A client that cannot reach the relay learns why within seconds, over real CurveZMQ sockets (a ROUTER with the
relay's ZAP authenticator plays the relay): a refused key, a wrong ``--server-key``, ``--insecure`` on one side only,
a port where nothing speaks ZMTP and a relay that never answers each give one error naming the cause and the fix; a
refused client connects by itself once its key is allowed (libzmq never reconnects a refused socket)."""

from __future__ import annotations

import logging
import shutil
import socket as socketlib
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from loopback_relay import wait_for
from tmrl_common.curve import generate_key_pair, load_secret_key, reload_authenticator, start_authenticator
from tmrl_common.relay_client import RelayClient
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

FAST = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0)


@dataclass
class Counters:
    connections: int = 0
    disconnections: int = 0
    send_blocked: int = 0


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("relay", "other-relay", "worker-9"):
        generate_key_pair(tmp_path / "keys", name)
    (tmp_path / "allow").mkdir()
    return tmp_path


def curve_router(context: zmq.Context, keys: Path) -> tuple[zmq.Socket, int, object]:
    authenticator = start_authenticator(context, {"tmrl-workers": keys / "allow"})
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.zap_domain = b"tmrl-workers"
    router.curve_publickey, router.curve_secretkey = load_secret_key(keys / "keys" / "relay.key_secret")
    router.curve_server = True
    return router, router.bind_to_random_port("tcp://127.0.0.1"), authenticator


def start_client(context: zmq.Context, port: int, security: SecurityConfig, role: str = "worker",
                 heartbeat: bool = False) -> RelayClient:
    """A client that sends a heartbeat every 0.2 s when ``heartbeat`` (a relay answers each), else nothing."""
    client = RelayClient("worker-9", "test", RelayEndpoint("127.0.0.1", port, FAST, security), Counters(),
                         on_connected=lambda: "", on_message=lambda frames: None, on_turn=lambda: None,
                         send_heartbeat=lambda: heartbeat and client.send([b"heartbeat"]), role=role,
                         heartbeat_interval_s=0.2, context=context)
    client.handshake.retry_s = 0.3
    client.handshake.handshake_timeout_s = 0.5
    client.handshake.reply_timeout_s = 0.8
    client.start()
    return client


def client_keys(keys: Path, server: str = "relay") -> SecurityConfig:
    return SecurityConfig(secret_key_file=keys / "keys" / "worker-9.key_secret",
                          server_public_key_file=keys / "keys" / f"{server}.key")


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "tmrl_common.handshake"]


def test_a_refused_key_is_reported_with_the_keys_add_command_and_connects_once_allowed(context, keys, caplog):
    caplog.set_level(logging.INFO)
    router, port, authenticator = curve_router(context, keys)
    client = start_client(context, port, client_keys(keys))
    try:
        wait_for(lambda: client.handshake.counters.refused >= 1, 5)
        assert not client.connected
        [message] = errors(caplog)
        assert "refused this worker's key" in message
        assert "tmrl-relay keys add worker-9.key --allow-dir ALLOW" in message

        shutil.copy(keys / "keys" / "worker-9.key", keys / "allow" / "worker-9.key")
        reload_authenticator(authenticator, {"tmrl-workers": keys / "allow"})
        assert client.wait_connected(5), "the client never retried after its key was allowed"
        assert client.handshake.counters.new_sockets >= 1
    finally:
        client.stop()
        router.close()
        authenticator.stop()


def test_a_refused_trainer_key_names_the_trainers_allow_list(context, keys, caplog):
    router, port, authenticator = curve_router(context, keys)
    client = start_client(context, port, client_keys(keys), role="trainer")
    try:
        wait_for(lambda: errors(caplog), 5)
        assert "--allow-dir ALLOW/trainers" in errors(caplog)[0]
    finally:
        client.stop()
        router.close()
        authenticator.stop()


def test_a_wrong_server_key_is_reported_as_such(context, keys, caplog):
    shutil.copy(keys / "keys" / "worker-9.key", keys / "allow" / "worker-9.key")
    router, port, authenticator = curve_router(context, keys)
    client = start_client(context, port, client_keys(keys, server="other-relay"))
    try:
        wait_for(lambda: errors(caplog), 5)
        assert "--server-key" in errors(caplog)[0] and "other-relay.key" in errors(caplog)[0]
        assert client.handshake.counters.dropped >= 1 and not client.connected
    finally:
        client.stop()
        router.close()
        authenticator.stop()


def test_insecure_client_against_a_curve_relay_is_told_to_match_the_other_side(context, keys, caplog):
    router, port, authenticator = curve_router(context, keys)
    client = start_client(context, port, SecurityConfig(insecure=True))
    try:
        wait_for(lambda: errors(caplog), 5)
        assert "speaks CurveZMQ, this worker plain text (--insecure)" in errors(caplog)[0]
        assert client.handshake.counters.mechanism >= 1
    finally:
        client.stop()
        router.close()
        authenticator.stop()


def test_a_port_where_nothing_speaks_zmtp_is_reported_after_the_handshake_timeout(context, caplog):
    with socketlib.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = start_client(context, listener.getsockname()[1], SecurityConfig(insecure=True))
        try:
            wait_for(lambda: errors(caplog), 5)
            assert "no handshake after" in errors(caplog)[0]
            assert client.handshake.counters.silent == 1
        finally:
            client.stop()


def test_a_relay_that_never_answers_is_reported_and_one_that_answers_is_not(context, caplog):
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = start_client(context, port, SecurityConfig(insecure=True), heartbeat=True)
    try:
        assert client.wait_connected(5)
        wait_for(lambda: errors(caplog), 5)
        assert "has not answered" in errors(caplog)[0]
    finally:
        client.stop()
    caplog.clear()
    answered = start_client(context, port, SecurityConfig(insecure=True), heartbeat=True)
    try:
        assert answered.wait_connected(5)
        deadline = time.monotonic() + 2.0  # more than twice reply_timeout_s, answering every heartbeat
        while time.monotonic() < deadline:
            if router.poll(50):
                routing_id, *_ = router.recv_multipart()
                router.send_multipart([routing_id, b"heartbeat"])
        assert answered.handshake.counters.unanswered == 0 and not errors(caplog)
    finally:
        answered.stop()
        router.close()
