"""The trainer service loop: layout from config, warm-up, the updates-per-sample cap, weights publishing with
increasing versions, the exported policy file, checkpoints and resuming from them. Batches are handed to the
ingestor directly (no relay needed: the link just keeps trying to connect)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.errors import ConfigError
from tmrl_common.layout import layout_for_box, tm20_full_layout, tm20_image_layout, tm20_lidar_layout
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
        "status_interval_s": 0.1, "torch_threads": 1, "train_record_every_s": 0.0,
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
    assert layout_for_env("tm20-full") == tm20_full_layout()  # speed, gear, rpm, images: upstream's full env
    assert layout_for_env("gym:Pendulum-v1") == layout_for_box(3, 1, -8.0, 8.0)  # bounds of its observation space
    with pytest.raises(ConfigError, match=r"no built-in layout; .* \(`tmrl-worker layout -c CONFIG > layout.json` writes"):
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
    # a BYO probe: pydantic's multi-line message, links included, was the CLI's "one line"
    path.write_text(layout_for_box(7, 2).model_dump_json().replace('"action_dim":2', '"action_dim":"x"'))
    with pytest.raises(ConfigError) as bad_field:
        layout_for_env("my_robot:Interface", path)
    assert str(bad_field.value).endswith("is not a readable ObservationLayout JSON (`tmrl-worker layout -c CONFIG > "
                                         "layout.json` writes one): action_dim = 'x': Input should be a valid integer")


def test_a_relative_layout_file_that_is_missing_names_the_folder_it_was_looked_for_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"layout_file layout.json \({tmp_path / 'layout.json'}: a relative path is "
                                          r"read from the working directory, not the config's\)"):
        layout_for_env("my_robot:Interface", Path("layout.json"))


def test_a_layout_the_networks_cannot_take_is_a_config_error_before_anything_is_written(tmp_path):
    """An outside probe: a 32x32 camera made the trainer print a 60-line traceback after creating its run folder."""
    path = tmp_path / "layout.json"
    path.write_text(tm20_image_layout(height=32, width=32).model_dump_json())
    config = make_config(tmp_path, env="my_robot:Camera", layout_file=str(path))
    with pytest.raises(ConfigError, match=r"^\[trainer.sac\] does not fit the observation layout: .*image 'image' of "
                                          r"32x32 pixels is too small .* at least 46x46: use fewer conv_channels"):
        TrainerService(config)
    assert not (tmp_path / "run").exists()


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


def test_the_start_line_names_the_networks_kind(tmp_path, caplog):
    """An image probe: nothing in any log said whether a layout got the CNN or the MLP."""
    service = TrainerService(make_config(tmp_path))
    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        service.run(max_updates=0)
    assert "(cpu-fast learner, mlp networks): layout " in caplog.text


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
    status = second.snapshot()  # samples counted across restarts, as updates are; and this run's alone
    assert (status["samples_received_total"], status["samples_received"]) == (200, 100)


# ------------------------------------------------------------------------------------- saved replay memory


def _checkpoint_files(service: TrainerService) -> list[str]:
    return sorted(p.name for p in (service.run_dir / "checkpoints").iterdir())


def test_with_save_memory_a_restarted_trainer_gets_its_rows_and_dedupe_window_back(tmp_path):
    config = make_config(tmp_path, save_memory=True)
    first = TrainerService(config)
    for seq in range(3):
        first.ingestor.handle(pendulum_batch("w1", seq, 40))
    first.ingestor.handle(pendulum_batch("w2", 0, 30))
    assert first.run(max_updates=12) == 12  # 150 rows at utd 0.5: 75 allowed, 12 made, 63 still owed
    positions = first.memory.sampleable_positions()
    before = first.memory.transitions(positions)
    rows, stored_before = len(first.memory), first.ingestor.snapshot()["batches_stored"]
    actor = {k: v.clone() for k, v in first.learner.actor.state_dict().items()}

    second = TrainerService(config)
    assert second.learner.updates == 12 and second.weights_version == first.weights_version
    assert all(torch.equal(actor[k], v) for k, v in second.learner.actor.state_dict().items())
    assert len(second.memory) == rows == 150 and stored_before == 4
    assert np.array_equal(second.memory.sampleable_positions(), positions)
    after = second.memory.transitions(positions)
    assert all(torch.equal(a, b) for a, b in zip(before.tensors(), after.tensors(), strict=True))
    # a batch stored before the checkpoint and resent after the restart (its ack was lost) is a duplicate
    second.ingestor.handle(pendulum_batch("w1", 1, 40))
    second.ingestor.handle(pendulum_batch("w2", 0, 30))
    assert second.ingestor.snapshot()["duplicates"] == 2 and len(second.memory) == rows
    second.ingestor.handle(pendulum_batch("w1", 3, 40))  # a new one is stored
    assert len(second.memory) == rows + 40 and second.ingestor.snapshot()["batches_stored"] == 1
    # no warm-up again, and the update budget carries over: 63 owed on the restored rows + 0.5 * 40 new ones
    stop, thread, _ = run_in_thread(second)
    try:
        wait_for(lambda: second.learner.updates >= 12 + 63 + 20)
        time.sleep(0.3)
        assert second.learner.updates == 12 + 63 + 20
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize("damage", ["missing", "truncated", "another memory"])
def test_a_checkpoint_whose_memory_file_is_unusable_resumes_the_learner_with_an_empty_memory(tmp_path, caplog, damage):
    from tmrl_trainer.memory import ReplayMemory

    config = make_config(tmp_path, save_memory=True)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4
    memory_file = first.run_dir / "checkpoints" / "checkpoint-000000000004.memory.safetensors"
    if damage == "missing":
        memory_file.unlink()
    elif damage == "truncated":
        memory_file.write_bytes(memory_file.read_bytes()[:200])
    else:  # a readable memory, but not the one saved with this checkpoint
        ReplayMemory(first.layout, capacity=config.memory_capacity).save(memory_file)

    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 4 and len(second.memory) == 0
        assert "could not be restored" in caplog.text and memory_file.name in caplog.text
        second.ingestor.handle(pendulum_batch("w1", 0, 60))  # fresh dedupe window: stored again, not a duplicate
        assert len(second.memory) == 60 and second.ingestor.snapshot()["duplicates"] == 0
    finally:
        second.shutdown()


def test_a_damaged_newest_memory_file_falls_back_to_the_older_checkpoints_memory_and_dedupe_window(tmp_path, caplog):
    """A trainer-persistence probe: with only the newest memory file damaged, every row went, though the previous
    checkpoint's memory file sat next to it intact."""
    config = make_config(tmp_path, save_memory=True, checkpoint_every=4)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4  # checkpoint 4: 60 rows, seq 0 stored
    second = TrainerService(config)
    second.ingestor.handle(pendulum_batch("w1", 1, 40))
    assert second.run(max_updates=8) == 8  # checkpoint 8: 100 rows, seqs 0 and 1 stored
    checkpoints = first.run_dir / "checkpoints"
    newest = checkpoints / "checkpoint-000000000008.memory.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])

    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        third = TrainerService(config)
    try:
        assert third.learner.updates == 8 and len(third.memory) == 60
        assert "could not be restored" in caplog.text and newest.name in caplog.text
        assert "older checkpoint checkpoint-000000000004.safetensors (60 rows; 40 rows were added" in caplog.text
        third.ingestor.handle(pendulum_batch("w1", 0, 60))  # in the older memory's dedupe window: a duplicate
        third.ingestor.handle(pendulum_batch("w1", 1, 40))  # acknowledged after it, resent: stored again
        assert third.ingestor.snapshot()["duplicates"] == 1 and len(third.memory) == 100
    finally:
        third.shutdown()


