"""CurveZMQ at the relay: allow-listed keys work, others deliver nothing (counted), ids are bound to keys, and only
trainer keys (``ALLOW/trainers``, ``keys add --role trainer``) reach the trainer socket."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
import zmq
from tmrl_common.curve import allow_public_key, generate_key_pair, load_public_key
from tmrl_common.protocol import Hello, encode
from tmrl_common.sockets import SecurityConfig
from tmrl_relay.broker import Relay, RelaySetupError
from tmrl_relay.config import RelayConfig
from tmrl_relay.keys import allow_key_for_role

from .relay_harness import (
    Peer,
    hello_until_it_takes_the_trainer_role,
    make_batch,
    make_weights,
    relay_in_thread,
    wait_until,
)


@pytest.fixture
def keys(tmp_path):
    made = {name: generate_key_pair(tmp_path / "keys", name) for name in ("relay", "worker-1", "worker-2", "trainer", "intruder")}
    for name in ("worker-1", "worker-2"):
        allow_key_for_role(tmp_path / "allow", made[name].public_file, "worker")
    allow_key_for_role(tmp_path / "allow", made["trainer"].public_file, "trainer")  # into allow/trainers
    return made


def _config(tmp_path, keys, **fields) -> RelayConfig:
    return RelayConfig(
        bind_host="127.0.0.1", worker_port=0, trainer_port=0, weights_port=0, metrics_port=0,
        security=SecurityConfig(secret_key_file=keys["relay"].secret_file, allowlist_dir=tmp_path / "allow"), **fields,
    )


def _client(keys, name) -> SecurityConfig:
    return SecurityConfig(secret_key_file=keys[name].secret_file, server_public_key_file=keys["relay"].public_file)


def _peer(context, port, keys, key_name, sender, kind=zmq.DEALER) -> Peer:
    return Peer(context, port, sender, kind, security=_client(keys, key_name))


def _trainer(context, relay, keys, key_name="trainer", sender="trainer-1") -> Peer:
    """A trainer with ``key_name``'s key that said hello and holds the role."""
    trainer = _peer(context, relay.ports.trainer_port, keys, key_name, sender)
    trainer.hello("trainer")
    wait_until(lambda: relay.trainer.ready and relay.trainer.peer.sender == sender, what=f"trainer {sender}")
    return trainer


def _second_trainer_key(tmp_path, keys) -> None:
    keys["trainer-b"] = generate_key_pair(tmp_path / "keys", "trainer-b")
    allow_key_for_role(tmp_path / "allow", keys["trainer-b"].public_file, "trainer")


def test_allow_listed_worker_and_trainer_exchange_samples_acks_and_weights(context, tmp_path, keys):
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        trainer = _peer(context, relay.ports.trainer_port, keys, "trainer", "trainer-1")
        trainer.hello("trainer")
        worker = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        worker.hello("worker")
        subscriber = _peer(context, relay.ports.weights_port, keys, "worker-1", "worker-1", zmq.SUB)
        worker.send(make_batch(1))
        assert trainer.recv_type("sample_batch")[1].seq == 1
        from tmrl_common.protocol import SampleAck

        trainer.send(SampleAck(worker="worker-1", seqs=[1]))
        assert worker.recv_type("sample_ack")[1].seqs == [1]
        trainer.send(make_weights(4))
        assert subscriber.recv_type("weights_update")[1].version == 4
        peer = relay.workers.by_sender["worker-1"]
        assert peer.user_id == load_public_key(keys["worker-1"].public_file).decode()  # id bound to the key


