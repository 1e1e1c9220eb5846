"""The worker's progress file: rewritten in place after every step, readable after a SIGKILL, and a restarted worker
logs what a run that did not stop cleanly built and lost."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
from tmrl_common.batching import SampleBatchBuilder
from tmrl_worker.config import WorkerConfig
from tmrl_worker.envs import make_env
from tmrl_worker.progress import RECORD_BYTES, ProgressFile, ProgressFileError, progress_path, read_progress
from tmrl_worker.runtime import RolloutLoop, UniformPolicy, open_progress_file


class ListSink:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def submit(self, builder: SampleBatchBuilder, weights_version: int) -> None:
        self.rows.append(len(builder))


def test_each_update_overwrites_the_whole_record_in_place(tmp_path):
    progress = ProgressFile(tmp_path / "w.progress.json")
    progress.update(steps=123456789, resets=5, rows_built=123456794, rows_handed_over=123456700,
                    batches_handed_over=99, rows_unfinished=94)
    progress.update(steps=7, resets=1, rows_built=8, rows_handed_over=0, batches_handed_over=0, rows_unfinished=8)
    progress.close()
    assert (tmp_path / "w.progress.json").stat().st_size == RECORD_BYTES
    record = read_progress(tmp_path / "w.progress.json")
    assert (record.steps, record.resets, record.rows_built, record.rows_unfinished, record.running) == (7, 1, 8, 8, True)


def test_the_rollout_loop_records_rows_built_handed_over_and_unfinished(tmp_path):
    env = make_env("sim-fast", max_episode_steps=40)
    sink = ListSink()
    progress = ProgressFile(tmp_path / "w.progress.json")
    loop = RolloutLoop(env, sink, None, UniformPolicy(env.action_dim, seed=0), batch_steps=16, seed=0,
                       progress=progress)
    records = []
    real_update = progress.update

    def update_and_keep(**fields):
        real_update(**fields)
        records.append(read_progress(progress.path))

    progress.update = update_and_keep
    try:
        loop.run(max_steps=150)
    finally:
        env.close()
        progress.close()
    assert len(records) == 150 + 2  # after the first reset, after every step, after the final flush
    for record in records:
        assert record.rows_built == record.steps + record.resets
        assert record.rows_built == record.rows_handed_over + record.rows_unfinished
    first, last = records[0], records[-1]
    assert (first.steps, first.resets, first.rows_unfinished) == (0, 1, 1)
    assert last.steps == 150 and last.resets == loop.stats.episodes + 1
    assert last.rows_unfinished == 0 and last.rows_handed_over == sum(sink.rows) == last.rows_built
    assert last.batches_handed_over == len(sink.rows)
    assert any(0 < r.rows_unfinished < 16 for r in records[1:-1])


def test_the_last_record_survives_a_sigkill_of_the_writer(tmp_path):
    path = tmp_path / "w.progress.json"
    script = (f"import os, signal; from tmrl_worker.progress import ProgressFile; p = ProgressFile({str(path)!r}); "
              "[p.update(steps=s, resets=1, rows_built=s + 1, rows_handed_over=s - s % 10, batches_handed_over=s // 10, "
              "rows_unfinished=s % 10 + 1) for s in range(1, 58)]; os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert result.returncode == -9
    record = read_progress(path)
    assert record.running and (record.steps, record.rows_handed_over, record.rows_unfinished) == (57, 50, 8)


def test_a_restarted_worker_logs_what_a_killed_run_built_and_lost(tmp_path, caplog):
    config = WorkerConfig(worker_id="w7", state_dir=tmp_path, durable_spool=True)
    ProgressFile(progress_path(tmp_path, "w7")).update(steps=310, resets=3, rows_built=313, rows_handed_over=300,
                                                      batches_handed_over=12, rows_unfinished=13)
    with caplog.at_level(logging.WARNING):
        progress = open_progress_file(config, restored_batches=2)
    progress.close()
    message = caplog.text
    assert "did not stop cleanly" in message and "built 313 rows, handed over 300 rows in 12 batches" in message
    assert "13 rows in its unfinished batch (lost); the 2 unacknowledged batch(es) its durable spool kept on disk " \
           "are sent again now" in message


def test_a_restart_whose_durable_spool_kept_nothing_does_not_say_batches_are_resent(tmp_path, caplog):
    """A chaos probe: after a SIGKILL with every batch acknowledged, the restart still said the batches 'spooled on
    disk are sent again now', and its hello then said 0 to resend."""
    config = WorkerConfig(worker_id="w8", state_dir=tmp_path, durable_spool=True)
    ProgressFile(progress_path(tmp_path, "w8")).update(steps=100, resets=1, rows_built=101, rows_handed_over=100,
                                                      batches_handed_over=2, rows_unfinished=1)
    with caplog.at_level(logging.WARNING):
        open_progress_file(config, restored_batches=0).close()
    assert "are sent again" not in caplog.text
    assert "its durable spool kept no unacknowledged batch on disk, so none is sent again" \
        in caplog.text


