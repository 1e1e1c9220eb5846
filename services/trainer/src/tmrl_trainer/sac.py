"""Soft Actor-Critic (Haarnoja et al. 2018, with learned entropy coefficient) and its REDQ variant (Chen et al. 2021):
its config, its shared maths, and :class:`SACLearner`, the ``cpu-fast`` backend.

The plain statement of the update is :class:`tmrl_trainer.reference.ReferenceLearner` (``nn.Module`` s, autograd,
``torch.optim.Adam``); the trainer picks a backend through :func:`tmrl_trainer.learner.make_learner`. This one is a
drop-in for the reference, tested against it on the same seeds and batches (``tests/trainer/test_learner_backends.py``):
it computes the same update with flat parameter views, the critics' hand-written backward passes
(:mod:`tmrl_common.networks`) and direct fused Adam calls, 1.4-1.55x Stable-Baselines3 on CPU.

One :meth:`SACLearner.update` reads top to bottom:

1. **critic target**  ``y = r + gamma * (1 - terminated) * (min_{i in M} Q'_i(s', a') - alpha * log pi(a'|s'))``
   with ``a' ~ pi(.|s')``. Only *termination* stops the bootstrap: a time-limit truncation is not a terminal state,
   so its target still includes the next state's value. ``M`` is all critics for SAC (twin critics, ``n = m = 2``)
   or ``m`` of the ``n`` critics drawn at random each update for REDQ.
2. **critic loss**  ``0.5 * sum_i mean_b (Q_i(s, a) - y)^2``.
3. **actor loss**  ``mean_b (alpha * log pi(a~|s) - Q(s, a~))`` with ``a~ ~ pi(.|s)`` reparameterised; ``Q`` is the
   min over the critics for SAC and their mean for REDQ; the critics' weights are detached here, so this loss only
   trains the actor.
4. **entropy coefficient loss**  ``-mean_b log(alpha) * (log pi(a~|s) + target_entropy)``: alpha grows when the
   policy's entropy ``-log pi`` falls below ``target_entropy`` (default ``-action_dim``) and shrinks otherwise.
   ``log pi`` is detached, so this loss only trains ``log(alpha)``.
5. All three losses are computed at the same parameters and applied by one Adam step (as in the original SAC
   implementation, which ran its three train ops together), then the **target critics** move by polyak averaging
   ``theta' <- (1 - tau) * theta' + tau * theta``.
6. **The guard** (:mod:`tmrl_trainer.guard`): between the backward pass and the Adam step, an update whose losses or
   gradients are not finite is marked rejected; Adam then leaves weights and moments as they were and the target
   critics do not move. Rejected updates still count in :attr:`SACLearner.updates` (the update-to-data cap and the
   publishing cadence do not change) and are counted apart by :attr:`SACLearner.guard`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tmrl_common.layout import ObservationLayout
from tmrl_common.networks import Activation, Actor, CriticEnsemble, PolicyArchitecture, build_actor

from tmrl_trainer.guard import UpdateGuard
from tmrl_trainer.memory import TransitionBatch

Backend = Literal["auto", "reference", "cpu-fast", "cuda-graph"]
"""Which learner runs the update (:func:`tmrl_trainer.learner.make_learner`); ``auto``: ``cuda-graph`` on a CUDA
device, ``cpu-fast`` otherwise."""

LEARNING_RATE_FIELDS = {"critics": "critic_lr", "actor": "actor_lr", "log_alpha": "alpha_lr"}
"""The :class:`SACConfig` field holding the learning rate of each optimizer parameter group."""


class SACConfig(BaseModel):
    """Hyperparameters of the learner (table ``[trainer.sac]``)."""

    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(default=0.99, ge=0.0, le=1.0)
    tau: float = Field(default=0.005, gt=0.0, le=1.0)
    """Polyak coefficient of the target critics (1: hard copy every update)."""
    actor_lr: float = Field(default=1e-3, gt=0.0)
    critic_lr: float = Field(default=1e-3, gt=0.0)
    alpha_lr: float = Field(default=1e-3, gt=0.0)
    batch_size: int = Field(default=256, ge=1)
    hidden_sizes: list[int] = Field(default_factory=lambda: [256, 256], min_length=1)
    activation: Activation = "relu"
    conv_channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 64], min_length=1, max_length=8)
    """Image observations only: output channels of each 4x4 stride-2 convolution of the CNNs (actor and each critic)."""
    init_alpha: float = Field(default=1.0, gt=0.0)
    learn_alpha: bool = True
    target_entropy: float | None = None
    """Entropy the learned alpha steers towards; ``None`` means ``-action_dim``."""
    redq_n: int = Field(default=2, ge=1)
    """Number of critics (2: twin critics of SAC)."""
    redq_m: int = Field(default=2, ge=1)
    """Critics the target takes the minimum over, drawn at random each update (``redq_m == redq_n``: plain SAC)."""
    utd: float = Field(default=1.0, gt=0.0)
    """Updates per environment step received (update-to-data ratio; REDQ uses large values like 20)."""
    learning_starts: int = Field(default=1000, ge=1)
    """Rows in the replay memory before the first update."""
    backend: Backend = "auto"
    """The learner implementation: ``reference`` (plain PyTorch, the oracle), ``cpu-fast``, ``cuda-graph`` or
    ``auto``. Every backend computes the same update and reads and writes the same checkpoints."""

    @model_validator(mode="after")
    def _subset_fits(self) -> SACConfig:
        if self.redq_m > self.redq_n:
            raise ValueError(f"redq_m ({self.redq_m}) cannot exceed redq_n ({self.redq_n})")
        return self

    def architecture(self, layout: ObservationLayout, **fields: Any) -> PolicyArchitecture:
        """The policy architecture for ``layout`` with this config's hidden sizes, activation and convolutions."""
        fields.setdefault("conv_channels", list(self.conv_channels))
        return PolicyArchitecture.for_layout(layout, hidden_sizes=list(self.hidden_sizes), activation=self.activation, **fields)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return resolved


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


