"""Soft Actor-Critic (Haarnoja et al. 2018, with learned entropy coefficient) and its REDQ variant (Chen et al. 2021):
the config and the maths every learner backend shares.

The update, whichever backend computes it (:func:`tmrl_trainer.learner.make_learner`):

1. **critic target**  ``y = r + gamma * (1 - terminated) * (min_{i in M} Q'_i(s', a') - alpha * log pi(a'|s'))``
   with ``a' ~ pi(.|s')``. Only *termination* stops the bootstrap: a time-limit truncation is not a terminal state,
   so its target still includes the next state's value. ``M`` is all critics for SAC (twin critics, ``n = m = 2``)
   or ``m`` of the ``n`` critics drawn at random each update for REDQ. With n-step returns (``n_step > 1``) ``r`` is
   the discounted sum of up to ``n_step`` rewards, ``s'`` the state after the last of them and ``gamma`` becomes
   ``gamma^k`` for the ``k`` rewards summed (:attr:`TransitionBatch.discount <tmrl_trainer.memory.TransitionBatch.discount>`).
2. **critic loss**  ``0.5 * sum_i mean_b (Q_i(s, a) - y)^2``.
3. **actor loss**  ``mean_b (alpha * log pi(a~|s) - Q(s, a~))`` with ``a~ ~ pi(.|s)`` reparameterised; ``Q`` is the
   min over the critics for SAC and their mean for REDQ; the critics' weights are detached here, so this loss only
   trains the actor.
4. **entropy coefficient loss**  ``-mean_b log(alpha) * (log pi(a~|s) + target_entropy)``: alpha grows when the
   policy's entropy ``-log pi`` falls below ``target_entropy`` (default ``-action_dim``) and shrinks otherwise.
   ``log pi`` is detached, so this loss only trains ``log(alpha)``.
5. With ``update_order = "critic-first"`` (the default) the critics take their Adam step first and the actor's loss
   (step 3) is then computed against the critics just updated, as Stable-Baselines3, SpinningUp and CleanRL do. With
   ``"joint"`` all three losses are computed at the same parameters and applied by one Adam step (as in the original
   SAC implementation, which ran its three train ops together). (Alpha's loss does not involve the
   critics, so it is the same in both orders; the target and the actor loss use the alpha from before the update in
   both). Then the **target critics** move by polyak averaging ``theta' <- (1 - tau) * theta' + tau * theta``.
6. **The guard** (:mod:`tmrl_trainer.guard`): between the backward pass and the Adam step, an update whose losses or
   gradients are not finite is marked rejected; Adam then leaves weights and moments as they were and the target
   critics do not move. In the ``critic-first`` order a non-finite critic loss or gradient skips the whole update
   likewise; a non-finite actor or alpha loss or gradient, which is only known after the critics have stepped, skips
   the actor's and alpha's steps and the polyak step. Rejected updates still count in the learner's ``updates`` (the update-to-data cap and the
   publishing cadence do not change) and are counted apart by its ``guard``.

:class:`tmrl_trainer.reference.ReferenceLearner` writes this in plain PyTorch and is the truth the other backends
(:mod:`tmrl_trainer.cpu_fast`, :mod:`tmrl_trainer.cuda_graph`) are tested against.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tmrl_common.layout import ObservationLayout
from tmrl_common.networks import MAX_CONV_CHANNELS, MAX_LAYER_WIDTH, Activation, PolicyArchitecture

if TYPE_CHECKING:
    from tmrl_trainer.memory import TransitionBatch

UpdateOrder = Literal["joint", "critic-first"]
"""When the actor's loss is computed (module docstring, step 5): at the same critics as the critic loss and applied
by one Adam step (``joint``), or after the critics' Adam step, against the updated critics (``critic-first``)."""

