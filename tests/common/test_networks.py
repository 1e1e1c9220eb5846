"""Policy networks shared by worker and trainer: architecture on the wire, weights round trip, inference contract."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tmrl_common import networks
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import (
    ObservationComponent,
    ObservationLayout,
    layout_for_box,
    tm20_image_layout,
    tm20_lidar_layout,
)
from tmrl_common.networks import (
    CriticEnsemble,
    PolicyArchitecture,
    actor_from_weights_update,
    build_actor,
    load_weights_into,
    weights_update_from_actor,
)
from tmrl_common.protocol import WeightsUpdate, decode, encode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lidar_observation(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    return (rng.random(1, dtype=np.float32), rng.random((4, 19), dtype=np.float32),
            rng.uniform(-1, 1, 3).astype(np.float32), rng.uniform(-1, 1, 3).astype(np.float32))


def test_architecture_round_trips_through_the_flat_dict_the_protocol_allows():
    architecture = PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[64, 32], activation="tanh")
    flat = architecture.to_flat_dict()
    assert all(isinstance(v, (bool, int, float, str)) or (isinstance(v, list) and all(isinstance(i, int) for i in v))
               for v in flat.values())
    assert PolicyArchitecture.from_flat_dict(flat) == architecture
    assert architecture.kind == "mlp"
    assert PolicyArchitecture.for_layout(tm20_image_layout(height=64, width=64)).kind == "cnn"


@pytest.mark.parametrize("broken", [
    {"layout": "{not json"},
    {"hidden_sizes": [0]},
    {"kind": "transformer"},
    {"action_dim": 7},
])
def test_an_invalid_architecture_is_a_schema_protocol_error(broken):
    flat = PolicyArchitecture.for_layout(tm20_lidar_layout()).to_flat_dict()
    flat.update(broken)
    with pytest.raises(ProtocolError) as info:
        PolicyArchitecture.from_flat_dict(flat)
    assert info.value.reason == "schema"


def test_weights_travel_through_the_wire_protocol_and_rebuild_an_actor_with_identical_actions():
    torch.manual_seed(0)
    actor = build_actor(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[32, 32]))
    update = weights_update_from_actor(actor, version=3)
    _, received = decode(encode(update, sender="trainer"))
    assert isinstance(received, WeightsUpdate) and received.version == 3
    rebuilt = actor_from_weights_update(received)
    observation = _lidar_observation(np.random.default_rng(1))
    np.testing.assert_array_equal(actor.act(observation, deterministic=True), rebuilt.act(observation, deterministic=True))


def test_load_weights_into_swaps_tensors_in_place_and_refuses_another_architecture():
    architecture = PolicyArchitecture.for_layout(layout_for_box(3, 1), hidden_sizes=[16])
    torch.manual_seed(0)
    source, target = build_actor(architecture), build_actor(architecture)
    observation = (np.array([0.1, -0.2, 0.3], np.float32),)
    assert not np.array_equal(source.act(observation, True), target.act(observation, True))
    parameter = next(target.parameters())
    load_weights_into(target, weights_update_from_actor(source, version=1))
    assert parameter is next(target.parameters())
    np.testing.assert_array_equal(source.act(observation, True), target.act(observation, True))
    other = build_actor(PolicyArchitecture.for_layout(layout_for_box(3, 1), hidden_sizes=[8]))
    with pytest.raises(ProtocolError, match="different architecture"):
        load_weights_into(other, weights_update_from_actor(source, version=2))


def test_act_returns_float32_actions_in_the_unit_box_for_lidar_and_image_layouts():
    rng = np.random.default_rng(0)
    lidar = build_actor(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[32]))
    for deterministic in (True, False):
        action = lidar.act(_lidar_observation(rng), deterministic=deterministic)
        assert action.dtype == np.float32 and action.shape == (3,) and np.all(np.abs(action) <= 1.0)
    image_layout = tm20_image_layout(height=32, width=32)
    image = build_actor(PolicyArchitecture.for_layout(image_layout, hidden_sizes=[32], conv_channels=[8, 16]))
    observation = (np.array([0.5], np.float32), rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),
                   np.zeros(3, np.float32), np.zeros(3, np.float32))
    action = image.act(observation, deterministic=True)
    assert action.dtype == np.float32 and action.shape == (3,) and np.all(np.abs(action) <= 1.0)
    with pytest.raises(ValueError, match="parts"):
        image.act(observation[:2], deterministic=True)


def test_deterministic_act_is_repeatable_and_stochastic_act_follows_its_noise_generator():
    actor = build_actor(PolicyArchitecture.for_layout(layout_for_box(3, 2), hidden_sizes=[16]))
    observation = (np.array([0.1, 0.2, 0.3], np.float32),)
    assert np.array_equal(actor.act(observation, True), actor.act(observation, True))
    actor.noise_generator = torch.Generator().manual_seed(5)
    first = [actor.act(observation, False) for _ in range(3)]
    actor.noise_generator = torch.Generator().manual_seed(5)
    second = [actor.act(observation, False) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])


def test_critic_ensemble_gives_one_q_value_per_member_for_image_observations():
    architecture = PolicyArchitecture.for_layout(tm20_image_layout(height=32, width=32), hidden_sizes=[16], conv_channels=[4, 8])
    critics = CriticEnsemble(architecture, n=3)
    observation = (torch.rand(5, 1), torch.randint(0, 256, (5, 4, 32, 32), dtype=torch.uint8), torch.zeros(5, 3), torch.zeros(5, 3))
    assert critics(observation, torch.zeros(5, 3)).shape == (3, 5)
    assert len(critics.encoders) == 3  # one CNN per critic


def test_an_image_too_small_for_the_convolutions_is_refused_with_the_smallest_size_that_fits():
    with pytest.raises(ValueError, match=r"image 'image' of 45x64 pixels is too small for 4 stride-2 convolutions "
                                         r"\(conv_channels \[16, 32, 64, 64\]\), which need at least 46x46"):
        PolicyArchitecture.for_layout(tm20_image_layout(height=45, width=64))
    PolicyArchitecture.for_layout(tm20_image_layout(height=46, width=46))  # the smallest that fits
    PolicyArchitecture.for_layout(tm20_image_layout(height=10, width=10), conv_channels=[8, 8])
    with pytest.raises(ValueError, match="need at least 10x10"):
        PolicyArchitecture.for_layout(tm20_image_layout(height=9, width=9), conv_channels=[8, 8])


def test_a_channels_last_camera_frame_is_named_as_such():
    """An outside probe: a [64, 64, 3] frame was reported as an image of 64x3, too small, with a traceback."""
    camera = ObservationLayout(components=[ObservationComponent(name="cam", frame_shape=[64, 64, 3], dtype="uint8")],
                               action_dim=2)
    with pytest.raises(ValueError, match=r"part 'cam' has uint8 frames \[64, 64, 3\], whose last dimension looks like "
                                         r"the channels of an \[H, W, C\] camera frame: frames are \[C, H, W\]"):
        PolicyArchitecture.for_layout(camera)


@pytest.mark.parametrize("frame_shape", [[64, 64, 4], [96, 96, 1], [2, 3, 64, 64]])
def test_a_frame_the_cnn_would_misread_is_refused_whatever_the_convolutions(frame_shape):
    """An image probe: [64, 64, 4] with conv_channels [16] built a CNN of 64 input channels over 64x4 pixels (the
    channels-last hint came only with frames too small), and stacked frames [2, 3, 64, 64] went to the MLP."""
    from tmrl_common.layout import image_shape_problem

    camera = ObservationLayout(components=[ObservationComponent(name="cam", frame_shape=frame_shape, dtype="uint8")],
                               action_dim=2)
    problem = image_shape_problem(camera)
    assert problem is not None and problem.startswith("observation part 'cam' has uint8 frames")
    with pytest.raises(ValueError, match=re.escape(problem)):
        PolicyArchitecture.for_layout(camera, conv_channels=[16])
    with pytest.raises(ValueError, match=re.escape(problem)):
        PolicyArchitecture.for_layout(camera, kind="mlp")
    for fine in ([3, 64, 64], [64, 64], [4, 64, 64]):
        layout = ObservationLayout(components=[ObservationComponent(name="cam", frame_shape=fine, dtype="uint8")],
                                   action_dim=2)
        assert image_shape_problem(layout) is None and PolicyArchitecture.for_layout(layout).kind == "cnn"


@pytest.mark.parametrize(("hidden_sizes", "members"), [([32, 32], 2), ([16, 24, 8], 3), ([16], 2)])
def test_frozen_min_matches_autograd_through_the_minimum_of_the_frozen_heads(hidden_sizes, members):
    architecture = PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=hidden_sizes)
    torch.manual_seed(0)
    critics = CriticEnsemble(architecture, n=members)
    part = critics.observation_part(torch.randn(64, 83)).detach()
    action = (torch.rand(64, 3) * 2 - 1).requires_grad_(True)
    fast = critics.frozen_min(part.clone(), action)
    (fast_grad,) = torch.autograd.grad((fast * torch.linspace(-1, 2, 64)).sum(), action)
    reference = critics.head(part.clone(), action, frozen=True).min(dim=0).values
    (reference_grad,) = torch.autograd.grad((reference * torch.linspace(-1, 2, 64)).sum(), action)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)  # same sums, another order
    torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-5, atol=1e-7)
    assert fast_grad.abs().sum() > 0
    assert all(p.grad is None for p in critics.parameters())  # the critics stay frozen


def _member_q_with_autograd(critics: CriticEnsemble, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Reference Q-values ``(n, B)``: each member as a plain stack of linear layers and ReLUs, left to autograd."""
    values = []
    for member in range(critics.n):
        x = torch.relu(features @ critics.observation_weight[member] + action @ critics.action_weight[member]
                       + critics.first_bias[member])
        for weight, bias in zip(critics.weights[:-1], critics.biases[:-1], strict=True):
            x = torch.relu(x @ weight[member] + bias[member])
        values.append((x @ critics.weights[-1][member] + critics.biases[-1][member]).squeeze(-1))
    return torch.stack(values)


