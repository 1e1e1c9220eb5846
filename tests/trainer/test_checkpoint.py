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
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = tm20_lidar_layout()


def _setup(redq_n: int = 2, redq_m: int = 2, hidden: int = 32, learn_alpha: bool = True) -> tuple[ReplayMemory, SACLearner]:
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=2500, seed=0), steps=1500, batch_rows=300)
    config = SACConfig(hidden_sizes=[hidden, hidden], redq_n=redq_n, redq_m=redq_m, learn_alpha=learn_alpha)
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
    with pytest.raises(CheckpointMismatchError, match=r"another policy architecture \(hidden_sizes = \[32, 32\] "
                                                      r"where the config has \[16, 16\]\)"):
        load_checkpoint(path, other)
    _, redq = _setup(redq_n=3, redq_m=2)
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_checkpoint(path, redq)


def _with_bounds(layout, name: str, low: float | None, high: float | None, scale: float | None = None):
    components = [c.model_copy(update={"low": low, "high": high, **({"scale": scale} if scale else {})})
                  if c.name == name else c for c in layout.components]
    return layout.model_copy(update={"components": components})


def test_a_checkpoint_whose_layout_differs_only_in_bounds_resumes_with_a_warning(tmp_path, caplog):
    """An outside probe widened a layout's bounds, as the worker's clipping warning advises, and the trainer then
    refused its checkpoint as "written for another policy architecture", though the networks are the same."""
    memory, learner = _setup()
    _train(learner, memory, 3)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner, memory=memory)
    config = SACConfig(hidden_sizes=[32, 32])
    wider = _with_bounds(LAYOUT, "speed", -2000.0, 2000.0)
    resumed = SACLearner(config, config.architecture(wider), device="cpu", seed=1)
    wider_memory = ReplayMemory(wider, capacity=2500, seed=0)
    with caplog.at_level("WARNING", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, resumed, memory=wider_memory)
    assert all(torch.equal(a, b) for a, b in zip(resumed.actor.state_dict().values(),
                                                 learner.actor.state_dict().values(), strict=True))
    assert len(wider_memory) == len(memory)
    assert "other observation bounds (speed [-1000.0, 1000.0] -> [-2000.0, 2000.0])" in caplog.text
    rescaled = _with_bounds(LAYOUT, "speed", -1000.0, 1000.0, scale=0.5)  # a scale changes the networks' inputs
    other = SACLearner(config, config.architecture(rescaled), device="cpu", seed=1)
    with pytest.raises(CheckpointMismatchError, match="another policy architecture .* or move its checkpoints"):
        load_checkpoint(path, other)


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


@pytest.mark.parametrize(("field", "old", "new"), [("the update count", b'updates\\": 2', b'updates\\": 7'),
                                                  ("Adam's eps", b'eps\\": 1e-08', b'eps\\": 1.000')])
def test_a_checkpoint_whose_json_header_was_damaged_is_refused_before_the_learner_is_touched(tmp_path, field, old, new):
    """An outside probe: one flipped bit in the header resumed at another update count, or with Adam's eps at 1.0,
    silently, and saved it again (only the tensors had CRCs)."""
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner, {"updates": 2})
    data = path.read_bytes()
    assert data.count(old) >= 1 and len(old) == len(new)  # same length: the safetensors header stays readable
    path.write_bytes(data.replace(old, new, 1))
    _, fresh = _setup()
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=r"does not match the CRC-32 saved in it .*the header was damaged"):
        load_checkpoint(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(fresh), strict=True)) and fresh.updates == 0


def test_the_same_state_is_saved_as_the_same_bytes(tmp_path):
    memory, learner = _setup()
    _train(learner, memory, 1)
    first = save_checkpoint(tmp_path / "a.safetensors", learner, {"updates": 1}).read_bytes()
    assert save_checkpoint(tmp_path / "b.safetensors", learner, {"updates": 1}).read_bytes() == first


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
    assert "the config's are used from here on: actor_lr: 0.001 -> 0.0003, alpha_lr: 0.001 -> 0.0005" in caplog.text
    assert "critic_lr" not in caplog.text


