"""What an untrained policy makes of TrackMania's LIDAR: the pixel distances must not saturate its actions.

Unscaled, the 76 LIDAR inputs of 170 to 490 pixels push an untrained actor's pre-tanh means so far out that every
action sits at +-1 and its log-density is huge; SAC's learned entropy coefficient then rises, the Q-values fall far
below zero and the policy learns to stand still to end its episodes early (docs/trackmania.md, "A learning run").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tmrl_common.layout import tm20_lidar_layout, tm20_pixel_lidar_layout
from tmrl_common.networks import PolicyArchitecture, build_actor
from tmrl_worker.tm20.emulated_game import EmulatedGame
from tmrl_worker.tm20.lidar import Lidar

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start_of_race_observations(batch: int = 256) -> list[torch.Tensor]:
    """The emulated game's first LIDAR scan (pixels, measured on its rendered frame), random previous actions."""
    with EmulatedGame({"port": 0}) as game:
        scan = Lidar().measure(game.render(488, 958))
    assert scan.min() > 100  # on the start straight every beam runs a long way: large pixel values
    rng = np.random.default_rng(0)
    actions = torch.from_numpy(rng.uniform(-1, 1, (batch, 3)).astype(np.float32))
    return [torch.full((batch, 1), 14.0), torch.from_numpy(np.repeat(scan[None], 4, axis=0)).expand(batch, 4, 19),
            actions, actions.flip(0)]


def entropy_at_start(layout, seed: int, observations: list[torch.Tensor]) -> float:
    torch.manual_seed(seed)
    actor = build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[128, 128]))
    with torch.no_grad():
        _, log_prob = actor(observations)
    return float(-log_prob.mean())


def test_the_tm20_layout_keeps_an_untrained_policy_unsaturated_on_pixel_lidar():
    observations = start_of_race_observations()
    scaled = [entropy_at_start(tm20_pixel_lidar_layout(), seed, observations) for seed in range(4)]
    unscaled = [entropy_at_start(tm20_lidar_layout(), seed, observations) for seed in range(4)]
    # SAC's target entropy is -3 (3 actions): the scaled inputs start above it, the raw pixels far below
    assert min(scaled) > -3.0, scaled
    assert max(unscaled) < -20.0, unscaled
