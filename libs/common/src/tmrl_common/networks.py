"""Policy and critic networks, defined once for worker inference and trainer learning (needs the ``torch`` extra).

* :class:`PolicyArchitecture` describes a network completely; it travels in
  :attr:`WeightsUpdate.architecture <tmrl_common.protocol.WeightsUpdate.architecture>` as a flat dict
  (:meth:`PolicyArchitecture.to_flat_dict` / :meth:`PolicyArchitecture.from_flat_dict`).
* :class:`ObservationEncoder` turns the observation tuple into one feature vector: for ``mlp`` every part is
  flattened (and multiplied by its component's ``scale`` when the layout declares one) and concatenated in layout
  order; for ``cnn`` the uint8 image history goes through a small CNN
  (history frames as channels, scaled to [0, 1]) and the other parts are flattened and appended.
* :class:`Actor` is the squashed-Gaussian SAC policy; :meth:`Actor.act` is what a worker calls each step.
* :class:`CriticEnsemble` holds N Q-functions evaluated together with batched matrix products (critics never travel).
* :func:`weights_update_from_actor`, :func:`actor_from_weights_update`, :func:`load_weights_into` convert between an
  actor and the wire message (tensors as safetensors bytes, never pickle); :func:`read_policy_file` reads a policy
  file (the same tensors, the architecture and version in the safetensors metadata).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as exc:  # the relay installs tmrl-common without the torch extra
    raise ImportError("tmrl_common.networks needs torch: install tmrl-common[torch] (the relay never needs it)") from exc

from tmrl_common.atomic_file import read_regular_file
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationComponent, ObservationLayout, image_shape_problem
from tmrl_common.protocol import ArchitectureValue, WeightsUpdate
from tmrl_common.weights import tensors_from_bytes, tensors_to_bytes

Activation = Literal["relu", "tanh", "elu", "silu"]
# In place: each activation overwrites the fresh output of the layer before it (which that layer's backward does not
# need), saving an allocation and a pass over memory per layer.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True), "tanh": nn.Tanh, "elu": lambda: nn.ELU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True)}
_FUNCTIONAL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_, "tanh": torch.tanh_, "elu": lambda x: F.elu(x, inplace=True), "silu": lambda x: F.silu(x, inplace=True)}
_PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "tanh": torch.tanh, "elu": F.elu, "silu": F.silu}
"""Out-of-place activations, for :meth:`CriticEnsemble.forward` (the plain form the reference learner reads)."""


def is_image_component(component: ObservationComponent) -> bool:
    """Image parts (uint8 frames of 2 or 3 dimensions: ``[H, W]`` or ``[C, H, W]``) go through the CNN."""
    return component.dtype == "uint8" and len(component.frame_shape) in (2, 3)


MAX_LAYER_WIDTH = 65_536
"""The widest hidden layer, and (``MAX_CONV_CHANNELS``) the most convolution channels, a policy may have: one
65,536-wide square layer already holds 16 GiB of float32 weights, so anything beyond is a typo (or a hostile
architecture), refused before any tensor is allocated."""
MAX_CONV_CHANNELS = 4_096


class PolicyArchitecture(BaseModel):
    """Everything needed to build a policy before loading its tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mlp", "cnn"] = "mlp"
    layout: ObservationLayout
    hidden_sizes: list[int] = Field(default_factory=lambda: [256, 256], min_length=1, max_length=8)
    activation: Activation = "relu"
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    conv_channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 64], min_length=1, max_length=8)
    """CNN only: output channels of each 4x4 stride-2 convolution."""

    @property
    def action_dim(self) -> int:
        return self.layout.action_dim

    @model_validator(mode="after")
    def _consistent(self) -> PolicyArchitecture:
        if any(h <= 0 for h in self.hidden_sizes) or any(c <= 0 for c in self.conv_channels):
            raise ValueError("hidden_sizes and conv_channels must be positive")
        if max(self.hidden_sizes) > MAX_LAYER_WIDTH or max(self.conv_channels) > MAX_CONV_CHANNELS:
            raise ValueError(f"hidden_sizes {self.hidden_sizes} and conv_channels {self.conv_channels} may be at most "
                             f"{MAX_LAYER_WIDTH} and {MAX_CONV_CHANNELS} wide")
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"log_std_min {self.log_std_min} must be below log_std_max {self.log_std_max}")
        image_problem = image_shape_problem(self.layout)
        if image_problem is not None:
            raise ValueError(image_problem)
        has_images = any(is_image_component(c) for c in self.layout.components)
        if self.kind == "cnn" and not has_images:
            raise ValueError("kind 'cnn' needs a uint8 image component ([H, W] or [C, H, W] frames) in the layout")
        if self.kind == "cnn":
            self._check_image_sizes()
        return self

    def _check_image_sizes(self) -> None:
        """Each image side must survive the 4x4 stride-2 convolutions: at least 4 pixels before the last, and
        ``2 * n + 2`` before one that needs ``n`` (46 for the default four)."""
        layers = len(self.conv_channels)
        smallest = 4
        for _ in range(layers - 1):
            smallest = 2 * smallest + 2
        for component in self.layout.components:
            if not is_image_component(component):
                continue
            *channels, height, width = component.frame_shape
            if min(height, width) >= smallest:
                continue
            last = component.frame_shape[-1]
            channels_last = (f"; a last dimension of {last} looks like the channels of an [H, W, C] camera frame: "
                             "frames are [C, H, W] (np.transpose(frame, (2, 0, 1)))" if last in (1, 3, 4) and channels
                             else "")
            raise ValueError(f"image {component.name!r} of {height}x{width} pixels is too small for {layers} stride-2 "
                             f"convolutions (conv_channels {list(self.conv_channels)}), which need at least "
                             f"{smallest}x{smallest}: use fewer conv_channels ([trainer.sac]) or larger frames"
                             f"{channels_last}")

    @classmethod
    def for_layout(cls, layout: ObservationLayout, **fields: object) -> PolicyArchitecture:
        """The default architecture for ``layout``: ``cnn`` when it has image components, else ``mlp``."""
        kind = "cnn" if any(is_image_component(c) for c in layout.components) else "mlp"
        return cls(kind=fields.pop("kind", kind), layout=layout, **fields)  # type: ignore[arg-type]

    def to_flat_dict(self) -> dict[str, ArchitectureValue]:
        """Flat ``bool/int/float/str/list[int]`` values for :class:`WeightsUpdate`; the layout is one JSON string."""
        return {
            "kind": self.kind,
            "layout": self.layout.model_dump_json(),
            "action_dim": self.layout.action_dim,
            "hidden_sizes": list(self.hidden_sizes),
            "activation": self.activation,
            "log_std_min": float(self.log_std_min),
            "log_std_max": float(self.log_std_max),
            "conv_channels": list(self.conv_channels),
        }

    @classmethod
    def from_flat_dict(cls, values: Mapping[str, ArchitectureValue]) -> PolicyArchitecture:
        """Inverse of :meth:`to_flat_dict`; raise :class:`ProtocolError` (reason ``schema``) on anything invalid."""
        data = dict(values)
        layout_text = data.pop("layout", None)
        action_dim = data.pop("action_dim", None)
        if not isinstance(layout_text, str):
            raise ProtocolError("schema", "architecture has no 'layout' JSON string")
        try:
            layout = ObservationLayout.model_validate_json(layout_text)
            architecture = cls.model_validate({**data, "layout": layout})
        except ValidationError as exc:
            raise ProtocolError("schema", f"architecture is invalid: {exc.errors()[0]['msg']} ({exc.error_count()} error(s))") from exc
        if action_dim is not None and action_dim != layout.action_dim:
            raise ProtocolError("schema", f"architecture action_dim {action_dim} disagrees with its layout ({layout.action_dim})")
        return architecture