def test_a_key_not_in_the_allow_list_delivers_nothing_and_is_counted(context, tmp_path, keys):
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        trainer = _peer(context, relay.ports.trainer_port, keys, "trainer", "trainer-1")
        trainer.hello("trainer")
        intruder = _peer(context, relay.ports.worker_port, keys, "intruder", "worker-1")
        intruder.try_send(Hello(role="worker", software="test"))  # either may find the session ended: try_send
        intruder.try_send(make_batch(1))
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: (value("tmrl_relay_handshake_failures_total", {"link": "workers", "kind": "auth"}) or 0) >= 1,
                   what="refused handshake")
        assert trainer.nothing_within(300)
        assert "worker-1" not in relay.workers.by_sender
        assert value("tmrl_relay_received_messages_total", {"link": "workers"}) in (None, 0)


def test_a_refused_handshake_is_logged_with_the_relays_own_endpoint_as_text(context, tmp_path, keys, caplog):
    # Found by hand: "refused a connection from b'tcp://127.0.0.1:5556'": a bytes repr, and that endpoint is the
    # relay's end of the connection (libzmq gives no peer address), not where the refused client is.
    caplog.set_level(logging.WARNING, logger="tmrl_relay")
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        value = relay.metrics.registry.get_sample_value
        fake_trainer = _peer(context, relay.ports.trainer_port, keys, "worker-1", "evil-trainer")
        fake_trainer.hello("trainer")
        wait_until(lambda: (value("tmrl_relay_handshake_failures_total", {"link": "trainer", "kind": "auth"}) or 0) >= 1,
                   what="refused handshake")
        wait_until(lambda: any("during the handshake" in r.getMessage() for r in caplog.records), what="the log line")
    [line] = [r.getMessage() for r in caplog.records if "during the handshake" in r.getMessage()]
    assert f"refused a connection on tcp://127.0.0.1:{relay.ports.trainer_port} " in line and "b'" not in line


def test_a_refused_connection_is_one_log_line_not_a_second_that_guesses_why_it_closed(context, tmp_path, keys, caplog):
    """An outside probe: every refused handshake was followed by an INFO line for the connection's close, guessing
    "the peer left; or it sent a frame over the cap; or it is not a DEALER socket". The close is counted, not said
    again; a peer that leaves after its handshake still is."""
    caplog.set_level(logging.INFO, logger="tmrl_relay")
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        value = relay.metrics.registry.get_sample_value

        def failures() -> float:
            return sum(value("tmrl_relay_handshake_failures_total", {"link": "workers", "kind": kind}) or 0
                       for kind in ("auth", "protocol", "other"))

        def closes() -> float:
            return value("tmrl_relay_disconnects_total", {"link": "workers"}) or 0

        intruder = _peer(context, relay.ports.worker_port, keys, "intruder", "worker-1")
        intruder.try_send(Hello(role="worker", software="test"))
        wait_until(lambda: closes() >= 1, what="the refused connection's close")
        intruder.close()
        wait_until(lambda: failures() == closes(), what="each refused connection closed")  # one of each per attempt
        refused_closes = closes()
        worker = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        worker.hello("worker")
        wait_until(lambda: "worker-1" in relay.workers.by_sender, what="the worker's hello")
        worker.close()
        wait_until(lambda: closes() == refused_closes + 1, what="the worker's close")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("during the handshake" in m for m in messages) == refused_closes >= 1, messages
    [closed] = [i for i, m in enumerate(messages) if "a connection on" in m and "closed" in m]
    [hello] = [i for i, m in enumerate(messages) if "worker worker-1 said hello" in m]
    assert closed > hello, messages  # the one close said is the worker's

def test_a_worker_key_on_the_trainer_port_is_refused_and_counted_by_default(context, tmp_path, keys):
    """Issue 14's takeover: an allow-listed worker key said hello as ``evil-trainer`` and published version 1e9."""
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = _trainer(context, relay, keys)
        fake_trainer = _peer(context, relay.ports.trainer_port, keys, "worker-1", "evil-trainer")
        fake_trainer.try_send(Hello(role="trainer", software="test"))  # the second may find the session ended
        fake_trainer.try_send(make_weights(10**9))
        wait_until(lambda: (value("tmrl_relay_handshake_failures_total", {"link": "trainer", "kind": "auth"}) or 0) >= 1,
                   what="refused handshake")
        assert value("tmrl_relay_weights_version") == -1
        assert relay.trainer.peer.sender == "trainer-1" and value("tmrl_relay_trainer_connected") == 1
        assert value("tmrl_relay_allowed_keys", {"link": "trainer"}) == 1
        worker = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        worker.hello("worker")
        worker.send(make_batch(1))
        assert trainer.recv_type("sample_batch")[1].seq == 1  # batches still go to the real trainer


