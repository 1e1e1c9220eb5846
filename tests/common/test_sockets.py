"""Shared socket settings: transport options land on the socket, CURVE works end to end, endpoints are well formed."""

from __future__ import annotations

import pytest
import zmq
from tmrl_common.curve import allow_public_key, generate_key_pair, load_public_key, start_authenticator
from tmrl_common.sockets import (
    SecurityConfig,
    SecurityError,
    TransportConfig,
    apply_transport,
    secure_client_socket,
    secure_server_socket,
    tcp_endpoint,
)

OPTIONS = ("SNDHWM", "RCVHWM", "LINGER", "HEARTBEAT_IVL", "HEARTBEAT_TIMEOUT", "TCP_KEEPALIVE", "TCP_KEEPALIVE_IDLE",
           "TCP_KEEPALIVE_INTVL", "TCP_KEEPALIVE_CNT", "TCP_MAXRT", "RECONNECT_IVL", "RECONNECT_IVL_MAX", "MAXMSGSIZE")


def options_set_by(context, transport: TransportConfig) -> dict[str, int]:
    socket = context.socket(zmq.DEALER)
    try:
        apply_transport(socket, transport)
        return {name: socket.getsockopt(getattr(zmq, name)) for name in OPTIONS}
    finally:
        socket.close()


def test_apply_transport_sets_every_option(context):
    transport = TransportConfig(send_hwm=11, recv_hwm=22, linger_ms=33, heartbeat_ivl_ms=444, heartbeat_timeout_ms=555,
                                heartbeat_ttl_ms=600, tcp_keepalive_idle_s=7, tcp_keepalive_interval_s=2,
                                tcp_keepalive_count=3, tcp_max_retransmit_ms=4000, reconnect_ivl_ms=77,
                                reconnect_ivl_max_ms=888, max_frame_bytes=4096)
    assert options_set_by(context, transport) == {
        "SNDHWM": 11, "RCVHWM": 22, "LINGER": 33, "HEARTBEAT_IVL": 444, "HEARTBEAT_TIMEOUT": 555, "TCP_KEEPALIVE": 1,
        "TCP_KEEPALIVE_IDLE": 7, "TCP_KEEPALIVE_INTVL": 2, "TCP_KEEPALIVE_CNT": 3, "TCP_MAXRT": 4000,
        "RECONNECT_IVL": 77, "RECONNECT_IVL_MAX": 888, "MAXMSGSIZE": 4096}


def test_the_default_transport_sends_no_zmtp_heartbeats_and_probes_with_tcp_keepalive(context):
    """ZMTP pings can abort the process in libzmq 4.3.5 (tests/common/test_dead_peer_while_unread.py)."""
    options = options_set_by(context, TransportConfig())
    assert options["HEARTBEAT_IVL"] == 0
    assert {name: options[name] for name in ("TCP_KEEPALIVE", "TCP_KEEPALIVE_IDLE", "TCP_KEEPALIVE_INTVL",
                                             "TCP_KEEPALIVE_CNT", "TCP_MAXRT")} == {
        "TCP_KEEPALIVE": 1, "TCP_KEEPALIVE_IDLE": 5, "TCP_KEEPALIVE_INTVL": 1, "TCP_KEEPALIVE_CNT": 5,
        "TCP_MAXRT": 10_000}


def test_reconnect_cap_below_first_interval_is_refused():
    with pytest.raises(ValueError, match="reconnect_ivl_max_ms"):
        TransportConfig(reconnect_ivl_ms=1000, reconnect_ivl_max_ms=10)


@pytest.mark.parametrize("host, port, expected", [
    ("127.0.0.1", 5555, "tcp://127.0.0.1:5555"),
    ("*", 1, "tcp://*:1"),
    ("relay.local", 65535, "tcp://relay.local:65535"),
    ("::1", 5557, "tcp://[::1]:5557"),
])
def test_tcp_endpoint(host, port, expected):
    assert tcp_endpoint(host, port) == expected


@pytest.mark.parametrize("host, port", [("127.0.0.1", 0), ("127.0.0.1", 70000), ("", 5555)])
def test_tcp_endpoint_refuses_bad_values(host, port):
    with pytest.raises(ValueError):
        tcp_endpoint(host, port)


def _pair(context, server_security, client_security, domain=b"test"):
    server = context.socket(zmq.ROUTER)
    server.zap_domain = domain
    secure_server_socket(server, server_security)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = context.socket(zmq.DEALER)
    client.linger = 0
    secure_client_socket(client, client_security)
    client.connect(tcp_endpoint("127.0.0.1", port))
    return server, client