@pytest.mark.parametrize(("hidden_sizes", "members"), [([32, 32], 2), ([16, 24, 8], 3), ([16], 2)])
def test_relu_critic_training_head_gives_autograds_values_and_gradients(hidden_sizes, members):
    architecture = PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=hidden_sizes)
    torch.manual_seed(0)
    critics = CriticEnsemble(architecture, n=members)
    features, target = torch.randn(64, 83), torch.randn(members, 64)
    action = (torch.rand(64, 3) * 2 - 1).requires_grad_(True)

    fast = critics.head(critics.observation_part(features), action)  # the hand-written backward
    fast_loss = (fast - target).pow(2).mean()
    fast_grads = torch.autograd.grad(fast_loss, [action, *critics.parameters()])
    reference = _member_q_with_autograd(critics, features, action)
    reference_grads = torch.autograd.grad((reference - target).pow(2).mean(), [action, *critics.parameters()])

    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    for name, fast_grad, reference_grad in zip(["action", *dict(critics.named_parameters())], fast_grads,
                                               reference_grads, strict=True):
        assert fast_grad.abs().sum() > 0, name
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-4, atol=1e-6, msg=name)


def test_relu_critic_training_head_leaves_its_saved_activations_for_a_second_backward():
    critics = CriticEnsemble(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[16, 16]), n=2)
    q_values = critics.head(critics.observation_part(torch.randn(8, 83)), torch.rand(8, 3))
    first = torch.autograd.grad(q_values.sum(), list(critics.parameters()), retain_graph=True)
    second = torch.autograd.grad(q_values.sum(), list(critics.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(g.abs().sum() > 0 for g in first)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_plain_critic_forward_gives_the_per_member_stack_and_the_fast_heads_values(activation):
    architecture = PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[16, 24], activation=activation)
    torch.manual_seed(0)
    critics = CriticEnsemble(architecture, n=3)
    observation = (torch.rand(64, 1), torch.rand(64, 4, 19), torch.rand(64, 3), torch.rand(64, 3))
    action = torch.rand(64, 3) * 2 - 1
    plain = critics(observation, action)
    fast = critics.q_values(critics.encode(observation), action)
    torch.testing.assert_close(plain, fast, rtol=1e-5, atol=1e-6)
    if activation == "relu":
        torch.testing.assert_close(plain, _member_q_with_autograd(critics, critics.encode(observation), action),
                                   rtol=1e-5, atol=1e-6)


def test_a_component_scale_multiplies_it_before_the_first_layer_for_actor_and_critics():
    from tmrl_common.layout import tm20_pixel_lidar_layout

    scaled_layout, plain_layout = tm20_pixel_lidar_layout(), tm20_lidar_layout()
    scale = scaled_layout.components[1].scale
    assert scale == 0.01 and plain_layout.components[1].scale is None
    torch.manual_seed(0)
    scaled = build_actor(PolicyArchitecture.for_layout(scaled_layout, hidden_sizes=[16]))
    plain = build_actor(PolicyArchitecture.for_layout(plain_layout, hidden_sizes=[16]))
    plain.load_state_dict(scaled.state_dict())
    speed, lidar, *actions = _lidar_observation(np.random.default_rng(2))
    pixels = lidar * 400.0
    kept = pixels.copy()
    np.testing.assert_allclose(scaled.act((speed, pixels, *actions), deterministic=True),
                               plain.act((speed, pixels * scale, *actions), deterministic=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pixels, kept)  # the caller's observation is not scaled in place
    critics = CriticEnsemble(PolicyArchitecture.for_layout(scaled_layout, hidden_sizes=[16]), n=2)
    plain_critics = CriticEnsemble(PolicyArchitecture.for_layout(plain_layout, hidden_sizes=[16]), n=2)
    plain_critics.load_state_dict(critics.state_dict())
    batch = [torch.from_numpy(part)[None] for part in (speed, pixels, *actions)]
    plain_batch = [batch[0], batch[1] * scale, *batch[2:]]
    action = torch.zeros(1, 3)
    torch.testing.assert_close(critics(batch, action), plain_critics(plain_batch, action))


def test_a_scaled_layout_travels_in_the_architecture_and_an_unscaled_one_stays_off_the_wire():
    from tmrl_common.layout import tm20_pixel_lidar_layout
    from tmrl_common.protocol import Hello

    architecture = PolicyArchitecture.for_layout(tm20_pixel_lidar_layout(), hidden_sizes=[8])
    assert PolicyArchitecture.from_flat_dict(architecture.to_flat_dict()).layout.components[1].scale == 0.01
    _, hello = decode(encode(Hello(role="worker", software="w", layout=tm20_pixel_lidar_layout(), next_seq=0),
                             sender="w"))
    assert hello.layout == tm20_pixel_lidar_layout()
    plain = encode(Hello(role="worker", software="w", layout=tm20_lidar_layout(), next_seq=0), sender="w",
                   sent_at=1.0)
    assert b"scale" not in b"".join(plain)


@pytest.mark.parametrize(("hidden_sizes", "activation"), [([32, 32], "relu"), ([16, 24, 8], "relu"), ([16], "relu"),
                                                          ([32, 32], "tanh")])
def test_policy_pair_matches_policy_at_both_batches_with_gradients_through_the_current_one_only(hidden_sizes,
                                                                                                activation):
    architecture = PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=hidden_sizes, activation=activation)
    torch.manual_seed(0)
    actor = build_actor(architecture)
    with torch.no_grad():  # a wide log-std head, so that some rows hit the clamp at both ends
        actor.log_std.weight.mul_(20.0)
    features = torch.randn(64, 83, requires_grad=True)  # as an encoder with parameters would give them
    next_features = torch.randn(64, 83)
    noise, next_noise = torch.randn(64, 3), torch.randn(64, 3)
    action, log_prob, next_action, next_log_prob = actor.policy_pair(features, next_features, noise, next_noise)
    assert not next_action.requires_grad and not next_log_prob.requires_grad

    def plain(features, noise):  # Actor.policy's maths, with the noise given
        mean, log_std = actor._mean_and_log_std(features)
        return networks._squashed_gaussian(mean, log_std, noise, True)

    expected_action, expected_log_prob = plain(features, noise)
    expected_next_action, expected_next_log_prob = plain(next_features, next_noise)
    torch.testing.assert_close(action, expected_action, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_prob, expected_log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(next_action, expected_next_action.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(next_log_prob, expected_next_log_prob.detach(), rtol=1e-5, atol=1e-5)
    raw_log_std = actor.log_std(actor.trunk(features)).detach()
    clamped = (raw_log_std < architecture.log_std_min) | (raw_log_std > architecture.log_std_max)
    assert clamped.any() and not clamped.all()

    def gradients(action, log_prob):
        loss = (action * torch.linspace(-1, 1, 3)).sum() + (log_prob * torch.linspace(-2, 1, 64)).sum()
        return torch.autograd.grad(loss, [features, *actor.parameters()])

    for name, fast, reference in zip(["features", *(n for n, _ in actor.named_parameters())],
                                     gradients(action, log_prob), gradients(expected_action, expected_log_prob),
                                     strict=True):
        scale = float(reference.abs().max())  # sums of hundreds of terms in another order: float error scales with it
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-6 * scale, msg=name)
        assert reference.abs().sum() > 0, name


def test_critics_with_layer_norm_normalise_each_hidden_layer_per_member_before_the_activation():
    architecture = PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[16, 8])
    torch.manual_seed(3)
    critics = CriticEnsemble(architecture, n=2, layer_norm=True)
    torch.manual_seed(3)
    plain = CriticEnsemble(architecture, n=2)
    for name, tensor in plain.state_dict().items():  # the norms are drawn after everything else
        assert torch.equal(critics.state_dict()[name], tensor)
    with torch.no_grad():
        for parameter in [*critics.norm_weights, *critics.norm_biases]:
            parameter.uniform_(-2, 2)
    observation = (torch.rand(5, 1), torch.rand(5, 4, 19), torch.rand(5, 3), torch.rand(5, 3))
    action = torch.rand(5, 3) * 2 - 1
    features = torch.cat([part.reshape(5, -1) for part in observation], dim=1)
    for member in range(2):  # one member at a time, with torch.nn's own LayerNorm
        first = torch.cat([critics.observation_weight[member], critics.action_weight[member]]).T
        x = torch.cat([features, action], dim=1) @ first.T + critics.first_bias[member]
        for layer in range(2):
            norm = torch.nn.LayerNorm(x.shape[-1])
            with torch.no_grad():
                norm.weight.copy_(critics.norm_weights[layer][member, 0])
                norm.bias.copy_(critics.norm_biases[layer][member, 0])
            x = torch.relu(norm(x)) @ critics.weights[layer][member] + critics.biases[layer][member]
        torch.testing.assert_close(critics(observation, action)[member], x.squeeze(-1).detach(), rtol=1e-5, atol=1e-6)
    for fast_path in (lambda: critics.observation_part(features), lambda: critics.q_values(features, action)):
        with pytest.raises(ValueError, match="LayerNorm"):
            fast_path()