def test_a_clean_stop_is_not_reported_and_an_unreadable_file_is_overwritten(tmp_path, caplog):
    config = WorkerConfig(worker_id="w8", state_dir=tmp_path)
    clean = ProgressFile(progress_path(tmp_path, "w8"))
    clean.update(steps=5, resets=1, rows_built=6, rows_handed_over=6, batches_handed_over=1, rows_unfinished=0,
                 running=False)
    clean.close()
    with caplog.at_level(logging.WARNING):
        open_progress_file(config).close()
    assert "did not stop cleanly" not in caplog.text

    progress_path(tmp_path, "w8").write_bytes(b"\x00garbage")
    with pytest.raises(ProgressFileError, match="holds no progress record"):
        read_progress(progress_path(tmp_path, "w8"))
    with caplog.at_level(logging.WARNING):
        progress = open_progress_file(config)
    progress.update(steps=1, resets=1, rows_built=2, rows_handed_over=0, batches_handed_over=0, rows_unfinished=2)
    progress.close()
    assert "holds no progress record" in caplog.text and read_progress(progress_path(tmp_path, "w8")).steps == 1


def test_a_new_progress_file_holds_a_record_from_the_start(tmp_path):
    # the first record is a real write (the page is backed on disk before it is mapped, so a full disk shows up as an
    # OSError at start and never as a SIGBUS on a later step)
    progress = ProgressFile(tmp_path / "w.progress.json")
    try:
        record = read_progress(tmp_path / "w.progress.json")
        assert record.running and (record.steps, record.resets, record.rows_built) == (0, 0, 0)
    finally:
        progress.close()


def test_a_progress_file_that_cannot_be_written_is_logged_and_the_rollouts_go_on(tmp_path, caplog):
    blocked = tmp_path / "w.progress.json"
    blocked.mkdir()  # a directory where the file should be: opening it for writing fails
    with caplog.at_level(logging.WARNING, logger="tmrl_worker.progress"):
        progress = ProgressFile(blocked)
    progress.update(steps=3, resets=1, rows_built=4, rows_handed_over=0, batches_handed_over=0, rows_unfinished=4)
    progress.close()
    assert blocked.is_dir()
    assert any("cannot be written" in r.getMessage() and "no progress record" in r.getMessage() for r in caplog.records)


def test_a_worker_that_cannot_reach_the_relay_says_so_in_its_progress_line_and_summary(tmp_path, monkeypatch, caplog):
    """An outside probe: a worker started before the relay, or given a wrong port, logged only its steps and
    'batches handed over' for 50 s, and its final line did not say it never connected."""
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker import runtime
    from tmrl_worker.cli import run_summary

    monkeypatch.setattr(runtime, "PROGRESS_EVERY_S", 0.5)
    worker_port, weights_port = free_ports(2)  # nothing listens on them
    config = WorkerConfig(worker_id="early", env="sim-fast", max_steps=400, max_steps_per_second=200,
                          batch_steps=50, worker_port=worker_port, weights_port=weights_port, state_dir=tmp_path,
                          flush_timeout_s=0.2, transport=TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200,
                                                                         linger_ms=0),
                          security=SecurityConfig(insecure=True))
    with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
        stats = runtime.run_worker(config)
    lines = [r for r in caplog.records if "steps/s" in r.getMessage()]
    assert lines and all(r.levelname == "WARNING" for r in lines)
    assert f"not connected to the relay at tcp://127.0.0.1:{worker_port} plain text yet (is it running there" \
           in lines[-1].getMessage() and "batch(es) waiting to be delivered" in lines[-1].getMessage()
    assert "it never connected to the relay" in run_summary("early", stats)