def test_when_no_saved_memory_loads_the_trainer_says_the_memory_starts_empty(tmp_path, caplog):
    config = make_config(tmp_path, save_memory=True, checkpoint_every=4)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=8) == 8  # checkpoints 4 and 8
    for updates in (4, 8):
        memory_file = first.run_dir / "checkpoints" / f"checkpoint-{updates:012d}.memory.safetensors"
        memory_file.write_bytes(memory_file.read_bytes()[:200])
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 8 and len(second.memory) == 0
        assert "checkpoint-000000000004.memory.safetensors could not be restored either" in caplog.text
        assert "the replay memory starts empty with a fresh dedupe window" in caplog.text
    finally:
        second.shutdown()


def _saved_memory_then_resumed(tmp_path, caplog, **second_config):
    """A trainer saves 60 rows at 4 updates; a second one resumes that checkpoint (``second_config`` changed)."""
    first = TrainerService(make_config(tmp_path, save_memory=True))
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(make_config(tmp_path, **second_config))
    assert second.learner.updates == 4
    return first.run_dir / "checkpoints" / "checkpoint-000000000004.memory.safetensors", second


def _rows_restored_by_the_next_start(tmp_path) -> int:
    """The rows in the replay memory of a trainer started with save_memory on the run of ``tmp_path`` (at 4
    updates: a start that does not resume would report 0 rows anyway)."""
    service = TrainerService(make_config(tmp_path, save_memory=True))
    try:
        assert service.learner.updates == 4
        return len(service.memory)
    finally:
        service.shutdown()


def test_a_restart_without_save_memory_keeps_the_saved_memory_and_says_it_is_there(tmp_path, caplog):
    """A run that resumed with save_memory off and made no update used to rewrite the checkpoint at the same update
    count without its memory, deleting the saved one."""
    memory_file, second = _saved_memory_then_resumed(tmp_path, caplog, save_memory=False)
    assert "holds a saved replay memory, but save_memory is off" in caplog.text
    assert len(second.memory) == 0
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second.shutdown()  # no update since resuming: the checkpoint it would write has the same name
    assert "not replaced" in caplog.text and memory_file.exists()
    assert _rows_restored_by_the_next_start(tmp_path) == 60


def test_a_memory_that_failed_to_load_once_is_not_replaced_by_an_empty_one(tmp_path, caplog):
    memory_file, second = _saved_memory_then_resumed(tmp_path, caplog, save_memory=True)
    assert len(second.memory) == 60
    second.shutdown()  # no update and the same rows: rewritten as it was
    aside = memory_file.with_name("elsewhere")
    memory_file.replace(aside)  # unreadable for one start (a disk not mounted yet, say)
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        resumed = TrainerService(make_config(tmp_path, save_memory=True))
    assert len(resumed.memory) == 0 and "could not be restored" in caplog.text
    resumed.shutdown()  # no update, no memory restored: the checkpoint at 4 updates stays as it was
    aside.replace(memory_file)
    assert _rows_restored_by_the_next_start(tmp_path) == 60


def test_a_saved_memory_of_another_capacity_stops_the_start_instead_of_being_pruned_away(tmp_path):
    """An outside probe restarted with memory_capacity 500 instead of 1,000,000: the trainer resumed with an empty
    memory, and its next three checkpoints pruned every saved 1M-row memory, so that setting the capacity back, as
    the warning advised, found nothing left to restore."""
    from tmrl_trainer.checkpoint import CheckpointMismatchError

    first = TrainerService(make_config(tmp_path, save_memory=True))
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4
    capacity = first.config.memory_capacity
    with pytest.raises(CheckpointMismatchError, match=(
            rf"checkpoint-000000000004.safetensors \(checkpoint-000000000004.memory.safetensors\) was written with "
            rf"memory_capacity = {capacity} .* this trainer has memory_capacity = 500: .* Set memory_capacity = "
            rf"{capacity} to restore it; or, .* start once with save_memory = false")):
        TrainerService(make_config(tmp_path, save_memory=True, memory_capacity=500))
    assert _rows_restored_by_the_next_start(tmp_path) == 60  # nothing was lost; the lock was released
    resumed = TrainerService(make_config(tmp_path, save_memory=False, memory_capacity=500))  # the way out it names
    try:
        assert resumed.learner.updates == 4 and len(resumed.memory) == 0
    finally:
        resumed.shutdown()


def test_a_restart_with_new_rows_and_no_update_saves_them_over_its_checkpoint(tmp_path, caplog):
    _, second = _saved_memory_then_resumed(tmp_path, caplog, save_memory=True)
    assert len(second.memory) == 60
    second.ingestor.handle(pendulum_batch("w1", 1, 40))
    second.shutdown()
    assert _rows_restored_by_the_next_start(tmp_path) == 100


def test_pruned_checkpoints_take_their_memory_files_with_them(tmp_path):
    config = make_config(tmp_path, save_memory=True, checkpoint_every=2)
    service = TrainerService(config)
    service.ingestor.handle(pendulum_batch("w1", 0, 60))
    stray = service.run_dir / "checkpoints" / "checkpoint-000000000001.memory.safetensors"  # its checkpoint is gone
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left over")
    assert service.run(max_updates=9) == 9  # checkpoints at 2, 4, 6, 8 and 9 (shutdown)
    assert _checkpoint_files(service) == [f"checkpoint-{n:012d}{suffix}" for n in (6, 8, 9)
                                          for suffix in (".memory.safetensors", ".safetensors")]


def test_a_trainer_stopped_during_its_warm_up_with_save_memory_keeps_the_rows_it_acknowledged(tmp_path):
    """An outside probe: SIGTERM before the first update saved nothing, so 2,287 acknowledged rows were gone."""
    config = make_config(tmp_path, save_memory=True)  # learning_starts 50
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 30))
    first.shutdown()
    assert _checkpoint_files(first) == ["checkpoint-000000000000.memory.safetensors",
                                        "checkpoint-000000000000.safetensors"]
    second = TrainerService(config)
    try:
        assert second.learner.updates == 0 and len(second.memory) == 30
        second.ingestor.handle(pendulum_batch("w1", 0, 30))  # the resend of an acknowledged batch
        assert second.ingestor.snapshot()["duplicates"] == 1 and len(second.memory) == 30
    finally:
        second.shutdown()
    third = TrainerService(make_config(tmp_path / "without", save_memory=False))  # nothing to keep: no checkpoint
    third.ingestor.handle(pendulum_batch("w1", 0, 30))
    third.shutdown()
    assert not list((third.run_dir / "checkpoints").iterdir())


