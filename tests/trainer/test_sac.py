"""SAC maths: TD target with terminated vs truncated, polyak averaging, entropy coefficient, determinism, REDQ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tmrl_common.layout import layout_for_box, tm20_lidar_layout
from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.memory import TransitionBatch
from tmrl_trainer.sac import SACConfig, entropy_coefficient_loss, resolve_device, soft_td_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = layout_for_box(4, 2)


def _batch(size: int = 32, seed: int = 0, terminated: float = 0.0, truncated: float = 0.0) -> TransitionBatch:
    generator = torch.Generator().manual_seed(seed)
    return TransitionBatch(
        observation=(torch.randn(size, 4, generator=generator),),
        action=torch.rand(size, 2, generator=generator) * 2 - 1,
        reward=torch.randn(size, generator=generator),
        next_observation=(torch.randn(size, 4, generator=generator),),
        terminated=torch.full((size,), terminated),
        truncated=torch.full((size,), truncated),
    )


def _learner(seed: int = 0, **fields) -> SACLearner:
    config = SACConfig(hidden_sizes=[32, 32], **fields)
    return SACLearner(config, config.architecture(LAYOUT), device="cpu", seed=seed)


def _parameters(learner: SACLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for module in (learner.actor, learner.critics, learner.target_critics)
            for p in module.parameters()] + [learner.log_alpha.detach().clone()]


def test_td_target_stops_bootstrapping_only_on_termination():
    reward = torch.tensor([1.0, 1.0, 1.0])
    terminated = torch.tensor([1.0, 0.0, 0.0])  # row 1 is a truncated step: still bootstrapped
    next_q = torch.tensor([10.0, 10.0, 4.0])
    next_log_prob = torch.tensor([-2.0, -2.0, 1.0])
    target = soft_td_target(reward, terminated, next_q, next_log_prob, alpha=0.5, gamma=0.9)
    assert target.tolist() == pytest.approx([1.0, 1.0 + 0.9 * (10.0 + 1.0), 1.0 + 0.9 * (4.0 - 0.5)])


def test_the_reward_scale_multiplies_the_reward_and_nothing_else_in_the_target():
    reward, terminated = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0])
    next_q, next_log_prob = torch.tensor([10.0, 10.0]), torch.tensor([-2.0, -2.0])
    target = soft_td_target(reward, terminated, next_q, next_log_prob, alpha=0.5, gamma=0.9, reward_scale=5.0)
    assert target.tolist() == pytest.approx([10.0, 10.0 + 0.9 * (10.0 + 1.0)])
    terminated_only = _learner(reward_scale=5.0).update(_batch(terminated=1.0), with_metrics=True)
    assert terminated_only["target_q_mean"] == pytest.approx(5.0 * float(_batch().reward.mean()), abs=1e-5)


def test_learner_target_equals_reward_on_terminated_steps_but_bootstraps_truncated_ones():
    terminated = _learner().update(_batch(terminated=1.0), with_metrics=True)
    batch = _batch(terminated=0.0, truncated=1.0)
    truncated = _learner().update(batch, with_metrics=True)
    assert terminated["target_q_mean"] == pytest.approx(float(_batch().reward.mean()), abs=1e-6)
    assert abs(truncated["target_q_mean"] - float(batch.reward.mean())) > 1e-3


def test_target_critics_move_by_polyak_averaging_towards_the_updated_critics():
    learner = _learner(tau=0.1)
    before = [p.detach().clone() for p in learner.target_critics.parameters()]
    learner.update(_batch())
    for old, online, target in zip(before, learner.critics.parameters(), learner.target_critics.parameters(), strict=True):
        torch.testing.assert_close(target, 0.9 * old + 0.1 * online.detach())
        assert not torch.equal(target, old)


def test_entropy_coefficient_loss_gradient_raises_alpha_when_entropy_is_below_target():
    log_alpha = torch.tensor(0.0, requires_grad=True)
    low_entropy_log_prob = torch.full((8,), 3.0)  # entropy -3 < target -1
    entropy_coefficient_loss(log_alpha, low_entropy_log_prob, target_entropy=-1.0).backward()
    assert log_alpha.grad < 0  # gradient descent increases log(alpha)
    log_alpha.grad = None
    entropy_coefficient_loss(log_alpha, torch.full((8,), -3.0), target_entropy=-1.0).backward()
    assert log_alpha.grad > 0


@pytest.mark.parametrize(("target_entropy", "direction"), [(50.0, 1), (-50.0, -1)])
def test_learned_alpha_moves_towards_the_target_entropy(target_entropy, direction):
    learner = _learner(target_entropy=target_entropy, init_alpha=0.5)
    for seed in range(3):
        learner.update(_batch(seed=seed))
    assert (learner.alpha - 0.5) * direction > 0


def test_fixed_alpha_stays_put_when_learn_alpha_is_off():
    learner = _learner(learn_alpha=False, init_alpha=0.2)
    learner.update(_batch())
    assert learner.alpha == pytest.approx(0.2)


def test_policy_loss_does_not_train_the_critics():
    learner = _learner()
    action = torch.zeros(5, 2, requires_grad=True)
    part = learner.critics.observation_part(learner.actor.encoder((torch.randn(5, 4),)))
    learner.critics.head(part.detach(), action, frozen=True).sum().backward()
    assert action.grad is not None and action.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in learner.critics.parameters())


def test_every_network_tensor_is_updated_by_one_learner_step():
    learner = _learner()
    before = {name: p.detach().clone() for name, p in learner.actor.named_parameters()}
    before.update({f"critic.{name}": p.detach().clone() for name, p in learner.critics.named_parameters()})
    learner.update(_batch())
    after = {name: p for name, p in learner.actor.named_parameters()}
    after.update({f"critic.{name}": p for name, p in learner.critics.named_parameters()})
    unchanged = [name for name, p in after.items() if torch.equal(p, before[name])]
    assert unchanged == []


def test_squashed_gaussian_log_prob_matches_torch_distributions():
    learner = _learner()
    features = learner.actor.encoder((torch.randn(64, 4),))
    generator = torch.Generator().manual_seed(0)
    action, log_prob = learner.actor.policy(features, generator=generator)
    hidden = learner.actor.trunk(features)
    mean, log_std = learner.actor.mean(hidden), learner.actor.log_std(hidden).clamp(-20, 2)
    pre_tanh = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
    expected = (torch.distributions.Normal(mean, log_std.exp()).log_prob(pre_tanh)
                - torch.log1p(-action.pow(2) + 1e-12)).sum(dim=1)
    torch.testing.assert_close(log_prob, expected, atol=2e-3, rtol=1e-3)
    assert action.abs().max() <= 1.0


def test_same_seed_gives_identical_weights_and_a_different_seed_does_not():
    runs = []
    for seed in (7, 7, 8):
        learner = _learner(seed=seed)
        for step in range(5):
            learner.update(_batch(seed=step), with_metrics=False)
        runs.append(_parameters(learner))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(runs[0], runs[2], strict=True))


def test_redq_ensemble_learns_with_n_critics_and_m_sampled_in_the_target():
    learner = _learner(redq_n=5, redq_m=2)
    assert learner.critics((torch.randn(3, 4),), torch.zeros(3, 2)).shape == (5, 3)
    before = _parameters(learner)
    metrics = learner.update(_batch())
    assert set(metrics) == set(SACLearner.METRICS) and all(math.isfinite(v) for v in metrics.values())
    assert not all(torch.equal(a, b) for a, b in zip(before, _parameters(learner), strict=True))
    with pytest.raises(ValueError, match="redq_m"):
        SACConfig(redq_n=2, redq_m=3)


def test_critic_ensemble_members_start_different():
    learner = _learner(redq_n=3)
    weights = learner.critics.weights[0]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_learner_accepts_history_layouts_and_reduces_the_critic_loss_on_a_fixed_batch():
    layout = tm20_lidar_layout()
    config = SACConfig(hidden_sizes=[64, 64], critic_lr=3e-3)
    learner = SACLearner(config, config.architecture(layout), device="cpu", seed=0)
    generator = torch.Generator().manual_seed(1)
    shapes = layout.observation_shapes()
    batch = TransitionBatch(tuple(torch.randn(64, *s, generator=generator) for s in shapes), torch.zeros(64, 3),
                            torch.ones(64), tuple(torch.randn(64, *s, generator=generator) for s in shapes),
                            torch.ones(64), torch.zeros(64))
    losses = [learner.update(batch)["critic_loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:3])


def test_auto_device_falls_back_to_cpu_and_unavailable_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("update_order", ["critic-first", "joint"])
def test_direct_fused_adam_steps_equal_the_optimizers_own_steps_also_after_loading_a_state(update_order):
    direct, reference = _learner(seed=3, update_order=update_order), _learner(seed=3, update_order=update_order)

    def reference_step(rejected: torch.Tensor, groups: tuple[str, ...] | None = None) -> None:
        reference.optimizer.found_inf = rejected  # the torch.optim.Adam.step path, every update
        reference._step_groups(groups)

    reference._adam_step = reference_step
    for step in range(4):
        batch = _batch(seed=step)
        if step == 2:  # a rejected update in between (the guard): both paths must skip it the same way
            batch = batch._replace(reward=torch.full_like(batch.reward, 3e38))
        direct.update(batch, with_metrics=False)
        reference.update(batch, with_metrics=False)
    assert direct.guard.rejected_updates() == reference.guard.rejected_updates() == 1
    assert direct._adam_calls is not None  # the direct calls are in use from the second step
    assert all(torch.equal(a, b) for a, b in zip(_parameters(direct), _parameters(reference), strict=True))

    saved = _learner(seed=4, update_order=update_order)
    saved.update(_batch(seed=9), with_metrics=False)
    direct.load_state_dict(saved.state_dict())  # new optimizer state tensors: the direct calls must follow them
    reference.load_state_dict(saved.state_dict())
    for step in range(3):
        direct.update(_batch(seed=10 + step), with_metrics=False)
        reference.update(_batch(seed=10 + step), with_metrics=False)
    assert all(torch.equal(a, b) for a, b in zip(_parameters(direct), _parameters(reference), strict=True))
    assert direct.optimizer.state_dict()["state"][0]["step"] == reference.optimizer.state_dict()["state"][0]["step"] == 1 + 3


def test_loading_a_live_learners_state_copies_its_optimizer_moments_instead_of_sharing_them():
    source, copy = _learner(seed=1), _learner(seed=2)
    source.update(_batch(seed=0), with_metrics=False)
    copy.load_state_dict(source.state_dict())
    moments_before = [t.clone() for state in source.optimizer.state.values() for t in state.values()]
    copy.update(_batch(seed=1), with_metrics=False)
    moments_after = [t for state in source.optimizer.state.values() for t in state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments_before, moments_after, strict=True))