@pytest.mark.parametrize("cap", [None, 300.0])
def test_an_uncapped_synchronous_env_warns_at_start_that_it_may_outrun_the_first_weights(tmp_path, caplog, cap):
    """A learning-quality probe: a `gym:` worker with no max_steps_per_second made all its 5,000 steps in about a
    second, every one with the random policy (weights version 0), and nothing but the example config names the
    setting that prevents it."""
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker import runtime

    worker_port, weights_port = free_ports(2)
    config = WorkerConfig(worker_id="fast", env="sim-fast", max_steps=20, max_steps_per_second=cap, batch_steps=10,
                          worker_port=worker_port, weights_port=weights_port, state_dir=tmp_path,
                          flush_timeout_s=0.1, transport=TransportConfig(linger_ms=0),
                          security=SecurityConfig(insecure=True))
    with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
        assert runtime.run_worker(config).steps == 20
    warned = [r.getMessage() for r in caplog.records if "max_steps_per_second is not set" in r.getMessage()]
    if cap is None:
        assert len(warned) == 1 and warned[0].startswith("fast: the synchronous env sim-fast steps as fast as the CPU")
    else:
        assert warned == []


SLOW_SENSOR = '''
    import time


    class SlowSensor(ZeroReadingInterface):
        """Its readings take 40 ms, at a 20 ms time step."""

        def get_obs_rew_terminated_info(self):
            time.sleep(0.04)
            return super().get_obs_rew_terminated_info()
'''


def progress_records(spec: str, caplog, monkeypatch, every_s: float, max_episode_steps: int, max_steps: int,
                     options: dict | None = None) -> list:
    """The progress lines (log records) of a rollout of the interface ``spec`` at 20 ms steps."""
    from tmrl_worker import runtime

    monkeypatch.setattr(runtime, "PROGRESS_EVERY_S", every_s)
    env = make_env(spec, time_step_duration=0.02, max_episode_steps=max_episode_steps, options=options)
    loop = RolloutLoop(env, ListSink(), None, UniformPolicy(env.action_dim, seed=0), batch_steps=16, seed=0)
    try:
        with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
            loop.run(max_steps=max_steps)
    finally:
        env.close()
    return [r for r in caplog.records if "steps/s" in r.getMessage()]


def test_a_real_time_env_slower_than_its_time_step_is_named_in_the_progress_line(plug_interface, monkeypatch, caplog):
    """An outside probe: 250 steps of an 80 ms sensor at 50 ms steps gave 496 lines of rtgym warnings and a progress
    line of '8 steps/s' that never said it should have been 20."""
    lines = progress_records(f"{plug_interface('slow_sensor', SLOW_SENSOR)}:SlowSensor", caplog, monkeypatch,
                             every_s=0.5, max_episode_steps=1000, max_steps=40)
    assert lines and all(r.levelname == "WARNING" for r in lines)
    assert "slower than the 50 steps/s of time_step_duration 0.02 s: the env's calls" in lines[-1].getMessage()
    # what was measured is the stretched step, not the call (a BYO probe's 80 ms call was reported as 131 ms "each")
    assert re.search(r"which rtgym stretched to about 0\.\d{3} s on average \(more than the calls take",
                     lines[-1].getMessage()), lines[-1].getMessage()


STALLING_SENSOR = '''
    import time


    class StallingSensor(ZeroReadingInterface):
        """Readings take no time, but every ``stall_every``-th takes 70 ms, at a 20 ms time step."""

        def __init__(self, stall_every=10):
            self.stall_every, self.readings = stall_every, 0

        def get_obs_rew_terminated_info(self):
            self.readings += 1
            if self.readings % self.stall_every == 0:
                time.sleep(0.07)
            return super().get_obs_rew_terminated_info()
'''


