"""SAC with the CNN policy (image layouts): every CNN trains, targets follow by polyak, the critic loss falls, the
policy loss leaves the critics' CNNs alone, checkpoints resume bit-for-bit, and ``train_local`` on the simulator's
image env builds and trains a CNN learner."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from random_episodes import fill_with_random_episodes
from tmrl_common.layout import tm20_image_layout
from tmrl_trainer.checkpoint import load_checkpoint, save_checkpoint
from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.local import LocalTrainingConfig, train_local
from tmrl_trainer.memory import ReplayMemory, TransitionBatch
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# speed (1,), 2 grayscale 16x16 frames, 2 past actions; two 4x4 stride-2 convolutions: 16 -> 7 -> 2
LAYOUT = tm20_image_layout(img_hist_len=2, height=16, width=16, act_buf_len=2)
CONV_CHANNELS = [4, 8]


def _learner(seed: int = 0, **fields) -> SACLearner:
    config = SACConfig(hidden_sizes=[32, 32], **fields)
    return SACLearner(config, config.architecture(LAYOUT, conv_channels=CONV_CHANNELS), device="cpu", seed=seed)


def _observation(size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.rand(size, 1, generator=generator),
            torch.randint(0, 256, (size, 2, 16, 16), dtype=torch.uint8, generator=generator),
            torch.rand(size, 3, generator=generator) * 2 - 1,
            torch.rand(size, 3, generator=generator) * 2 - 1)


def _batch(size: int = 32, seed: int = 0, terminated: float = 0.0) -> TransitionBatch:
    generator = torch.Generator().manual_seed(seed)
    return TransitionBatch(
        observation=_observation(size, generator),
        action=torch.rand(size, 3, generator=generator) * 2 - 1,
        reward=torch.randn(size, generator=generator),
        next_observation=_observation(size, generator),
        terminated=torch.full((size,), terminated),
        truncated=torch.zeros(size),
    )


def test_image_layout_builds_a_cnn_actor_and_one_cnn_per_critic():
    learner = _learner(redq_n=3, redq_m=2)
    assert learner.architecture.kind == "cnn"
    assert len(learner.actor.encoder.cnns) == 1
    assert not learner.critics.shares_encoder and len(learner.critics.encoders) == 3
    cnn_weights = [encoder.cnns[0][0].weight for encoder in (learner.actor.encoder, *learner.critics.encoders)]
    assert all(not torch.equal(a, b) for i, a in enumerate(cnn_weights) for b in cnn_weights[i + 1:])
    assert learner.critics(_batch(5).observation, torch.zeros(5, 3)).shape == (3, 5)


def test_one_cnn_update_changes_every_network_tensor_and_moves_the_targets_by_polyak():
    learner = _learner(tau=0.1)
    online = {"actor": learner.actor, "critics": learner.critics}
    before = {f"{net}.{name}": p.detach().clone() for net, module in online.items() for name, p in module.named_parameters()}
    target_before = {name: p.detach().clone() for name, p in learner.target_critics.named_parameters()}
    assert any(".cnns." in name for name in before)
    assert {name.split(".cnns.")[0] for name in before if ".cnns." in name} == {
        "actor.encoder", "critics.encoders.0", "critics.encoders.1"}

    learner.update(_batch())

    after = {f"{net}.{name}": p.detach() for net, module in online.items() for name, p in module.named_parameters()}
    unchanged = [name for name, p in after.items() if torch.equal(p, before[name])]
    assert unchanged == []
    for name, target in learner.target_critics.named_parameters():
        expected = 0.9 * target_before[name] + 0.1 * after[f"critics.{name}"]
        torch.testing.assert_close(target, expected)
        assert not torch.equal(target, target_before[name]), name


def test_repeated_cnn_updates_on_one_batch_reduce_the_critic_loss():
    learner = _learner(critic_lr=3e-3)
    batch = _batch(size=64, terminated=1.0)  # target = reward: a fixed regression problem for the critics
    losses = [learner.update(batch)["critic_loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:3])


@pytest.mark.parametrize(("redq_n", "redq_m"), [(2, 2), (4, 2)])
def test_policy_loss_inside_an_update_reaches_the_actor_cnn_but_no_critic_parameter(monkeypatch, redq_n, redq_m):
    """The Q-value the actor loss reads is differentiated, during a real update, against every critic parameter (each
    critic's CNN included): nothing may reach them, while the action, and through it the actor's CNN, get gradient."""
    learner = _learner(redq_n=redq_n, redq_m=redq_m)
    critic_parameters = dict(learner.critics.named_parameters())
    actor_cnn = [p for name, p in learner.actor.named_parameters() if ".cnns." in name]
    seen: list[torch.Tensor] = []
    real_frozen_min, real_head = learner.critics.frozen_min, learner.critics.head

    def check(q_policy: torch.Tensor, action: torch.Tensor) -> None:
        inputs = [action, *actor_cnn, *critic_parameters.values()]
        gradients = torch.autograd.grad(q_policy.sum(), inputs, retain_graph=True, allow_unused=True)
        action_grad, cnn_grads, critic_grads = gradients[0], gradients[1:1 + len(actor_cnn)], gradients[1 + len(actor_cnn):]
        assert action_grad is not None and action_grad.abs().sum() > 0
        assert all(g is not None and g.abs().sum() > 0 for g in cnn_grads)
        leaked = [name for name, g in zip(critic_parameters, critic_grads, strict=True) if g is not None and g.any()]
        assert leaked == []
        seen.append(q_policy)

    def frozen_min(observation_part, action):
        q_policy = real_frozen_min(observation_part, action)
        check(q_policy, action)
        return q_policy

    def head(observation_part, action, frozen=False, consume=False):
        q_values = real_head(observation_part, action, frozen=frozen, consume=consume)
        if frozen:
            check(q_values.mean(dim=0), action)
        return q_values

    monkeypatch.setattr(learner.critics, "frozen_min", frozen_min)
    monkeypatch.setattr(learner.critics, "head", head)
    learner.update(_batch())
    assert len(seen) == 1  # the policy loss was checked exactly once


def test_cnn_encoders_never_scale_the_callers_float_images_in_place():
    """Float32 images (an env that does not return uint8) used to be divided by 255 in place: ``Actor.act`` rescaled
    the caller's numpy observation, and in an update every further encoder saw the images divided again."""
    learner = _learner()
    image = np.full((2, 16, 16), 200.0, np.float32)
    observation = (np.zeros(1, np.float32), image, np.zeros(3, np.float32), np.zeros(3, np.float32))
    float_action = learner.actor.act(observation, deterministic=True)
    assert np.all(image == 200.0)
    uint8_observation = (observation[0], image.astype(np.uint8), *observation[2:])
    np.testing.assert_array_equal(float_action, learner.actor.act(uint8_observation, deterministic=True))

    batch = _batch(4)
    float_batch = (batch.observation[0], batch.observation[1].float(), *batch.observation[2:])
    first = learner.critics.encoders[0](float_batch)
    torch.testing.assert_close(learner.critics.encoders[0](float_batch), first)
    torch.testing.assert_close(learner.critics.encoders[0](batch.observation), first)


def _image_memory() -> ReplayMemory:
    return fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=600, seed=0), steps=400, batch_rows=100)