def test_a_checkpoint_just_saved_is_never_pruned_and_leftovers_of_interrupted_writes_are(tmp_path):
    """Outside probe: a run resumed from a checkpoint named above its update count deleted each checkpoint it
    wrote (pruning goes by name); and the temporary files of writes a SIGKILL cut short piled up for ever."""
    first = TrainerService(make_config(tmp_path, save_memory=True))
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4
    checkpoints = first.run_dir / "checkpoints"
    saved = checkpoints / "checkpoint-000000000004.safetensors"
    for name in ("checkpoint-000000000700", "checkpoint-000000000800", "checkpoint-000000000900"):  # copied in by hand
        (checkpoints / f"{name}.safetensors").write_bytes(saved.read_bytes())
    saved.unlink()
    (checkpoints / "checkpoint-000000000004.memory.safetensors").unlink()
    leftover = checkpoints / ".checkpoint-000000000005.memory.safetensors.x1y2.tmp"
    leftover.write_bytes(b"half a memory")
    second = TrainerService(make_config(tmp_path, checkpoint_every=1000))
    assert second.learner.updates == 4  # resumed from the one named 900
    second.ingestor.handle(pendulum_batch("w1", 1, 60))
    assert second.run(max_updates=6) == 6
    assert _checkpoint_files(second) == ["checkpoint-000000000006.safetensors", "checkpoint-000000000800.safetensors",
                                         "checkpoint-000000000900.safetensors"]


def test_each_trainer_process_marks_where_its_metrics_records_begin(tmp_path):
    """Persistence probe: after a crash, metrics.jsonl kept the killed run's records past its last checkpoint and
    the next run's 'updates' went back (12,800 -> 12,650) with nothing to say why."""
    from tmrl_trainer.status import METRICS_FILE, read_metrics

    first = TrainerService(make_config(tmp_path))
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4
    second = TrainerService(make_config(tmp_path))
    second.shutdown()
    starts = [r for r in read_metrics(first.run_dir / METRICS_FILE) if r["kind"] == "start"]
    assert [(r["updates"], r["checkpoint"]) for r in starts] == [(0, None), (4, "checkpoint-000000000004.safetensors")]


def test_a_deleted_run_directory_is_reported_once(tmp_path, caplog):
    """An outside probe: the folder deleted under a running trainer went unnoticed, and a second trainer then
    started in the re-created one beside it."""
    import shutil

    service = TrainerService(make_config(tmp_path))
    try:
        with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
            service._check_run_directory()
            assert not caplog.records
            shutil.rmtree(service.run_dir)
            service._check_run_directory()
            service._check_run_directory()
        [record] = caplog.records
        assert f"the run directory {service.run_dir} or its lock file" in record.getMessage()
        assert "another trainer could now start in it" in record.getMessage()
    finally:
        service.shutdown()


def test_without_save_memory_no_memory_file_is_written_and_a_restart_starts_empty(tmp_path):
    config = make_config(tmp_path)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=3) == 3
    assert _checkpoint_files(first) == ["checkpoint-000000000003.safetensors"]
    second = TrainerService(config)
    try:
        assert second.learner.updates == 3 and len(second.memory) == 0
        second.ingestor.handle(pendulum_batch("w1", 0, 60))
        assert len(second.memory) == 60
    finally:
        second.shutdown()


# ------------------------------------------------------------------------------------------ the learner guard


def absurd_pendulum_batch(worker: str, seq: int, rows: int, reward: float = 3e38):
    """A decoded batch whose rewards are finite but absurd (ingest bounds are not this test's subject: the rows go
    straight into the memory, as a batch that got past ingest would)."""
    rng = np.random.default_rng(seq)
    builder = SampleBatchBuilder(layout_for_box(3, 1))
    builder.add_reset((rng.normal(size=3).astype(np.float32),))
    for _ in range(rows - 1):
        builder.add_step(rng.uniform(-1, 1, 1).astype(np.float32), (rng.normal(size=3).astype(np.float32),), reward,
                         False, False)
    return builder.build(seq=seq, weights_version=0)


