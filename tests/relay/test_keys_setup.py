"""``tmrl-relay keys init`` and ``keys generate``'s advice: one command makes every pair and allow-list entry of a
one-machine setup in the layout the relay reads (workers in ``<allow-dir>``, trainers in ``<allow-dir>/trainers``),
running it twice changes nothing, and ``generate`` says where each half of the key it made goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from tmrl_common.curve import list_allowed_keys, load_public_key
from tmrl_relay.cli import app
from tmrl_relay.keys import role_dir, write_local_setup
from typer.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_keys_init_makes_every_pair_and_allows_trainer_and_workers_apart(runner, tmp_path):
    result = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "keys"), "--allow-dir", str(tmp_path / "allow"),
                                 "--worker", "worker-1", "--worker", "worker-2"])
    assert result.exit_code == 0, result.output
    for name in ("relay", "trainer", "worker-1", "worker-2"):
        assert (tmp_path / "keys" / f"{name}.key").is_file() and (tmp_path / "keys" / f"{name}.key_secret").is_file()
    workers = {entry.name: entry.public_key for entry in list_allowed_keys(tmp_path / "allow")}
    trainers = {entry.name: entry.public_key for entry in list_allowed_keys(tmp_path / "allow" / "trainers")}
    assert workers == {name: load_public_key(tmp_path / "keys" / f"{name}.key") for name in ("worker-1", "worker-2")}
    assert trainers == {"trainer": load_public_key(tmp_path / "keys" / "trainer.key")}
    assert "--secret-key" in result.output and "relay.key_secret" in result.output


def test_keys_init_twice_keeps_the_existing_pairs(tmp_path):
    first = write_local_setup(tmp_path / "keys", tmp_path / "allow", ["worker-1"])
    key_before = load_public_key(first.pairs["worker-1"].public_file)
    second = write_local_setup(tmp_path / "keys", tmp_path / "allow", ["worker-1", "worker-2"])
    assert second.kept == ["relay", "trainer", "worker-1"]
    assert load_public_key(second.pairs["worker-1"].public_file) == key_before
    assert [entry.name for entry in list_allowed_keys(tmp_path / "allow")] == ["worker-1", "worker-2"]


def test_keys_init_checks_every_name_before_it_writes_any_key(runner, tmp_path):
    """A config probe: a bad last --worker name was refused after the relay's, the trainer's and the first worker's
    pairs (and their allow-list entries) were written."""
    result = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "keys"), "--allow-dir", str(tmp_path / "allow"),
                                 "--worker", "w1", "--worker", "bad id"])
    assert result.exit_code == 2 and "key name 'bad id' must match" in result.output
    assert not (tmp_path / "keys").exists() and not (tmp_path / "allow").exists()


def test_keys_generate_into_a_file_says_so_in_one_line(runner, tmp_path):
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path / "afile" / "keys"), "--name", "w2"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # was FileExistsError's traceback
    assert f"{tmp_path / 'afile'} is a file, not a folder" in result.output


def test_role_dir_puts_trainers_in_their_own_folder():
    assert role_dir(Path("allow"), "worker") == Path("allow")
    assert role_dir(Path("allow"), "trainer") == Path("allow/trainers")


@pytest.mark.parametrize(("name", "expected", "absent"), [
    ("relay", "it is not added to the allow-list", "keys add"),
    ("trainer", "keys add trainer.key --allow-dir ALLOW --role trainer", "--server-key relay.key "),
    ("worker-3", "keys add worker-3.key --allow-dir ALLOW --role worker)", "--role trainer"),
])
def test_keys_generate_advice_fits_the_key_it_made(runner, tmp_path, name, expected, absent):
    result = runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path), "--name", name])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", " ")
    assert expected in text
    assert absent not in result.output
    if name != "relay":  # the relay's public key beside the pair, as `keys init` and deployment.md place it
        assert f"--server-key {tmp_path / 'relay.key'} " in result.output, result.output


def test_a_relay_on_the_keys_init_layout_admits_the_trainer_only_on_the_trainer_socket(context, tmp_path):
    import zmq
    from tmrl_common.protocol import Hello
    from tmrl_common.sockets import SecurityConfig
    from tmrl_relay.config import RelayConfig

    from .relay_harness import Peer, relay_in_thread, wait_until

    setup = write_local_setup(tmp_path / "keys", tmp_path / "allow", ["worker-1"])
    relay_public = setup.pairs["relay"].public_file

    def peer(port: int, name: str) -> Peer:
        security = SecurityConfig(secret_key_file=setup.pairs[name].secret_file, server_public_key_file=relay_public)
        return Peer(context, port, name, zmq.DEALER, security=security)

    config = RelayConfig(bind_host="127.0.0.1", worker_port=0, trainer_port=0, weights_port=0, metrics_port=0,
                         security=SecurityConfig(secret_key_file=setup.pairs["relay"].secret_file,
                                                 allowlist_dir=tmp_path / "allow"))  # no trainer_allowlist_dir
    with relay_in_thread(config) as relay:
        trainer, worker = peer(relay.ports.trainer_port, "trainer"), peer(relay.ports.worker_port, "worker-1")
        trainer.hello("trainer")
        wait_until(lambda: relay.trainer.ready and relay.trainer.peer.sender == "trainer", what="trainer hello")
        worker.hello("worker")
        wait_until(lambda: "worker-1" in relay.workers.by_sender, what="worker hello")
        intruder = peer(relay.ports.trainer_port, "worker-1")  # a worker's key on the trainer socket
        # try_send: the refusal may end the intruder's session before its hello is queued (seen in one CI run on the loaded machine)
        intruder.try_send(Hello(role="trainer", software="test"))
        failures = relay.metrics.registry.get_sample_value
        wait_until(lambda: failures("tmrl_relay_handshake_failures_total", {"link": "trainer", "kind": "auth"}) == 1,
                   what="the worker key refused on the trainer socket")
        assert relay.trainer.peer.sender == "trainer"
        for client in (trainer, worker, intruder):
            client.close()


@pytest.mark.parametrize("command", [["keys", "init", "--allow-dir", "allow", "--worker", "w1", "--dir"],
                                     ["keys", "generate", "--name", "worker-1", "--dir"],
                                     ["keys", "init", "--dir", "keys", "--worker", "w1", "--allow-dir"]])
def test_a_folder_name_too_long_for_the_file_system_is_one_line(runner, tmp_path, monkeypatch, command):
    """The re-check probe: `keys init --dir <300 characters>` and `keys generate` ended in an ENAMETOOLONG traceback."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*command, "k" * 300])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said, result.output
    assert said.startswith("error: cannot use ") and "k" * 300 in said and said.endswith(": File name too long")