def _state(learner: SACLearner) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for m in (learner.actor, learner.critics, learner.target_critics) for p in m.parameters()]
    for state in learner.optimizer.state.values():
        tensors += [v.clone() for v in state.values()]
    return tensors + [learner.log_alpha.detach().clone()]


def test_cnn_learner_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    memory, learner = _image_memory(), _learner()
    sampled = memory.sample(4)
    assert sampled.observation[1].dtype == torch.uint8 and sampled.observation[1].shape == (4, 2, 16, 16)
    for _ in range(3):
        learner.update(memory.sample(16), with_metrics=False)
    path = save_checkpoint(tmp_path / "cnn.safetensors", learner, {"env_steps": 400}, memory)
    for _ in range(3):
        learner.update(memory.sample(16), with_metrics=False)
    uninterrupted = _state(learner)

    fresh_memory, fresh_learner = _image_memory(), _learner(seed=9)  # other initial weights: all must be restored
    restored = load_checkpoint(path, fresh_learner, fresh_memory)
    assert restored.memory_restored and fresh_learner.updates == 3
    for _ in range(3):
        fresh_learner.update(fresh_memory.sample(16), with_metrics=False)
    resumed = _state(fresh_learner)
    assert len(resumed) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))


# The simulator's image env with 48x48 frames: the smallest the default CNN (four stride-2 convolutions) accepts.
# The id names the module, so gymnasium imports the simulator; the trainer package itself never does.
gym.register(id="tmrl-test/RaceTrackSmallImage-v0", entry_point="tmrl_worker.sim.env:RaceTrackEnv",
             kwargs={"variant": "image", "image_size": 48})


def test_train_local_on_the_simulators_image_env_trains_a_cnn_policy(tmp_path):
    sac = SACConfig(hidden_sizes=[16, 16], batch_size=8, learning_starts=20)
    config = LocalTrainingConfig(sac=sac, device="cpu", eval_episodes=1, memory_capacity=200, run_dir=tmp_path)
    result = train_local("tmrl-test/RaceTrackSmallImage-v0", steps=40, seed=0, config=config)
    assert result.updates >= 20 and len(result.final_returns) == 1 and np.isfinite(result.final_return)

    layout = tm20_image_layout(img_hist_len=4, height=48, width=48, act_buf_len=2)
    learner = SACLearner(sac, sac.architecture(layout), device="cpu", seed=1)
    assert learner.architecture.kind == "cnn"
    untrained = [p.detach().clone() for p in learner.actor.encoder.parameters()]
    load_checkpoint(result.checkpoint, learner)  # a CNN learner's tensors: names and shapes must all match
    assert learner.updates == result.updates
    assert not any(torch.equal(a, b) for a, b in zip(untrained, learner.actor.encoder.parameters(), strict=True))


def test_sac_config_conv_channels_shape_the_cnns_of_actor_and_critics():
    config = SACConfig(hidden_sizes=[8], conv_channels=[3, 5])
    learner = SACLearner(config, config.architecture(LAYOUT), device="cpu", seed=0)
    for encoder in (learner.actor.encoder, *learner.critics.encoders):
        convolutions = [layer for layer in encoder.cnns[0] if isinstance(layer, torch.nn.Conv2d)]
        assert [c.out_channels for c in convolutions] == [3, 5]