def test_a_trainer_fed_absurd_rewards_keeps_running_counts_rejected_updates_and_saves_finite_state(tmp_path, caplog):
    config = make_config(tmp_path, checkpoint_every=10)
    service = TrainerService(config)
    service._store("w1", absurd_pendulum_batch("w1", 0, 100))  # every minibatch is poisoned
    with caplog.at_level("WARNING", logger="tmrl_trainer.guard"):
        assert service.run(max_updates=10) == 10
    status = json.loads((service.run_dir / "status.json").read_text())
    assert status["learner"] == {"updates_rejected": 10, "publishes_refused": 0, "checkpoints_refused": 0,
                                 "checkpoints_failed": 0, "policy_exports_failed": 0}
    trains = [json.loads(line) for line in (service.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates_rejected"] for r in trains if r["kind"] == "train"] == [5, 10]
    assert "5 SAC update(s) not applied" in caplog.text and "critic_loss inf" in caplog.text
    assert service.weights_version == 2  # the unchanged, finite weights were still published

    resumed = TrainerService(config)  # the checkpoint written at 10 updates is finite and loads
    try:
        assert resumed.learner.updates == 10 and resumed.weights_version == 2
        assert all(torch.isfinite(p).all() for p in resumed.learner.actor.parameters())
    finally:
        resumed.shutdown()


def test_weights_holding_a_nan_are_neither_published_nor_checkpointed(tmp_path, caplog):
    service = TrainerService(make_config(tmp_path))
    service.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert service.run(max_updates=10) == 10  # published twice, checkpointed once
    saved = _checkpoint_files(service)
    with torch.no_grad():
        next(service.learner.actor.parameters()).view(-1)[0] = float("nan")  # what the guard exists to prevent
    with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
        service._publish()
        service._checkpoint()
    assert service.weights_version == 2 and _checkpoint_files(service) == saved
    assert service.snapshot()["learner"] == {"updates_rejected": 0, "publishes_refused": 1, "checkpoints_refused": 1,
                                             "checkpoints_failed": 0, "policy_exports_failed": 0}
    assert "weights not published after 10 updates: actor tensor" in caplog.text
    assert "checkpoint at 10 updates not saved" in caplog.text and "non-finite" in caplog.text


def test_a_checkpoint_the_disk_refuses_is_logged_and_counted_and_training_goes_on(tmp_path, caplog, monkeypatch):
    from tmrl_trainer import service as service_module

    service = TrainerService(make_config(tmp_path))
    service.ingestor.handle(pendulum_batch("w1", 0, 60))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service_module, "save_checkpoint", disk_full)
    with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
        assert service.run(max_updates=20) == 20  # checkpoints at 10, 20 and at shutdown all fail; training goes on
    assert _checkpoint_files(service) == []
    assert service.snapshot()["learner"]["checkpoints_failed"] == 3
    assert ("checkpoint at 10 updates could not be written ([Errno 28] No space left on device); no checkpoint of "
            "this run is on disk yet and training goes on") in caplog.text  # it said "the previous ... are kept"
    # the periodic one at 20 is held back (a line a minute while the disk stays full: 37 lines in a probe's run) ...
    assert [r.getMessage().startswith("checkpoint at 20 updates") and "training goes on" in r.getMessage()
            for r in caplog.records].count(True) == 0
    # ... and at shutdown there is no training to go on: said plainly, and flagged for the exit status
    assert service.final_checkpoint_missing
    assert ("checkpoint at 20 updates could not be written ([Errno 28] No space left on device); no checkpoint of "
            "this run is on disk yet: free disk space") in caplog.text
    assert ("stopping without a final checkpoint (above): this run reached 20 updates, and no checkpoint was saved, "
            "a restart starts from scratch") in caplog.text


def test_a_policy_file_the_disk_refuses_is_counted_and_training_and_publishing_go_on(tmp_path, caplog, monkeypatch):
    """An outside probe filled the run directory's disk: the first ``policy.safetensors`` it refused stopped the
    trainer with a traceback, though the workers had the weights already."""
    from tmrl_trainer import service as service_module

    service = TrainerService(make_config(tmp_path, checkpoint_every=1000))
    service.ingestor.handle(pendulum_batch("w1", 0, 60))
    real_export = service_module.export_policy
    disk = {"full": True}

    def export_on_a_full_disk(update, path):
        if disk["full"]:
            raise OSError(28, "No space left on device")
        return real_export(update, path)

    monkeypatch.setattr(service_module, "export_policy", export_on_a_full_disk)
    policy = service.run_dir / "policy.safetensors"
    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        assert service.run(max_updates=20) == 20  # publications at 5, 10, 15 and 20 updates: all four refused
        assert service.weights_version == 4 and not policy.exists()
        assert service.snapshot()["learner"]["policy_exports_failed"] == 4
        disk["full"] = False
        service._publish()  # the next publication
    assert service.weights_version == 5 and policy.exists()
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "policy.safetensors" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is None and "No space left on device" in errors[0].getMessage()
    assert "policy.safetensors written again after 4 failed attempt(s)" in caplog.text


def test_a_final_checkpoint_that_fails_names_the_one_a_restart_resumes_from(tmp_path, caplog, monkeypatch):
    from tmrl_trainer import service as service_module

    service = TrainerService(make_config(tmp_path))
    service.ingestor.handle(pendulum_batch("w1", 0, 60))
    real_save = service_module.save_checkpoint

    def read_only_after_10(path, *args, **kwargs):
        if "000000000010" not in path.name:
            raise PermissionError(13, "Permission denied")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(service_module, "save_checkpoint", read_only_after_10)
    with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
        assert service.run(max_updates=15) == 15
    assert service.final_checkpoint_missing and service.last_checkpoint_updates == 10

    fine = TrainerService(make_config(tmp_path / "fine"))  # and a final checkpoint that is saved is not missing
    fine.ingestor.handle(pendulum_batch("w1", 0, 60))
    monkeypatch.setattr(service_module, "save_checkpoint", real_save)
    assert fine.run(max_updates=15) == 15
    assert not fine.final_checkpoint_missing and fine.last_checkpoint_updates == 15
    assert ("stopping without a final checkpoint (above): this run reached 15 updates, and a restart resumes from "
            "the newest one kept, at 10 updates") in caplog.text


def test_a_run_dir_gone_read_only_does_not_cut_the_shutdown_short(tmp_path, caplog, monkeypatch):
    from tmrl_trainer import status as status_module

    service = TrainerService(make_config(tmp_path))
    service.ingestor.handle(pendulum_batch("w1", 0, 60))

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(status_module, "write_atomically", read_only)
    with caplog.at_level("ERROR", logger="tmrl_trainer.status"):
        assert service.run(max_updates=10) == 10  # before: status.json's last write raised out of shutdown()
    assert "could not write the final" in caplog.text and "status.json" in caplog.text
    assert not service._run_lock.is_locked  # the rest of the shutdown ran: the run directory's lock is released



def test_a_disk_too_full_for_one_more_checkpoint_gets_room_from_the_older_ones_and_keeps_the_newest(tmp_path, caplog,
                                                                                                   monkeypatch):
    """A probe filled the disk: no checkpoint could be written again, since pruning only follows a successful save."""
    from tmrl_trainer import service as service_module

    config, directory = checkpointed_every_4(tmp_path, updates=12)  # checkpoints at 4, 8 and 12
    real_save = service_module.save_checkpoint

    def disk_with_room_for_two(path, *args, **kwargs):
        if len(list(directory.glob("checkpoint-*.safetensors"))) >= 2:
            raise OSError(28, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(service_module, "save_checkpoint", disk_with_room_for_two)
    second = TrainerService(config)
    second.ingestor.handle(pendulum_batch("w1", 1, 60))
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        assert second.run(max_updates=20) == 20  # checkpoints at 16, 20 and 20 again at shutdown, each making room
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint-000000000020.safetensors"]
    assert second.snapshot()["learner"]["checkpoints_failed"] == 0
    assert ("checkpoint at 16 updates could not be written ([Errno 28] No space left on device): deleted "
            "checkpoint-000000000004.safetensors, checkpoint-000000000008.safetensors to make room, keeping the newest "
            "checkpoint, and trying once more") in caplog.text
    assert load_state(directory / "checkpoint-000000000020.safetensors")  # whole and readable

def test_a_run_dir_where_checkpoints_cannot_be_written_is_a_config_error_at_start(tmp_path):
    from tmrl_common.errors import ConfigError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoint folder should be")
    with pytest.raises(ConfigError, match=r"cannot write in .*checkpoints .*choose another run_dir"):
        TrainerService(make_config(tmp_path))


def test_non_positive_layer_sizes_are_refused_as_config():
    from pydantic import ValidationError
    from tmrl_trainer.config import TrainerConfig

    with pytest.raises(ValidationError, match=r"sac.hidden_sizes.0\n  Input should be greater than or equal to 1"):
        TrainerConfig.model_validate({"sac": {"hidden_sizes": [0, -3]}})


def test_a_bad_layer_size_from_an_environment_variable_is_named_alone_with_the_variable(tmp_path):
    """An outside probe: TMRL_TRAINER__SAC__HIDDEN_SIZES=[64,-1] was refused as "hidden_sizes [64, -1] and
    conv_channels [16, 32, 64, 64] must be positive", naming the untouched default too and not the variable."""
    from tmrl_common.config import load_config
    from tmrl_trainer.config import TrainerConfig

    with pytest.raises(ConfigError) as refused:
        load_config(TrainerConfig, "trainer", environ={"TMRL_TRAINER__SAC__HIDDEN_SIZES": "[64, -1]"})
    assert "TMRL_TRAINER__SAC__HIDDEN_SIZES" in str(refused.value) and "conv_channels" not in str(refused.value)
    assert "greater than or equal to 1" in str(refused.value)


def test_a_warm_up_larger_than_the_memory_is_said_at_start_since_such_a_trainer_never_trains(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):  # an ingest-only trainer is a use; a typo is not
        service = TrainerService(make_config(tmp_path, memory_capacity=150))  # learning_starts 50: fits
        service.shutdown()
        assert "exceeds memory_capacity" not in caplog.text
        service = TrainerService(make_config(tmp_path / "b", memory_capacity=150,
                                             sac={"hidden_sizes": [16], "learning_starts": 200}))
        service.shutdown()
    assert "sac.learning_starts (200) exceeds memory_capacity (150): this trainer stores samples but will never " \
           "train" in caplog.text


def test_a_replay_memory_larger_than_the_machine_is_said_at_start_not_hours_later(tmp_path, caplog, monkeypatch):
    """A soak probe: the memory's zeroed arrays are committed as rows come (+17 MB an hour for 7 hours), so a
    memory_capacity too large for the machine would fail hours into a run; the start line did not give its size."""
    from tmrl_trainer import service as service_module

    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        service = TrainerService(make_config(tmp_path, memory_capacity=150))
        full = service.memory.nbytes_when_full
        service.shutdown()
        assert "replay memory takes" not in caplog.text
        monkeypatch.setattr(service_module, "physical_memory_bytes", lambda: full)  # a machine it would fill
        service = TrainerService(make_config(tmp_path / "b", memory_capacity=150))
        service.shutdown()
    assert f"the replay memory takes {full / 2**20:.0f} MiB when full (memory_capacity = 150 rows), 100% of this " \
           "machine's" in caplog.text and "lower memory_capacity" in caplog.text
    assert full >= 150 * (4 * 3 + 4)  # the rows' actions and rewards at least


def checkpointed_every_4(tmp_path, updates: int):
    """A trainer's config and checkpoint folder after ``updates`` updates with a checkpoint every 4."""
    config = make_config(tmp_path, checkpoint_every=4)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=updates) == updates
    return config, first.run_dir / "checkpoints"


def test_resume_refuses_a_non_finite_or_unreadable_checkpoint_and_uses_the_previous_good_one(tmp_path, caplog):
    from test_checkpoint import with_a_nan

    config, directory = checkpointed_every_4(tmp_path, updates=12)  # checkpoints at 4, 8, 12
    good, truncated, poisoned = (directory / f"checkpoint-{n:012d}.safetensors" for n in (4, 8, 12))
    with_a_nan(poisoned)
    truncated.write_bytes(truncated.read_bytes()[:300])
    expected = load_state(good)

    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 4 and second.weights_version == 0  # published every 5: none by update 4
        assert all(torch.equal(v, expected[k]) for k, v in second.learner.actor.state_dict().items())
        assert f"refusing checkpoint {poisoned}: checkpoint {poisoned} holds a non-finite value" in caplog.text
        assert f"refusing checkpoint {truncated}: checkpoint {truncated} is unreadable" in caplog.text
        assert f"resumed from checkpoint {good}" in caplog.text
        assert sorted(p.name for p in directory.iterdir()) == [
            good.name, truncated.name + ".refused", poisoned.name + ".refused"]
    finally:
        second.shutdown()


@pytest.mark.timeout(60)
def test_a_fifo_or_a_device_named_as_the_newest_checkpoint_is_refused_without_blocking(tmp_path, caplog):
    """An outside probe: a FIFO named as the newest checkpoint hung the trainer at start for ever (a link to
    /dev/zero would read without end)."""
    import os

    config, directory = checkpointed_every_4(tmp_path, updates=8)  # checkpoints at 4 and 8
    good = directory / "checkpoint-000000000008.safetensors"
    fifo = directory / "checkpoint-000000000012.safetensors"
    os.mkfifo(fifo)
    endless = directory / "checkpoint-000000000016.safetensors"
    endless.symlink_to("/dev/zero")
    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 8
        assert f"refusing checkpoint {endless}" in caplog.text and f"refusing checkpoint {fifo}" in caplog.text
        assert "is not a regular file (a FIFO, a device or a socket)" in caplog.text
        assert f"resumed from checkpoint {good}" in caplog.text
    finally:
        second.shutdown()


def test_with_every_checkpoint_refused_the_trainer_starts_from_scratch_and_says_so(tmp_path, caplog):
    config, directory = checkpointed_every_4(tmp_path, updates=4)
    only = directory / "checkpoint-000000000004.safetensors"
    only.write_bytes(b"not a checkpoint")
    with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 0
        assert fresh_actor_state(config) == {k: v.tolist() for k, v in second.learner.actor.state_dict().items()}
        assert "no usable checkpoint" in caplog.text and str(only) in caplog.text
    finally:
        second.shutdown()


def test_a_refused_checkpoint_that_cannot_be_renamed_is_still_skipped(tmp_path, caplog, monkeypatch):
    config, directory = checkpointed_every_4(tmp_path, updates=8)
    newest = directory / "checkpoint-000000000008.safetensors"
    newest.write_bytes(b"damaged")

    def read_only(self, target):
        raise PermissionError(f"read-only: {self}")

    monkeypatch.setattr(type(newest), "replace", read_only)
    with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 4 and newest.exists()
        assert "could not set it aside (read-only" in caplog.text
    finally:
        second.shutdown()



def test_a_refused_checkpoints_memory_file_is_set_aside_with_it_and_outlives_the_next_prunes(tmp_path, caplog):
    from test_checkpoint import with_a_nan

    config = make_config(tmp_path, checkpoint_every=4, save_memory=True)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=8) == 8  # checkpoints at 4 and 8, each with its memory file
    directory = first.run_dir / "checkpoints"
    newest = directory / "checkpoint-000000000008.safetensors"
    memory_bytes = (directory / "checkpoint-000000000008.memory.safetensors").read_bytes()
    with_a_nan(newest)
    with caplog.at_level("ERROR", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    assert second.learner.updates == 4
    assert ("set aside as checkpoint-000000000008.safetensors.refused, its replay memory file as "
            "checkpoint-000000000008.memory.safetensors.refused") in caplog.text
    second.ingestor.handle(pendulum_batch("w1", 1, 60))
    assert second.run(max_updates=16) == 16  # checkpoints at 8, 12, 16 and 16 at shutdown, each followed by a prune
    refused_memory = directory / "checkpoint-000000000008.memory.safetensors.refused"
    assert refused_memory.read_bytes() == memory_bytes  # kept as it was, for inspection or recovery
    assert (directory / "checkpoint-000000000008.safetensors.refused").exists()


def test_the_lost_progress_warning_after_a_refused_checkpoint_names_it_instead_of_an_unclean_stop(tmp_path, caplog):
    from test_checkpoint import with_a_nan

    config, directory = checkpointed_every_4(tmp_path, updates=12)  # stopped cleanly: checkpoint and status at 12
    newest = directory / "checkpoint-000000000012.safetensors"
    with_a_nan(newest)
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 8
        # versions 1 and 2 published at 5 and 10 updates, 3 the final actor's (12 updates) at the stop
        assert ("the last run reached 12 updates and weights version 3 (status.json), 60 samples received, but this "
                "one resumes from 8 updates and version 1: the newer checkpoint(s) checkpoint-000000000012.safetensors "
                "were refused (above)") in caplog.text
        assert "did not stop cleanly" not in caplog.text
    finally:
        second.shutdown()

def load_state(path) -> dict[str, torch.Tensor]:
    """The actor tensors saved in the checkpoint at ``path``."""
    from tmrl_trainer.tensor_file import read_file

    tensors, _ = read_file(path)
    return {k.removeprefix("learner.actor."): v for k, v in tensors.items() if k.startswith("learner.actor.")}


def test_the_final_checkpoints_weights_version_labels_its_own_actor_as_the_policy_file_does(tmp_path):
    """A restart probe exported a final checkpoint (24,162 updates) as `weights version 483`, the version published
    at 24,150 updates, whose tensors differ by up to 0.0175: two actors under one label. At the stop, an actor
    trained past its last publication now gets the next version, in policy.safetensors and the final checkpoint."""
    from tmrl_common.networks import read_policy_file

    config = make_config(tmp_path, publish_every=10, checkpoint_every=1000)
    service = TrainerService(config)
    service.ingestor.handle(pendulum_batch("w1", 0, 100))
    assert service.run(max_updates=25) == 25  # published at 10 and 20 (versions 1, 2); stopped at 25
    final = service.run_dir / "checkpoints" / "checkpoint-000000000025.safetensors"
    actor, version = read_policy_file(service.run_dir / "policy.safetensors")
    assert version == 3 == service.weights_version
    saved = load_state(final)
    for name, tensor in actor.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    resumed = TrainerService(config)
    try:
        assert (resumed.learner.updates, resumed.weights_version) == (25, 3)
    finally:
        resumed.shutdown()  # no update since: the same version, no new policy file
    assert read_policy_file(service.run_dir / "policy.safetensors")[1] == 3


def fresh_actor_state(config: TrainerConfig) -> dict[str, list]:
    from tmrl_trainer.cpu_fast import SACLearner

    learner = SACLearner(config.sac, config.sac.architecture(layout_for_box(3, 1)), device="cpu", seed=config.seed)
    return {k: v.tolist() for k, v in learner.actor.state_dict().items()}


def test_status_reports_the_verification_of_batches_that_carry_observation_digests(tmp_path):
    service = TrainerService(make_config(tmp_path))
    try:
        rng = np.random.default_rng(0)
        builder = SampleBatchBuilder(layout_for_box(3, 1), digests=True)
        builder.add_reset((rng.normal(size=3).astype(np.float32),))
        for _ in range(9):
            builder.add_step(rng.uniform(-1, 1, 1).astype(np.float32), (rng.normal(size=3).astype(np.float32),),
                             0.5, False, False)
        service.ingestor.handle(encode(builder.build(seq=0, weights_version=0), "w1"))
        assert service.snapshot()["verification"] == {"verified_rows": 10, "mismatched_rows": 0, "unverifiable_rows": 0,
                                                       "mismatched_by_worker": {}, "orphan_rows": 0}
    finally:
        service.shutdown()


def test_the_service_trains_with_the_backend_its_config_names_and_resumes_with_another(tmp_path):
    from tmrl_trainer.cpu_fast import SACLearner
    from tmrl_trainer.reference import ReferenceLearner

    sac = {"hidden_sizes": [16], "batch_size": 16, "learning_starts": 50, "utd": 0.5}
    first = TrainerService(make_config(tmp_path, sac={**sac, "backend": "reference"}))
    assert type(first.learner) is ReferenceLearner
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=6) == 6  # checkpoint at shutdown
    second = TrainerService(make_config(tmp_path, sac=sac))  # auto: cpu-fast on CPU
    try:
        assert type(second.learner) is SACLearner and second.learner.updates == 6
        for name, tensor in first.learner.actor.state_dict().items():
            assert torch.equal(second.learner.actor.state_dict()[name], tensor), name
    finally:
        second.shutdown()


