"""The ``cpu-compiled`` learner backend: ``cpu-fast``'s update written as explicit forward and backward passes,
without autograd, and compiled by ``torch.compile`` (inductor: the matrix products stay BLAS calls, the element-wise
operators between them become a few fused C++ loops, and no Python runs between them).

The passes are ``cpu-fast``'s own hand-written ones, called as plain functions (:func:`~tmrl_common.networks.
relu_policy_pair`, :func:`~tmrl_common.networks.relu_policy_backward`, :func:`~tmrl_common.networks.relu_critic_q`,
:func:`~tmrl_common.networks.relu_critic_backward`, :func:`~tmrl_common.networks.relu_critic_action_gradient`), so
the products and their order are ``cpu-fast``'s; what changes is that autograd's engine, the Python between 300
dispatched operators and most passes over memory are gone. Each update runs three compiled graphs:

1. the policy at the next and current observations, the critic target, the critic loss and its gradient, written
   into the critics' flat gradient;
2. the policy loss's critics (after the critics' Adam step in the ``critic-first`` order), the actor and alpha losses
   and alpha's gradient; then, eagerly, the gradient of ``min_i Q_i`` through each row's winning critic (its row
   counts change every update, which a static graph cannot hold; REDQ's mean over the critics goes in the graph);
3. the actor's gradient, written into its flat gradient.

Adam (``torch._fused_adam_``), the guard and the polyak step are ``cpu-fast``'s. Tested against the reference like
every backend (``tests/trainer/test_cpu_compiled.py``); computes the MLP (parameter-free encoder) with ReLU and plain
critics, on the CPU. The first update compiles (seconds; inductor caches the result on disk for later processes),
and each new batch size or architecture compiles again. Where compiling fails (no C++ compiler, for one), the
learner says so once in the log and goes on with ``cpu-fast``'s update, from the same random state.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tmrl_common.networks import (
    PolicyArchitecture,
    critic_observation_part,
    relu_critic_action_gradient,
    relu_critic_backward,
    relu_critic_q,
    relu_policy_backward,
    relu_policy_pair,
)

from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.guard import non_finite
from tmrl_trainer.memory import TransitionBatch
from tmrl_trainer.sac import SACConfig, draw_critic_subset, entropy_coefficient_loss, keep_critics, soft_td_target

log = logging.getLogger(__name__)


Shapes = tuple[tuple[int, ...], ...]
"""A network's parameter shapes in its parameter order (a graph's constant: the flat tensor is cut into views by it)."""


def parameter_shapes(module: torch.nn.Module) -> Shapes:
    """``module``'s parameter shapes in its parameter order, the order of its flat parameter (``cpu_fast``)."""
    return tuple(tuple(parameter.shape) for parameter in module.parameters())


