"""``tmrl-relay`` as users run it: a real subprocess (forwarding, metrics, clean SIGTERM), key commands, refusals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request

import pytest
import zmq
from tmrl_common.curve import list_allowed_keys, load_public_key
from tmrl_common.protocol import SampleAck
from tmrl_relay.cli import app
from typer.testing import CliRunner

from .relay_harness import Peer, make_batch, make_weights, relay_subprocess, wait_until


@pytest.fixture
def runner(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("TMRL_"):
            monkeypatch.delenv(key)
    return CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _sample(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return None


@pytest.mark.slow
def test_relay_subprocess_forwards_serves_metrics_and_stops_cleanly_on_sigterm(context):
    metrics_port = _free_port()
    with relay_subprocess("--insecure", "--metrics-port", str(metrics_port)) as (process, ports):
        assert ports["metrics_port"] == metrics_port
        trainer = Peer(context, ports["trainer_port"], "trainer-1")
        trainer.hello("trainer")
        workers = [Peer(context, ports["worker_port"], f"worker-{i}") for i in (1, 2)]
        subscriber = Peer(context, ports["weights_port"], "sub", zmq.SUB)
        for worker in workers:
            worker.hello("worker")
        wait_until(lambda: _sample(_scrape(metrics_port), "tmrl_relay_trainer_connected") == 1, what="trainer hello")
        for seq, worker in enumerate(workers):
            worker.send(make_batch(seq, steps=6))
        senders = {trainer.recv_type("sample_batch")[0].sender for _ in workers}
        assert senders == {"worker-1", "worker-2"}
        trainer.send(SampleAck(worker="worker-2", seqs=[1]))
        assert workers[1].recv_type("sample_ack")[1].seqs == [1]
        wait_until(lambda: _sample(_scrape(metrics_port), "tmrl_relay_weights_subscriptions_total") == 1)
        trainer.send(make_weights(3))
        assert subscriber.recv_type("weights_update")[1].version == 3
        workers[0].send_frames([b"garbage"])
        assert workers[0].recv_type("error")[1].reason == "malformed"

        text = _scrape(metrics_port)
        assert "# TYPE tmrl_relay_batches_forwarded_total counter" in text
        assert "_created" not in text  # an operator's probe: `grep tmrl_` showed a timestamp beside every counter
        assert _sample(text, "tmrl_relay_batches_forwarded_total") == 2
        assert _sample(text, "tmrl_relay_steps_forwarded_total") == 12
        assert _sample(text, "tmrl_relay_connected_workers") == 2
        assert _sample(text, "tmrl_relay_weights_version") == 3
        assert _sample(text, "tmrl_relay_acks_forwarded_total") == 1
        assert _sample(text, "tmrl_relay_rejects_total", '{link="workers",reason="malformed"}') == 1
        assert _sample(text, "tmrl_relay_received_bytes_total", '{link="workers"}') > 0
        assert _sample(text, "tmrl_relay_pending_bytes") == 0
        assert _sample(text, "tmrl_relay_dropped_batches_total") == 0

        process.send_signal(__import__("signal").SIGTERM)
        assert process.wait(10) == 0
        # its totals, as the workers' and the trainer's last lines give theirs (a soak probe)
        assert ("relay stopped: 2 batches (12 steps) forwarded to the trainer, 1 acks to workers, 0 batches dropped, "
                "0 held for a trainer at the stop, 1 weights versions published, 1 messages rejected") in \
            process.stderr.read()


def test_relay_refuses_to_start_without_keys_unless_insecure(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from tmrl_relay.cli import app; app()", "run", "--worker-port", "0",
                             "--trainer-port", "0", "--weights-port", "0", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "keys generate" in result.stderr and "--insecure" in result.stderr


def test_relay_subprocess_with_curve_keys_from_the_keys_commands(context, tmp_path, runner):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    for name in ("relay", "worker-1", "trainer"):
        assert runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", name]).exit_code == 0
    assert runner.invoke(app, ["keys", "add", "--allow-dir", str(allow), str(keys / "worker-1.key")]).exit_code == 0
    added = runner.invoke(app, ["keys", "add", str(keys / "trainer.key"), "--allow-dir", str(allow), "--role", "trainer"])
    assert added.exit_code == 0 and (allow / "trainers" / "trainer.key").is_file(), added.output
    from tmrl_common.sockets import SecurityConfig

    with relay_subprocess("--secret-key", str(keys / "relay.key_secret"), "--allow-dir", str(allow),
                          "--metrics-port", "0") as (_, ports):
        def security(name):
            return SecurityConfig(secret_key_file=keys / f"{name}.key_secret", server_public_key_file=keys / "relay.key")

        trainer = Peer(context, ports["trainer_port"], "trainer-1", security=security("trainer"))
        trainer.hello("trainer")
        worker = Peer(context, ports["worker_port"], "worker-1", security=security("worker-1"))
        worker.hello("worker")
        worker.send(make_batch(5))
        assert trainer.recv_type("sample_batch")[1].seq == 5


def test_keys_commands_generate_add_list_remove(runner, tmp_path):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    result = runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", "worker-1"])
    assert result.exit_code == 0, result.output
    assert (keys / "worker-1.key").is_file() and (keys / "worker-1.key_secret").is_file()
    again = runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", "worker-1"])
    assert again.exit_code == 2 and "already exists" in again.output
    added = runner.invoke(app, ["keys", "add", "--allow-dir", str(allow), str(keys / "worker-1.key"), "--name", "w1"])
    assert added.exit_code == 0, added.output
    assert [k.name for k in list_allowed_keys(allow)] == ["w1"]
    listed = runner.invoke(app, ["keys", "list", "--allow-dir", str(allow)])
    assert listed.exit_code == 0 and load_public_key(keys / "worker-1.key").decode() in listed.output
    config = tmp_path / "relay.toml"
    config.write_text(f'[relay.security]\nallowlist_dir = "{allow}"\n')
    assert "w1" in runner.invoke(app, ["keys", "list", "--config", str(config)]).output
    bad = runner.invoke(app, ["keys", "add", "--allow-dir", str(allow), str(tmp_path / "missing.key")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    assert runner.invoke(app, ["keys", "remove", "--allow-dir", str(allow), "w1"]).exit_code == 0
    assert list_allowed_keys(allow) == []


def test_keys_list_shows_the_good_entries_and_says_which_hold_no_key(runner, tmp_path):
    """An outside probe's link to nothing in the allow-list made `keys list` print nothing and exit 2."""
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", "worker-1"])
    assert runner.invoke(app, ["keys", "add", "--allow-dir", str(allow), str(keys / "worker-1.key")]).exit_code == 0
    (allow / "dangling.key").symlink_to(tmp_path / "nowhere")
    listed = runner.invoke(app, ["keys", "list", "--allow-dir", str(allow)])
    assert listed.exit_code == 1 and load_public_key(keys / "worker-1.key").decode() in listed.output
    assert "error: key file" in listed.output and "dangling.key does not exist" in listed.output
    assert runner.invoke(app, ["keys", "remove", "--allow-dir", str(allow), "dangling"]).exit_code == 0
    assert runner.invoke(app, ["keys", "list", "--allow-dir", str(allow)]).exit_code == 0