def test_with_device_sampling_the_service_trains_from_a_mirror_kept_equal_to_its_memory(tmp_path):
    auto = TrainerService(make_config(tmp_path / "auto"))
    try:
        assert auto.replay is None  # auto on CPU: sampled on the host
    finally:
        auto.shutdown()
    service = TrainerService(make_config(tmp_path, sac={"hidden_sizes": [16], "batch_size": 16, "learning_starts": 50,
                                                        "utd": 0.5, "sampling": "device"}))
    assert service.replay is not None and service.replay.device == service.device
    stop, thread, _ = run_in_thread(service)
    try:
        service.ingestor.handle(pendulum_batch("w1", 0, 40))  # below the warm-up: the mirror is not even asked
        time.sleep(0.3)
        assert service.learner.updates == 0
        service.ingestor.handle(pendulum_batch("w1", 1, 40))  # ingest goes on while the main thread syncs
        service.ingestor.handle(pendulum_batch("w2", 0, 40))
        wait_for(lambda: service.learner.updates >= 60)
        time.sleep(0.3)
        assert service.learner.updates == 60  # the update-to-data cap holds as with host sampling
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    service.replay.sync(service.memory_lock)
    positions = service.memory.sampleable_positions()
    assert np.array_equal(service.replay.sampleable_positions().numpy(), positions) and positions.size == 117
    assert all(np.isfinite(v) for v in service.last_metrics.values())