def test_a_second_trainer_key_is_refused_while_the_trainer_is_alive(context, tmp_path, keys):
    _second_trainer_key(tmp_path, keys)
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = _trainer(context, relay, keys)  # kept open: a closed connection would free the role at once
        other = _peer(context, relay.ports.trainer_port, keys, "trainer-b", "trainer-2")
        other.hello("trainer")
        error = other.recv_type("error")[1]
        assert error.reason == "unknown_sender" and "alive" in error.message and error.ref_type == "hello"
        # an operator's probe: two trainers both named 'trainer' read "trainer 'trainer' holds the role": the key tells
        holder_key = load_public_key(keys["trainer"].public_file).decode()
        assert error.message.startswith(f"trainer 'trainer-1' (another CurveZMQ key: {holder_key[:8]}...) holds the "
                                        "trainer role and is alive; a relay serves one trainer at a time")
        assert value("tmrl_relay_role_refusals_total", {"link": "trainer", "why": "trainer_alive"}) == 1
        other.send(make_weights(5))
        assert other.recv_type("error")[1].reason == "unknown_sender"
        assert value("tmrl_relay_weights_version") == -1 and relay.trainer.peer.sender == "trainer-1"
        trainer.close()


def test_the_same_trainer_key_on_a_second_live_connection_waits_until_the_first_closes(context, tmp_path, keys):
    """A storage probe started a second trainer with the same key and another run directory: it took the role at once,
    and the first one, with all its training, lost it and stopped. A live connection under the key is a second
    process; a restart's old connection is gone."""
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        value = relay.metrics.registry.get_sample_value
        old = _trainer(context, relay, keys)
        old_routing_id = relay.trainer.peer.routing_id
        second = _peer(context, relay.ports.trainer_port, keys, "trainer", "trainer-1")  # old one still open, alive
        second.hello("trainer")
        error = second.recv_type("error")[1]
        assert error.reason == "unknown_sender" and error.message.startswith(
            "trainer 'trainer-1' holds the trainer role with this CurveZMQ key on another connection and is alive: a "
            "second process with the same key or id?")
        assert value("tmrl_relay_role_refusals_total", {"link": "trainer", "why": "trainer_alive"}) == 1
        assert relay.trainer.peer.routing_id == old_routing_id
        old.close()  # the first one stops (or a restart's old process ended): its connection closes
        hello_until_it_takes_the_trainer_role(relay, second, old_routing_id)
        worker = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        worker.hello("worker")
        worker.send(make_batch(3))
        assert second.recv_type("sample_batch")[1].seq == 3
        assert value("tmrl_relay_weights_version") == -1


def test_another_trainer_key_takes_the_role_once_the_trainer_is_silent(context, tmp_path, keys):
    _second_trainer_key(tmp_path, keys)
    with relay_in_thread(_config(tmp_path, keys, peer_timeout_s=0.3)) as relay:
        value = relay.metrics.registry.get_sample_value
        _trainer(context, relay, keys)
        wait_until(lambda: value("tmrl_relay_trainer_connected") == 0, what="the first trainer to go silent")
        _trainer(context, relay, keys, "trainer-b", "trainer-2")
        assert value("tmrl_relay_trainer_connected") == 1


