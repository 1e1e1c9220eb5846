"""The trainer service loop: layout from config, warm-up, the updates-per-sample cap, weights publishing with
increasing versions, the exported policy file, checkpoints and resuming from them. Batches are handed to the
ingestor directly (no relay needed: the link just keeps trying to connect)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.errors import ConfigError
from tmrl_common.layout import layout_for_box, tm20_image_layout, tm20_lidar_layout
from tmrl_common.protocol import encode
from tmrl_common.sockets import SecurityConfig
from tmrl_trainer.config import TrainerConfig
from tmrl_trainer.service import TrainerService, layout_for_env


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """TrainerService sets torch's process-wide thread count; give other tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_config(tmp_path, **fields) -> TrainerConfig:
    base = {
        "env": "gym:Pendulum-v1", "device": "cpu", "relay_host": "127.0.0.1", "trainer_port": 1,  # nobody listens
        "run_dir": str(tmp_path / "run"), "publish_every": 5, "checkpoint_every": 10, "memory_capacity": 5000,
        "status_interval_s": 0.1, "torch_threads": 1,
        "sac": {"hidden_sizes": [16], "batch_size": 16, "learning_starts": 50, "utd": 0.5},
        "security": SecurityConfig(insecure=True),
    }
    return TrainerConfig.model_validate({**base, **fields})


def pendulum_batch(worker: str, seq: int, rows: int) -> list[bytes]:
    rng = np.random.default_rng(seq)
    builder = SampleBatchBuilder(layout_for_box(3, 1))
    builder.add_reset((rng.normal(size=3).astype(np.float32),))
    for _ in range(rows - 1):
        builder.add_step(rng.uniform(-1, 1, 1).astype(np.float32), (rng.normal(size=3).astype(np.float32),),
                         float(rng.normal()), False, False)
    return encode(builder.build(seq=seq, weights_version=0), worker)


def run_in_thread(service: TrainerService, **kwargs):
    stop = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("updates", service.run(stop=stop, **kwargs)))
    thread.start()
    return stop, thread, result


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_layout_comes_from_the_configured_env_name():
    assert layout_for_env("sim") == tm20_lidar_layout()
    assert layout_for_env("tm20-full") == tm20_image_layout()
    assert layout_for_env("gym:Pendulum-v1") == layout_for_box(3, 1)
    with pytest.raises(ConfigError, match="no built-in layout"):
        layout_for_env("my_robot:Interface")
    with pytest.raises(ConfigError, match="cannot make"):
        layout_for_env("gym:NoSuchEnv-v0")


def test_layout_file_overrides_the_env_name(tmp_path):
    path = tmp_path / "layout.json"
    path.write_text(layout_for_box(7, 2).model_dump_json())
    assert layout_for_env("my_robot:Interface", path) == layout_for_box(7, 2)
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a readable ObservationLayout"):
        layout_for_env("sim", path)


@pytest.mark.slow
def test_warm_up_then_at_most_utd_updates_per_sample_and_versioned_publishing(tmp_path):
    service = TrainerService(make_config(tmp_path))
    stop, thread, _ = run_in_thread(service)
    try:
        service.ingestor.handle(pendulum_batch("w1", 0, 40))  # below the 50-row warm-up
        time.sleep(0.5)
        assert service.learner.updates == 0
        service.ingestor.handle(pendulum_batch("w1", 1, 40))  # 80 rows: warm-up passed, cap = 0.5 * 80 = 40 updates
        wait_for(lambda: service.learner.updates >= 40)
        time.sleep(0.5)
        assert service.learner.updates == 40  # capped: no more samples, no more updates
        assert service.weights_version == 8  # every 5 updates
        policy = service.run_dir / "policy.safetensors"
        assert policy.exists()
        service.ingestor.handle(pendulum_batch("w2", 0, 20))
        wait_for(lambda: service.learner.updates >= 50)
        status_path = service.run_dir / "status.json"
        wait_for(lambda: json.loads(status_path.read_text())["updates"] >= 50)  # rewritten every 0.1 s
        status = json.loads(status_path.read_text())
        assert status["samples_received"] == 100 and set(status["workers"]) == {"w1", "w2"}
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    records = [json.loads(line) for line in (service.run_dir / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["weights_version"] for r in trains] == list(range(1, len(trains) + 1))
    assert all(np.isfinite(r["critic_loss"]) for r in trains)


@pytest.mark.slow
def test_checkpoint_is_saved_and_a_restarted_trainer_resumes_from_it(tmp_path):
    config = make_config(tmp_path)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 100))
    assert first.run(max_updates=25) == 25
    checkpoints = sorted((first.run_dir / "checkpoints").glob("checkpoint-*.safetensors"))
    assert [p.name for p in checkpoints] == ["checkpoint-000000000010.safetensors",
                                             "checkpoint-000000000020.safetensors",
                                             "checkpoint-000000000025.safetensors"]
    version = first.weights_version
    actor_state = {k: v.clone() for k, v in first.learner.actor.state_dict().items()}

    second = TrainerService(config)
    second.ingestor.handle(pendulum_batch("w1", 1, 100))
    assert second.run(max_updates=30) == 30  # continued from 25, not from 0
    assert second.weights_version == version + 1  # update 30 published, continuing the version sequence
    assert any(not np.allclose(actor_state[k].numpy(), v.numpy()) for k, v in second.learner.actor.state_dict().items())