@pytest.mark.parametrize("sampling", ["host", "device"])
def test_the_service_trains_on_n_step_returns_when_its_config_asks(tmp_path, sampling):
    sac = {"hidden_sizes": [16], "batch_size": 16, "learning_starts": 50, "utd": 0.5, "n_step": 3, "gamma": 0.95,
           "sampling": sampling}
    service = TrainerService(make_config(tmp_path, save_memory=True, sac=sac))
    assert (service.memory.n_step, service.memory.gamma) == (3, 0.95)
    service.ingestor.handle(pendulum_batch("w1", 0, 120))
    try:
        assert service.run(max_updates=20) == 20
        batch = service.memory.sample(64)  # three rewards, fewer from the episode's newest two rows
        assert batch.discount is not None
        assert {round(float(d), 6) for d in batch.discount} <= {round(0.95**k, 6) for k in (1, 2, 3)}
        assert float((batch.discount < 0.95**2 - 1e-6).float().mean()) > 0.9
        assert all(np.isfinite(v) for v in service.last_metrics.values())
    finally:
        service.shutdown()
    resumed = TrainerService(make_config(tmp_path, save_memory=True, sac=sac))  # the memory file carries no n_step
    try:
        assert resumed.memory.n_step == 3 and len(resumed.memory) == 120
        assert torch.equal(resumed.memory.transitions(np.arange(1, 100)).reward,
                           service.memory.transitions(np.arange(1, 100)).reward)
    finally:
        resumed.shutdown()


def test_the_progress_line_of_a_trainer_without_relay_names_where_it_looks_for_one(tmp_path, caplog):
    service = TrainerService(make_config(tmp_path))  # trainer_port 1: nobody listens
    try:
        with caplog.at_level("INFO", logger="tmrl_trainer.service"):
            service._report()
        assert "not connected to the relay at tcp://127.0.0.1:1 plain text (is it running there" in caplog.text
        assert caplog.records[-1].levelname == "WARNING"  # as the worker's own line says it (a probe: INFO here)
        # a chaos probe: once workers had sent, a relay that went away turned the line into a WARNING that said why not
        service.ingestor.handle(pendulum_batch("w1", 0, 30))
        caplog.clear()
        with caplog.at_level("INFO", logger="tmrl_trainer.service"):
            service._report()
        record = caplog.records[-1]
        assert record.levelname == "WARNING" and "w1: 1 batches" in record.getMessage()
        assert "; not connected to the relay at tcp://127.0.0.1:1 plain text (is it running there" in record.getMessage()
    finally:
        service.shutdown()


def test_the_progress_line_shows_the_warm_up_and_warns_once_no_batch_was_stored_for_a_minute(tmp_path, caplog):
    """An operator's-first-hour probe: a run whose only worker had been displaced logged the same INFO line, updates
    frozen, for five minutes; after a restart nothing said how far the warm-up was."""
    from tmrl_trainer.service import NO_BATCH_WARNING_S

    service = TrainerService(make_config(tmp_path))  # learning_starts 50
    try:
        def line() -> tuple[str, str]:
            with caplog.at_level("INFO", logger="tmrl_trainer.service"):
                service._report()
            return caplog.records[-1].levelname, caplog.records[-1].getMessage()

        service.ingestor.handle(pendulum_batch("w1", 0, 30))
        _, message = line()
        assert message.endswith("; warm-up: 30 of 50 rows stored before the first update")
        service._batch_seen_at -= NO_BATCH_WARNING_S + 1  # a minute without a batch
        level, message = line()
        assert level == "WARNING" and "; no batch stored for 61 s: updates wait for samples" in message
        service.ingestor.handle(pendulum_batch("w1", 1, 30))
        _, message = line()
        assert "no batch stored" not in message and "warm-up" not in message  # 60 rows: past the warm-up
    finally:
        service.shutdown()


