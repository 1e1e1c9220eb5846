"""An env that gives up while running (TrackMania's race that does not restart, a game that does not come back):
the worker still delivers what it sent, then stops with the env's message."""

from __future__ import annotations

import threading

import pytest
from relay.relay_harness import connected_trainer, insecure_config, relay_in_thread
from tmrl_common.protocol import SampleAck
from tmrl_common.sockets import SecurityConfig, TransportConfig

GIVES_UP = '''
    from tmrl_worker.envs import EnvFailure


    class GivesUpAfterOneEpisode(OneActionInterface):
        """Three steps, then a reset that gives up, as a game whose race does not restart."""

        def __init__(self):
            self.resets = 0
            self.steps = 0

        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(-10.0, 10.0, (1,), np.float32),))

        def reset(self, seed=None, options=None):
            self.resets += 1
            if self.resets > 1:
                raise EnvFailure("the race did not restart")
            self.steps = 0
            return [np.zeros(1, dtype=np.float32)], {}

        def get_obs_rew_terminated_info(self):
            self.steps += 1
            return [np.full(1, self.steps, dtype=np.float32)], 1.0, self.steps >= 3, {}
'''


def test_an_env_that_gives_up_stops_the_worker_only_after_the_relay_acknowledged_what_it_sent(
        context, tmp_path, plug_interface):
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.envs import EnvFailure
    from tmrl_worker.runtime import run_worker

    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)
        acked: list[int] = []

        def acknowledge_late() -> None:  # the trainer stand-in answers 0.5 s after the batch, when the env gave up
            envelope, batch = trainer.recv_type("sample_batch", timeout_ms=20_000)
            threading.Event().wait(0.5)
            trainer.send(SampleAck(worker=envelope.sender, seqs=[batch.seq], outcome="stored"))
            acked.append(batch.seq)

        answering = threading.Thread(target=acknowledge_late, daemon=True)
        answering.start()
        config = WorkerConfig(worker_id="w-gives-up", env=f"{plug_interface('gives_up_robot', GIVES_UP)}:GivesUpAfterOneEpisode",
                              worker_port=relay.ports.worker_port, weights_port=relay.ports.weights_port,
                              state_dir=tmp_path, durable_spool=True, flush_timeout_s=10.0,
                              transport=TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0),
                              security=SecurityConfig(insecure=True))
        with pytest.raises(EnvFailure, match="the race did not restart") as raised:
            run_worker(config)
        answering.join(timeout=10.0)
        assert len(acked) == 1
        spooled = sorted((tmp_path / "w-gives-up.spool").glob("*"))
        assert spooled == []  # acknowledged before the worker stopped: nothing left to resend
        # and the CLI's run summary says so (it printed only the env's line before)
        stats = raised.value.stats
        assert (stats.steps, stats.episodes) == (3, 1)
        assert (stats.delivery["batches_built"], stats.delivery["spool_acked"], stats.delivery["spool_batches"]) == (1, 1, 0)


def test_a_dead_sender_thread_stops_the_worker_with_what_it_had_delivered(context, tmp_path, monkeypatch):
    """The sender thread dying on an unexpected error stopped the worker with one line and no count of what it
    had sent, had acknowledged, or left unsent."""
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.relay_link import RelayLink, SenderFailure
    from tmrl_worker.runtime import run_worker

    stored: list[int] = []
    real_heartbeat = RelayLink._heartbeat

    def heartbeat_that_fails_once_a_batch_is_stored(self):
        if stored:
            raise RuntimeError("an unexpected bug in the sender thread")
        return real_heartbeat(self)

    monkeypatch.setattr(RelayLink, "_heartbeat", heartbeat_that_fails_once_a_batch_is_stored)
    with relay_in_thread(insecure_config()) as relay:
        trainer = connected_trainer(context, relay)

        def acknowledge_one() -> None:
            envelope, batch = trainer.recv_type("sample_batch", timeout_ms=20_000)
            trainer.send(SampleAck(worker=envelope.sender, seqs=[batch.seq], outcome="stored"))
            threading.Event().wait(0.3)  # the ack reaches the worker before its next heartbeat fails
            stored.append(batch.seq)

        answering = threading.Thread(target=acknowledge_one, daemon=True)
        answering.start()
        config = WorkerConfig(worker_id="w-dead-sender", env="sim-fast", batch_steps=20, max_steps_per_second=200,
                              heartbeat_interval_s=0.1, worker_port=relay.ports.worker_port,
                              weights_port=relay.ports.weights_port, state_dir=tmp_path,
                              transport=TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0),
                              security=SecurityConfig(insecure=True))
        with pytest.raises(SenderFailure, match="an unexpected bug in the sender thread") as raised:
            run_worker(config)
        answering.join(timeout=10.0)
    delivery = raised.value.stats.delivery
    assert delivery["spool_acked"] >= 1 and delivery["batches_built"] >= delivery["spool_acked"]
    assert raised.value.stats.steps >= 20


