"""The ``cpu-fast`` learner backend: the reference update (:mod:`tmrl_trainer.reference`) computed with fewer passes
over memory: 1.3-1.4x Stable-Baselines3 at one CPU thread and 1.35-1.55x at two in the default ``critic-first``
order, a few per cent more in the ``joint`` order (``benchmarks/sac_updates.py``, benchmarks/README.md).

What makes it fast, each checked against the reference on the same seeds and batches
(``tests/trainer/test_learner_backends.py``: parameters, targets, log alpha and Adam moments agree to float
tolerance, checkpoints cross between backends):

* each network's parameters are views of one flat tensor (:func:`_flat_parameter`), so zeroing gradients, the guard's
  norms, Adam and the polyak step are one operation per network;
* the critics' first layer is split into an observation part, computed once and shared by the critic loss and the
  policy loss, and an action part; ReLU critics go through hand-written backward passes
  (:class:`~tmrl_common.networks.CriticEnsemble`'s ``head`` and ``frozen_min``), and the policy loss overwrites the
  observation part in place;
* the policy runs once per update for both the next observations (critic target) and the current ones (policy
  loss): :meth:`~tmrl_common.networks.Actor.policy_pair`, one pass of twice the rows with a hand-written backward
  for a ReLU actor; the learner draws the noise itself, in the reference's order;
* the critic loss is back-propagated as soon as it is computed, while the critics' activations are still in cache
  (the losses reach disjoint parameters, so two backward passes give the one-backward gradients);
* after the first step, Adam is called as ``torch._fused_adam_`` directly (:meth:`SACLearner._adam_step`), without
  the optimizer's per-step Python bookkeeping; the guard's verdict is its ``found_inf``.

Everything else (building the networks from the seed, the metrics, checkpoints) is the reference's.
"""

from __future__ import annotations

from typing import Any

import torch
from tmrl_common.networks import CriticEnsemble, PolicyArchitecture

from tmrl_trainer.guard import non_finite
from tmrl_trainer.memory import TransitionBatch
from tmrl_trainer.reference import ReferenceLearner, summed_losses
from tmrl_trainer.sac import (
    SACConfig,
    bootstrap_discount,
    draw_critic_subset,
    entropy_coefficient_loss,
    keep_critics,
    soft_td_target,
)


def _flat_parameter(module: torch.nn.Module) -> torch.nn.Parameter:
    """Re-home ``module``'s parameters (and their gradients, when they require one) as views of one flat tensor,
    returned as a parameter whose ``grad`` is the flat gradient. Gradients must then be zeroed in place, never set to
    ``None`` (autograd accumulates into the existing views)."""
    parameters = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    gradient = torch.zeros_like(flat)
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.data = flat[offset : offset + size].view_as(parameter)
        if parameter.requires_grad:
            parameter.grad = gradient[offset : offset + size].view_as(parameter)
        offset += size
    shared = torch.nn.Parameter(flat, requires_grad=parameters[0].requires_grad)
    if shared.requires_grad:
        shared.grad = gradient
    return shared