def test_the_progress_line_names_a_few_sending_workers_and_counts_the_others(tmp_path, caplog):
    service = TrainerService(make_config(tmp_path))
    try:
        for index in range(11):
            service.ingestor.handle(pendulum_batch(f"w{index:02d}", 0, 10))
        wrong_shape = SampleBatchBuilder(layout_for_box(4, 1))  # Pendulum's observations have 3 values
        wrong_shape.add_reset((np.zeros(4, np.float32),))
        wrong_shape.add_step(np.zeros(1, np.float32), (np.zeros(4, np.float32),), 0.0, False, False)
        service.ingestor.handle(encode(wrong_shape.build(seq=0, weights_version=0), "refused-only"))
        with caplog.at_level("INFO", logger="tmrl_trainer.service"):
            service._report()
        line = caplog.records[-1].getMessage()
        assert "w00: 1 batches" in line and "w07: 1 batches" in line and "w08" not in line
        assert "3 more worker(s) with batches (status.json lists every one)" in line
        assert "1 worker(s) without a stored batch yet" in line and "refused-only" not in line
        assert len(service.snapshot()["workers"]) == 12  # status.json still has every one
    finally:
        service.shutdown()


@pytest.mark.parametrize(("field", "value"), [("sac", {"actor_lr": float("inf")}), ("sac", {"utd": float("inf")}),
                                              ("sac", {"gamma": float("nan")}), ("max_abs_reward", float("inf"))])
def test_an_infinite_or_nan_setting_is_refused_as_config(field, value):
    from pydantic import ValidationError
    from tmrl_trainer.config import TrainerConfig

    with pytest.raises(ValidationError, match="finite number"):
        TrainerConfig.model_validate({field: value})


def test_a_restart_after_a_kill_says_how_far_the_last_run_got_beyond_its_checkpoint(tmp_path, caplog):
    config = make_config(tmp_path)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 100))
    assert first.run(max_updates=25) == 25  # checkpoints at 10, 20 and 25
    status = json.loads((first.run_dir / "status.json").read_text())
    status.update(updates=37, weights_version=7, stopped=False)  # a killed run's last status.json: it got further
    (first.run_dir / "status.json").write_text(json.dumps(status))
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert ("the last run reached 37 updates and weights version 7 (status.json), 100 samples received, but this "
                "one resumes from 25 updates and version 5: it did not stop cleanly") in caplog.text
    finally:
        second.shutdown()
    caplog.clear()
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):  # a clean stop loses nothing: no warning
        TrainerService(config).shutdown()
    assert "the last run reached" not in caplog.text


def test_rows_a_killed_trainer_stored_after_its_last_checkpoint_are_counted_lost_across_restarts(tmp_path, caplog):
    """A restart probe: with save_memory, three SIGKILLs each lost the rows stored (and acknowledged to the workers)
    since the last checkpoint, 300-869 a time, and no counter said so: samples_received_total went backwards."""
    config = make_config(tmp_path, save_memory=True)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 100))
    assert first.run(max_updates=25) == 25  # its final checkpoint holds the 100 rows
    killed = json.loads((first.run_dir / "status.json").read_text())
    killed.update(updates=37, weights_version=7, samples_received_total=160, stopped=False)  # 60 rows more, then killed
    (first.run_dir / "status.json").write_text(json.dumps(killed))
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    assert ("the last run reached 37 updates and weights version 7 (status.json), 160 samples received (60 or more of "
            "them after that checkpoint: acknowledged to their workers but in no saved memory, so lost; 60 so far in this "
            "run directory, samples_lost_in_restarts in status.json), but this one resumes from 25 updates") in caplog.text
    second.ingestor.handle(pendulum_batch("w1", 1, 20))
    assert second.run(max_updates=30) == 30
    status = json.loads((second.run_dir / "status.json").read_text())
    assert (status["samples_lost_in_restarts"], status["samples_received_total"]) == (60, 120)
    killed = {**status, "samples_received_total": 125, "stopped": False}  # killed again, 5 rows after its checkpoint
    (second.run_dir / "status.json").write_text(json.dumps(killed))
    caplog.clear()
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        third = TrainerService(config)  # the same updates as its checkpoint: warned for the rows alone
    try:
        assert "(5 or more of them after that checkpoint" in caplog.text and "65 so far in this run directory" in caplog.text
        assert third.snapshot()["samples_lost_in_restarts"] == 65
    finally:
        third.shutdown()


def test_rows_of_a_run_killed_before_its_first_checkpoint_are_said_lost_without_a_checkpoint(tmp_path, caplog):
    """A re-check: a trainer SIGKILLed before any checkpoint was told its rows came "after that checkpoint"."""
    config = make_config(tmp_path, save_memory=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text(json.dumps({"updates": 0, "weights_version": 0, "stopped": False,
                                                              "samples_received_total": 80}))
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        service = TrainerService(config)
    try:
        assert "80 samples received (80 or more of them and no checkpoint was saved: acknowledged" in caplog.text
        assert service.snapshot()["samples_lost_in_restarts"] == 80
    finally:
        service.shutdown()


def test_after_a_stop_whose_final_checkpoint_failed_the_lost_progress_is_not_blamed_on_an_unclean_stop(tmp_path,
                                                                                                     caplog):
    """A storage probe: a trainer stopped by SIGTERM on a full disk (its final checkpoint refused), then restarted, was
    said not to have stopped cleanly; so was one whose newer checkpoints had been deleted."""
    config = make_config(tmp_path)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 100))
    checkpoint = first._checkpoint
    first._checkpoint = lambda final=False: False if final else checkpoint(final)  # the disk is full at the stop
    assert first.run(max_updates=25) == 25 and first.final_checkpoint_missing  # checkpoints at 10 and 20 only
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert ("the last run reached 25 updates and weights version 5 (status.json), 100 samples received, but this "
                "one resumes from 20 updates and version 4: it stopped, but could not save its final checkpoint (its "
                "log says why") in caplog.text
    finally:
        second.shutdown()  # stops cleanly at 20 (no new updates: no new checkpoint)
    status = json.loads((second.run_dir / "status.json").read_text())
    assert status["stopped"] and not status["final_checkpoint_missing"]
    status.update(updates=30)  # as if it had got to 30, saved that and stopped: the 30 is then deleted
    (second.run_dir / "status.json").write_text(json.dumps(status))
    caplog.clear()
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        TrainerService(config).shutdown()
    assert (f"resumes from 20 updates and version 4: it stopped cleanly, so its newer checkpoints are gone from "
            f"{second.checkpoint_dir} (deleted or moved?)") in caplog.text