@pytest.mark.parametrize("learn_alpha", [True, False])
def test_resuming_with_another_init_alpha_says_it_is_not_used_and_which_alpha_goes_on(tmp_path, caplog, learn_alpha):
    """A restart probe set init_alpha = 0.5 on resume: the warning listed the other changes, and not this one."""
    memory, learner = _setup(learn_alpha=learn_alpha)
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    saved_alpha = float(learner.log_alpha.detach().exp())
    config = learner.config.model_copy(update={"init_alpha": 0.5})
    changed = SACLearner(config, config.architecture(LAYOUT), device="cpu", seed=0)
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, changed)
    assert float(changed.log_alpha.detach().exp()) == pytest.approx(saved_alpha)
    [line] = [r.getMessage() for r in caplog.records if "init_alpha" in r.getMessage()]
    assert f"init_alpha {learner.config.init_alpha!r} -> 0.5 is not used: a resumed learner keeps the checkpoint's " \
           f"alpha, {saved_alpha:.4g}" in line
    assert ("it changes only in a new run_dir" in line) != learn_alpha


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


def _learner(**fields):
    """A learner of ``_setup``'s architecture whose config differs from the default in ``fields`` (its backend the
    one ``sac.backend`` picks: ``cpu-fast``, or ``reference`` for LayerNorm critics)."""
    config = SACConfig(hidden_sizes=[32, 32], **fields)
    return make_learner(config, config.architecture(LAYOUT), device="cpu", seed=0)


def _mismatch_message(path, learner) -> str:
    with pytest.raises(CheckpointMismatchError) as raised:
        load_checkpoint(path, learner)
    return str(raised.value)


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "tmrl_trainer.checkpoint" and record.levelname == "WARNING"]


def _rewrite_saved_config(path, edit) -> None:
    """Rewrite the ``sac_config`` of the checkpoint at ``path`` as ``edit`` returns it (``None``: drop it, as
    checkpoints written before it was saved lack it)."""
    tensors, document = tensor_file.read_file(path)
    config = edit(document.pop("sac_config"))
    if config is not None:
        document["sac_config"] = config
    path.write_bytes(tensor_file.pack(tensors, document))


def test_a_checkpoint_with_another_number_of_critics_is_refused_in_one_line_naming_redq_n(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _learner(redq_n=2, redq_m=2))
    message = _mismatch_message(path, _learner(redq_n=4, redq_m=2))
    assert "\n" not in message and "size mismatch" not in message
    assert "ckpt.safetensors does not fit this learner" in message
    assert "redq_n = 2 where the config has 4" in message and "redq_m" not in message


def test_a_checkpoint_with_layer_normed_critics_is_refused_in_one_line_naming_critic_layer_norm(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _learner(critic_layer_norm=True))
    message = _mismatch_message(path, _learner(backend="reference", gamma=0.9))
    assert "\n" not in message and "Unexpected key" not in message
    assert "critic_layer_norm = True where the config has False" in message and "gamma" not in message


def test_resuming_with_another_gamma_and_reward_scale_loads_and_warns_once_naming_both(tmp_path, caplog):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    changed = _learner(gamma=0.95, reward_scale=2.0)
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, changed)
    assert changed.updates == 2 and changed.config.gamma == 0.95
    [warning] = _warnings(caplog)
    assert "\n" not in warning and "the config's are used from here on" in warning
    assert "gamma: 0.99 -> 0.95, reward_scale: 1.0 -> 2.0" in warning
    assert "Q values re-fit" in warning


def test_resuming_with_the_same_settings_on_another_backend_logs_no_warning(tmp_path, caplog):
    memory, learner = _setup()
    _train(learner, memory, 2)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", learner)
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, _learner())
        load_checkpoint(path, _learner(backend="reference", sampling="host"))  # how, not what
    assert _warnings(caplog) == [] and caplog.text == ""


def test_a_checkpoint_without_a_saved_config_loads_and_names_no_differences(tmp_path, caplog):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _learner())
    _rewrite_saved_config(path, lambda config: None)
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        restored = load_checkpoint(path, _learner(gamma=0.9))
    assert restored.sac_config == {} and _warnings(caplog) == []
    message = _mismatch_message(path, _learner(redq_n=3))
    assert "\n" not in message and "the checkpoint records none" in message
    assert message.endswith("Error(s) in loading state_dict for CriticEnsemble: 7 size mismatches")


