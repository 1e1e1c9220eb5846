"""The ``cpu-compiled`` backend (issue 16): cpu-fast's update as explicit passes compiled by ``torch.compile``. Its
graphs, run eagerly and compiled, end where the reference does after the same batches (weights, targets, log alpha,
Adam moments); it refuses what it does not compute; where compiling fails it goes on with cpu-fast's update from the
same random state. Compiling takes seconds per batch size and architecture, so the compiled runs here are few and
share their shapes with ``test_guard.py`` and ``test_learner_backends.py``."""

from __future__ import annotations

import logging

import pytest
import torch
from random_episodes import fill_with_random_episodes
from test_learner_backends import MEMORY, _assert_agree, _learner, _own_batches, _state, _train
from tmrl_common.layout import tm20_image_layout
from tmrl_trainer import cpu_compiled
from tmrl_trainer.checkpoint import load_checkpoint, save_checkpoint
from tmrl_trainer.cpu_compiled import CompiledLearner
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compiled(compiled: bool, **fields) -> CompiledLearner:
    config = SACConfig(hidden_sizes=[32, 32], **fields)
    # the architecture of test_learner_backends._learner, so that their checkpoints cross
    return CompiledLearner(config, config.architecture(MEMORY.layout, conv_channels=[4, 8]), device="cpu", seed=0,
                           compiled=compiled)


def _check_against_the_reference(learner: CompiledLearner, batches, **fields) -> None:
    reference = _learner("reference", **fields)
    before = _state(reference)
    _assert_agree(before, _state(learner))  # same seed, same initial weights
    _train([reference, learner], batches)
    after = _state(reference)
    assert not torch.equal(before["actor.mean.weight"], after["actor.mean.weight"])  # it did learn
    assert not torch.equal(before["target_critics.first_bias"], after["target_critics.first_bias"])
    _assert_agree(after, _state(learner))
    assert learner.updates == reference.updates == len(batches)


@pytest.mark.parametrize("update_order", ["joint", "critic-first"])
@pytest.mark.parametrize(("redq_n", "redq_m"), [(2, 2), (4, 2), (3, 3)])
@pytest.mark.parametrize("learn_alpha", [True, False])
def test_the_graphs_run_eagerly_end_where_the_reference_does(update_order, redq_n, redq_m, learn_alpha):
    fields = {"update_order": update_order, "redq_n": redq_n, "redq_m": redq_m, "learn_alpha": learn_alpha}
    _check_against_the_reference(_compiled(False, **fields), _own_batches(6), **fields)


@pytest.mark.parametrize("fields", [{"n_step": 3}, {"reward_scale": 0.2}, {"hidden_sizes": [24]},
                                    {"hidden_sizes": [16, 24, 8]}],
                         ids=["n_step", "reward_scale", "one_layer", "three_layers"])
def test_the_graphs_run_eagerly_follow_n_step_discounts_reward_scales_and_depths(fields):
    config = SACConfig(**{"hidden_sizes": [32, 32], **fields})
    architecture = config.architecture(MEMORY.layout)
    if "n_step" in fields:  # the memory sums the rewards; its own, so that the batches do not depend on other tests
        memory = fill_with_random_episodes(ReplayMemory(MEMORY.layout, capacity=2000, seed=3, n_step=3),
                                           steps=800, batch_rows=100)
        batches = [memory.sample(64) for _ in range(5)]
    else:
        batches = _own_batches(5)
    assert (batches[0].discount is not None) == ("n_step" in fields)
    reference = make_learner(config, architecture, device="cpu", seed=0, backend="reference")
    learner = CompiledLearner(config, architecture, device="cpu", seed=0, compiled=False)
    _train([reference, learner], batches)
    _assert_agree(_state(reference), _state(learner))


@pytest.mark.parametrize(("update_order", "redq_n", "redq_m", "learn_alpha"),
                         [("critic-first", 2, 2, True), ("joint", 4, 2, False)])
def test_the_compiled_update_ends_where_the_reference_does(update_order, redq_n, redq_m, learn_alpha):
    fields = {"update_order": update_order, "redq_n": redq_n, "redq_m": redq_m, "learn_alpha": learn_alpha}
    learner = _compiled(True, **fields)
    _check_against_the_reference(learner, _own_batches(8), **fields)
    assert learner.compile_failure is None  # it ran compiled, not on the fallback


def test_the_compiled_update_reports_the_metrics_of_the_reference():
    reference, learner = _learner("reference"), _compiled(True)
    for batch in _own_batches(3):
        expected, actual = reference.update(batch), learner.update(batch)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            assert actual[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def _compile_failing_for(monkeypatch, failing: str) -> None:
    """``torch.compile`` as the cpu-compiled module sees it: the graph named ``failing`` raises a compiler error."""
    def compile_failing(function, **_options):
        if function.__name__ != failing:
            return function

        def fail(*_args, **_kwargs):
            raise RuntimeError("Compiler: cc1plus not found\nsecond line of the error")

        return fail

    monkeypatch.setattr(CompiledLearner, "GRAPHS", {})
    monkeypatch.setattr(cpu_compiled.torch, "compile", compile_failing)


@pytest.mark.parametrize("failing", ["critic_step", "policy_critics", "actor_step"])
def test_a_learner_that_cannot_compile_goes_on_with_cpu_fast_from_the_same_random_state(monkeypatch, caplog,
                                                                                       failing):
    _compile_failing_for(monkeypatch, failing)
    learner, fast = _compiled(True), _learner("cpu-fast")
    batches = _own_batches(3)
    with caplog.at_level(logging.WARNING, logger="tmrl_trainer.cpu_compiled"):
        _train([learner, fast], batches)
    assert learner.compile_failure == "RuntimeError: Compiler: cc1plus not found"
    assert [record.getMessage() for record in caplog.records] == [
        "cpu-compiled: the update could not be compiled (RuntimeError: Compiler: cc1plus not found); this learner "
        "goes on with cpu-fast's update, which computes the same"]
    expected, actual = _state(fast), _state(learner)
    assert all(torch.equal(actual[name], value) for name, value in expected.items())  # the very same update
    assert learner.updates == 3


def test_a_learner_resumed_from_a_checkpoint_that_cannot_compile_goes_on_with_cpu_fast(monkeypatch, tmp_path):
    writer = _learner("reference")
    _train([writer], _own_batches(2))
    path = save_checkpoint(tmp_path / "ckpt.safetensors", writer, {"env_steps": 1})
    _compile_failing_for(monkeypatch, "critic_step")
    learner, fast = _compiled(True), _learner("cpu-fast")
    load_checkpoint(path, learner)
    load_checkpoint(path, fast)
    _train([learner, fast], _own_batches(2, seed=2))
    assert learner.compile_failure == "RuntimeError: Compiler: cc1plus not found" and learner.updates == 4
    expected, actual = _state(fast), _state(learner)
    assert all(torch.equal(actual[name], value) for name, value in expected.items())


def test_it_refuses_what_it_does_not_compute():
    image = tm20_image_layout(img_hist_len=2, height=16, width=16, act_buf_len=2)
    for config, architecture in [
        (SACConfig(hidden_sizes=[8]), SACConfig(hidden_sizes=[8]).architecture(image, conv_channels=[4, 8])),
        (SACConfig(hidden_sizes=[8], critic_layer_norm=True), None),
        (SACConfig(hidden_sizes=[8], activation="tanh"), None),
    ]:
        with pytest.raises(ValueError, match="cpu-compiled backend computes MLP observations with ReLU and plain"):
            CompiledLearner(config, architecture or config.architecture(MEMORY.layout), device="cpu")