def test_a_second_trainer_in_a_run_directory_in_use_is_refused_until_the_first_stops(tmp_path):
    """A probe ran two trainers in one run directory: both wrote and pruned checkpoints there and took the trainer
    role from each other at the relay about every 0.3 s."""
    config = make_config(tmp_path)
    first = TrainerService(config)
    try:
        with pytest.raises(ConfigError, match=r"is in use by another trainer .*trainer.lock.*another run_dir"):
            TrainerService(config)
    finally:
        first.shutdown()
    second = TrainerService(config)  # the first one stopped: its lock is free
    second.shutdown()


def test_a_folder_where_the_lock_file_goes_is_a_one_line_config_error(tmp_path):
    """An outside probe's folder at run_dir/trainer.lock ended the trainer in an IsADirectoryError traceback."""
    config = make_config(tmp_path)
    (tmp_path / "run" / "trainer.lock").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"cannot hold the trainer's lock file .*trainer.lock: Is a directory; move "
                                          "what is there aside, or choose another run_dir"):
        TrainerService(config)
    (tmp_path / "run" / "trainer.lock").rmdir()
    TrainerService(config).shutdown()


@pytest.mark.parametrize("blocked", ["metrics.jsonl", "status.json", "policy.safetensors", "tensorboard"])
def test_a_run_directory_whose_record_files_cannot_be_written_is_a_one_line_config_error(tmp_path, blocked):
    """A probe found a folder where metrics.jsonl, status.json or policy.safetensors go (or a file where tensorboard/
    goes) crashed the trainer with a traceback, at start or at its first publication."""
    config = make_config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    if blocked == "tensorboard":
        (run_dir / blocked).write_text("not a folder")
    else:
        (run_dir / blocked).mkdir()
    with pytest.raises(ConfigError, match=r"cannot write the run's records in .*choose another run_dir"):
        TrainerService(config)
    if blocked == "tensorboard":
        (run_dir / blocked).unlink()
    else:
        (run_dir / blocked).rmdir()
    TrainerService(config).shutdown()  # the lock was released with the refusal


def test_a_folder_in_place_of_the_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, caplog):
    """A probe's IsADirectoryError went up as a traceback: an OS error reading a checkpoint refuses that one only."""
    config, directory = checkpointed_every_4(tmp_path, updates=12)  # checkpoints at 4, 8, 12
    newest = directory / "checkpoint-000000000012.safetensors"
    newest.unlink()
    newest.mkdir()
    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 8 and f"refusing checkpoint {newest}: checkpoint {newest} cannot be read" in caplog.text
        assert (directory / (newest.name + ".refused")).is_dir()
    finally:
        second.shutdown()


def test_a_layout_file_that_overrides_a_named_envs_layout_says_so_and_the_start_line_names_its_source(tmp_path,
                                                                                                       caplog):
    """A probe ran `tmrl-trainer run --env sim` with a config whose layout_file held another layout: the file won and
    nothing said so, and every batch of the sim workers was then refused."""
    path = tmp_path / "layout.json"
    path.write_text(layout_for_box(7, 2).model_dump_json())
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        assert layout_for_env("sim", path) == layout_for_box(7, 2)
    assert (f"layout_file {path} overrides the layout of env 'sim' ([speed 1, lidar 4x19, 2 previous action(s); "
            "action 3]) with [obs 7; action 2]: batches in that env's own layout will be refused") in caplog.text
    caplog.clear()
    path.write_text(tm20_lidar_layout().model_dump_json())  # the same layout as the env's own: nothing to say
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        assert layout_for_env("sim", path) == tm20_lidar_layout()
        assert layout_for_env("my_robot:Interface", path) == tm20_lidar_layout()  # no layout of its own to override
    assert caplog.text == ""
    service = TrainerService(make_config(tmp_path, layout_file=str(path)))
    with caplog.at_level("INFO", logger="tmrl_trainer.service"):
        service.run(max_updates=0)
    assert f"layout [speed 1, lidar 4x19, 2 previous action(s); action 3] from layout_file {path}" in caplog.text


def first_rows_only_batch(seq: int, rows: int):
    """A valid batch in which every row starts an episode: rows, but no transition (a worker whose env resets on
    every step, or a rogue one)."""
    rng = np.random.default_rng(seq)
    builder = SampleBatchBuilder(layout_for_box(3, 1))
    for _ in range(rows):
        builder.add_reset((rng.normal(size=3).astype(np.float32),))
    return builder.build(seq=seq, weights_version=0)


def test_rows_that_form_no_transition_make_the_trainer_wait_and_say_so_not_stop(tmp_path, caplog):
    """An outside probe stored five such batches past the warm-up: the trainer's sampler raised and the trainer
    exited 1, before its first update and again once the ring was overwritten in steady state."""
    service = TrainerService(make_config(tmp_path, status_interval_s=1.0))
    for seq in range(4):
        service._store("w1", first_rows_only_batch(seq, 20))  # 80 rows, past the 50-row warm-up
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        stop, thread, result = run_in_thread(service, max_updates=5)
        try:
            wait_for(lambda: "none ends a complete transition" in caplog.text, 10)
            assert thread.is_alive() and service.learner.updates == 0
            service.ingestor.handle(pendulum_batch("w2", 0, 40))  # real transitions arrive
            thread.join(60)
        finally:
            stop.set()
            thread.join(30)
    assert result["updates"] == 5
    assert "waiting for more samples" in caplog.text


def test_a_contested_trainer_role_stops_the_service_with_a_config_error_after_its_final_checkpoint(tmp_path):
    from tmrl_common.errors import ConfigError
    from tmrl_trainer.relay_link import TrainerRoleContested

    service = TrainerService(make_config(tmp_path))
    service._store("w1", absurd_pendulum_batch("w1", 0, 100, reward=0.5))  # 50 updates at utd 0.5

    def contest() -> None:
        wait_for(lambda: service.learner.updates >= 3)
        service.link.contested = "trainer-1 lost the trainer role 3 times in 4 s"

    threading.Thread(target=contest, daemon=True).start()
    with pytest.raises(TrainerRoleContested, match="lost the trainer role") as raised:
        service.run()
    assert isinstance(raised.value, ConfigError)  # the CLI's one line and status 2
    assert _checkpoint_files(service)  # shutdown saved the final checkpoint


def test_with_device_sampling_rows_that_overwrite_every_transition_pause_training_until_new_ones_come(tmp_path, caplog):
    """The mirror on the learner's device counted its sampleable rows once: after rows forming no transition had
    overwritten the whole ring it would have drawn stale positions. It now waits, as the host path does."""
    config = make_config(tmp_path, memory_capacity=200, sac={"hidden_sizes": [16], "batch_size": 16,
                                                              "learning_starts": 50, "utd": 0.5, "sampling": "device"})
    service = TrainerService(config)
    assert service.replay is not None
    service.ingestor.handle(pendulum_batch("w1", 0, 100))  # 50 updates allowed
    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        stop, thread, _ = run_in_thread(service)
        try:
            wait_for(lambda: service.learner.updates >= 10)
            service._store("w2", first_rows_only_batch(0, 200))  # the whole ring: no transition left
            wait_for(lambda: "none ends a complete transition" in caplog.text, 10)
            paused_at = service.learner.updates
            time.sleep(0.5)
            assert service.learner.updates == paused_at and paused_at < 50
            service.ingestor.handle(pendulum_batch("w1", 1, 100))  # real transitions again
            wait_for(lambda: service.learner.updates > paused_at + 5)
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive()
