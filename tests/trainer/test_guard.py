"""The learner guard (issue 13, finding 4): absurd but finite data fed to the learner directly (bypassing ingest,
which has its own bounds) never makes it apply a non-finite update: weights, target critics and Adam state stay as
they were, the update is counted, and the next sane update trains as usual. Every learner backend is checked (the
``cuda-graph`` backend's step runs eagerly on CPU; its graph is checked in ``test_learner_backends.py`` on CUDA)."""

from __future__ import annotations

import logging

import pytest
import torch
from random_episodes import fill_with_random_episodes
from tmrl_common.layout import tm20_lidar_layout
from tmrl_trainer.guard import UpdateGuard, first_non_finite
from tmrl_trainer.learner import BACKENDS, Learner, make_learner
from tmrl_trainer.memory import ReplayMemory, TransitionBatch
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = tm20_lidar_layout()  # speed, 4 x 19 LIDAR, two previous actions
MEMORY = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=2000, seed=0), steps=600, batch_rows=100)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    return request.param


def _learner(backend: str, **fields) -> Learner:
    config = SACConfig(hidden_sizes=[32, 32], **fields)
    return make_learner(config, config.architecture(LAYOUT), device="cpu", seed=0, backend=backend)


def _poisoned(batch: TransitionBatch, what: str) -> TransitionBatch:
    """``batch`` with one field set to an absurd but finite value everywhere."""
    if what == "reward 3e38":
        return batch._replace(reward=torch.full_like(batch.reward, 3e38))
    if what == "action 1e30":
        return batch._replace(action=torch.full_like(batch.action, 1e30))
    part = {"speed 1e30": 0, "lidar 1e30": 1}[what]
    observation = list(batch.observation)
    observation[part] = torch.full_like(observation[part], 1e30)
    return batch._replace(observation=tuple(observation), next_observation=tuple(observation))


def _state(learner: Learner) -> dict[str, torch.Tensor]:
    """Every weight, target weight, log(alpha) and Adam moment / step count, copied."""
    tensors = {f"{name}.{key}": value.detach().clone() for name in ("actor", "critics", "target_critics")
               for key, value in getattr(learner, name).state_dict().items()}
    tensors["log_alpha"] = learner.log_alpha.detach().clone()
    for index, state in learner.state_dict()["optimizer"]["state"].items():  # one entry per group, every backend
        tensors.update({f"adam.{index}.{key}": value.clone() for key, value in state.items()})
    return tensors


POISONS = ["reward 3e38", "action 1e30", "lidar 1e30", "speed 1e30"]


@pytest.mark.parametrize("what", POISONS)
@pytest.mark.parametrize("after_updates", [0, 2])  # the first step goes through optimizer.step(), later ones direct
def test_an_update_on_absurd_but_finite_data_is_not_applied_and_changes_no_weight_or_adam_state(what, after_updates,
                                                                                                  backend):
    learner = _learner(backend)
    for _ in range(after_updates):
        learner.update(MEMORY.sample(32), with_metrics=False)
    before = _state(learner)
    metrics = learner.update(_poisoned(MEMORY.sample(32), what))
    assert not all(torch.isfinite(torch.tensor(v)) for v in metrics.values())  # the data did poison the losses
    after = _state(learner)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    # a fused backend's first step creates Adam's state, at rest; the reference does not step Adam at all
    created = [after[name] for name in after.keys() - before.keys()]
    assert len(created) == (9 if after_updates == 0 and backend != "reference" else 0)
    assert all(not t.any() for t in created)
    assert learner.guard.rejected_updates() == 1 and learner.updates == after_updates + 1


@pytest.mark.parametrize("what", POISONS)
@pytest.mark.parametrize("after_updates", [0, 2])
@pytest.mark.parametrize("update_order", ["joint", "critic-first"])
def test_in_either_update_order_a_poisoned_update_changes_nothing_and_training_goes_on(what, after_updates, backend,
                                                                                       update_order):
    learner = _learner(backend, update_order=update_order)
    for _ in range(after_updates):
        learner.update(MEMORY.sample(32), with_metrics=False)
    before = _state(learner)
    learner.update(_poisoned(MEMORY.sample(32), what), with_metrics=False)
    after = _state(learner)
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    assert all(not after[name].any() for name in after.keys() - before.keys())  # Adam state created at rest
    assert learner.guard.rejected_updates() == 1 and learner.updates == after_updates + 1
    learner.update(MEMORY.sample(32), with_metrics=False)
    assert not torch.equal(before["actor.mean.weight"], _state(learner)["actor.mean.weight"])  # and then trains


def test_ten_poisoned_batches_among_sane_ones_leave_a_finite_learner_that_still_trains(backend):
    learner = _learner(backend)
    for step in range(30):
        batch = MEMORY.sample(32)
        learner.update(_poisoned(batch, POISONS[step % 4]) if step % 3 == 0 else batch, with_metrics=False)
    assert learner.guard.rejected_updates() == 10
    before = _state(learner)
    learner.update(MEMORY.sample(32))
    after = _state(learner)
    assert first_non_finite(after) is None
    assert not torch.equal(before["actor.mean.weight"], after["actor.mean.weight"])  # sane updates still apply
    assert after["adam.0.step"] == 30 - 10 + 1  # Adam counted only the applied steps


def test_a_rejected_update_with_fixed_alpha_is_skipped_too(backend):
    learner = _learner(backend, learn_alpha=False)
    learner.update(MEMORY.sample(32), with_metrics=False)
    before = _state(learner)
    learner.update(_poisoned(MEMORY.sample(32), "reward 3e38"), with_metrics=False)
    assert all(torch.equal(before[name], value) for name, value in _state(learner).items())
    assert learner.guard.rejected_updates() == 1


def test_a_finite_gradient_whose_square_would_overflow_adams_second_moment_is_rejected():
    guard = UpdateGuard(torch.device("cpu"))
    finite = torch.tensor(0.5)
    assert guard.check(finite, finite, None, [torch.ones(4), torch.tensor(2.0)]).item() == 0.0
    assert guard.check(finite, finite, None, [torch.full((4,), 1e20)]).item() == 1.0  # 1e40 overflows float32
    assert guard.check(finite, torch.tensor(float("nan")), finite, [torch.ones(4)]).item() == 1.0
    assert guard.check(torch.tensor(float("inf")), finite, finite, [torch.ones(4)]).item() == 1.0
    assert guard.rejected_updates() == 3


def test_rejections_are_logged_with_their_losses_at_most_once_per_interval(caplog):
    learner = _learner("cpu-fast")
    learner.update(_poisoned(MEMORY.sample(32), "reward 3e38"), with_metrics=False)
    with caplog.at_level(logging.WARNING, logger="tmrl_trainer.guard"):
        assert learner.guard.report(updates=1) == 1
        learner.update(_poisoned(MEMORY.sample(32), "action 1e30"), with_metrics=False)
        assert learner.guard.report(updates=2) == 2  # counted, but within the interval: not logged again
    assert len(caplog.records) == 1
    assert "1 SAC update(s) not applied" in caplog.text and "critic_loss inf" in caplog.text


def test_first_non_finite_names_the_first_bad_floating_point_tensor():
    tensors = {"ok": torch.ones(3), "steps": torch.tensor([3], dtype=torch.int64), "bad": torch.tensor([1.0, float("inf")]),
               "worse": torch.tensor(float("nan"))}
    assert first_non_finite(tensors) == "bad"
    assert first_non_finite({"ok": torch.ones(2), "rng": torch.zeros(4, dtype=torch.uint8)}) is None