def test_a_worker_cannot_take_over_another_workers_id(context, tmp_path, keys):
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        trainer = _peer(context, relay.ports.trainer_port, keys, "trainer", "trainer-1")
        trainer.hello("trainer")
        honest = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        honest.hello("worker")
        wait_until(lambda: "worker-1" in relay.workers.by_sender)
        impostor = _peer(context, relay.ports.worker_port, keys, "worker-2", "worker-1")
        impostor.send(Hello(role="worker", software="x"))
        error = impostor.recv_type("error")[1]
        assert error.reason == "unknown_sender" and "another CurveZMQ key" in error.message
        impostor.send(make_batch(66))
        assert impostor.recv_type("error")[1].reason == "unknown_sender"
        assert "sample_batch" not in trainer.types_within(300)
        honest.send(make_batch(1))  # the real worker-1 is unaffected
        assert trainer.recv_type("sample_batch")[1].seq == 1


def test_a_plain_text_client_cannot_talk_to_a_curve_relay(context, tmp_path, keys, caplog):
    caplog.set_level(logging.WARNING, logger="tmrl_relay")
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        plain = Peer(context, relay.ports.worker_port, "worker-1")
        for message in (Hello(role="worker", software="plain"), make_batch(1)):
            # once the handshake has failed the DEALER has no pipe left and a blocking send would wait forever
            with contextlib.suppress(zmq.Again):
                plain.socket.send_multipart(encode(message, "worker-1"), zmq.NOBLOCK)
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: sum(value("tmrl_relay_handshake_failures_total", {"link": "workers", "kind": k}) or 0
                               for k in ("auth", "protocol", "other")) >= 1, what="refused handshake")
        assert "worker-1" not in relay.workers.by_sender
        wait_until(lambda: any("during the handshake" in r.getMessage() for r in caplog.records), what="the log line")
    # a re-check: the relay's line for a plain-text client (libzmq's `other`, EPIPE) named no --insecure at all
    lines = [r.getMessage() for r in caplog.records if "during the handshake" in r.getMessage()]
    assert lines and all("runs --insecure" in line for line in lines), lines


def test_keys_added_while_running_are_accepted_after_the_reload(context, tmp_path, keys):
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        assert value("tmrl_relay_allowed_keys", {"link": "workers"}) == 2
        allow_public_key(tmp_path / "allow", keys["intruder"].public_file, name="worker-3")
        wait_until(lambda: value("tmrl_relay_allowed_keys", {"link": "workers"}) == 3, what="allow-list reload")
        newcomer = _peer(context, relay.ports.worker_port, keys, "intruder", "worker-3")
        newcomer.hello("worker")
        wait_until(lambda: "worker-3" in relay.workers.by_sender, what="hello from the newly allowed key")


def test_the_relay_refuses_to_start_secure_without_a_trainer_key_and_says_what_to_run(tmp_path, keys):
    for key in (tmp_path / "allow" / "trainers").glob("*.key"):
        key.unlink()
    relay = Relay(_config(tmp_path, keys))
    with pytest.raises(RelaySetupError, match=r"no trainer key.*keys add trainer.key --allow-dir .* --role trainer"):
        relay.bind()


def test_a_public_certificate_given_as_the_relays_secret_key_is_the_one_error_shown(tmp_path, keys, caplog):
    """An operator's-first-hour probe: `--secret-key keys/worker-1.key` (a public certificate, mode 644) warned to
    chmod it and that the allow-list held 'the relay's own public key' before the error that it holds no secret."""
    config = _config(tmp_path, keys)
    config.security.secret_key_file = keys["worker-1"].public_file
    with caplog.at_level("WARNING"), pytest.raises(RelaySetupError, match=r"worker-1.key holds no secret key: it is a "
                                                                          r"public certificate"):
        Relay(config).bind()
    assert caplog.records == []


def test_a_secret_key_others_can_read_is_warned_about_once_for_the_relays_three_sockets(tmp_path, keys, caplog):
    keys["relay"].secret_file.chmod(0o644)
    with caplog.at_level("WARNING"), relay_in_thread(_config(tmp_path, keys)):
        pass
    assert len([r for r in caplog.records if "has mode 644" in r.getMessage()]) == 1