def camera_interface(name: str, shape: tuple[int, ...]) -> str:
    """The source of an interface ``name`` whose one observation part is a zero uint8 frame of ``shape``."""
    return f'''
    class {name}(OneActionInterface):
        def get_observation_space(self):
            return spaces.Tuple((spaces.Box(0, 255, {shape}, np.uint8),))

        def reset(self, seed=None, options=None):
            return [np.zeros({shape}, np.uint8)], {{}}

        def get_obs_rew_terminated_info(self):
            return [np.zeros({shape}, np.uint8)], 0.0, False, {{}}
'''


def test_batches_too_large_for_the_protocol_are_refused_at_start_in_one_line(tmp_path, plug_interface):
    """An image probe's camera worker (batch_steps 400 of 3x256x256 frames) ran 8 s, then its sender thread
    stopped on a pydantic traceback and the 454 steps were lost, compress on or off."""
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    module = plug_interface("big_camera_robot", camera_interface("BigCamera", (3, 256, 256)))
    result = CliRunner().invoke(app, ["run", "--env", f"{module}:BigCamera", "--insecure", "--batch-steps", "400",
                                      "--worker-id", "camera", "--state-dir", str(tmp_path), "--max-steps", "5",
                                      "--worker-port", "1", "--weights-port", "2"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said, result.output
    assert (f"env '{module}:BigCamera': batch_steps = 400 would make batches of 78,647,600 bytes (196,619 per row of "
            "this env's layout), its observations['part0'] array past the 67108864-byte limit of one array: set "
            "batch_steps to at most 341") in said
    assert not (tmp_path / "camera.state.json").exists()  # refused before any step or sequence number


def test_a_channels_last_camera_is_refused_by_the_worker_not_only_by_the_trainer(plug_interface):
    """An image probe: `tmrl-worker layout` and the worker took [64, 64, 3] frames without a word (only the trainer
    refused them), so a worker started before its trainer spooled samples that could never be learned from."""
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    module = plug_interface("rgb_camera_robot", camera_interface("RgbCamera", (64, 64, 3)))  # as cameras give it
    result = CliRunner().invoke(app, ["layout", "--env", f"{module}:RgbCamera"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said, result.output
    assert (f"env '{module}:RgbCamera': observation part 'part0' has uint8 frames [64, 64, 3], whose last dimension "
            "looks like the channels of an [H, W, C] camera frame: frames are [C, H, W]") in said


def test_a_spool_smaller_than_two_batches_is_warned_of_at_start(tmp_path, plug_interface, caplog):
    """The second re-check: batches of 262 MB against the default 256 MiB spool; in an outage every batch but the
    newest was dropped (4 of 5 in 60 s), which nothing had said could happen."""
    from tmrl_common.sockets import SecurityConfig, TransportConfig
    from tmrl_stack import free_ports
    from tmrl_worker.config import WorkerConfig
    from tmrl_worker.runtime import run_worker

    module = plug_interface("mid_camera_robot", camera_interface("MidCamera", (3, 64, 64)))  # 12,299 bytes a row
    worker_port, weights_port = free_ports(2)  # no relay: nothing is delivered, the warning comes at start
    config = WorkerConfig(worker_id="camera", env=f"{module}:MidCamera", batch_steps=100, spool_max_bytes=2_000_000,
                          max_steps=2, max_steps_per_second=200, worker_port=worker_port, weights_port=weights_port,
                          state_dir=tmp_path, flush_timeout_s=0.1, transport=TransportConfig(linger_ms=0),
                          security=SecurityConfig(insecure=True))
    with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
        run_worker(config)
    assert ("camera: spool_max_bytes (2000000) holds fewer than two batches of 100 rows of this env's layout (up to "
            "1229900 bytes each before compression)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tmrl_worker.runtime"):
        run_worker(config.model_copy(update={"spool_max_bytes": 2_500_000}))
    assert "holds fewer than two batches" not in caplog.text