def _keys(tmp_path):
    relay = generate_key_pair(tmp_path / "relay", "relay")
    good = generate_key_pair(tmp_path / "clients", "good")
    bad = generate_key_pair(tmp_path / "clients", "bad")
    allow_public_key(tmp_path / "allow", good.public_file)
    return relay, good, bad


def test_allow_listed_client_talks_and_carries_its_public_key_as_user_id(context, tmp_path):
    relay, good, _ = _keys(tmp_path)
    auth = start_authenticator(context, {"test": tmp_path / "allow"})
    try:
        server, client = _pair(
            context,
            SecurityConfig(secret_key_file=relay.secret_file),
            SecurityConfig(secret_key_file=good.secret_file, server_public_key_file=relay.public_file),
        )
        assert server.curve_server
        client.send(b"hi")
        assert server.poll(5000)
        routing_id, payload = server.recv_multipart(copy=False)
        assert payload.bytes == b"hi"
        assert payload.get("User-Id") == load_public_key(good.public_file).decode()
    finally:
        auth.stop()


def test_client_not_in_allow_list_delivers_nothing(context, tmp_path):
    relay, _, bad = _keys(tmp_path)
    auth = start_authenticator(context, {"test": tmp_path / "allow"})
    try:
        server, client = _pair(
            context,
            SecurityConfig(secret_key_file=relay.secret_file),
            SecurityConfig(secret_key_file=bad.secret_file, server_public_key_file=relay.public_file),
        )
        client.send(b"let me in")
        assert server.poll(700) == 0
    finally:
        auth.stop()


def test_insecure_mode_sets_no_curve_options(context):
    server, client = _pair(context, SecurityConfig(insecure=True), SecurityConfig(insecure=True))
    assert not server.curve_server
    client.send(b"plain")
    assert server.poll(5000)
    assert server.recv_multipart()[1] == b"plain"


def test_secure_socket_without_keys_says_how_to_generate_them(context, tmp_path):
    """An operator's-first-hour probe: the error named the config field only, where the Quick start passes flags."""
    socket = context.socket(zmq.ROUTER)
    with pytest.raises(SecurityError, match=r"secret key file is not set \(--secret-key FILE, or secret_key_file in "
                                            r"the config's \[relay.security\]\).*keys init.*--insecure"):
        secure_server_socket(socket, SecurityConfig())
    with pytest.raises(SecurityError, match=r"secret_key_file in the config's \[worker.security\] or "
                                            r"\[trainer.security\]\).*keys generate"):  # was "[<service>.security]"
        secure_client_socket(socket, SecurityConfig())
    pair = generate_key_pair(tmp_path, "worker-1")
    with pytest.raises(SecurityError, match=r"the relay's public key file is not set \(--server-key FILE, or "
                                            r"server_public_key_file"):
        secure_client_socket(socket, SecurityConfig(secret_key_file=pair.secret_file))
    socket.close()


def test_a_relay_host_name_that_does_not_resolve_is_warned_about_and_addresses_are_not_looked_up(caplog):
    """Deployment probe: a relay_host that does not resolve gave only 'not connected ... (is it running there)'."""
    from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

    def endpoint(host: str) -> RelayEndpoint:
        return RelayEndpoint(host, 5555, TransportConfig(), SecurityConfig(insecure=True))

    with caplog.at_level("WARNING", logger="tmrl_common.sockets"):
        assert endpoint("127.0.0.1").warn_if_unresolvable() and endpoint("::1").warn_if_unresolvable()
        assert endpoint("localhost").warn_if_unresolvable()
        assert not caplog.records
        assert not endpoint("relay-host.invalid").warn_if_unresolvable()  # .invalid never resolves (RFC 2606)
    [record] = caplog.records
    assert "relay_host 'relay-host.invalid' does not resolve" in record.getMessage()


def test_a_client_told_insecure_says_the_key_files_it_was_given_are_not_used(caplog):
    """A config probe: --insecure beside --secret-key and --server-key ran in plain text without a word of the keys."""
    import logging

    from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig

    caplog.set_level(logging.WARNING, logger="tmrl_common.sockets")
    RelayEndpoint("127.0.0.1", 5555, TransportConfig(), SecurityConfig(insecure=True)).check_security()
    assert "not used" not in caplog.text
    given = SecurityConfig(insecure=True, secret_key_file="keys/w.key_secret", server_public_key_file="keys/relay.key")
    RelayEndpoint("127.0.0.1", 5555, TransportConfig(), given).check_security()
    assert "the key settings given (secret_key_file, server_public_key_file) are not used" in caplog.text