def soft_td_target(reward: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, next_log_prob: torch.Tensor,
                   alpha: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """``r + gamma * (1 - terminated) * (Q'(s', a') - alpha * log pi(a'|s'))``: no bootstrap past a terminal state;
    a truncated (time-limit) step is not terminal, so it is not an argument here."""
    return reward + gamma * (1.0 - terminated) * (next_q - alpha * next_log_prob)


def critic_subset(q_values: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """REDQ: ``m`` of the ``n`` rows of ``q_values`` drawn without replacement (all of them, untouched, when ``m == n``).
    Drawn as the first ``m`` of a random permutation made by sorting ``n`` uniforms, which is graph-capturable on CUDA
    (``randperm`` is not) and gives every backend the same draw from the same generator state."""
    n = q_values.shape[0]
    if m == n:
        return q_values
    subset = torch.rand(n, generator=generator, device=q_values.device).argsort()[:m]
    return q_values.index_select(0, subset)


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
"""Adam options that say how a step is computed, not what it computes: a learner keeps its own when it loads an
optimizer state saved by another backend."""


def with_own_implementation_flags(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the optimizer ``state`` whose parameter groups carry ``optimizer``'s implementation flags
    (torch.optim would otherwise adopt the saved ones: a reference checkpoint would turn a fused Adam into a plain one).
    A copy also keeps this learner's Adam moments apart from whoever else holds ``state``'s tensors."""
    state = copy.deepcopy(state)
    for saved, own in zip(state["param_groups"], optimizer.param_groups, strict=True):
        saved.update({flag: own[flag] for flag in IMPLEMENTATION_FLAGS if flag in own})
    return state


def entropy_coefficient_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """``-mean(log(alpha) * (log pi + target_entropy))``: its gradient raises alpha while the policy's entropy
    ``-log pi`` is below ``target_entropy`` and lowers it above."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


class SACLearner:
    """Actor, critic ensemble, target critics and entropy coefficient, with their optimizers.

    Deterministic on CPU for a given ``seed`` (weights initialisation, exploration noise and REDQ subsets all come
    from generators seeded here, never from the global RNG).
    """

    METRICS = ("critic_loss", "actor_loss", "alpha_loss", "alpha", "q_mean", "target_q_mean", "entropy")

    def __init__(self, config: SACConfig, architecture: PolicyArchitecture, device: str | torch.device = "auto",
                 seed: int = 0) -> None:
        self.config = config
        self.architecture = architecture
        self.device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor: Actor = build_actor(architecture).to(self.device)
            self.critics = CriticEnsemble(architecture, n=config.redq_n).to(self.device)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=self.device, requires_grad=config.learn_alpha)
        self.target_entropy = float(-architecture.action_dim if config.target_entropy is None else config.target_entropy)

        # Each network's parameters become views of one flat tensor, so that Adam, zeroing gradients and the polyak
        # step are one operation per network instead of one per weight tensor.
        self._critic_flat = _flat_parameter(self.critics)
        self._actor_flat = _flat_parameter(self.actor)
        self._target_flat = _flat_parameter(self.target_critics)
        groups = [{"params": [self._critic_flat], "lr": config.critic_lr, "name": "critics"},
                  {"params": [self._actor_flat], "lr": config.actor_lr, "name": "actor"}]
        if config.learn_alpha:
            self.log_alpha.grad = torch.zeros_like(self.log_alpha)
            groups.append({"params": [self.log_alpha], "lr": config.alpha_lr, "name": "log_alpha"})
        self.optimizer = torch.optim.Adam(groups, fused=self.device.type in ("cpu", "cuda"))
        self._gradients = [group["params"][0].grad for group in groups]
        self.learning_rates_overridden: dict[str, tuple[float, float]] = {}
        """``{config field: (saved rate, configured rate in use)}`` for each rate the config changed at the last
        :meth:`load_state_dict`: the saved optimizer state brings its own rates, and the config wins."""
        self._adam_calls: list[tuple[dict[str, Any], list[torch.Tensor]]] | None = None
        """Per parameter group: its hyperparameters and the tensor lists of one fused Adam call (see :meth:`_adam_step`);
        ``None`` until the optimizer has state, and again after :meth:`load_state_dict` replaces it."""

        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.guard = UpdateGuard(self.device)
        self.updates = 0
        """Update steps taken, the ones :attr:`guard` rejected included."""
        self._shared_features = self.critics.shares_encoder and not any(True for _ in self.actor.encoder.parameters())

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def _features(self, observation: tuple[torch.Tensor, ...], critics: CriticEnsemble) -> tuple[torch.Tensor, torch.Tensor]:
        """(actor features, ``critics``' features); one flatten for both when no encoder has parameters (MLP)."""
        if self._shared_features:
            features = self.actor.encoder(observation)
            return features, features
        return self.actor.encoder(observation), critics.encode(observation)

    def _critic_subset(self, q_values: torch.Tensor) -> torch.Tensor:
        return critic_subset(q_values, self.config.redq_m, self.generator)

    def update(self, batch: TransitionBatch, with_metrics: bool = True) -> dict[str, float]:
        """One gradient step on critics, actor and alpha, then a polyak step on the target critics.

        Returns the metrics named in :attr:`METRICS` (an empty dict when ``with_metrics`` is False, which avoids a
        device synchronisation per update on GPU).
        """
        batch = batch.to(self.device)
        gamma, tau = self.config.gamma, self.config.tau
        alpha = self.log_alpha.detach().exp()

        # 1. critic target: bootstrap unless the episode terminated (a truncated episode still bootstraps)
        with torch.no_grad():
            next_actor_features, next_critic_features = self._features(batch.next_observation, self.target_critics)
            next_action, next_log_prob = self.actor.policy(next_actor_features, generator=self.generator)
            next_q = self._critic_subset(self.target_critics.q_values(next_critic_features, next_action)).min(dim=0).values
            target_q = soft_td_target(batch.reward, batch.terminated, next_q, next_log_prob, alpha, gamma)

        # 2. critic loss
        actor_features, critic_features = self._features(batch.observation, self.critics)
        observation_part = self.critics.observation_part(critic_features)
        q_values = self.critics.head(observation_part, batch.action)
        critic_loss = 0.5 * (q_values - target_q).pow(2).mean(dim=1).sum()

        # 3. actor loss: the critics act as fixed functions of the action (frozen weights, detached features); the
        # critic loss has read observation_part and autograd did not save it, so this head may overwrite it
        action, log_prob = self.actor.policy(actor_features, generator=self.generator)
        if self.config.redq_m == self.config.redq_n:
            q_policy = self.critics.frozen_min(observation_part.detach(), action)
        else:
            q_policy = self.critics.head(observation_part.detach(), action, frozen=True, consume=True).mean(dim=0)
        actor_loss = (alpha * log_prob - q_policy).mean()

        # 4. entropy coefficient loss
        alpha_loss = entropy_coefficient_loss(self.log_alpha, log_prob, self.target_entropy)

        # One backward and one Adam step for all three: each loss reaches only its own parameters.
        learned_alpha_loss = alpha_loss if self.config.learn_alpha else None
        total_loss = critic_loss + actor_loss + (0.0 if learned_alpha_loss is None else learned_alpha_loss)
        torch._foreach_zero_(self._gradients)  # in place: the networks' gradients are views of these
        total_loss.backward()
        # 6. the guard: 1.0 when a loss or gradient is not finite; Adam and the polyak step then change nothing
        rejected = self.guard.check(critic_loss, actor_loss, learned_alpha_loss, self._gradients)
        self._adam_step(rejected)

        # 5. target critics
        with torch.no_grad():
            self._target_flat.lerp_(self._critic_flat, tau * (1.0 - rejected))
        self.updates += 1

        if not with_metrics:
            return {}
        values = torch.stack([critic_loss.detach(), actor_loss.detach(), alpha_loss.detach(), alpha,
                              q_values.detach().mean(), target_q.mean(), -log_prob.detach().mean()]).tolist()
        return dict(zip(self.METRICS, values, strict=True))

    def _adam_step(self, rejected: torch.Tensor) -> None:
        """``self.optimizer.step()`` as the fused Adam kernel calls it makes, without the optimizer's per-step Python
        bookkeeping (about 2% of a CPU update at batch 256). The first step, and every step off the CPU, goes through
        ``optimizer.step()``, which creates the state; results are bit-identical (tested), and the state stays in
        ``self.optimizer``, so checkpoints are unchanged. ``rejected`` (1.0 or 0.0, from the guard) is the fused
        kernel's ``found_inf``: at 1.0 weights, moments and step count stay as they were."""
        if not self.optimizer.defaults["fused"]:  # only the fused kernels take found_inf; elsewhere, ask the host
            if not bool(rejected):
                self.optimizer.step()
            return
        if self._adam_calls is None:
            self.optimizer.found_inf = rejected  # read by Adam.step, as GradScaler sets it
            self.optimizer.step()
            if self.device.type == "cpu" and self.optimizer.defaults["fused"] and not self.optimizer.defaults["amsgrad"]:
                self._adam_calls = []
                for group in self.optimizer.param_groups:
                    (parameter,) = group["params"]
                    state = self.optimizer.state[parameter]
                    self._adam_calls.append((group, [parameter.detach(), parameter.grad, state["exp_avg"],
                                                     state["exp_avg_sq"], state["step"]]))
            return
        for group, (parameter, gradient, exp_avg, exp_avg_sq, step) in self._adam_calls:
            beta1, beta2 = group["betas"]
            step.add_(1.0 - rejected)
            torch._fused_adam_([parameter], [gradient], [exp_avg], [exp_avg_sq], [], [step], amsgrad=group["amsgrad"],
                               lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                               eps=group["eps"], maximize=group["maximize"], found_inf=rejected)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit (nested dicts of tensors and plain values)."""
        return {
            "actor": self.actor.state_dict(),
            "critics": self.critics.state_dict(),
            "target_critics": self.target_critics.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of a learner with the same config and architecture)."""
        self.actor.load_state_dict(state["actor"])
        self.critics.load_state_dict(state["critics"])
        self.target_critics.load_state_dict(state["target_critics"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        # a copy: torch.optim keeps the given state tensors themselves (no copy when dtype and device already match),
        # which would tie this learner's Adam moments to whoever else holds them (a live learner's state_dict(), say)
        self.optimizer.load_state_dict(with_own_implementation_flags(self.optimizer, state["optimizer"]))
        self._adam_calls = None  # the loaded state tensors replace the ones the direct calls held
        self.learning_rates_overridden = {}
        for group in self.optimizer.param_groups:  # the config wins over the saved rates (issue 13, finding 7)
            field = LEARNING_RATE_FIELDS[group["name"]]
            configured = getattr(self.config, field)
            if group["lr"] != configured:
                self.learning_rates_overridden[field] = (group["lr"], configured)
                group["lr"] = configured
        self.generator.set_state(state["generator"].cpu())
        self.updates = int(state["updates"])
