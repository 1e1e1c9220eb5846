"""The trainer role without CurveZMQ (the sender id is the identity): one trainer at a time; a hello on another
connection, of another id or the same one, is refused while the trainer is alive and counted, and takes the role once
the holder's connection is gone or silent; a hello naming the wrong role is counted."""

from __future__ import annotations

import time

import pytest
from tmrl_common.protocol import Hello

from .relay_harness import (
    Peer,
    connected_trainer,
    connected_worker,
    hello_until_it_takes_the_trainer_role,
    insecure_config,
    make_batch,
    make_weights,
    relay_in_thread,
    wait_until,
)


def test_another_trainer_id_is_refused_while_the_trainer_is_alive(context):
    with relay_in_thread(insecure_config()) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = connected_trainer(context, relay, "trainer-1")
        evil = Peer(context, relay.ports.trainer_port, "evil-trainer")
        evil.hello("trainer")
        assert evil.recv_type("error")[1].reason == "unknown_sender"
        evil.send(make_weights(10**9))
        assert evil.recv_type("error")[1].reason == "unknown_sender"
        assert value("tmrl_relay_role_refusals_total", {"link": "trainer", "why": "trainer_alive"}) == 1
        assert value("tmrl_relay_weights_version") == -1
        worker = connected_worker(context, relay, "worker-1")
        worker.send(make_batch(4))
        assert trainer.recv_type("sample_batch")[1].seq == 4


def test_the_same_trainer_id_takes_over_once_its_old_connection_is_gone_not_while_it_is_alive(context):
    with relay_in_thread(insecure_config()) as relay:
        old = connected_trainer(context, relay, "trainer-1")
        old_routing_id = relay.trainer.peer.routing_id
        restarted = Peer(context, relay.ports.trainer_port, "trainer-1")
        restarted.hello("trainer")
        error = restarted.recv_type("error")[1]  # the old connection is open and alive: a second process
        assert error.reason == "unknown_sender" and "with this id on another connection and is alive" in error.message
        old.close()  # the old process ended
        hello_until_it_takes_the_trainer_role(relay, restarted, old_routing_id)
        worker = connected_worker(context, relay, "worker-1")
        worker.send(make_batch(2))
        assert restarted.recv_type("sample_batch")[1].seq == 2
        restarted.hello("trainer")  # a hello again on the holder's own connection keeps the role
        worker.send(make_batch(3))
        assert restarted.recv_type("sample_batch")[1].seq == 3


def test_a_hello_with_the_wrong_role_is_refused_and_counted_on_either_socket(context):
    with relay_in_thread(insecure_config()) as relay:
        value = relay.metrics.registry.get_sample_value
        as_worker = Peer(context, relay.ports.trainer_port, "worker-1")
        as_worker.send(Hello(role="worker", software="test"))
        assert as_worker.recv_type("error")[1].reason == "schema"
        as_trainer = Peer(context, relay.ports.worker_port, "trainer-1")
        as_trainer.send(Hello(role="trainer", software="test"))
        assert as_trainer.recv_type("error")[1].reason == "schema"
        assert value("tmrl_relay_role_refusals_total", {"link": "trainer", "why": "wrong_role"}) == 1
        assert value("tmrl_relay_role_refusals_total", {"link": "workers", "why": "wrong_role"}) == 1
        assert value("tmrl_relay_trainer_connected") in (None, 0)


def test_a_worker_hello_under_the_relays_or_the_trainers_reserved_id_is_refused(context):
    with relay_in_thread(insecure_config()) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = connected_trainer(context, relay, "trainer")
        for reserved in ("relay", "trainer"):
            impostor = Peer(context, relay.ports.worker_port, reserved)
            impostor.hello("worker")
            error = impostor.recv_type("error")[1]
            assert error.reason == "unknown_sender" and f"worker id {reserved!r} is reserved" in error.message
            impostor.send(make_batch(1))  # never registered, so nothing it sends is taken
            assert impostor.recv_type("error")[1].reason == "unknown_sender"
            assert reserved not in relay.workers.by_sender
        assert value("tmrl_relay_rejects_total", {"reason": "unknown_sender", "link": "workers"}) == 4
        assert trainer.nothing_within(300)
        worker = connected_worker(context, relay, "worker-1")
        worker.send(make_batch(5))
        assert trainer.recv_type("sample_batch")[1].seq == 5