def test_an_explicit_trainer_allowlist_dir_overrides_the_default(context, tmp_path, keys):
    allow_public_key(tmp_path / "elsewhere", keys["trainer"].public_file)
    for key in (tmp_path / "allow" / "trainers").glob("*.key"):
        key.unlink()
    with relay_in_thread(_config(tmp_path, keys, trainer_allowlist_dir=tmp_path / "elsewhere")) as relay:
        _trainer(context, relay, keys)  # admitted through the overriding list


def test_the_relay_refuses_to_start_without_keys_and_says_how_to_make_them(tmp_path):
    config = RelayConfig(worker_port=0, trainer_port=0, weights_port=0, metrics_port=0)
    relay = Relay(config)
    with pytest.raises(RelaySetupError, match="keys generate.*keys add.*--insecure"):
        relay.bind()


def test_removing_the_trainer_key_revokes_the_live_trainer_without_a_restart(context, tmp_path, keys):
    from tmrl_relay.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = _trainer(context, relay, keys)
        removed = runner.invoke(app, ["keys", "remove", "trainer", "--allow-dir", str(tmp_path / "allow"), "--role", "trainer"])
        assert removed.exit_code == 0, removed.output
        wait_until(lambda: value("tmrl_relay_trainer_connected") == 0, what="the revocation")
        trainer.send(make_weights(3))  # its open connection can no longer publish...
        assert trainer.recv_type("error")[1].reason == "unknown_sender"
        trainer.hello("trainer")  # ...nor take the role back
        assert "not in the relay's trainer allow-list" in trainer.recv_type("error")[1].message
        assert value("tmrl_relay_role_refusals_total", {"link": "trainer", "why": "not_a_trainer_key"}) == 1
        assert value("tmrl_relay_weights_version") == -1


def _admitted(context, relay, keys, key_name: str, sender: str) -> bool:
    """Whether a new connection with ``key_name``'s key gets its hello through (within 3 s)."""
    peer = _peer(context, relay.ports.worker_port, keys, key_name, sender)
    try:
        peer.hello("worker")
        wait_until(lambda: sender in relay.workers.by_sender, timeout_s=3.0, what=f"{sender}'s hello")
        return True
    except AssertionError:
        return False
    finally:
        peer.close()


def test_a_removal_applies_even_while_another_allow_list_file_is_malformed(context, tmp_path, keys, caplog):
    """An outside probe: a truncated worker-3.key made every reload fail ('keeping the previous one'), so removing
    worker-1 did nothing and a new connection with worker-1's key was still admitted."""
    caplog.set_level(logging.ERROR, logger="tmrl_relay.allowlist")
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        (tmp_path / "allow" / "worker-3.key").write_text("public-key = \"trunc")  # malformed: admits no one
        (tmp_path / "allow" / "worker-1.key").unlink()  # revoked
        wait_until(lambda: value("tmrl_relay_allowed_keys", {"link": "workers"}) == 1, what="the reload")
        assert not _admitted(context, relay, keys, "worker-1", "worker-1b")
        assert _admitted(context, relay, keys, "worker-2", "worker-2b")
        assert "worker-3.key" in caplog.text and "keys remove worker-3" in caplog.text


def test_an_allow_list_folder_that_cannot_be_read_keeps_the_previous_lists(context, tmp_path, keys, caplog):
    caplog.set_level(logging.ERROR, logger="tmrl_relay.allowlist")
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        allow = tmp_path / "allow"
        allow.rename(tmp_path / "allow-moved")
        allow.write_text("a file where the allow-list folder was")  # listing it fails (as it does without permission)
        wait_until(lambda: "cannot be read, keeping the previous lists" in caplog.text, what="the failed reload")
        assert value("tmrl_relay_allowed_keys", {"link": "workers"}) == 2  # not emptied
        assert _admitted(context, relay, keys, "worker-1", "worker-1b")