def test_keys_add_binds_a_role_to_a_key_and_refuses_one_key_in_both_roles(runner, tmp_path):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    for name in ("trainer", "worker-1"):
        assert runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", name]).exit_code == 0
    as_trainer = runner.invoke(app, ["keys", "add", str(keys / "trainer.key"), "--allow-dir", str(allow), "--role", "trainer"])
    assert as_trainer.exit_code == 0 and "as trainer" in as_trainer.output
    assert [k.name for k in list_allowed_keys(allow / "trainers")] == ["trainer"]
    assert runner.invoke(app, ["keys", "add", str(keys / "worker-1.key"), "--allow-dir", str(allow)]).exit_code == 0
    assert [k.name for k in list_allowed_keys(allow)] == ["worker-1"]  # trainers/ is not in the workers' list
    both = runner.invoke(app, ["keys", "add", str(keys / "worker-1.key"), "--allow-dir", str(allow), "--role", "trainer",
                               "--name", "sneaky"])
    assert both.exit_code == 2 and "allowed as a worker" in both.output and "one key has one role" in both.output
    listed = runner.invoke(app, ["keys", "list", "--allow-dir", str(allow), "--role", "trainer"])
    assert listed.exit_code == 0 and "trainer\t" in listed.output and "worker-1" not in listed.output
    removed = runner.invoke(app, ["keys", "remove", "trainer", "--allow-dir", str(allow), "--role", "trainer"])
    assert removed.exit_code == 0 and list_allowed_keys(allow / "trainers") == []


def test_run_flags_show_in_the_effective_config(runner, tmp_path):
    result = runner.invoke(app, ["run", "--insecure", "--worker-port", "7001", "--allow-dir", str(tmp_path), "--show-config"])
    assert result.exit_code == 0, result.output
    table = tomllib.loads(result.stdout)["relay"]
    assert table["worker_port"] == 7001
    assert table["security"]["insecure"] is True and table["security"]["allowlist_dir"] == str(tmp_path)


def test_relay_subprocess_stops_cleanly_on_sigint(context):
    import signal

    with relay_subprocess("--insecure", "--metrics-port", "0") as (process, ports):
        worker = Peer(context, ports["worker_port"], "worker-1")
        worker.hello("worker")
        worker.send(make_batch(1))  # held: no trainer
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert "relay stopped" in process.stderr.read()


def _relay_run(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tmrl_relay.cli import app; app()", "run", "--insecure",
                           "--log-level", "info", *options], capture_output=True, text=True, timeout=60)