Backend = Literal["auto", "reference", "cpu-fast", "cpu-compiled", "cuda-graph"]
Sampling = Literal["auto", "host", "device"]
"""Which learner runs the update (:func:`tmrl_trainer.learner.make_learner`); ``auto``: ``cuda-graph`` on a CUDA
device, ``cpu-fast`` otherwise."""

LEARNING_RATE_FIELDS = {"critics": "critic_lr", "actor": "actor_lr", "log_alpha": "alpha_lr"}
"""The :class:`SACConfig` field holding the learning rate of each optimizer parameter group."""


def check_batch_fits_the_memory(sac: SACConfig, memory_capacity: int) -> None:
    """A ValueError when ``sac.batch_size`` exceeds ``memory_capacity`` and the trainer would learn (a probe's batch
    of 1,048,576 from 1,000 rows ran 16 updates a minute, each repeating every row a thousand times). An ingest-only
    trainer (``learning_starts`` above the capacity) never samples one."""
    if sac.batch_size > memory_capacity >= sac.learning_starts:
        raise ValueError(f"sac.batch_size ({sac.batch_size}) exceeds memory_capacity ({memory_capacity}): a minibatch "
                         "cannot be larger than the replay memory it is drawn from")


class SACConfig(BaseModel):
    """Hyperparameters of the learner (table ``[trainer.sac]``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or infinity is never a learning setting

    gamma: float = Field(default=0.99, ge=0.0, le=1.0)
    n_step: int = Field(default=1, ge=1, le=64)
    """Rewards summed per sampled transition before the critics' target bootstraps (n-step returns, discounted by
    ``gamma``, with ``gamma^k`` on the bootstrap; cut short where the episode ended: :mod:`tmrl_trainer.memory`).
    1: the one-step target of SAC. Larger values carry a reward back faster, at the price of a bias (the rewards
    are those of the policy that acted, not of the current one; nothing corrects for it)."""
    reward_scale: float = Field(default=1.0, gt=0.0, le=1e6)
    """Every reward is multiplied by this in the critics' target (the SAC paper's reward scale; Q values, and with a
    learned alpha alpha itself, come out in scaled units). 1: rewards as the env gives them."""
    tau: float = Field(default=0.005, gt=0.0, le=1.0)
    """Polyak coefficient of the target critics (1: hard copy every update)."""
    actor_lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    critic_lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    alpha_lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    """(Each at most 1: a probe's 1e30 had every update thrown away by the guard, the run exiting 0.)"""
    batch_size: int = Field(default=256, ge=1, le=2**20)
    hidden_sizes: list[Annotated[int, Field(ge=1, le=MAX_LAYER_WIDTH)]] = Field(
        default_factory=lambda: [256, 256], min_length=1, max_length=8)
    activation: Activation = "relu"
    conv_channels: list[Annotated[int, Field(ge=1, le=MAX_CONV_CHANNELS)]] = Field(
        default_factory=lambda: [16, 32, 64, 64], min_length=1, max_length=8)
    """Image observations only: output channels of each 4x4 stride-2 convolution of the CNNs (actor and each critic)."""
    init_alpha: float = Field(default=1.0, gt=0.0, le=1e6)
    learn_alpha: bool = True
    target_entropy: float | None = None
    """Entropy the learned alpha steers towards; ``None`` means ``-action_dim``."""
    critic_layer_norm: bool = False
    """A LayerNorm (per critic, with its own gain and bias) on each hidden layer of the critics, before the activation
    (the critics of RLPD and DroQ, meant to keep Q values from drifting at high update rates; on the simulator's
    ``hairpins`` it did not help, docs/tuning.md). The ``cpu-fast`` backend computes plain critics only, so on a CPU
    ``auto`` then picks ``reference``."""
    redq_n: int = Field(default=2, ge=1)
    """Number of critics (2: twin critics of SAC)."""
    redq_m: int = Field(default=2, ge=1)
    """Critics the target takes the minimum over, drawn at random each update (``redq_m == redq_n``: plain SAC)."""
    utd: float = Field(default=1.0, gt=0.0, le=1000.0)
    """Updates per environment step received (update-to-data ratio; REDQ uses large values like 20)."""
    learning_starts: int = Field(default=1000, ge=1)
    """Rows in the replay memory before the first update."""
    update_order: UpdateOrder = "critic-first"
    """``critic-first``: the critics step first and the actor learns against the updated critics (the order of
    Stable-Baselines3, SpinningUp and CleanRL); ``joint``: the three losses at the same parameters, one Adam step (the
    original SAC code's order; one product fewer: 2-8 % faster at one CPU thread, no faster at two). Every backend
    computes both."""
    backend: Backend = "auto"
    """The learner implementation: ``reference`` (plain PyTorch, the oracle), ``cpu-fast``, ``cpu-compiled`` (cpu-fast
    compiled by ``torch.compile``: faster on a CPU, but each process compiles first, which takes seconds and a C++
    compiler), ``cuda-graph`` or ``auto``. Every backend computes the same update and reads and writes the same
    checkpoints."""
    sampling: Sampling = "auto"
    """Where the trainer service draws its minibatches: ``host`` (:meth:`ReplayMemory.sample
    <tmrl_trainer.memory.ReplayMemory.sample>`), ``device`` (a mirror of the replay memory on the learner's device,
    :mod:`tmrl_trainer.device_replay`; the ``cuda-graph`` backend draws inside its graph) or ``auto``: ``device``
    for the ``cuda-graph`` backend on CUDA, ``host`` otherwise. Both draw uniformly from the same transitions."""

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


def soft_td_target(reward: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, next_log_prob: torch.Tensor,
                   alpha: torch.Tensor | float, gamma: torch.Tensor | float, reward_scale: float = 1.0) -> torch.Tensor:
    """``reward_scale * r + gamma * (1 - terminated) * (Q'(s', a') - alpha * log pi(a'|s'))``: no bootstrap past a
    terminal state; a truncated (time-limit) step is not terminal, so it is not an argument here. ``gamma`` is a
    number, or per transition ``γ^k`` for n-step returns (:attr:`TransitionBatch.discount
    <tmrl_trainer.memory.TransitionBatch.discount>`)."""
    scaled = reward if reward_scale == 1.0 else reward * reward_scale
    return scaled + gamma * (1.0 - terminated) * (next_q - alpha * next_log_prob)


def bootstrap_discount(batch: TransitionBatch, gamma: float) -> torch.Tensor | float:
    """The factor of ``batch``'s bootstrap term: its per-transition ``γ^k`` (n-step returns), else ``gamma``."""
    return gamma if batch.discount is None else batch.discount


def critic_subset(q_values: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """REDQ: ``m`` of the ``n`` rows of ``q_values`` drawn without replacement (all of them, untouched, when ``m == n``).
    Drawn as the first ``m`` of a random permutation made by sorting ``n`` uniforms, which is graph-capturable on CUDA
    (``randperm`` is not) and gives every backend the same draw from the same generator state."""
    return keep_critics(q_values, draw_critic_subset(q_values.shape[0], m, generator, q_values.device))


def keep_critics(q_values: torch.Tensor, subset: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``q_values`` that :func:`draw_critic_subset` drew (all of them for ``None``)."""
    return q_values if subset is None else q_values.index_select(0, subset)


def draw_critic_subset(n: int, m: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
    """The rows :func:`critic_subset` keeps (``None``: all of them, nothing drawn), drawn from ``generator`` as it
    draws them: for a learner that must take this draw before others that it computes earlier."""
    if m == n:
        return None
    return torch.rand(n, generator=generator, device=device).argsort()[:m]


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


def __getattr__(name: str) -> Any:
    # SACLearner lived here before the backends were split (issue 16): ``from tmrl_trainer.sac import SACLearner``
    # keeps working, resolved on first use because cpu_fast imports this module
    if name == "SACLearner":
        from tmrl_trainer.cpu_fast import SACLearner

        return SACLearner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