@pytest.mark.parametrize(("stall_every", "every_s", "level"), [(20, 1.0, "WARNING"), (100, 2.5, "INFO")])
def test_steps_that_overran_now_and_then_are_counted_in_the_progress_line(plug_interface, monkeypatch, caplog,
                                                                           stall_every, every_s, level):
    """A BYO probe: a 120 ms stall every 25th 50 ms step (rtgym's warnings hidden by the CLI, the mean rate near
    20 steps/s) was never reported. One in 20 steps late is a warning; one in about 125, a note on the INFO line."""
    lines = progress_records(f"{plug_interface('stalling_sensor', STALLING_SENSOR)}:StallingSensor", caplog,
                             monkeypatch, every_s=every_s, max_episode_steps=1000, max_steps=140,
                             options={"stall_every": stall_every})
    assert lines and "late step(s) of" in lines[0].getMessage(), [r.getMessage() for r in lines]
    assert lines[0].levelname == level
    assert "slower than" not in lines[0].getMessage()  # the mean rate is within SLOW_STEPS_FRACTION of 50 steps/s
    longest = float(lines[0].getMessage().split("the longest ")[1].split(" s")[0])
    assert 0.06 <= longest < 0.5


BLOCKING_RESET = '''
    import time


    class SlowHoming(ZeroReadingInterface):
        """Its first reset takes 1.7 s (a robot homing, or a driver blocked for a while); steps take no time."""

        def __init__(self):
            self.resets = 0

        def reset(self, seed=None, options=None):
            self.resets += 1
            if self.resets == 1:
                time.sleep(1.7)
            return super().reset(seed, options)
'''