def test_a_trainer_key_copied_by_hand_into_the_worker_list_admits_no_one(context, tmp_path, keys, caplog):
    """`keys add` refuses a key in two roles; a file copied by hand is caught at the reload (outside probe: the
    trainer's key then worked as a worker)."""
    import shutil

    caplog.set_level(logging.ERROR, logger="tmrl_relay.allowlist")
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        shutil.copy(keys["trainer"].public_file, tmp_path / "allow" / "sneaky.key")
        wait_until(lambda: "one key is allowed in two roles" in caplog.text, what="the reload")
        assert not _admitted(context, relay, keys, "trainer", "sneaky-worker")
        assert value("tmrl_relay_allowed_keys", {"link": "trainer"}) == 0
        assert _admitted(context, relay, keys, "worker-2", "worker-2b")


def test_the_relays_own_public_key_in_an_allow_list_is_logged_with_the_command_that_removes_it(context, tmp_path, keys,
                                                                                              caplog):
    """A deployment probe: `keys add relay.key` (the wrong file of the pair copied around) was accepted without a
    word, and the client the operator meant stayed refused."""
    caplog.set_level(logging.WARNING, logger="tmrl_relay.allowlist")
    allow_key_for_role(tmp_path / "allow", keys["relay"].public_file, "worker")
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)):
        assert "allow/relay.key holds the relay's own public key" in caplog.text
        assert f"keys remove relay --allow-dir {tmp_path / 'allow'}`" in caplog.text
        caplog.clear()
        (tmp_path / "allow" / "relay.key").unlink()
        allow_key_for_role(tmp_path / "allow", keys["relay"].public_file, "trainer", name="relay-t")
        wait_until(lambda: "trainers/relay-t.key holds the relay's own public key" in caplog.text, what="the reload")
        assert "keys remove relay-t --allow-dir" in caplog.text and "--role trainer`" in caplog.text


def test_a_relay_without_its_own_key_in_the_lists_logs_nothing_about_it(context, tmp_path, keys, caplog):
    caplog.set_level(logging.WARNING, logger="tmrl_relay.allowlist")
    with relay_in_thread(_config(tmp_path, keys)):
        pass
    assert "relay's own public key" not in caplog.text


def test_a_removed_worker_keys_open_connection_gets_nothing_through(context, tmp_path, keys):
    """ZeroMQ authenticates a connection once; the relay checks each message's key against the reloaded list, so a
    revoked worker's batches stop at once instead of when its connection drops (an outside probe: they went on)."""
    with relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = _trainer(context, relay, keys)
        worker = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        worker.hello("worker")
        wait_until(lambda: "worker-1" in relay.workers.by_sender, what="worker-1's hello")
        worker.send(make_batch(1))
        assert trainer.recv_type("sample_batch")[1].seq == 1
        (tmp_path / "allow" / "worker-1.key").unlink()
        wait_until(lambda: value("tmrl_relay_allowed_keys", {"link": "workers"}) == 1, what="the reload")
        worker.send(make_batch(2))
        error = worker.recv_type("error")[1]
        assert error.reason == "unknown_sender" and "removed from the relay's worker allow-list" in error.message
        assert not trainer.socket.poll(300)  # nothing reached the trainer
        other = _peer(context, relay.ports.worker_port, keys, "worker-2", "worker-2")
        other.hello("worker")
        wait_until(lambda: "worker-2" in relay.workers.by_sender, what="worker-2's hello")
        other.send(make_batch(3))
        assert trainer.recv_type("sample_batch")[1].seq == 3


