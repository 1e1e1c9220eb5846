"""Checkpoints: safetensors + JSON (no pickle), atomic writes, bit-for-bit resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from random_episodes import fill_with_random_episodes
from tmrl_common.layout import tm20_lidar_layout
from tmrl_trainer import tensor_file
from tmrl_trainer.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    memory_path_for,
    save_checkpoint,
)
from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = tm20_lidar_layout()


def _setup(redq_n: int = 2, redq_m: int = 2, hidden: int = 32) -> tuple[ReplayMemory, SACLearner]:
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=2500, seed=0), steps=1500, batch_rows=300)
    config = SACConfig(hidden_sizes=[hidden, hidden], redq_n=redq_n, redq_m=redq_m)
    return memory, SACLearner(config, config.architecture(LAYOUT), device="cpu", seed=0)


def _train(learner: SACLearner, memory: ReplayMemory, updates: int) -> None:
    for _ in range(updates):
        learner.update(memory.sample(64), with_metrics=False)


def _state(learner: SACLearner) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for m in (learner.actor, learner.critics, learner.target_critics) for p in m.parameters()]
    for state in learner.optimizer.state.values():
        tensors += [v.clone() for v in state.values()]
    return tensors + [learner.log_alpha.detach().clone()]


@pytest.mark.parametrize(("redq_n", "redq_m"), [(2, 2), (4, 2)])
def test_resuming_from_a_checkpoint_continues_bit_for_bit(tmp_path, redq_n, redq_m):
    memory, learner = _setup(redq_n, redq_m)
    _train(learner, memory, 6)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner, {"env_steps": 1500}, memory)
    _train(learner, memory, 6)
    uninterrupted = _state(learner)

    fresh_memory, fresh_learner = _setup(redq_n, redq_m)
    fresh_memory.sample(10)  # move its RNG: the checkpoint must restore it
    restored = load_checkpoint(path, fresh_learner, fresh_memory)
    assert restored.counters == {"env_steps": 1500} and restored.memory_restored
    assert fresh_learner.updates == 6
    _train(fresh_learner, fresh_memory, 6)
    resumed = _state(fresh_learner)
    assert len(resumed) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))


def test_checkpoint_is_one_safetensors_file_with_json_metadata_and_no_pickle(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner, {"updates": 2})
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    document = json.loads(header["__metadata__"]["tmrl"])
    assert document["format"] == "tmrl-checkpoint-1" and document["counters"] == {"updates": 2}
    assert document["learner"]["optimizer"]["param_groups"][0]["name"] == "critics"
    assert any(name.startswith("learner.optimizer.state.") for name in header)
    assert b"\x80\x04\x95" not in data and b"torch._utils" not in data  # pickle protocol 4 / torch.save markers
    assert not memory_path_for(path).exists()


def test_a_failed_write_leaves_the_previous_checkpoint_intact_and_no_temporary_file(tmp_path, monkeypatch):
    memory, learner = _setup()
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner, {"updates": 0})
    before = path.read_bytes()
    _train(learner, memory, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tensor_file.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, learner, {"updates": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_loading_a_corrupt_missing_or_mismatched_checkpoint_raises_checkpoint_error(tmp_path):
    memory, learner = _setup()
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors", learner)
    (tmp_path / "corrupt.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "corrupt.safetensors", learner)
    (tmp_path / "folder.safetensors").mkdir()  # an OS error other than a missing file (a probe's traceback)
    with pytest.raises(CheckpointError, match="folder.safetensors cannot be read: .*Is a directory"):
        load_checkpoint(tmp_path / "folder.safetensors", learner)
    _, other = _setup(hidden=16)
    with pytest.raises(CheckpointMismatchError, match="architecture"):
        load_checkpoint(path, other)
    _, redq = _setup(redq_n=3, redq_m=2)
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_checkpoint(path, redq)


def test_a_memory_snapshot_and_extra_json_state_ride_along_with_a_checkpoint(tmp_path):
    memory, learner = _setup()
    extra = {"dedupe": {"workers": {"worker-1": [1, 2]}}, "note": "taken under the memory lock"}
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner, {"updates": 0}, memory=memory.to_bytes(), extra=extra)
    restored_memory = ReplayMemory(LAYOUT, capacity=2500, seed=1)
    restored = load_checkpoint(path, learner, restored_memory)
    assert restored.extra == extra and restored.memory_saved and restored.memory_restored
    assert restored_memory.rows_added == memory.rows_added and memory_path_for(path).exists()
    plain = load_checkpoint(save_checkpoint(tmp_path / "plain.safetensors", learner), learner)  # the local-mode call
    assert plain.extra == {} and not plain.memory_saved


def with_a_nan(path, tensor: str = "learner.actor.mean.weight"):
    """Rewrite the checkpoint at ``path`` with one NaN in ``tensor`` (what a learner poisoned before the guard wrote)."""
    tensors, document = tensor_file.read_file(path)
    tensors[tensor][0, 0] = float("nan")
    path.write_bytes(tensor_file.pack(tensors, document))
    return path


def test_a_checkpoint_holding_a_non_finite_tensor_is_refused_before_the_learner_is_touched(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = with_a_nan(save_checkpoint(tmp_path / "ckpt.safetensors", learner))
    _, fresh = _setup()
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=r"ckpt.safetensors holds a non-finite value in learner.actor.mean.weight"):
        load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(fresh), strict=True)) and fresh.updates == 0


def _flip_an_exponent_bit(path, tensor: str) -> float:
    """Flip one exponent bit of the first float of ``tensor`` in the file at ``path`` (a disk error that leaves the
    value finite: 0.0177 becomes about 6e36, as an outside probe saw); returns the damaged value."""
    import struct

    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header_size])[tensor]
    assert entry["dtype"] == "F32"
    begin = 8 + header_size + entry["data_offsets"][0]
    data[begin + 3] ^= 0x40  # little endian: byte 3 holds the sign and the high exponent bits
    path.write_bytes(bytes(data))
    return struct.unpack_from("<f", data, begin)[0]


def test_a_checkpoint_damaged_into_other_finite_values_is_refused_before_the_learner_is_touched(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    damaged = _flip_an_exponent_bit(path, "learner.actor.mean.weight")
    assert torch.isfinite(torch.tensor(damaged))  # the value checks alone let it through
    _, fresh = _setup()
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=r"tensor learner.actor.mean.weight does not match the CRC-32 saved"):
        load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(fresh), strict=True)) and fresh.updates == 0


def test_a_checkpoint_written_before_crcs_were_saved_still_loads(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    tensors, document = tensor_file.read_file(path)
    del document["crc32"]
    path.write_bytes(tensor_file.pack(tensors, document))
    _, fresh = _setup()
    load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(_state(learner), _state(fresh), strict=True))


def test_a_learner_holding_a_non_finite_value_is_never_written_to_a_checkpoint(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 1)
    previous = save_checkpoint(tmp_path / "ckpt.safetensors", learner).read_bytes()
    with torch.no_grad():
        learner.critics.weights[0][0].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="refusing to write checkpoint .*ckpt.safetensors: learner.critics"):
        save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    assert (tmp_path / "ckpt.safetensors").read_bytes() == previous


def test_resuming_with_changed_learning_rates_uses_the_configs_and_logs_each_change(tmp_path, caplog):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    config = learner.config.model_copy(update={"actor_lr": 3e-4, "alpha_lr": 5e-4})
    changed = SACLearner(config, config.architecture(LAYOUT), device="cpu", seed=0)
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, changed)
    rates = {group["name"]: group["lr"] for group in changed.optimizer.param_groups}
    assert rates == {"critics": 1e-3, "actor": 3e-4, "log_alpha": 5e-4}
    assert changed.learning_rates_overridden == {"actor_lr": (1e-3, 3e-4), "alpha_lr": (1e-3, 5e-4)}
    assert "saved with actor_lr = 0.001; the config's 0.0003 is used" in caplog.text
    assert "alpha_lr = 0.001; the config's 0.0005" in caplog.text and "critic_lr" not in caplog.text


def test_a_resumed_learner_steps_with_the_configured_rate_not_the_saved_one(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 2)  # from here on the direct fused Adam calls are in use
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    config = learner.config.model_copy(update={"actor_lr": 1e-12})  # Adam steps of about 1e-12: no visible change
    slowed = SACLearner(config, config.architecture(LAYOUT), device="cpu", seed=0)
    load_checkpoint(path, slowed)
    actor = [p.detach().clone() for p in slowed.actor.parameters()]
    _train(slowed, memory, 3)
    _train(learner, memory, 3)
    assert max((a - p).abs().max().item() for a, p in zip(actor, slowed.actor.parameters(), strict=True)) < 1e-9
    assert max((a - p).abs().max().item() for a, p in zip(actor, learner.actor.parameters(), strict=True)) > 1e-4