class SACLearner(ReferenceLearner):
    """The reference learner with the fast update of the module docstring (backend ``cpu-fast``)."""

    def __init__(self, config: SACConfig, architecture: PolicyArchitecture, device: str | torch.device = "auto",
                 seed: int = 0) -> None:
        if not self.computes(config):
            raise ValueError("the cpu-fast backend computes plain critics; critic_layer_norm needs the reference or "
                             "cuda-graph backend (backend = \"auto\" picks reference on a CPU)")
        self._adam_calls: list[tuple[dict[str, Any], list[torch.Tensor]]] | None = None
        """Per parameter group: its hyperparameters and the tensor lists of one fused Adam call (see :meth:`_adam_step`);
        ``None`` until the optimizer has state, and again after :meth:`load_state_dict` replaces it."""
        super().__init__(config, architecture, device=device, seed=seed)
        self._shared_features = self.critics.shares_encoder and not any(True for _ in self.actor.encoder.parameters())

    @staticmethod
    def computes(config: SACConfig) -> bool:
        """Whether this backend computes ``config``'s update: its hand-written passes are for plain critics, not
        critics with LayerNorm (``critic_layer_norm``)."""
        return not config.critic_layer_norm

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # Each network's parameters become views of one flat tensor, so that Adam, zeroing gradients and the polyak
        # step are one operation per network instead of one per weight tensor.
        self._critic_flat = _flat_parameter(self.critics)
        self._actor_flat = _flat_parameter(self.actor)
        self._target_flat = _flat_parameter(self.target_critics)
        groups = [{"params": [self._critic_flat], "lr": self.config.critic_lr, "name": "critics"},
                  {"params": [self._actor_flat], "lr": self.config.actor_lr, "name": "actor"}]
        if self.config.learn_alpha:
            self.log_alpha.grad = torch.zeros_like(self.log_alpha)
            groups.append({"params": [self.log_alpha], "lr": self.config.alpha_lr, "name": "log_alpha"})
        optimizer = torch.optim.Adam(groups, fused=self.device.type in ("cpu", "cuda"))
        self._flat_gradients = [group["params"][0].grad for group in groups]
        return optimizer

    def _features(self, observation: tuple[torch.Tensor, ...], critics: CriticEnsemble) -> tuple[torch.Tensor, torch.Tensor]:
        """(actor features, ``critics``' features); one flatten for both when no encoder has parameters (MLP)."""
        if self._shared_features:
            features = self.actor.encoder(observation)
            return features, features
        return self.actor.encoder(observation), critics.encode(observation)

    def _standard_normal(self, like: torch.Tensor) -> torch.Tensor:
        """The policy's noise for one batch, drawn as :meth:`Actor.policy <tmrl_common.networks.Actor.policy>` draws it."""
        return torch.randn(like.shape[0], self.architecture.action_dim, generator=self.generator, device=self.device,
                           dtype=like.dtype)

    def update(self, batch: TransitionBatch, with_metrics: bool = True) -> dict[str, float]:
        """One gradient step on critics, actor and alpha, then a polyak step on the target critics.

        Returns the metrics named in :attr:`METRICS` (an empty dict when ``with_metrics`` is False, which avoids a
        device synchronisation per update on GPU).
        """
        batch = batch.to(self.device)
        gamma = self.config.gamma
        alpha = self.log_alpha.detach().exp()

        # the policy at the next and the current observations in one pass; the random draws in the reference's order
        with torch.no_grad():
            next_actor_features, next_critic_features = self._features(batch.next_observation, self.target_critics)
        actor_features, critic_features = self._features(batch.observation, self.critics)
        next_noise = self._standard_normal(batch.action)
        subset = draw_critic_subset(self.config.redq_n, self.config.redq_m, self.generator, self.device)
        noise = self._standard_normal(batch.action)
        action, log_prob, next_action, next_log_prob = self.actor.policy_pair(actor_features, next_actor_features,
                                                                              noise, next_noise)

        # 1. critic target: bootstrap unless the episode terminated (a truncated episode still bootstraps)
        with torch.no_grad():
            next_q = self.target_critics.q_values(next_critic_features, next_action)
            next_q = keep_critics(next_q, subset).min(dim=0).values
            target_q = soft_td_target(batch.reward, batch.terminated, next_q, next_log_prob, alpha,
                                      bootstrap_discount(batch, gamma),
                                      self.config.reward_scale)

        # 2. critic loss
        observation_part = self.critics.observation_part(critic_features)
        q_values = self.critics.head(observation_part, batch.action)
        critic_loss = 0.5 * (q_values - target_q).pow(2).mean(dim=1).sum()
        # its gradient now, while the critics' activations are still in cache (the losses reach disjoint parameters,
        # so two backward passes give the joint order's gradients); in place: the networks' gradients are views
        torch._foreach_zero_(self._flat_gradients)
        critic_loss.backward()
        critic_rejected = None
        if self.config.update_order == "critic-first":  # 5 for the critics first; the actor's loss then sees them
            critic_rejected = non_finite(critic_loss, [self._critic_flat.grad])
            self._adam_step(critic_rejected, groups=("critics",))
            with torch.no_grad():
                if not self._shared_features:
                    critic_features = self.critics.encode(batch.observation)
                observation_part = self.critics.observation_part(critic_features)

        # 3. actor loss: the critics act as fixed functions of the action (frozen weights, detached features); the
        # critic loss has read observation_part and autograd did not save it, so this head may overwrite it
        if self.config.redq_m == self.config.redq_n:
            q_policy = self.critics.frozen_min(observation_part.detach(), action)
        else:
            q_policy = self.critics.head(observation_part.detach(), action, frozen=True, consume=True).mean(dim=0)
        actor_loss = (alpha * log_prob - q_policy).mean()

        # 4. entropy coefficient loss
        alpha_loss = entropy_coefficient_loss(self.log_alpha, log_prob, self.target_entropy)

        # 5. the actor's and alpha's gradients (each loss reaches only its own parameters), then one Adam step for all
        # three (critic-first: for these two; the critics' gradient stays for the guard, untouched by this backward)
        learned_alpha_loss = alpha_loss if self.config.learn_alpha else None
        summed_losses(actor_loss, learned_alpha_loss).backward()
        self._guarded_step(critic_loss, actor_loss, learned_alpha_loss, critic_rejected)
        if not with_metrics:
            return {}
        return self._metrics(critic_loss, actor_loss, alpha_loss, alpha, q_values.detach().mean(), target_q.mean(),
                             log_prob)

    def _guarded_step(self, critic_loss: torch.Tensor, actor_loss: torch.Tensor,
                      learned_alpha_loss: torch.Tensor | None, critic_rejected: torch.Tensor | None,
                      square_norm: torch.Tensor | None = None) -> None:
        """Steps 6 and 7 of an update whose gradients are in the flat gradients: the guard (1.0 when a loss or
        gradient is not finite; Adam and the polyak step then change nothing), one Adam step for what has not stepped
        yet (``critic_rejected`` is the critics' verdict when they stepped first), the polyak step of the target
        critics, and the update counted. ``square_norm``: the gradients' squared norm when the caller has it."""
        rejected = self.guard.check(critic_loss, actor_loss, learned_alpha_loss, self._flat_gradients,
                                    rejected_before=critic_rejected, square_norm=square_norm)
        if critic_rejected is None:
            self._adam_step(rejected)
        else:
            self._adam_step(rejected, groups=("actor", "log_alpha"))
        with torch.no_grad():  # a polyak step of zero when the guard rejected the update
            self._target_flat.lerp_(self._critic_flat, self.config.tau * (1.0 - rejected))
        self.updates += 1

    def _metrics(self, critic_loss: torch.Tensor, actor_loss: torch.Tensor, alpha_loss: torch.Tensor,
                 alpha: torch.Tensor, q_mean: torch.Tensor, target_mean: torch.Tensor,
                 log_prob: torch.Tensor) -> dict[str, float]:
        """:attr:`METRICS` of one update, read from the device at once."""
        values = torch.stack([critic_loss.detach(), actor_loss.detach(), alpha_loss.detach(), alpha, q_mean,
                              target_mean, -log_prob.detach().mean()]).tolist()
        return dict(zip(self.METRICS, values, strict=True))

    def _adam_step(self, rejected: torch.Tensor, groups: tuple[str, ...] | None = None) -> None:
        """``self.optimizer.step()`` as the fused Adam kernel calls it makes, without the optimizer's per-step Python
        bookkeeping (about 2% of a CPU update at batch 256). The first step, and every step off the CPU, goes through
        ``optimizer.step()``, which creates the state; results are bit-identical (tested), and the state stays in
        ``self.optimizer``, so checkpoints are unchanged. ``rejected`` (1.0 or 0.0, from the guard) is the fused
        kernel's ``found_inf``: at 1.0 weights, moments and step count stay as they were. ``groups`` names the
        parameter groups to step (``None``: all)."""
        if not self.optimizer.defaults["fused"]:  # only the fused kernels take found_inf; elsewhere, ask the host
            if not bool(rejected):
                self._step_groups(groups)
            return
        if self._adam_calls is None:
            self.optimizer.found_inf = rejected  # read by Adam.step, as GradScaler sets it
            self._step_groups(groups)
            if (self.device.type == "cpu" and self.optimizer.defaults["fused"] and not self.optimizer.defaults["amsgrad"]
                    and all(group["params"][0] in self.optimizer.state for group in self.optimizer.param_groups)):
                self._adam_calls = []
                for group in self.optimizer.param_groups:
                    (parameter,) = group["params"]
                    state = self.optimizer.state[parameter]
                    self._adam_calls.append((group, [parameter.detach(), parameter.grad, state["exp_avg"],
                                                     state["exp_avg_sq"], state["step"]]))
            return
        for group, (parameter, gradient, exp_avg, exp_avg_sq, step) in self._adam_calls:
            if groups is not None and group["name"] not in groups:
                continue
            beta1, beta2 = group["betas"]
            step.add_(1.0 - rejected)
            torch._fused_adam_([parameter], [gradient], [exp_avg], [exp_avg_sq], [], [step], amsgrad=group["amsgrad"],
                               lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                               eps=group["eps"], maximize=group["maximize"], found_inf=rejected)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._adam_calls = None  # the loaded state tensors replace the ones the direct calls held