def test_a_revoked_workers_id_is_free_for_its_new_key_without_a_restart(context, tmp_path, keys, caplog):
    """docs/security.md: revoke the key, then give the worker a new pair. Its id stayed bound to the revoked key for
    the relay's lifetime (an outside probe: refused until a relay restart)."""
    keys["worker-1b"] = generate_key_pair(tmp_path / "keys", "worker-1b")
    with caplog.at_level(logging.INFO), relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        value = relay.metrics.registry.get_sample_value
        trainer = _trainer(context, relay, keys)
        old = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        old.hello("worker")
        wait_until(lambda: "worker-1" in relay.workers.by_sender, what="worker-1's hello")
        (tmp_path / "allow" / "worker-1.key").unlink()
        allow_key_for_role(tmp_path / "allow", keys["worker-1b"].public_file, "worker")
        wait_until(lambda: "their key left the worker allow-list" in caplog.text, what="the reload")
        assert value("tmrl_relay_allowed_keys", {"link": "workers"}) == 2
        new = _peer(context, relay.ports.worker_port, keys, "worker-1b", "worker-1")
        new.hello("worker")
        wait_until(lambda: relay.workers.by_sender.get("worker-1") is not None
                   and relay.workers.by_sender["worker-1"].user_id == load_public_key(keys["worker-1b"].public_file).decode(),
                   what="the new key's hello")
        new.send(make_batch(7))
        assert trainer.recv_type("sample_batch")[1].seq == 7
        old.send(make_batch(8))  # the revoked connection still gets nothing through
        assert old.recv_type("error")[1].reason == "unknown_sender"
        assert not trainer.socket.poll(300)


def test_a_rotated_trainer_key_takes_the_role_under_the_same_id_once_the_old_key_is_removed(context, tmp_path, keys,
                                                                                            caplog):
    """An outside probe rotated the trainer's key as an operator would (add the new key, stop the trainer, start it
    with the new key, then remove the old key): the new key was refused (`trainer id 'trainer' is bound to another
    CurveZMQ key`) until the relay restarted, and training stopped; the old key's removal freed nothing."""
    _second_trainer_key(tmp_path, keys)
    with caplog.at_level(logging.INFO), relay_in_thread(_config(tmp_path, keys, allowlist_reload_s=0.1)) as relay:
        old = _trainer(context, relay, keys, sender="trainer")
        old.socket.close(linger=0)  # the old trainer stopped...
        # ...and the relay saw it go: a hello in the same poll turn as the close was refused as a second live trainer
        # (a fresh-clone CI run), not the rotation this test is about
        wait_until(lambda: relay.trainer.peer is None, what="the old trainer's role released")
        new = _peer(context, relay.ports.trainer_port, keys, "trainer-b", "trainer")
        new.hello("trainer")
        refusal = new.recv_type("error")[1]
        assert refusal.reason == "unknown_sender" and "bound to another CurveZMQ key" in refusal.message
        assert "`tmrl-relay keys remove --allow-dir ALLOW NAME --role trainer`" in refusal.message
        (tmp_path / "allow" / "trainers" / "trainer.key").unlink()  # keys remove trainer --role trainer
        wait_until(lambda: "trainer id(s) trainer: their key left the trainer allow-list" in caplog.text,
                   what="the reload")
        new.hello("trainer")
        wait_until(lambda: relay.trainer.ready and relay.trainer.peer.user_id
                   == load_public_key(keys["trainer-b"].public_file).decode(), what="the new key's hello")
        worker = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        worker.hello("worker")
        wait_until(lambda: "worker-1" in relay.workers.by_sender, what="worker-1's hello")
        worker.send(make_batch(4))
        assert new.recv_type("sample_batch")[1].seq == 4


