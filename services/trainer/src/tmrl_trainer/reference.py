"""The reference SAC update: plain ``nn.Module`` s, autograd and ``torch.optim.Adam``, the truth the fast backends
are tested against.

It states the update the way CleanRL's ``sac_continuous_action.py`` does, with the conventions of this project
(equations in :mod:`tmrl_trainer.sac`'s docstring):

1. critic target ``y = r + gamma * (1 - terminated) * (min_{i in M} Q'_i(s', a') - alpha * log pi(a'|s'))``,
   ``a' ~ pi(.|s')``; only termination stops the bootstrap, ``M`` is every critic (SAC) or ``m`` drawn at random (REDQ);
2. critic loss ``0.5 * sum_i mean_b (Q_i(s, a) - y)^2``;
3. actor loss ``mean_b (alpha * log pi(a~|s) - Q(s, a~))``, ``Q`` the min (SAC) or mean (REDQ) of the critics, whose
   weights do not learn from this loss;
4. entropy coefficient loss ``-mean_b log(alpha) * (log pi(a~|s) + target_entropy)``;
5. one Adam step for the three losses (``update_order = "critic-first"``: the critics' step first, then the actor's
   loss against the updated critics and the actor's and alpha's step), then polyak averaging of the target critics;
6. the learner guard (:mod:`tmrl_trainer.guard`): a non-finite loss or gradient skips step 5 entirely.

Nothing here is tuned for speed: no flat parameters, no in-place tricks, no hand-written backward. A new critic
(LayerNorm, dropout) is written here first; a fast backend follows once it is checked against this one.

Checkpoints are shared by every backend: :meth:`ReferenceLearner.state_dict` stores Adam's state in the canonical
form, one flat tensor per parameter group (critics, actor, log alpha; parameters in ``module.parameters()`` order),
which is what the ``cpu-fast`` backend's flat parameters hold natively.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tmrl_common.networks import Actor, CriticEnsemble, PolicyArchitecture, build_actor

from tmrl_trainer.guard import UpdateGuard, non_finite
from tmrl_trainer.memory import TransitionBatch
from tmrl_trainer.sac import (
    LEARNING_RATE_FIELDS,
    SACConfig,
    bootstrap_discount,
    critic_subset,
    entropy_coefficient_loss,
    resolve_device,
    soft_td_target,
    with_own_implementation_flags,
)

if TYPE_CHECKING:
    from tmrl_trainer.device_replay import DeviceReplay

METRICS = ("critic_loss", "actor_loss", "alpha_loss", "alpha", "q_mean", "target_q_mean", "entropy")


class Losses:
    """The three losses of one update and what the metrics read, all at the same parameters."""

    def __init__(self, critic: torch.Tensor, actor: torch.Tensor, alpha: torch.Tensor, alpha_value: torch.Tensor,
                 q_values: torch.Tensor, target_q: torch.Tensor, log_prob: torch.Tensor) -> None:
        self.critic, self.actor, self.alpha = critic, actor, alpha
        self.alpha_value, self.q_values, self.target_q, self.log_prob = alpha_value, q_values, target_q, log_prob

    def metrics(self) -> torch.Tensor:
        """The values of :data:`METRICS`, stacked on the device (reading them is the caller's choice)."""
        return torch.stack([self.critic.detach(), self.actor.detach(), self.alpha.detach(), self.alpha_value,
                            self.q_values.detach().mean(), self.target_q.mean(), -self.log_prob.detach().mean()])


class ReferenceLearner:
    """Actor, critic ensemble, target critics and learned entropy coefficient; one :meth:`update` per minibatch.

    Built from ``seed`` exactly as the other backends are (same initial weights, same random draws in the same
    order), so their parameters after the same batches agree to float tolerance.
    """

    METRICS = METRICS

    def __init__(self, config: SACConfig, architecture: PolicyArchitecture, device: str | torch.device = "auto",
                 seed: int = 0) -> None:
        self.config = config
        self.architecture = architecture
        self.device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor: Actor = build_actor(architecture).to(self.device)
            self.critics = CriticEnsemble(architecture, n=config.redq_n, layer_norm=config.critic_layer_norm).to(self.device)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=self.device, requires_grad=config.learn_alpha)
        self.target_entropy = float(-architecture.action_dim if config.target_entropy is None else config.target_entropy)
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.guard = UpdateGuard(self.device)
        self.updates = 0
        """Update steps taken, the ones :attr:`guard` rejected included."""
        self.learning_rates_overridden: dict[str, tuple[float, float]] = {}
        """``{config field: (saved rate, configured rate in use)}`` for each rate the config changed at the last
        :meth:`load_state_dict`."""

    def _parameter_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.critics.parameters()), "lr": self.config.critic_lr, "name": "critics"},
                  {"params": list(self.actor.parameters()), "lr": self.config.actor_lr, "name": "actor"}]
        if self.config.learn_alpha:
            groups.append({"params": [self.log_alpha], "lr": self.config.alpha_lr, "name": "log_alpha"})
        return groups

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self._parameter_groups())

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    # ------------------------------------------------------------------------------------------------ the update

    def losses(self, batch: TransitionBatch) -> Losses:
        """Steps 1-4 of the module docstring, at the current parameters."""
        alpha = self.log_alpha.detach().exp()
        critic_loss, q_values, target_q = self._critic_loss(batch, alpha)
        actor_loss, alpha_loss, log_prob = self._actor_losses(batch, alpha)
        return Losses(critic_loss, actor_loss, alpha_loss, alpha, q_values, target_q, log_prob)

    def _critic_loss(self, batch: TransitionBatch, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-2: (critic loss, Q values of the batch's actions, target)."""
        # 1. critic target: bootstrap unless the episode terminated (a truncated episode still bootstraps)
        with torch.no_grad():
            next_action, next_log_prob = self.actor(batch.next_observation, generator=self.generator)
            next_q = self.target_critics(batch.next_observation, next_action)
            next_q = critic_subset(next_q, self.config.redq_m, self.generator).min(dim=0).values
            target_q = soft_td_target(batch.reward, batch.terminated, next_q, next_log_prob, alpha,
                                      bootstrap_discount(batch, self.config.gamma),
                                      self.config.reward_scale)

        # 2. critic loss
        q_values = self.critics(batch.observation, batch.action)  # (n, B)
        critic_loss = 0.5 * (q_values - target_q).pow(2).mean(dim=1).sum()
        return critic_loss, q_values, target_q

    def _actor_losses(self, batch: TransitionBatch, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 3-4 against the critics as they are now: (actor loss, entropy coefficient loss, log pi)."""
        # 3. actor loss: the critics are fixed functions of the action here (their weights learn from step 2 only)
        action, log_prob = self.actor(batch.observation, generator=self.generator)
        self.critics.requires_grad_(False)
        q_policy = self.critics(batch.observation, action)
        self.critics.requires_grad_(True)
        q_policy = q_policy.min(dim=0).values if self.config.redq_m == self.config.redq_n else q_policy.mean(dim=0)
        actor_loss = (alpha * log_prob - q_policy).mean()

        # 4. entropy coefficient loss (log pi detached inside: it trains log alpha only)
        alpha_loss = entropy_coefficient_loss(self.log_alpha, log_prob, self.target_entropy)
        return actor_loss, alpha_loss, log_prob

    def update(self, batch: TransitionBatch, with_metrics: bool = True) -> dict[str, float]:
        """One gradient step on critics, actor and alpha, then a polyak step on the target critics (both skipped
        when the guard rejects the update). Returns the metrics named in :attr:`METRICS` (empty without
        ``with_metrics``)."""
        if self.config.update_order == "critic-first":
            return self._update_critic_first(batch.to(self.device), with_metrics)
        losses = self.losses(batch.to(self.device))
        learned_alpha_loss = losses.alpha if self.config.learn_alpha else None

        # 5. one backward and one Adam step for all three: each loss reaches only its own parameters
        self.optimizer.zero_grad()
        summed_losses(losses.critic, losses.actor, learned_alpha_loss).backward()
        # 6. the guard; asking the host is fine in the reference (the fast backends keep the verdict on the device)
        rejected = self.guard.check(losses.critic, losses.actor, learned_alpha_loss, self._gradients())
        if not bool(rejected):
            self.optimizer.step()
            self._soft_update_targets(self.config.tau)
        self.updates += 1
        if not with_metrics:
            return {}
        return dict(zip(self.METRICS, losses.metrics().tolist(), strict=True))

    def update_sampled(self, replay: DeviceReplay, with_metrics: bool = True) -> dict[str, float]:
        """:meth:`update` on a batch of ``config.batch_size`` transitions drawn by ``replay`` on this learner's device
        (:class:`~tmrl_trainer.device_replay.DeviceReplay`; the ``cuda-graph`` backend draws it inside its graph)."""
        return self.update(replay.sample(self.config.batch_size), with_metrics)

    def _update_critic_first(self, batch: TransitionBatch, with_metrics: bool) -> dict[str, float]:
        """:meth:`update` in the ``critic-first`` order: the critics' Adam step, then the actor's loss against the
        updated critics and one Adam step for the actor and alpha (Stable-Baselines3's order)."""
        alpha = self.log_alpha.detach().exp()
        critic_loss, q_values, target_q = self._critic_loss(batch, alpha)
        self.optimizer.zero_grad()  # to None: Adam skips the actor and alpha, which have no gradient yet
        critic_loss.backward()
        critic_gradients = self._gradients()
        critic_rejected = non_finite(critic_loss, critic_gradients)
        if not bool(critic_rejected):
            self.optimizer.step()
        for parameter in self.critics.parameters():  # kept in critic_gradients; the next step leaves the critics be
            parameter.grad = None

        actor_loss, alpha_loss, log_prob = self._actor_losses(batch, alpha)
        learned_alpha_loss = alpha_loss if self.config.learn_alpha else None
        summed_losses(actor_loss, learned_alpha_loss).backward()
        rejected = self.guard.check(critic_loss, actor_loss, learned_alpha_loss, critic_gradients + self._gradients(),
                                    rejected_before=critic_rejected)
        if not bool(rejected):
            self.optimizer.step()
            self._soft_update_targets(self.config.tau)
        self.updates += 1
        if not with_metrics:
            return {}
        losses = Losses(critic_loss, actor_loss, alpha_loss, alpha, q_values, target_q, log_prob)
        return dict(zip(self.METRICS, losses.metrics().tolist(), strict=True))

    @torch.no_grad()
    def _soft_update_targets(self, weight: float | torch.Tensor) -> None:
        """Polyak averaging: every target critic parameter moves ``weight`` (tau, or a device tensor) toward its critic."""
        for target, online in zip(self.target_critics.parameters(), self.critics.parameters(), strict=True):
            target.lerp_(online, weight)

    def _step_groups(self, groups: tuple[str, ...] | None) -> None:
        """``self.optimizer.step()`` for the parameter groups named in ``groups`` only (``None``: all): Adam skips a
        parameter without a gradient, so the other groups' gradients are set aside for the step (the same tensors go
        back, so a CUDA graph that recorded this step keeps their addresses)."""
        hidden = [] if groups is None else [parameter for group in self.optimizer.param_groups
                                            if group["name"] not in groups for parameter in group["params"]]
        gradients = [parameter.grad for parameter in hidden]
        for parameter in hidden:
            parameter.grad = None
        try:
            self.optimizer.step()
        finally:
            for parameter, gradient in zip(hidden, gradients, strict=True):
                parameter.grad = gradient

    def _gradients(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    # ------------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit, in the form every backend reads (Adam state flat per group)."""
        return {
            "actor": self.actor.state_dict(),
            "critics": self.critics.state_dict(),
            "target_critics": self.target_critics.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "optimizer": flat_optimizer_state(self.optimizer),
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` written by any backend for the same config and architecture."""
        self.actor.load_state_dict(state["actor"])
        self.critics.load_state_dict(state["critics"])
        self.target_critics.load_state_dict(state["target_critics"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        saved = split_optimizer_state(state["optimizer"], self.optimizer)
        self.optimizer.load_state_dict(with_own_implementation_flags(self.optimizer, saved))
        self.learning_rates_overridden = {}
        for group in self.optimizer.param_groups:  # the config wins over the saved rates (issue 13, finding 7)
            field = LEARNING_RATE_FIELDS[group["name"]]
            configured = getattr(self.config, field)
            if group["lr"] != configured:
                self.learning_rates_overridden[field] = (group["lr"], configured)
                group["lr"] = configured
        self.generator.set_state(state["generator"].cpu())
        self.updates = int(state["updates"])


def summed_losses(*losses: torch.Tensor | None) -> torch.Tensor:
    """The sum of ``losses`` in the order given, leaving out ``None`` (alpha's loss when alpha is fixed): the tensor
    whose ``backward()`` one step takes."""
    total = None
    for loss in losses:
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        raise ValueError("no loss to sum")
    return total


# ---------------------------------------------------------------------------------- the canonical Adam state


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with one entry per parameter group: each moment of the group's parameters
    concatenated in order (flattened; a group of one parameter keeps its shape), and the group's step count (Adam
    steps every parameter together)."""
    full = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    for index, group in enumerate(full["param_groups"]):
        entries = [full["state"][i] for i in group["params"] if i in full["state"]]
        if len(entries) == 1:  # log alpha: kept 0-d, as the cpu-fast backend holds it
            state[index] = {key: value.clone() for key, value in entries[0].items()}
        elif entries:
            state[index] = {"step": entries[0]["step"].clone(),
                            **{key: torch.cat([e[key].reshape(-1) for e in entries]) for key in ("exp_avg", "exp_avg_sq")}}
        groups.append({**group, "params": [index]})
    return {"state": state, "param_groups": groups}


def split_optimizer_state(flat: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Inverse of :func:`flat_optimizer_state` for ``optimizer``'s parameters (shapes taken from them)."""
    if len(flat["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"saved optimizer has {len(flat['param_groups'])} parameter groups, this learner "
                         f"{len(optimizer.param_groups)} (learn_alpha differs?)")
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    index = 0
    for group_index, (saved, own) in enumerate(zip(flat["param_groups"], optimizer.param_groups, strict=True)):
        parameters: Sequence[torch.Tensor] = own["params"]
        ids = list(range(index, index + len(parameters)))
        entry = flat["state"].get(group_index, flat["state"].get(str(group_index)))
        if entry is not None:
            sizes = [p.numel() for p in parameters]
            if entry["exp_avg"].numel() != sum(sizes):
                raise ValueError(f"saved Adam state of {saved.get('name')!r} holds {entry['exp_avg'].numel()} values, "
                                 f"this learner's parameters {sum(sizes)}")
            moments = {key: entry[key].reshape(-1).split(sizes) for key in ("exp_avg", "exp_avg_sq")}
            for i, parameter, position in zip(ids, parameters, range(len(sizes)), strict=True):
                state[i] = {"step": entry["step"].clone(),
                            **{key: moments[key][position].reshape(parameter.shape).clone() for key in moments}}
        groups.append({**saved, "params": ids})
        index += len(parameters)
    return {"state": state, "param_groups": groups}