# ------------------------------------------------------------------------------------------------ observation encoding


def _conv_output_size(height: int, width: int, layers: int) -> tuple[int, int]:
    for _ in range(layers):
        height, width = (height - 4) // 2 + 1, (width - 4) // 2 + 1
    return height, width


class ObservationEncoder(nn.Module):
    """Observation tuple (batched tensors, layout order, then the action buffer) → feature matrix ``(B, features)``.

    ``mlp``: every part flattened (uint8 parts scaled to [0, 1], a component with a ``scale`` multiplied by it) and
    concatenated; no parameters.
    ``cnn``: each image component's history is stacked as channels and passed through its own CNN; the rest is
    flattened and appended to the CNN features.
    """

    def __init__(self, architecture: PolicyArchitecture) -> None:
        super().__init__()
        self.layout = architecture.layout
        self._image_parts: list[int] = []
        self.cnns = nn.ModuleList()
        features = 0
        shapes = self.layout.observation_shapes()
        if architecture.kind == "cnn":
            activation = _ACTIVATIONS[architecture.activation]
            for index, component in enumerate(self.layout.components):
                if not is_image_component(component):
                    continue
                *channels, height, width = component.frame_shape
                in_channels = component.history * (channels[0] if channels else 1)
                layers: list[nn.Module] = []
                for out_channels in architecture.conv_channels:
                    layers += [nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2), activation()]
                    in_channels = out_channels
                out_h, out_w = _conv_output_size(height, width, len(architecture.conv_channels))
                assert out_h > 0 and out_w > 0, "PolicyArchitecture checks the image sizes"
                self.cnns.append(nn.Sequential(*layers, nn.Flatten()))
                self._image_parts.append(index)
                features += in_channels * out_h * out_w
        self._flat_parts = [i for i in range(len(shapes)) if i not in self._image_parts]
        features += sum(math.prod(shapes[i]) for i in self._flat_parts)
        self.features = features
        components = self.layout.components
        self._scales = {i: components[i].scale for i in self._flat_parts
                        if i < len(components) and components[i].scale is not None}
        """Flat parts the layout asks to scale (:attr:`ObservationComponent.scale`), by position."""

    def forward(self, observation: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = observation[0].shape[0]
        parts: list[torch.Tensor] = []
        for cnn, index in zip(self.cnns, self._image_parts, strict=True):
            images = observation[index]
            # a copy even when the images already are float32 (.float() would return them, and div_ would then
            # scale the caller's tensor, or the numpy array Actor.act wrapped, in place)
            images = images.reshape(batch, -1, *images.shape[-2:]).to(torch.float32, copy=True).div_(255.0)
            parts.append(cnn(images))
        for index in self._flat_parts:
            part = observation[index]
            if part.dtype == torch.uint8:
                part = part.float().div_(255.0)
            if index in self._scales:
                part = part * self._scales[index]  # a new tensor: the caller's observation stays as it was
            parts.append(part.reshape(batch, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _mlp(sizes: Sequence[int], activation: Activation) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), _ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------------------- actor


class Actor(nn.Module):
    """Squashed-Gaussian policy: ``a = tanh(mu + sigma * eps)``, actions in ``[-1, 1]``.

    :meth:`forward` is the batched, differentiable form used by the learner; :meth:`act` is the worker's
    one-observation inference call.
    """

    def __init__(self, architecture: PolicyArchitecture) -> None:
        super().__init__()
        self.architecture = architecture
        self.encoder = ObservationEncoder(architecture)
        self.trunk = _mlp([self.encoder.features, *architecture.hidden_sizes], architecture.activation)
        self.mean = nn.Linear(architecture.hidden_sizes[-1], architecture.action_dim)
        self.log_std = nn.Linear(architecture.hidden_sizes[-1], architecture.action_dim)
        self.noise_generator: torch.Generator | None = None
        """Source of exploration noise for :meth:`act` (the global torch RNG when ``None``)."""

    def forward(
        self,
        observation: Sequence[torch.Tensor],
        deterministic: bool = False,
        with_log_prob: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Actions ``(B, action_dim)`` and their log-probabilities ``(B,)`` under the squashed Gaussian."""
        return self.policy(self.encoder(observation), deterministic, with_log_prob, generator)

    def policy(
        self,
        features: torch.Tensor,
        deterministic: bool = False,
        with_log_prob: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` from already encoded observations (``self.encoder(observation)``)."""
        if deterministic:  # the mean alone: the log-std head is not needed
            return torch.tanh(self.mean(self.trunk(features))), None
        mean, log_std = self._mean_and_log_std(features)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return _squashed_gaussian(mean, log_std, noise, with_log_prob)

    def policy_pair(self, features: torch.Tensor, next_features: torch.Tensor, noise: torch.Tensor,
                    next_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(action, log_prob, next_action, next_log_prob)``: :meth:`policy` at ``features`` and, without gradient, at
        ``next_features``, with the standard normal draws given (``(B, action_dim)`` each; the caller draws them, in
        its order). A learner needs both every update (the critic target at the next observations, the policy loss
        at the current ones).

        A ReLU actor computes both in one pass of twice the rows, with a hand-written backward through the current
        rows only (:class:`_ReluPolicyPair`): the same values and gradients as :meth:`policy`, in about a third fewer
        dispatched operations; other activations call :meth:`policy`'s maths twice."""
        if self.architecture.activation == "relu":
            linears = [layer for layer in self.trunk if isinstance(layer, nn.Linear)]
            return _ReluPolicyPair.apply(features, next_features, noise, next_noise, self.architecture.log_std_min,
                                         self.architecture.log_std_max, self.mean.weight, self.mean.bias,
                                         self.log_std.weight, self.log_std.bias,
                                         *(linear.weight for linear in linears), *(linear.bias for linear in linears))
        with torch.no_grad():
            next_action, next_log_prob = _squashed_gaussian(*self._mean_and_log_std(next_features), next_noise, True)
        action, log_prob = _squashed_gaussian(*self._mean_and_log_std(features), noise, True)
        return action, log_prob, next_action, next_log_prob

    def _mean_and_log_std(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian's mean and its log-std clamped to the architecture's bounds, before the tanh squash."""
        hidden = self.trunk(features)
        log_std = self.log_std(hidden).clamp(self.architecture.log_std_min, self.architecture.log_std_max)
        return self.mean(hidden), log_std

    @torch.no_grad()
    def act(self, observation: Sequence[np.ndarray], deterministic: bool = False) -> np.ndarray:
        """One action for one (unbatched) observation tuple: float32 in ``[-1, 1]``, computed on the CPU."""
        expected = len(self.architecture.layout.observation_shapes())
        if len(observation) != expected:
            raise ValueError(f"observation has {len(observation)} parts, the policy's layout expects {expected}")
        device = next(self.parameters()).device
        batch = [torch.as_tensor(np.asarray(part)).unsqueeze(0).to(device) for part in observation]
        batch = [part if part.dtype == torch.uint8 else part.float() for part in batch]
        action, _ = self.forward(batch, deterministic=deterministic, with_log_prob=False, generator=self.noise_generator)
        return action[0].cpu().numpy().astype(np.float32, copy=False)


def _squashed_gaussian(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor,
                       with_log_prob: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``a = tanh(mean + exp(log_std) * noise)`` and, with ``with_log_prob``, ``log pi(a)`` summed over dims."""
    pre_tanh = mean + log_std.exp() * noise
    action = torch.tanh(pre_tanh)
    if not with_log_prob:
        return action, None
    # log N(pre_tanh; mean, std) minus log|d tanh/dx| = 2 (log 2 - x - softplus(-2x)), summed over dims
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    squash = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return action, (gaussian - squash).sum(dim=1)


def relu_policy_pair(features: torch.Tensor, next_features: torch.Tensor, noise: torch.Tensor,
                     next_noise: torch.Tensor, log_std_min: float, log_std_max: float, mean_weight: torch.Tensor,
                     mean_bias: torch.Tensor, log_std_weight: torch.Tensor, log_std_bias: torch.Tensor,
                     weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A ReLU actor's squashed-Gaussian policy at the current and the next features in one pass of ``2B`` rows (one
    matrix product per layer, the mean and log-std heads as one product), without autograd:
    ``(action, log_prob, next_action, next_log_prob, saved)``, where ``saved`` is what :func:`relu_policy_backward`
    reads to back-propagate through the current rows (:class:`_ReluPolicyPair` and the ``cpu-compiled`` learner)."""
    rows, actions = features.shape[0], mean_weight.shape[0]
    layers = [torch.cat([features, next_features])]
    for weight, bias in zip(weights, biases, strict=True):
        layers.append(torch.addmm(bias, layers[-1], weight.t()).relu_())
    head_weight = torch.cat([mean_weight, log_std_weight])
    heads = torch.addmm(torch.cat([mean_bias, log_std_bias]), layers[-1], head_weight.t())
    mean, raw_log_std = heads[:, :actions], heads[:, actions:]
    log_std = raw_log_std.clamp(log_std_min, log_std_max)
    action, log_prob = _squashed_gaussian(mean, log_std, torch.cat([noise, next_noise]), True)
    current = slice(0, rows)
    saved = (*(layer[current] for layer in layers), head_weight, *weights, action[current], log_std[current].exp(),
             noise, log_std[current] == raw_log_std[current])
    return action[current], log_prob[current], action[rows:], log_prob[rows:], saved


def relu_policy_backward(saved: Sequence[torch.Tensor], grad_action: torch.Tensor, grad_log_prob: torch.Tensor,
                         input_gradient: bool,
                         ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    list[torch.Tensor], list[torch.Tensor]]:
    """The gradients of :func:`relu_policy_pair`'s current rows, given ``grad_action`` ``(B, action_dim)`` and
    ``grad_log_prob`` ``(B,)`` reaching its action and log-probability: ``(grad_features`` (``None`` unless
    ``input_gradient``), ``grad_mean_weight, grad_mean_bias, grad_log_std_weight, grad_log_std_bias, grad_weights,
    grad_biases)``. See :class:`_ReluPolicyPair` for the maths."""
    *saved, action, std, noise, unclamped = saved
    layers = (len(saved) - 1) // 2 + 1  # input and hidden outputs; then the head weight and the trunk weights
    outputs, head_weight, weights = saved[:layers], saved[layers], saved[layers + 1 :]
    grad_log_prob = grad_log_prob.unsqueeze(1)
    grad_x = (1.0 - action * action).mul_(grad_action).addcmul_(action, grad_log_prob, value=2.0)
    grad_log_std = (grad_x * std).mul_(noise).sub_(grad_log_prob).mul_(unclamped)
    grad_heads = torch.cat([grad_x, grad_log_std], dim=1)
    grad_head_weight = grad_heads.t().mm(outputs[-1])
    grad_head_bias = grad_heads.sum(dim=0)
    actions = grad_x.shape[1]
    grad = grad_heads.mm(head_weight)
    grad_weights: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    grad_biases: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    for layer in range(len(weights) - 1, -1, -1):
        grad = _relu_backward(grad, outputs[layer + 1])
        grad_weights[layer] = grad.t().mm(outputs[layer])
        grad_biases[layer] = grad.sum(dim=0)
        if layer > 0 or input_gradient:
            grad = grad.mm(weights[layer])
    return (grad if input_gradient else None, grad_head_weight[:actions], grad_head_bias[:actions],
            grad_head_weight[actions:], grad_head_bias[actions:], grad_weights, grad_biases)


class _ReluPolicyPair(torch.autograd.Function):
    """:meth:`Actor.policy_pair` of a ReLU actor: :func:`relu_policy_pair`'s one pass of ``2B`` rows, with
    :func:`relu_policy_backward` through the current rows only (the next ones carry no gradient).

    Gradients, with ``x = mean + std * noise``, ``a = tanh(x)``, ``g_a`` and ``g_l`` the gradients reaching ``a``
    and ``log pi``: ``d log pi / dx = 2 tanh(x) = 2a`` (the derivative of ``-2 (log 2 - x - softplus(-2x))``), so
    ``g_x = g_a (1 - a^2) + 2 a g_l``; ``g_mean = g_x``; ``g_log_std = g_x std noise - g_l`` where the clamp of
    the log-std passes it, else 0. Two :meth:`Actor.policy` calls and autograd's graph compute the same values and
    gradients (tested against them) in 113 operators and 35 autograd nodes, this in 88 and 12 (``torch.profiler``,
    [256, 256] actor, a loss summing both outputs)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, next_features: torch.Tensor, noise: torch.Tensor,  # type: ignore[override]
                next_noise: torch.Tensor, log_std_min: float, log_std_max: float, mean_weight: torch.Tensor,
                mean_bias: torch.Tensor, log_std_weight: torch.Tensor, log_std_bias: torch.Tensor,
                *trunk: torch.Tensor):
        weights, biases = trunk[: len(trunk) // 2], trunk[len(trunk) // 2 :]
        action, log_prob, next_action, next_log_prob, saved = relu_policy_pair(
            features, next_features, noise, next_noise, log_std_min, log_std_max, mean_weight, mean_bias,
            log_std_weight, log_std_bias, weights, biases)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(next_action, next_log_prob)
        return action, log_prob, next_action, next_log_prob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_action: torch.Tensor, grad_log_prob: torch.Tensor, *_next):  # type: ignore[override]
        (grad_features, grad_mean_weight, grad_mean_bias, grad_log_std_weight, grad_log_std_bias, grad_weights,
         grad_biases) = relu_policy_backward(ctx.saved_tensors, grad_action, grad_log_prob, ctx.needs_input_grad[0])
        return (grad_features, None, None, None, None, None, grad_mean_weight, grad_mean_bias, grad_log_std_weight,
                grad_log_std_bias, *grad_weights, *grad_biases)


def build_actor(architecture: PolicyArchitecture) -> Actor:
    """A freshly initialised :class:`Actor` for ``architecture`` (seed torch first for reproducible weights)."""
    return Actor(architecture)


# ----------------------------------------------------------------------------------------------------------- critics


class CriticEnsemble(nn.Module):
    """``n`` Q-functions ``Q_i(o, a)`` evaluated in one pass: each layer is a stacked weight tensor
    ``(n, fan_in, fan_out)`` applied with one batched matrix product, instead of ``n`` separate MLPs.
    Each member is initialised like an independent ``nn.Linear`` stack.

    The first layer is split into an observation part and an action part, so a learner that evaluates the critics
    at the same observations with two different actions (the replayed one and the policy's) computes the larger
    observation part once: ``Q = head(observation_part(features), action)``.

    For ``mlp`` architectures the encoder has no parameters and is shared; for ``cnn`` each critic has its own CNN.

    ``layer_norm``: each hidden layer's pre-activation goes through a LayerNorm (per member, with its own gain and
    bias) before the activation, as the critics of RLPD and DroQ do; only :meth:`forward` computes it (the faster
    methods below are for plain critics and refuse such an ensemble).
    """

    def __init__(self, architecture: PolicyArchitecture, n: int = 2, layer_norm: bool = False) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"a critic ensemble needs at least 1 member, got {n}")
        self.n = n
        self.layer_norm = layer_norm
        self.activation = _FUNCTIONAL[architecture.activation]
        self.activation_name = architecture.activation
        self.encoders = nn.ModuleList([ObservationEncoder(architecture) for _ in range(n if architecture.kind == "cnn" else 1)])
        features, actions = self.encoders[0].features, architecture.action_dim
        sizes = [features + actions, *architecture.hidden_sizes, 1]
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            weight = torch.empty(n, fan_in, fan_out)
            bias = torch.empty(n, 1, fan_out)
            bound = 1.0 / math.sqrt(fan_in)
            for member in range(n):  # same distribution as nn.Linear's default initialisation
                nn.init.kaiming_uniform_(weight[member].T, a=math.sqrt(5))
                nn.init.uniform_(bias[member], -bound, bound)
            weights.append(weight)
            biases.append(bias)
        self.observation_weight = nn.Parameter(weights[0][:, :features].contiguous())
        self.action_weight = nn.Parameter(weights[0][:, features:].contiguous())
        self.first_bias = nn.Parameter(biases[0])
        self.weights = nn.ParameterList([nn.Parameter(w) for w in weights[1:]])
        self.biases = nn.ParameterList([nn.Parameter(b) for b in biases[1:]])
        # after the random draws above, so an ensemble with LayerNorm starts from the same weights as one without
        hidden = architecture.hidden_sizes if layer_norm else []
        self.norm_weights = nn.ParameterList([nn.Parameter(torch.ones(n, 1, size)) for size in hidden])
        self.norm_biases = nn.ParameterList([nn.Parameter(torch.zeros(n, 1, size)) for size in hidden])

    @property
    def shares_encoder(self) -> bool:
        """True when every member reads the same parameter-free features (``mlp``)."""
        return len(self.encoders) == 1

    def encode(self, observation: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features ``(B, F)`` when the encoder is shared, else ``(n, B, F)`` (one CNN per member)."""
        if self.shares_encoder:
            return self.encoders[0](observation)
        return torch.stack([encoder(observation) for encoder in self.encoders])

    def forward(self, observation: Sequence[torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """Q-values ``(n, B)``, the plain way: ``Q_i = W_i^L act(... act(W_i^1 [features_i, a] + b_i^1) ...) + b_i^L``
        with out-of-place ops and autograd's own backward. The reference learner (:mod:`tmrl_trainer.reference`)
        uses this; :meth:`q_values`, :meth:`head` and :meth:`frozen_min` compute the same values faster (tested
        against it)."""
        features = self.encode(observation)
        if features.dim() == 2:
            features = features.expand(self.n, -1, -1)
        activation = _PLAIN[self.activation_name]
        x = torch.cat([features, action.expand(self.n, -1, -1)], dim=-1)  # (n, B, features + action_dim)
        first_weight = torch.cat([self.observation_weight, self.action_weight], dim=1)
        x = activation(self._normalised(0, torch.baddbmm(self.first_bias, x, first_weight)))
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(bias, x, weight)
            if layer < len(self.weights) - 1:
                x = activation(self._normalised(layer + 1, x))
        return x.squeeze(-1)

    def _normalised(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden layer ``layer``'s pre-activation ``(n, B, H)`` through its LayerNorm (unchanged without one)."""
        if not self.layer_norm:
            return x
        return torch.addcmul(self.norm_biases[layer], F.layer_norm(x, x.shape[-1:]), self.norm_weights[layer])

    def _plain_only(self) -> None:
        if self.layer_norm:
            raise ValueError("this critic ensemble has LayerNorm, which only forward() computes")

    def q_values(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q-values ``(n, B)`` from :meth:`encode`'s features."""
        self._plain_only()
        return self.head(self.observation_part(features), action, consume=True)

    def observation_part(self, features: torch.Tensor) -> torch.Tensor:
        """First-layer pre-activation from the observation alone (bias included): ``(n, B, hidden)``."""
        self._plain_only()
        return critic_observation_part(features, self.first_bias, self.observation_weight)

    def head(self, observation_part: torch.Tensor, action: torch.Tensor, frozen: bool = False,
             consume: bool = False) -> torch.Tensor:
        """Q-values ``(n, B)`` from :meth:`observation_part` and actions ``(B, action_dim)``.

        ``frozen``: use detached weights, so gradients reach ``action`` but never the critics (policy loss).
        ``consume``: add the action part into ``observation_part`` in place instead of into a copy (saves a pass over
        an ``(n, B, hidden)`` tensor); only for a tensor nothing reads afterwards and autograd has not saved.

        ReLU critics trained by back-propagation (gradients on, weights not frozen) go through
        :class:`_ReluCriticQ`, which computes the same values and gradients with fewer passes over memory.
        """
        self._plain_only()
        if (self.activation is torch.relu_ and not frozen and torch.is_grad_enabled()
                and self.action_weight.requires_grad):
            return _ReluCriticQ.apply(observation_part, action, self.action_weight, *self.weights, *self.biases)
        action_weight = self.action_weight.detach() if frozen else self.action_weight
        action = action.expand(self.n, -1, -1)
        if consume:
            x = self.activation(observation_part.baddbmm_(action, action_weight))
        else:
            x = self.activation(torch.baddbmm(observation_part, action, action_weight))
        *hidden, (last_weight, last_bias) = zip(self.weights, self.biases, strict=True)
        for weight, bias in hidden:
            if frozen:
                weight, bias = weight.detach(), bias.detach()
            x = self.activation(torch.baddbmm(bias, x, weight))
        if frozen:
            last_weight, last_bias = last_weight.detach(), last_bias.detach()
        if not torch.is_grad_enabled():
            return _output_layer(x, last_weight, last_bias)
        # With autograd, the output layer (one unit) is a multiply-and-sum: as a matrix product its backward would be
        # an outer product, which takes CPU BLAS's slow paths.
        return (x * last_weight.transpose(1, 2)).sum(dim=-1) + last_bias.squeeze(-1)

    def frozen_min(self, observation_part: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``head(observation_part, action, frozen=True, consume=True).min(dim=0).values``: the policy loss's
        ``min_i Q_i(s, a)`` with gradients reaching ``action`` only; ``observation_part`` is overwritten.

        ReLU critics back-propagate through each row's minimising member only (see :class:`_FrozenReluCriticMin`).
        """
        self._plain_only()
        if self.activation is torch.relu_ and torch.is_grad_enabled() and action.requires_grad:
            return _FrozenReluCriticMin.apply(observation_part.detach(), action, self)
        return self.head(observation_part, action, frozen=True, consume=True).min(dim=0).values


def _relu_backward(grad: torch.Tensor, relu_output: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``relu_output > 0``, else 0 (the gradient through a ReLU), in one pass: autograd's own kernel."""
    return torch.ops.aten.threshold_backward(grad, relu_output, 0)


def _relu_backward_(grad: torch.Tensor, relu_output: torch.Tensor) -> torch.Tensor:
    """:func:`_relu_backward` written into ``grad`` (one pass, no new tensor); out of place where ``torch.compile``
    traces it, which plans its own buffers."""
    if torch.compiler.is_compiling():
        return _relu_backward(grad, relu_output)
    return torch.ops.aten.threshold_backward.grad_input(grad, relu_output, 0, grad_input=grad)


def _relu_hidden_layers(first: torch.Tensor, weights: Sequence[torch.Tensor],
                        biases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ReLU outputs of every hidden layer of a critic ensemble, from the first layer's pre-activation ``first``
    (made the first output in place) through ``weights[:-1]``/``biases[:-1]`` (the output layer is not applied)."""
    hidden = [first.relu_()]
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        hidden.append(torch.baddbmm(bias, hidden[-1], weight).relu_())
    return hidden


def _output_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The critics' one-unit output layer without autograd: ``(n, B, H)`` activations, ``(n, H, 1)`` weight and
    ``(n, 1, 1)`` bias to Q-values ``(n, B)``. Written as ``weight^T x^T``, a product with a single *row*: CPU BLAS
    computes that fast, while ``x weight`` (a single column) takes a matrix-vector path many times slower."""
    return torch.baddbmm(bias, weight.transpose(1, 2), x.transpose(1, 2)).squeeze(1)


def critic_observation_part(features: torch.Tensor, first_bias: torch.Tensor,
                            observation_weight: torch.Tensor) -> torch.Tensor:
    """:meth:`CriticEnsemble.observation_part` from the ensemble's first bias ``(n, 1, H)`` and observation weight
    ``(n, F, H)``: features ``(B, F)`` (shared by every member) or ``(n, B, F)``."""
    if features.dim() == 2:
        features = features.expand(observation_weight.shape[0], -1, -1)
    return torch.baddbmm(first_bias, features, observation_weight)


def relu_critic_q(observation_part: torch.Tensor, action: torch.Tensor, action_weight: torch.Tensor,
                  weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Q-values ``(n, B)`` of a ReLU critic ensemble from :meth:`CriticEnsemble.observation_part` and actions
    ``(B, action_dim)``, without autograd, and the hidden ReLU outputs that :func:`relu_critic_backward` and
    :func:`relu_critic_action_gradient` read; ``observation_part`` is only read."""
    first = torch.baddbmm(observation_part, action.expand(action_weight.shape[0], -1, -1), action_weight)
    hidden = _relu_hidden_layers(first, weights, biases)
    return _output_layer(hidden[-1], weights[-1], biases[-1]), hidden


def relu_critic_backward(grad_q: torch.Tensor, action: torch.Tensor, action_weight: torch.Tensor,
                         weights: Sequence[torch.Tensor], hidden: Sequence[torch.Tensor], action_gradient: bool,
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor],
                                    list[torch.Tensor]]:
    """The gradients of :func:`relu_critic_q` given ``grad_q`` ``(n, B)``: ``(grad_observation_part, grad_action``
    (``None`` unless ``action_gradient``), ``grad_action_weight, grad_weights, grad_biases)``. Each step back is one
    product whose result is masked in place; the output layer's weight gradient is a one-row product."""
    layers = len(weights)
    n = action_weight.shape[0]
    grad_weights: list[torch.Tensor] = [torch.empty(0)] * layers
    grad_biases: list[torch.Tensor] = [torch.empty(0)] * layers
    grad_weights[-1] = torch.bmm(grad_q.unsqueeze(1), hidden[-1]).transpose(1, 2)  # (n, H, 1)
    grad_biases[-1] = grad_q.sum(dim=1).view(n, 1, 1)
    # gradient at the last hidden pre-activation: the output layer's, where that layer's ReLU passed
    grad = _relu_backward_(grad_q.unsqueeze(-1) * weights[-1].transpose(1, 2), hidden[-1])
    for layer in range(layers - 1, 0, -1):
        grad_weights[layer - 1] = torch.bmm(hidden[layer - 1].transpose(1, 2), grad)
        grad_biases[layer - 1] = grad.sum(dim=1, keepdim=True)
        grad = _relu_backward_(torch.bmm(grad, weights[layer - 1].transpose(1, 2)), hidden[layer - 1])
    grad_action_weight = torch.bmm(action.expand(n, -1, -1).transpose(1, 2), grad)
    grad_action = torch.bmm(grad, action_weight.transpose(1, 2)).sum(dim=0) if action_gradient else None
    return grad, grad_action, grad_action_weight, grad_weights, grad_biases


def relu_critic_action_gradient(grad_q: torch.Tensor, action_weight: torch.Tensor, weights: Sequence[torch.Tensor],
                                hidden: Sequence[torch.Tensor], winner: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient ``(B, action_dim)`` reaching the actions of :func:`relu_critic_q` with frozen weights: from
    ``grad_q`` ``(n, B)`` through every member, or, with ``winner`` ``(B,)``, from ``grad_q`` ``(B,)`` through each
    row's winning member only (the gradient of a minimum: ``B`` rows in all instead of ``n * B``; the rows each member
    wins are counted here, so this form does not go into ``torch.compile``'s static graphs)."""
    if winner is None:
        grad = _relu_backward(grad_q.unsqueeze(-1) * weights[-1].transpose(1, 2), hidden[-1])
        for layer in range(len(hidden) - 1, 0, -1):
            grad = _relu_backward(torch.bmm(grad, weights[layer - 1].transpose(1, 2)), hidden[layer - 1])
        return torch.bmm(grad, action_weight.transpose(1, 2)).sum(dim=0)
    grad_action = torch.empty(grad_q.shape[0], action_weight.shape[1], dtype=grad_q.dtype, device=grad_q.device)
    for member in range(action_weight.shape[0]):
        rows = (winner == member).nonzero().squeeze(1)
        grad = grad_q.index_select(0, rows).unsqueeze(1) * weights[-1][member].transpose(0, 1)
        for layer in range(len(hidden) - 1, -1, -1):
            grad = _relu_backward(grad, hidden[layer][member].index_select(0, rows))
            grad = grad.mm(weights[layer - 1][member].T if layer > 0 else action_weight[member].T)
        grad_action.index_copy_(0, rows, grad)
    return grad_action


class _ReluCriticQ(torch.autograd.Function):
    """Q-values ``(n, B)`` of a ReLU critic ensemble from its observation part and actions (:func:`relu_critic_q`),
    with a hand-written backward (:func:`relu_critic_backward`) that gives autograd's gradients with fewer large
    temporaries.

    Autograd would allocate and fill a fresh ``(n, B, hidden)`` tensor for every step back through the output layer
    and each ReLU, and mask it in another pass. Here each step back is one product whose result is masked in place
    (:func:`_relu_backward_`, one pass reading the saved ReLU output), and the output layer's weight gradient is a
    one-row product. The saved activations are only read, so the graph can be back-propagated again.
    """

    @staticmethod
    def forward(ctx, observation_part: torch.Tensor, action: torch.Tensor,  # type: ignore[override]
                action_weight: torch.Tensor, *layers: torch.Tensor) -> torch.Tensor:
        weights, biases = layers[: len(layers) // 2], layers[len(layers) // 2 :]
        q_values, hidden = relu_critic_q(observation_part, action, action_weight, weights, biases)
        ctx.save_for_backward(action, action_weight, *weights, *hidden)
        return q_values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: torch.Tensor):  # type: ignore[override]
        action, action_weight, *saved = ctx.saved_tensors
        layers = len(saved) // 2
        grad, grad_action, grad_action_weight, grad_weights, grad_biases = relu_critic_backward(
            grad_q, action, action_weight, saved[:layers], saved[layers:], ctx.needs_input_grad[1])
        return grad, grad_action, grad_action_weight, *grad_weights, *grad_biases


class _FrozenReluCriticMin(torch.autograd.Function):
    """``min_i Q_i(s, a)`` of a ReLU critic ensemble with frozen weights, differentiable with respect to ``a`` only.

    The gradient of a minimum flows through the minimising critic alone, so autograd would back-propagate rows of
    zeros through every other member. The backward here (:func:`relu_critic_action_gradient` with ``winner``) walks
    each member's layers for the rows it wins only (``B`` rows in all instead of ``n * B``): the same gradient with
    ``1/n`` of the matrix products and passes.
    """

    @staticmethod
    def forward(ctx, observation_part: torch.Tensor, action: torch.Tensor,  # type: ignore[override]
                critics: CriticEnsemble) -> torch.Tensor:
        weights = [w.detach() for w in critics.weights]
        biases = [b.detach() for b in critics.biases]
        action_weight = critics.action_weight.detach()
        first = observation_part.baddbmm_(action.expand(critics.n, -1, -1), action_weight)
        hidden = _relu_hidden_layers(first, weights, biases)
        q_values = _output_layer(hidden[-1], weights[-1], biases[-1])
        q_min, winner = q_values.min(dim=0)
        ctx.save_for_backward(winner, action_weight, *weights, *hidden)
        return q_min

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor):  # type: ignore[override]
        winner, action_weight, *saved = ctx.saved_tensors
        layers = len(saved) // 2
        return None, relu_critic_action_gradient(grad_q, action_weight, saved[:layers], saved[layers:], winner), None


# ----------------------------------------------------------------------------------------------- weights on the wire


def _actor_tensors(actor: Actor) -> dict[str, np.ndarray]:
    return {name: tensor.detach().to("cpu", torch.float32).contiguous().numpy() for name, tensor in actor.state_dict().items()}


def weights_update_from_actor(actor: Actor, version: int) -> WeightsUpdate:
    """The :class:`WeightsUpdate` message carrying ``actor`` (float32 safetensors bytes + flat architecture)."""
    data = tensors_to_bytes(_actor_tensors(actor), metadata={"format": "tmrl-actor"})
    return WeightsUpdate.build(version=version, architecture=actor.architecture.to_flat_dict(), tensors=data)


def load_weights_into(actor: Actor, update: WeightsUpdate) -> None:
    """Swap ``update``'s tensors into ``actor`` in place; raise :class:`ProtocolError` (reason ``schema``) when the
    architecture or any tensor name/shape differs (the actor is left untouched then)."""
    architecture = PolicyArchitecture.from_flat_dict(update.architecture)
    if architecture != actor.architecture:
        raise ProtocolError("schema", f"weights version {update.version} are for a different architecture than this actor; "
                                      "rebuild it with actor_from_weights_update")
    tensors = tensors_from_bytes(update.tensors)
    current = actor.state_dict()
    if set(tensors) != set(current):
        raise ProtocolError("schema", f"weights version {update.version} hold tensors {sorted(set(tensors) ^ set(current))} "
                                      "that do not match the actor")
    for name, target in current.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise ProtocolError("schema", f"weight {name!r} has shape {tuple(tensors[name].shape)}, actor expects {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in current.items():
            target.copy_(torch.from_numpy(np.array(tensors[name], copy=True)))


def actor_from_weights_update(update: WeightsUpdate) -> Actor:
    """A new :class:`Actor` built from ``update.architecture`` with ``update``'s tensors loaded (CPU, eval mode)."""
    actor = build_actor(PolicyArchitecture.from_flat_dict(update.architecture))
    load_weights_into(actor, update)
    return actor.eval()


# ------------------------------------------------------------------------------------------------------- policy files

POLICY_FILE_FORMAT = "tmrl-actor"
"""``format`` metadata of a policy file: the actor's tensors (as in :func:`weights_update_from_actor`), metadata
``architecture`` (JSON of :meth:`PolicyArchitecture.to_flat_dict`) and ``version``."""


class PolicyFileError(ValueError):
    """A policy file cannot be loaded as an actor (unreadable, not safetensors, no architecture, tensors that do not
    fit it), or does not fit the env it is meant for."""


def read_policy_file(path: str | os.PathLike[str]) -> tuple[Actor, int]:
    """The actor (CPU, eval mode) and weights version of a policy file; raise :class:`PolicyFileError`."""
    from safetensors import safe_open

    try:
        data = read_regular_file(path)
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except OSError as exc:
        raise PolicyFileError(f"policy file {path} cannot be read: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise PolicyFileError(f"policy file {path} is not a safetensors file: {exc}") from exc
    if "architecture" not in metadata:
        hint = (" (a trainer checkpoint: `tmrl-trainer export` it with --policy-out FILE)"
                if '"tmrl-checkpoint' in metadata.get("tmrl", "") else
                " (a run writes its policy file as policy.safetensors; `tmrl-trainer export` writes one from a "
                "checkpoint)")
        raise PolicyFileError(f"policy file {path} has no 'architecture' metadata{hint}")
    try:
        architecture = json.loads(metadata["architecture"])
        update = WeightsUpdate.build(version=int(metadata.get("version", 0)), architecture=architecture, tensors=data)
        return actor_from_weights_update(update), update.version
    except (ValueError, ProtocolError) as exc:
        raise PolicyFileError(f"policy file {path} cannot be loaded: {exc}") from exc