def test_a_refused_key_is_logged_with_the_key_and_the_link_that_allows_it(context, tmp_path, keys, caplog):
    """Deployment probe: a refused handshake was logged without the client's key, so the operator could not tell
    which client it was, nor that it was an allowed worker pointed at the trainer's port."""
    caplog.set_level(logging.WARNING, logger="tmrl_common.curve")
    with relay_in_thread(_config(tmp_path, keys)) as relay:
        value = relay.metrics.registry.get_sample_value
        lost_worker = _peer(context, relay.ports.trainer_port, keys, "worker-1", "worker-1")
        lost_worker.hello("trainer")
        stranger = _peer(context, relay.ports.worker_port, keys, "intruder", "worker-9")
        stranger.hello("worker")
        wait_until(lambda: (value("tmrl_relay_handshake_failures_total", {"link": "trainer", "kind": "auth"}) or 0) >= 1
                   and (value("tmrl_relay_handshake_failures_total", {"link": "workers", "kind": "auth"}) or 0) >= 1,
                   what="both refusals")
    lines = [r.getMessage() for r in caplog.records if "refused the CurveZMQ key" in r.getMessage()]
    worker_key = load_public_key(keys["worker-1"].public_file).decode()
    intruder_key = load_public_key(keys["intruder"].public_file).decode()
    assert any(worker_key in line and "on tmrl-trainer" in line and "allowed on tmrl-weights, tmrl-workers: a client "
               "pointed at the wrong port?" in line for line in lines), lines
    assert any(intruder_key in line and "on tmrl-workers: not in its allow-list" in line and "allowed on" not in line
               for line in lines), lines


def test_under_curvezmq_the_weights_socket_reopened_after_a_flood_admits_allowed_keys_again(context, tmp_path, keys,
                                                                                            monkeypatch, caplog):
    """The re-opened weights socket is secured like the first (ZAP domain, server key): an allowed worker's SUB
    reconnects and gets weights, and the warning names the flooding key."""
    from tmrl_relay import subscriptions

    monkeypatch.setattr(subscriptions, "FOREIGN_TOPICS_MAX", 20)
    with relay_in_thread(_config(tmp_path, keys, weights_min_interval_s=0)) as relay:
        trainer = _trainer(context, relay, keys)
        good = _peer(context, relay.ports.weights_port, keys, "worker-1", "worker-1", zmq.SUB)
        hostile = _peer(context, relay.ports.weights_port, keys, "worker-2", "worker-2", zmq.XSUB)
        for i in range(60):
            hostile.socket.send(b"\x01" + f"topic-{i}".encode())
        value = relay.metrics.registry.get_sample_value
        wait_until(lambda: (value("tmrl_relay_weights_socket_reopened_total") or 0) >= 1, timeout_s=20,
                   what="the weights socket to be re-opened")
        worker_2_key = load_public_key(keys["worker-2"].public_file).decode()
        assert any(f"key {worker_2_key}" in r.getMessage() for r in caplog.records if "re-opening" in r.getMessage())
        hostile.socket.close(linger=0)
        received, version = False, 1
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:  # until the SUB has reconnected
            trainer.send(make_weights(version))
            received = "weights_update" in good.types_within(200)
            version += 1
        assert received, "the allowed SUB got no weights from the re-opened socket"


def test_a_curve_client_of_an_insecure_relay_is_told_apart_from_a_wrong_server_key(context, keys, caplog):
    """An operator probe forgot --insecure on the worker of an --insecure relay: the relay logged that the client's
    --server-key was most likely wrong, which it cannot be (the relay has no key), and the worker said the same."""
    from .relay_harness import insecure_config

    caplog.set_level(logging.WARNING, logger="tmrl_relay")
    with relay_in_thread(insecure_config()) as relay:
        curve = _peer(context, relay.ports.worker_port, keys, "worker-1", "worker-1")
        with contextlib.suppress(zmq.Again):
            curve.socket.send_multipart(encode(Hello(role="worker", software="curve"), "worker-1"), zmq.NOBLOCK)
        wait_until(lambda: any("during the handshake" in r.getMessage() for r in caplog.records), what="the log line")
        curve.close()
    lines = [r.getMessage() for r in caplog.records if "during the handshake" in r.getMessage()]
    # libzmq reports a mechanism mismatch (`protocol`), or `other` (EPIPE) when the client closed first
    says = ("(protocol: this relay runs --insecure (plain text) and the client speaks CurveZMQ: run both with "
            "--insecure or both with keys)", ", speaks CurveZMQ to this --insecure relay, ")
    assert lines and all(says[0] in line or says[1] in line for line in lines), lines