def _views(flat: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
    """The parameters of a flat tensor laid out by ``shapes``, as views."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].view(shape))
        offset += size
    return views


def _split_actor(flat: torch.Tensor, shapes: Shapes) -> tuple[Any, ...]:
    """(mean weight, mean bias, log-std weight, log-std bias, trunk weights, trunk biases) of a flat actor."""
    *trunk, mean_weight, mean_bias, log_std_weight, log_std_bias = _views(flat, shapes)
    return mean_weight, mean_bias, log_std_weight, log_std_bias, trunk[0::2], trunk[1::2]


def _split_critics(flat: torch.Tensor, shapes: Shapes) -> tuple[Any, ...]:
    """(observation weight, action weight, first bias, later weights, later biases) of a flat critic ensemble."""
    observation_weight, action_weight, first_bias, *layers = _views(flat, shapes)
    return observation_weight, action_weight, first_bias, layers[: len(layers) // 2], layers[len(layers) // 2 :]


def _write_flat(out: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Write ``tensors`` one after another into the flat ``out``; returns their squared norm (for the guard)."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    out.copy_(flat)
    return flat.square().sum()


def critic_step(features: torch.Tensor, next_features: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                terminated: torch.Tensor, discount: torch.Tensor, noise: torch.Tensor, next_noise: torch.Tensor,
                alpha: torch.Tensor, subset: torch.Tensor | None, actor: torch.Tensor, critics: torch.Tensor,
                targets: torch.Tensor, critic_gradient: torch.Tensor, actor_shapes: Shapes, critic_shapes: Shapes,
                log_std_min: float, log_std_max: float, reward_scale: float) -> tuple[torch.Tensor, ...]:
    """Graph 1: the policy at both observation sets, the critic target and loss, and the loss's gradient written into
    ``critic_gradient`` (the critics' flat gradient). ``actor``, ``critics`` and ``targets`` are the networks' flat
    parameters, cut by ``actor_shapes`` and ``critic_shapes``. Returns the critic loss, the gradient's squared norm,
    the means of Q and of the target, the policy's action and log-probability, and what :func:`actor_step` reads."""
    rows = features.shape[0]
    mean_weight, mean_bias, log_std_weight, log_std_bias, weights, biases = _split_actor(actor, actor_shapes)
    action_pi, log_prob, next_action, next_log_prob, saved = relu_policy_pair(
        features, next_features, noise, next_noise, log_std_min, log_std_max, mean_weight, mean_bias, log_std_weight,
        log_std_bias, weights, biases)
    # 1. critic target: bootstrap unless the episode terminated
    observation_weight, action_weight, first_bias, weights, biases = _split_critics(targets, critic_shapes)
    next_q, _ = relu_critic_q(critic_observation_part(next_features, first_bias, observation_weight), next_action,
                              action_weight, weights, biases)
    next_q = keep_critics(next_q, subset).min(dim=0).values
    target_q = soft_td_target(reward, terminated, next_q, next_log_prob, alpha, discount, reward_scale)
    # 2. critic loss 0.5 * sum_i mean_b (Q_i - y)^2 and its gradient
    observation_weight, action_weight, first_bias, weights, biases = _split_critics(critics, critic_shapes)
    q_values, hidden = relu_critic_q(critic_observation_part(features, first_bias, observation_weight), action,
                                     action_weight, weights, biases)
    error = q_values - target_q
    critic_loss = 0.5 * error.pow(2).mean(dim=1).sum()
    grad_part, _, grad_action_weight, grad_weights, grad_biases = relu_critic_backward(
        error * (1.0 / rows), action, action_weight, weights, hidden, action_gradient=False)
    grad_observation_weight = torch.bmm(features.expand(q_values.shape[0], -1, -1).transpose(1, 2), grad_part)
    square_norm = _write_flat(critic_gradient, [grad_observation_weight, grad_action_weight,
                                                grad_part.sum(dim=1, keepdim=True), *grad_weights, *grad_biases])
    return critic_loss, square_norm, q_values.mean(), target_q.mean(), action_pi, log_prob, *saved


def policy_critics(features: torch.Tensor, action_pi: torch.Tensor, log_prob: torch.Tensor, alpha: torch.Tensor,
                   log_alpha: torch.Tensor, critics: torch.Tensor, critic_shapes: Shapes, target_entropy: float,
                   mean_of_critics: bool) -> tuple[Any, ...]:
    """Graph 2: the critics (frozen) at the policy's actions, the actor and alpha losses and alpha's gradient; then
    the action gradient of ``mean_i Q_i`` (REDQ, ``mean_of_critics``), or what the eager minimum's backward needs."""
    rows = features.shape[0]
    observation_weight, action_weight, first_bias, weights, biases = _split_critics(critics, critic_shapes)
    q_values, hidden = relu_critic_q(critic_observation_part(features, first_bias, observation_weight), action_pi,
                                     action_weight, weights, biases)
    alpha_loss = entropy_coefficient_loss(log_alpha, log_prob, target_entropy)
    grad_log_alpha = -(log_prob + target_entropy).mean()
    if mean_of_critics:
        actor_loss = (alpha * log_prob - q_values.mean(dim=0)).mean()
        grad_q = torch.full_like(q_values, -1.0 / (rows * q_values.shape[0]))
        grad_action = relu_critic_action_gradient(grad_q, action_weight, weights, hidden)
        return actor_loss, alpha_loss, grad_log_alpha, grad_action
    q_min, winner = q_values.min(dim=0)
    actor_loss = (alpha * log_prob - q_min).mean()
    return actor_loss, alpha_loss, grad_log_alpha, winner, *hidden


def actor_step(grad_action: torch.Tensor, alpha: torch.Tensor, saved: Sequence[torch.Tensor],
               actor_gradient: torch.Tensor) -> torch.Tensor:
    """Graph 3: the actor's gradient from the policy loss ``mean_b(alpha log pi - Q)``, written into
    ``actor_gradient`` (its flat gradient); returns its squared norm."""
    grad_log_prob = (alpha * (1.0 / grad_action.shape[0])).expand(grad_action.shape[0])
    _, grad_mean_weight, grad_mean_bias, grad_log_std_weight, grad_log_std_bias, grad_weights, grad_biases = (
        relu_policy_backward(saved, grad_action, grad_log_prob, input_gradient=False))
    trunk = [gradient for pair in zip(grad_weights, grad_biases, strict=True) for gradient in pair]
    return _write_flat(actor_gradient, [*trunk, grad_mean_weight, grad_mean_bias, grad_log_std_weight,
                                        grad_log_std_bias])


class CompiledLearner(SACLearner):
    """``cpu-fast``'s update as three compiled graphs (backend ``cpu-compiled``; module docstring)."""

    GRAPHS: dict[str, Callable[..., Any]] = {}
    """The compiled graphs, made on first use and shared by every learner of the process (``torch.compile`` keeps
    one compiled version per batch size and architecture)."""

    def __init__(self, config: SACConfig, architecture: PolicyArchitecture, device: str | torch.device = "auto",
                 seed: int = 0, compiled: bool = True) -> None:
        if not self.computes(config, architecture):
            raise ValueError("the cpu-compiled backend computes MLP observations with ReLU and plain critics; this "
                             "config needs the cpu-fast or the reference backend (backend = \"auto\" picks one)")
        super().__init__(config, architecture, device=device, seed=seed)
        if self.device.type != "cpu":
            raise ValueError(f"the cpu-compiled backend computes on the CPU, not {self.device}; on CUDA use cuda-graph")
        self.compiled = compiled
        """Whether the three graphs run compiled (False: the same functions eagerly, as the tests of the maths run
        them)."""
        self.compile_failure: str | None = None
        """Why compiling failed (then this learner computes ``cpu-fast``'s update); ``None`` while it has not."""
        self._compiled_once = False
        """Whether this learner's first update ran its compiled graphs (the first one of a process, or after a
        checkpoint, compiles them or finds them compiled)."""
        self._actor_shapes = parameter_shapes(self.actor)
        self._critic_shapes = parameter_shapes(self.critics)

    @staticmethod
    def computes(config: SACConfig, architecture: PolicyArchitecture | None = None) -> bool:
        """Whether this backend computes ``config``'s update for ``architecture``: ReLU, plain critics and, given
        an architecture, an MLP one (its encoders have no parameters)."""
        return (SACLearner.computes(config) and config.activation == "relu"
                and (architecture is None or architecture.kind == "mlp"))

    def _graph(self, function: Callable[..., Any]) -> Callable[..., Any]:
        if not self.compiled:
            return function
        graph = self.GRAPHS.get(function.__name__)
        if graph is None:
            graph = self.GRAPHS[function.__name__] = torch.compile(function, fullgraph=True, dynamic=False)
        return graph

    def update(self, batch: TransitionBatch, with_metrics: bool = True) -> dict[str, float]:
        """One update, as :meth:`SACLearner.update <tmrl_trainer.cpu_fast.SACLearner.update>` computes it."""
        if self.compile_failure is not None:
            return super().update(batch, with_metrics)
        if not self.compiled or self._compiled_once:
            return self._update(batch, with_metrics)
        log.info("cpu-compiled: the first update compiles the learner's update (seconds; torch keeps the result on "
                 "disk, and a later start with the same nets and batch size finds it)")
        started = time.monotonic()
        generator_state = self.generator.get_state()
        try:
            metrics = self._update(batch, with_metrics)
        except Exception as exc:  # compiling needs a working C++ toolchain; without one, cpu-fast computes the same
            first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
            self.compile_failure = f"{type(exc).__name__}: {first_line}".rstrip(": ")
            log.warning("cpu-compiled: the update could not be compiled (%s); this learner goes on with cpu-fast's "
                        "update, which computes the same", self.compile_failure)
            self.generator.set_state(generator_state)
            return super().update(batch, with_metrics)
        self._compiled_once = True
        log.info("cpu-compiled: first update done in %.1f s", time.monotonic() - started)
        return metrics

    def _update(self, batch: TransitionBatch, with_metrics: bool) -> dict[str, float]:
        config = self.config
        batch = batch.to(self.device)
        alpha = self.log_alpha.detach().exp()
        rows = batch.action.shape[0]
        with torch.no_grad():
            features = self.actor.encoder(batch.observation)
            next_features = self.actor.encoder(batch.next_observation)
            next_noise = self._standard_normal(batch.action)
            subset = draw_critic_subset(config.redq_n, config.redq_m, self.generator, self.device)
            noise = self._standard_normal(batch.action)
            discount = (batch.discount if batch.discount is not None
                        else torch.full((rows,), config.gamma, dtype=batch.reward.dtype))
            critics = self._critic_flat.detach()
            critic_loss, critic_square_norm, q_mean, target_mean, action_pi, log_prob, *saved = self._graph(critic_step)(
                features, next_features, batch.action.contiguous(), batch.reward, batch.terminated, discount, noise, next_noise,
                alpha, subset, self._actor_flat.detach(), critics, self._target_flat.detach(), self._critic_flat.grad,
                self._actor_shapes, self._critic_shapes, self.architecture.log_std_min, self.architecture.log_std_max,
                config.reward_scale)
            if self.compiled and not self._compiled_once and config.update_order == "critic-first":
                # compile the actor's graphs before anything changes weights, so that a failure to compile them can
                # still fall back to cpu-fast (update); their results at the critics before the step are dropped
                self._actor_gradient(features, action_pi, log_prob, alpha, critics, saved)
            critic_rejected = None
            if config.update_order == "critic-first":  # the critics step first; the actor's loss then sees them
                critic_rejected = non_finite(critic_loss, square_norm=critic_square_norm)
                self._adam_step(critic_rejected, groups=("critics",))
            actor_loss, alpha_loss, grad_log_alpha, actor_square_norm = self._actor_gradient(
                features, action_pi, log_prob, alpha, critics, saved)
            square_norm = critic_square_norm + actor_square_norm
            learned_alpha_loss = None
            if config.learn_alpha:
                self.log_alpha.grad.copy_(grad_log_alpha)
                learned_alpha_loss = alpha_loss
                square_norm = square_norm + grad_log_alpha.square()
            self._guarded_step(critic_loss, actor_loss, learned_alpha_loss, critic_rejected, square_norm)
        if not with_metrics:
            return {}
        return self._metrics(critic_loss, actor_loss, alpha_loss, alpha, q_mean, target_mean, log_prob)

    def _actor_gradient(self, features: torch.Tensor, action_pi: torch.Tensor, log_prob: torch.Tensor,
                        alpha: torch.Tensor, critics: torch.Tensor, saved: Sequence[torch.Tensor],
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graphs 2 and 3, and the minimum's backward between them: the actor's gradient written into its flat
        gradient; returns the actor loss, the alpha loss, alpha's gradient and the actor gradient's squared norm."""
        rows = features.shape[0]
        mean_of_critics = self.config.redq_m != self.config.redq_n
        actor_loss, alpha_loss, grad_log_alpha, *rest = self._graph(policy_critics)(
            features, action_pi, log_prob, alpha, self.log_alpha.detach(), critics, self._critic_shapes,
            self.target_entropy, mean_of_critics)
        if mean_of_critics:
            (grad_action,) = rest
        else:  # the minimum's gradient through each row's winning critic, eagerly (its row counts vary)
            winner, *hidden = rest
            _, action_weight, _, weights, _ = _split_critics(critics, self._critic_shapes)
            grad_action = relu_critic_action_gradient(torch.full((rows,), -1.0 / rows), action_weight, weights,
                                                      hidden, winner)
        actor_square_norm = self._graph(actor_step)(grad_action, alpha, saved, self._actor_flat.grad)
        return actor_loss, alpha_loss, grad_log_alpha, actor_square_norm