def test_fields_a_saved_config_lacks_or_today_has_not_are_not_reported_as_differences(tmp_path, caplog):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _learner())

    def older(config):
        del config["update_order"], config["n_step"]  # written before these fields existed
        return {**config, "retired_knob": 3}  # a field since removed

    _rewrite_saved_config(path, older)
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        restored = load_checkpoint(path, _learner(update_order="joint", n_step=3, tau=0.01))
    assert restored.sac_config["retired_knob"] == 3
    [warning] = _warnings(caplog)
    assert warning.endswith("the config's are used from here on: tau: 0.005 -> 0.01")


def test_a_checkpoint_from_before_update_order_is_compared_as_the_joint_order_it_trained_in(tmp_path, caplog):
    """An upgrade probe: a checkpoint of 98305cb (2026-11-27, before `update_order`, when every update was `joint`)
    resumed under today's default `critic-first` without a word, where deployment.md promises a warning for a
    changed default."""
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _learner(update_order="joint"))
    _rewrite_saved_config(path, lambda config: {name: value for name, value in config.items()
                                                if name != "update_order"})
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, _learner())  # today's default order
    [warning] = _warnings(caplog)
    assert "update_order: 'joint' -> 'critic-first'" in warning and "after their step (critic-first)" in warning
    caplog.clear()
    with caplog.at_level("INFO", logger="tmrl_trainer.checkpoint"):
        load_checkpoint(path, _learner(update_order="joint"))
    assert _warnings(caplog) == []


def test_tensors_that_do_not_fit_a_matching_saved_config_are_summed_up_in_one_line(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _learner())
    _rewrite_saved_config(path, lambda config: {**config, "redq_n": 3})  # says 3 critics, holds 2
    message = _mismatch_message(path, _learner(redq_n=3))
    assert "\n" not in message and "its saved SAC config matches this learner's" in message
    assert "7 size mismatches" in message


def test_a_checkpoint_whose_write_fails_leaves_no_memory_file_and_keeps_the_previous_pair(tmp_path, monkeypatch):
    """Full-disk probe: the memory file was written first, so a checkpoint write that failed left a memory file
    without its checkpoint (the trainer's 11-16 MB files held the space its next save needed), and train-local's
    `latest` then paired the previous checkpoint with the newer memory (env_steps 900, memory total 1207)."""
    from tmrl_trainer import checkpoint as checkpoint_module

    memory, learner = _setup()
    path = save_checkpoint(tmp_path / "latest.safetensors", learner, {"env_steps": 1500}, memory)
    saved_memory = memory_path_for(path).read_bytes()
    _train(learner, memory, 2)  # its sampling moves the memory's saved random state: the next memory file differs
    assert memory.to_bytes() != saved_memory
    real_write = checkpoint_module.write_atomically

    def disk_full_for_checkpoints(target, data, mode=0o600):
        if target.name.endswith(".safetensors") and not target.name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_write(target, data, mode)

    monkeypatch.setattr(checkpoint_module, "write_atomically", disk_full_for_checkpoints)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "latest.safetensors", learner, {"env_steps": 1800}, memory)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "checkpoint-2.safetensors", learner, {"env_steps": 1800}, memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.memory.safetensors", "latest.safetensors"]
    assert memory_path_for(path).read_bytes() == saved_memory  # the pair on disk is still the first save's
    monkeypatch.undo()

    fresh_memory, fresh_learner = _setup()
    restored = load_checkpoint(path, fresh_learner, fresh_memory)
    assert restored.counters == {"env_steps": 1500} and restored.memory_restored and fresh_learner.updates == 0
    path = save_checkpoint(tmp_path / "latest.safetensors", learner, {"env_steps": 1800}, memory)  # space came back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.memory.safetensors", "latest.safetensors"]
    assert memory_path_for(path).read_bytes() == memory.to_bytes()
    assert load_checkpoint(path, fresh_learner, fresh_memory).counters == {"env_steps": 1800}
    assert fresh_learner.updates == 2