def test_a_busy_port_stops_the_relay_naming_the_option_that_moves_it_and_before_it_says_it_listens():
    """An outside first-hour probe: the README's relay command on a machine whose 9108 was taken logged 'relay
    listening on ...' and then failed with 'Address already in use' and no way out."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        metrics = _relay_run("--worker-port", "0", "--trainer-port", "0", "--weights-port", "0", "--metrics-port", port)
        workers = _relay_run("--worker-port", port, "--trainer-port", "0", "--weights-port", "0", "--metrics-port", "0")
    assert metrics.returncode == 2 and "relay listening" not in metrics.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use (another relay?): choose another with " \
           "--metrics-port N (metrics_port in [relay]), or 0 to turn the metrics off" in metrics.stderr
    assert workers.returncode == 2
    assert f"cannot bind the workers socket on 127.0.0.1:{port}" in workers.stderr
    assert "choose another port with --worker-port N (worker_port in [relay]; its clients must use the same)" \
           in workers.stderr


def test_an_address_this_machine_does_not_have_exits_1_so_a_service_manager_retries():
    """A relay set to a LAN address that starts before DHCP gave exit 2, which systemd and the Windows supervisor
    never restart (deployment probe). 192.0.2.0/24 is TEST-NET-1: no machine holds it."""
    workers = _relay_run("--bind-host", "192.0.2.99", "--worker-port", "0", "--trainer-port", "0", "--weights-port",
                         "0", "--metrics-port", "0")
    metrics = subprocess.run([sys.executable, "-c", "from tmrl_relay.cli import app; app()", "run", "--insecure",
                              "--worker-port", "0", "--trainer-port", "0", "--weights-port", "0", "--metrics-port",
                              "9"], env={**os.environ, "TMRL_RELAY__METRICS_HOST": "192.0.2.99"},
                             capture_output=True, text=True, timeout=60)
    for run in (workers, metrics):
        assert run.returncode == 1, run.stderr
        assert "this machine has no such address or interface now" in run.stderr and "relay listening" not in run.stderr
    assert "cannot bind the workers socket on 192.0.2.99" in workers.stderr
    assert "cannot serve metrics on 192.0.2.99" in metrics.stderr


@pytest.mark.slow
def test_connections_near_the_open_file_limit_are_counted_and_warned_about_and_peers_get_in_after(context):
    """An outside probe held 1,099 silent connections against a relay under `ulimit -n 1024`: no new peer got in
    for 45 s, two cores spun in libzmq's accept loop, and neither a log line nor a metric said why."""
    with relay_subprocess("--insecure", "--metrics-port", str(_free_port()), open_file_limit=512) as (process, ports):
        silent = []
        try:
            for _ in range(445):  # connections that never send a byte, as the probe's; short of the limit, where
                silent.append(socket.create_connection(("127.0.0.1", ports["worker_port"])))  # /metrics gets in too
            wait_until(lambda: (_sample(_scrape(ports["metrics_port"]), "tmrl_relay_open_files") or 0) >= 0.9 * 512,
                       what="the open files gauge", timeout_s=20)
        finally:
            for connection in silent:
                connection.close()
        wait_until(lambda: (_sample(_scrape(ports["metrics_port"]), "tmrl_relay_open_files") or 999) < 100,
                   what="the connections closed", timeout_s=20)
        worker = Peer(context, ports["worker_port"], "worker-1")  # a peer gets in once they are gone
        worker.hello("worker")
        worker.send(make_batch(0))
        wait_until(lambda: _sample(_scrape(ports["metrics_port"]), "tmrl_relay_pending_batches") == 1,
                   what="the batch held for the trainer")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert "the open-file limit is 512 (hard limit 512): the relay can hold about that many connections" in stderr
    assert "open files of the limit 512: each connection holds one, and at the limit no new peer gets in" in stderr


def test_the_relay_lifts_its_soft_open_file_limit_to_the_hard_one_up_to_what_the_systemd_unit_sets():
    """`make run-relay` inherits the shell's soft limit, often 1,024 connections; only the systemd unit set more."""
    import resource

    from tmrl_relay.open_files import WANTED_OPEN_FILES

    this_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    script = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, {hard})); "
              "from tmrl_relay.open_files import raise_open_file_limit; "
              "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    for hard in (min(8192, this_hard), this_hard):  # a hard limit above the wanted one is not used whole
        out = subprocess.run([sys.executable, "-c", script.format(hard=hard)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == [str(min(WANTED_OPEN_FILES, hard))] * 2


def test_keys_add_of_a_key_named_relay_warns_that_it_is_the_relays_own(runner, tmp_path):
    """An operator probe ran `keys add keys/relay.key`: `allowed relay as worker`, exit 0, not a word until the relay
    started. A client allowed with the relay's own key shares its identity."""
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    assert runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", "relay"]).exit_code == 0
    added = runner.invoke(app, ["keys", "add", "--allow-dir", str(allow), str(keys / "relay.key")])
    assert added.exit_code == 0 and "allowed relay as worker" in added.output
    assert "warning: 'relay' is the name of the relay's own key pair" in added.output
    assert f"tmrl-relay keys remove relay --allow-dir {allow} --role worker" in " ".join(added.output.split())
    assert runner.invoke(app, ["keys", "generate", "--dir", str(keys), "--name", "worker-1"]).exit_code == 0
    worker = runner.invoke(app, ["keys", "add", "--allow-dir", str(allow), str(keys / "worker-1.key")])
    assert worker.exit_code == 0 and "warning" not in worker.output