def test_a_reset_that_does_not_return_is_a_warning_again_at_each_doubling_and_its_end_is_said(tmp_path, caplog,
                                                                                             plug_interface):
    """A BYO probe: an interface blocked in its reset left 53 s without a line in the worker's log."""
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker import runtime

    worker_port, weights_port = free_ports(2)
    config = WorkerConfig(worker_id="homing", env=f"{plug_interface('slow_homing', BLOCKING_RESET)}:SlowHoming",
                          max_steps=10, long_call_warning_s=0.5, time_step_duration=0.02, worker_port=worker_port,
                          weights_port=weights_port, state_dir=tmp_path, flush_timeout_s=0.1,
                          transport=TransportConfig(linger_ms=0), security=SecurityConfig(insecure=True))
    with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
        assert runtime.run_worker(config).steps == 10
    warned = [r for r in caplog.records if "has not returned" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING", "WARNING"], [r.getMessage() for r in warned]
    # at 0.5 s, then once the wait doubled, at 1 s (each rounded to whole seconds)
    assert all(re.match(r"homing: the env's reset has not returned for [12] s: the rollout waits for it", r.getMessage())
               for r in warned)
    ended = [r.getMessage() for r in caplog.records if "returned after" in r.getMessage()]
    assert len(ended) == 1 and re.fullmatch(r"homing: the env's reset returned after [23] s", ended[0])


SLOW_RESET = '''
    import time


    class WaitsForTheGame(ZeroReadingInterface):
        """Quick steps; each reset takes 0.8 s (a game coming back)."""

        def reset(self, seed=None, options=None):
            time.sleep(0.8)
            return super().reset(seed, options)
'''


def test_time_spent_in_resets_is_named_and_not_taken_for_slow_steps(plug_interface, monkeypatch, caplog):
    """A TrackMania-docs probe: right after an 11.5 s wait for the game the progress line said '3 steps/s ... the
    env's calls ... take longer than a step, about 0.319 s each'."""
    lines = [r.getMessage() for r in progress_records(
        f"{plug_interface('waits_for_the_game', SLOW_RESET)}:WaitsForTheGame", caplog, monkeypatch, every_s=1.5,
        max_episode_steps=5, max_steps=25)]
    assert lines and not any("slower than" in line for line in lines), lines
    assert any("s in resets (the env waited, e.g. for the game)" in line for line in lines), lines


@pytest.mark.parametrize(("reset_seconds", "level"), [(1.5, "INFO"), (6.0, "WARNING")])
def test_resets_are_a_note_on_the_progress_line_until_they_take_half_its_time(caplog, reset_seconds, level):
    """A TrackMania probe: each reset waits sleep_time_at_reset (1.5 s), so every healthy progress line was a
    warning ('1.5 s of the last 10 s in resets')."""
    env = make_env("gym:Pendulum-v1")
    loop = RolloutLoop(env, None, None, UniformPolicy(env.action_dim, seed=0))
    try:
        with caplog.at_level("INFO", logger="tmrl_worker.runtime"):
            loop._report(10.0, 100, reset_seconds=reset_seconds)
    finally:
        env.close()
    [line] = [r for r in caplog.records if "steps/s" in r.getMessage()]
    assert line.levelname == level
    assert line.getMessage().endswith(f"; {reset_seconds:.1f} s of the last 10 s in resets (the env waited, e.g. for "
                                      "the game)")


@pytest.mark.parametrize("mistake", ["insecure worker", "wrong server key", "trainer port"])
def test_the_summary_of_a_worker_that_never_connected_gives_its_failed_handshakes_cause_and_fix(tmp_path, mistake):
    """Probes: after a wrong server key the summary asked whether the relay was running; a plain-text worker against
    a CurveZMQ relay was asked about its server key (it has none); a worker given the trainer's port was told to
    allow a key that was allowed (on the workers' port). The summary now ends with the error line its sender
    logged."""
    from relay.relay_harness import relay_in_thread
    from tmrl_common.curve import generate_key_pair
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_relay.config import RelayConfig
    from tmrl_relay.keys import allow_key_for_role
    from tmrl_stack import free_ports
    from tmrl_worker import runtime
    from tmrl_worker.cli import run_summary

    keys = {name: generate_key_pair(tmp_path / "keys", name) for name in ("relay", "worker-1", "trainer", "stranger")}
    allow_key_for_role(tmp_path / "allow", keys["worker-1"].public_file, "worker")
    allow_key_for_role(tmp_path / "allow", keys["trainer"].public_file, "trainer")
    relay_config = RelayConfig(bind_host="127.0.0.1", worker_port=0, trainer_port=0, weights_port=0, metrics_port=0,
                               security=SecurityConfig(secret_key_file=keys["relay"].secret_file,
                                                       allowlist_dir=tmp_path / "allow"))
    with relay_in_thread(relay_config) as relay:
        port = relay.ports.trainer_port if mistake == "trainer port" else relay.ports.worker_port
        server_key = keys["stranger" if mistake == "wrong server key" else "relay"].public_file
        security = (SecurityConfig(insecure=True) if mistake == "insecure worker" else
                    SecurityConfig(secret_key_file=keys["worker-1"].secret_file, server_public_key_file=server_key))
        [weights_port] = free_ports(1)
        config = WorkerConfig(worker_id="worker-1", env="sim-fast", max_steps=150, max_steps_per_second=100,
                              batch_steps=50, worker_port=port, weights_port=weights_port, state_dir=tmp_path,
                              flush_timeout_s=0.2, transport=TransportConfig(linger_ms=0), security=security)
        summary = run_summary("worker-1", runtime.run_worker(config))
    expected = {"insecure worker": "speaks CurveZMQ, this worker plain text (--insecure): run both with --insecure",
                "wrong server key": f"drops the CurveZMQ handshake: --server-key ({server_key}) is most likely not",
                "trainer port": f"refused this worker's key {keys['worker-1'].public_file}: either port {port} is not "
                                "the relay's worker_port"}[mistake]
    assert expected in summary, summary
    assert "retrying every" not in summary
    if mistake == "wrong server key":  # an operator probe's CurveZMQ worker of an --insecure relay was told this too
        assert "or the relay runs --insecure (then run this worker with --insecure too" in summary, summary
        assert "copy the relay's public key, the .key file beside its --secret-key, over it again" in summary


def test_the_summary_says_what_became_of_its_batches_and_that_it_never_connected():
    from tmrl_worker.cli import run_summary
    from tmrl_worker.runtime import RolloutStats

    delivery = {"steps_submitted": 40, "batches_built": 2, "spool_acked": 0, "spool_resent": 0, "spool_dropped": 0,
                "spool_batches": 2, "batches_rejected": 0, "connections": 0, "handshake_refused": 0}
    stats = RolloutStats(steps=40, delivery=delivery)  # nothing answered at all
    assert run_summary("w", stats).endswith("; it never connected to the relay (is it running, on this worker's "
                                            "relay_host and worker_port?)")
    stats = RolloutStats(steps=40, delivery={**delivery, "connections": 1, "not_numbered": 5, "seqs_reused": 2,
                                             "batches_rejected": 1, "rejected.stale": 1})
    summary = run_summary("w", stats)
    assert "1 rejected (stale: 1); 5 batch(es)" in summary  # the reasons stay beside the count they break down
    assert "; 5 batch(es) handed over were never numbered nor spooled (the sender thread was still behind" in summary
    assert "; 2 of the acknowledged were NOT stored: their seq had been used before" in summary
    stats = RolloutStats(steps=40, delivery={**delivery, "connections": 1, "spool_restored": 30})
    assert "; 30 batch(es) restored from the durable spool at start (an earlier run's: among the acknowledged" in (
        run_summary("w", stats))  # an upgrade probe: 4258 rows in 46 batches, 76 acknowledged, with no word why
    stats = RolloutStats(steps=40, delivery={**delivery, "connections": 1, "waiting_dropped": 4,
                                             "waiting_dropped_steps": 200})
    assert "; 4 batch(es) (200 rows) dropped before they were numbered: the sender thread fell a whole spool" in (
        run_summary("w", stats))


@pytest.mark.parametrize("durable", [False, True])
def test_a_run_that_never_reached_the_relay_ends_with_status_1_after_its_summary(tmp_path, durable):
    """A probe: a worker pointed at a port where no relay listens made 300 steps, said in its summary that it never
    connected, and exited 0, so neither a script nor a supervisor saw that nothing reached the trainer."""
    from tmrl_stack import free_ports
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    worker_port, weights_port = free_ports(2)  # nothing listens there
    config = tmp_path / "tmrl.toml"
    config.write_text(f'[worker]\nworker_id = "lonely"\nenv = "sim-fast"\nmax_steps = 120\nbatch_steps = 50\n'
                      f'max_steps_per_second = 400\nrelay_host = "127.0.0.1"\nworker_port = {worker_port}\n'
                      f'weights_port = {weights_port}\nstate_dir = "{tmp_path / "state"}"\nflush_timeout_s = 0.2\n'
                      f'durable_spool = {str(durable).lower()}\n[worker.transport]\nlinger_ms = 0\n')
    result = CliRunner().invoke(app, ["run", "--insecure", "--config", str(config)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "it never connected to the relay" in lines[-2]  # the summary, then why the status is 1
    kept = ("they wait in its durable spool for the next run" if durable else
            "they are lost with this process (durable_spool would keep them on disk)")
    assert re.fullmatch(r"tmrl-worker: none of the 12\d rows this run made was delivered: it never connected to the "
                        rf"relay; {re.escape(kept)}.*", lines[-1]), lines[-1]
    # every unacknowledged batch is on disk with the durable spool (3 or more: an episode end adds one), none without
    unacknowledged = int(re.search(r"(\d+) unacknowledged", lines[-2]).group(1))
    assert unacknowledged >= 3
    assert len(list((tmp_path / "state").glob("lonely.spool/*.batch"))) == (unacknowledged if durable else 0)


def test_only_a_run_that_delivered_nothing_for_want_of_the_relay_or_its_key_counts_as_undelivered():
    from tmrl_worker.cli import undelivered_run
    from tmrl_worker.runtime import RolloutStats

    delivery = {"steps_submitted": 40, "batches_built": 2, "spool_acked": 0, "spool_batches": 2, "connections": 0,
                "handshake_refused": 0}
    assert "it never connected to the relay" in undelivered_run(RolloutStats(steps=40, delivery=delivery), False)
    refused = {**delivery, "connections": 3, "handshake_refused": 3}
    assert "the relay refused its key every time" in undelivered_run(RolloutStats(steps=40, delivery=refused), False)
    for fine in ({**delivery, "spool_acked": 1},  # something was stored
                 {**delivery, "connections": 1},  # the relay was reached; no trainer answered yet
                 {**delivery, "steps_submitted": 0}):  # nothing to deliver (a --test run)
        assert undelivered_run(RolloutStats(steps=40, delivery=fine), True) is None
    assert undelivered_run(RolloutStats(steps=40, delivery={}), False) is None