def ipv6_loopback() -> bool:
    """Whether this machine can bind IPv6 loopback (some CI containers have no IPv6)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_an_insecure_relay_warns_loudly_at_start_and_louder_off_loopback(caplog):
    import logging

    from tmrl_relay.broker import Relay
    from tmrl_relay.config import RelayConfig

    caplog.set_level(logging.WARNING, logger="tmrl_relay")
    hosts = ("127.0.0.1", "127.0.0.2", "0.0.0.0") + (("[::1]", "::1", "[::ffff:127.0.0.1]") if ipv6_loopback() else ())
    for host in hosts:  # an outside probe: [::1] and 127.0.0.2 were called NOT loopback, and [::1] on port 0 failed
        caplog.clear()
        relay = Relay(insecure_config(bind_host=host))
        relay.bind()
        relay.stop()
        relay.run()  # returns at once and closes the sockets
        [warning] = [r.getMessage() for r in caplog.records if "INSECURE" in r.getMessage()]
        assert "say hello as the trainer" in warning
        assert ("NOT loopback" in warning) == (host == "0.0.0.0")
    assert RelayConfig().bind_host == "127.0.0.1"  # loopback unless told otherwise
    caplog.clear()  # keys given with --insecure were not used without a word (a config probe)
    relay = Relay(insecure_config(security={"insecure": True, "secret_key_file": "keys/relay.key_secret",
                                            "allowlist_dir": "allow"}))
    relay.bind()
    relay.stop()
    relay.run()
    assert "--insecure: the key settings given (secret_key_file, allowlist_dir) are not used" in caplog.text


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback to connect from")
def test_a_relay_bound_on_every_interface_takes_ipv6_clients_as_well_as_ipv4(context):
    """An outside probe: bind_host = "*", the address the docs give for every interface, logged `relay listening on *`
    but took IPv4 only; a worker and a trainer given [::1] never connected."""
    with relay_in_thread(insecure_config(bind_host="*")) as relay:
        for host, sender in (("::1", "worker-v6"), ("127.0.0.1", "worker-v4")):
            peer = Peer(context, relay.ports.worker_port, sender, host=host)
            peer.hello("worker")
            wait_until(lambda sender=sender: sender in relay.workers.by_sender, what=f"{sender}'s hello")


def test_a_trainer_that_left_frees_the_role_for_another_id_without_waiting_for_the_peer_timeout(context):
    with relay_in_thread(insecure_config(peer_timeout_s=60.0)) as relay:
        value = relay.metrics.registry.get_sample_value
        first = connected_trainer(context, relay, "trainer-1")
        first.close()  # a clean stop: the connection closes, nothing is silent for peer_timeout_s yet
        second = Peer(context, relay.ports.trainer_port, "trainer-2")
        started = time.monotonic()
        while relay.trainer.peer is None or relay.trainer.peer.sender != "trainer-2":
            assert time.monotonic() - started < 10.0, "trainer-2 did not get the role well before peer_timeout_s"
            second.hello("trainer")  # as a refused trainer does, with its backoff
            time.sleep(0.2)
        assert value("tmrl_relay_trainer_connected") == 1
        worker = connected_worker(context, relay, "worker-1")
        worker.send(make_batch(7))
        assert second.recv_type("sample_batch")[1].seq == 7


def test_another_id_is_still_refused_while_the_trainers_connection_is_open(context):
    with relay_in_thread(insecure_config(peer_timeout_s=60.0)) as relay:
        trainer = connected_trainer(context, relay, "trainer-1")  # open, and heard from just now
        other = Peer(context, relay.ports.trainer_port, "trainer-2")
        for _ in range(3):
            other.hello("trainer")
            assert other.recv_type("error")[1].reason == "unknown_sender"
        assert relay.trainer.peer.sender == "trainer-1"
        trainer.send(make_weights(1))  # it still holds the role
        wait_until(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_weights_version") == 1,
                   what="the holder's weights")


def test_a_trainer_that_stops_cleanly_is_said_to_have_left_at_once_not_to_be_silent_later(context, caplog):
    """After a trainer's clean stop the relay logged, 10 s later, 'trainer ... silent for 10.1s' at WARNING (an
    outside probe): its connection closing now frees the role at once, said at INFO."""
    with caplog.at_level("INFO", logger="tmrl_relay.broker"), \
            relay_in_thread(insecure_config(peer_timeout_s=1.0)) as relay:
        trainer = connected_trainer(context, relay, "trainer-1")
        trainer.close()
        wait_until(lambda: relay.metrics.registry.get_sample_value("tmrl_relay_trainer_connected") == 0,
                   what="the role freed")
        time.sleep(1.5)  # past peer_timeout_s: a trainer still counted as holding the role would be called silent
    assert "trainer trainer-1: its connection closed (it stopped, or restarted); the trainer role is free" in caplog.text
    assert "silent for" not in caplog.text


def test_weights_whose_version_went_back_are_published_with_a_warning_naming_the_trainer(context, caplog):
    """The networking probe: a standby trainer with a run directory of its own took the role from scratch; the relay
    only said `(trainer restarted?)` while every worker switched to the fresh policy."""
    import logging

    with caplog.at_level(logging.WARNING, logger="tmrl_relay"), relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay, "trainer-a")
        trainer.send(make_weights(17))
        wait_until(lambda: relay.weights.version == 17, what="version 17")
        trainer.send(make_weights(1))
        wait_until(lambda: relay.weights.version == 1, what="version 1, published all the same")
    assert ("weights version went back from 17 to 1: trainer trainer-a resumed an older checkpoint, or started from "
            "scratch (a run_dir of its own?); the workers get its policy from now on") in caplog.text


def test_a_relay_that_did_not_run_does_not_take_its_peers_for_silent(context, caplog):
    """A pause probe SIGSTOPped the relay for 90 s: once resumed it logged `trainer trainer silent for 90.2s ...
    (another trainer may take the role now)` and `trainer trainer is back` in the same millisecond. A poll that
    returns seconds past its time-out is the relay's own pause: said once, and its peers' silence moves on by it."""
    import logging

    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        worker = connected_worker(context, relay, "worker-1")
        wait_until(lambda: relay.trainer.peer is not None and "worker-1" in relay.workers.by_sender)
        holder, registered = relay.trainer.peer, relay.workers.by_sender["worker-1"]
        stopped_at = time.monotonic() - 90.2  # heard from last just before the relay was stopped for 90 s
        holder.last_seen = registered.last_seen = stopped_at
        with caplog.at_level(logging.WARNING, logger="tmrl_relay.broker"):
            relay._resumed(90.0)
        now = time.monotonic()
        assert not relay.trainer.is_silent(now) and now - registered.last_seen < 1.0
        assert relay.workers.alive(relay.config.peer_timeout_s, now) == 1
        assert ("the relay did not run for 90 s (suspended: SIGSTOP, a paused VM or container, or a machine starved of "
                "CPU)") in caplog.text
        worker.close()
        trainer.close()
