"""Synchronous single-process training: one environment, the learner and the replay memory in one loop.

Samples take the same path as in the distributed trainer: each step becomes a row of a
:class:`~tmrl_common.batching.SampleBatchBuilder`, whose :class:`~tmrl_common.protocol.SampleBatch` goes into
:meth:`ReplayMemory.add_batch`. Any gymnasium id works (``Pendulum-v1``, ``module.path:env/Id-v0``): an environment
whose unwrapped object has an ``ObservationLayout`` attribute ``layout`` uses it (tuple observations), one with a
flat ``Box`` observation uses :func:`~tmrl_common.layout.layout_for_box`. The policy acts in ``[-1, 1]``; actions are
rescaled to the environment's ``Box`` bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tmrl_common.batching import SampleBatchBuilder
from tmrl_common.layout import ObservationLayout, box_bounds, layout_for_box

from tmrl_trainer.checkpoint import save_checkpoint
from tmrl_trainer.learner import make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.metrics import TrainingMetrics
from tmrl_trainer.sac import SACConfig, check_batch_fits_the_memory

LOCAL_WORKER_ID = "local"
LATEST_LOCAL_CHECKPOINT = "latest.safetensors"
"""The checkpoint of a local run, in ``<run_dir>/checkpoints/`` (rewritten at each save)."""


class UnsupportedEnvironmentError(ValueError):
    """The environment cannot be trained on locally (unsupported spaces, unknown id)."""


class LocalTrainingConfig(BaseModel):
    """Settings of :func:`train_local` besides the environment, the step budget and the seed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sac: SACConfig = Field(default_factory=SACConfig)
    memory_capacity: int = Field(default=1_000_000, ge=2)
    device: str = "auto"
    eval_episodes: int = Field(default=10, ge=0)
    """Deterministic episodes of the final evaluation (and of each periodic one)."""
    eval_every: int = Field(default=0, ge=0)
    """Environment steps between periodic evaluations (0: only at the end)."""
    log_every: int = Field(default=250, ge=1)
    """Updates between TensorBoard points for the learner metrics and speeds."""
    run_dir: Path | None = None
    """``tensorboard/`` and ``checkpoints/`` go here (nothing is written when unset)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Environment steps between checkpoints (0: only at the end); needs ``run_dir``."""
    save_memory: bool = False
    """Save the replay memory next to each checkpoint."""

    @model_validator(mode="after")
    def _can_learn(self) -> LocalTrainingConfig:
        if self.sac.learning_starts > self.memory_capacity:  # the service may only store; a local run must learn
            raise ValueError(f"sac.learning_starts ({self.sac.learning_starts}) exceeds memory_capacity "
                             f"({self.memory_capacity}): the memory never holds enough rows to start learning")
        check_batch_fits_the_memory(self.sac, self.memory_capacity)
        return self


@dataclass
class LocalTrainingResult:
    """What :func:`train_local` measured."""

    final_return: float
    """Mean undiscounted return of the final deterministic evaluation (NaN when ``eval_episodes`` is 0)."""
    final_returns: list[float]
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    """(environment step, mean deterministic return) of every evaluation, the final one included."""
    steps: int = 0
    """Environment steps taken: the budget, or fewer when a stop was asked for."""
    stopped: bool = False
    """Whether a stop (``stop`` set: Ctrl-C, SIGTERM) ended the run before its step budget; the run then saved its
    checkpoint but skipped the final evaluation."""
    updates: int = 0
    updates_rejected: int = 0
    """Updates the learner guard did not apply (a non-finite loss or gradient; see :mod:`tmrl_trainer.guard`)."""
    episodes: int = 0
    wall_s: float = 0.0
    checkpoint: Path | None = None


class _EnvAdapter:
    """Observation tuples and [-1, 1] actions for one gymnasium environment."""

    def __init__(self, env: gym.Env) -> None:
        self.env = env
        space = env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise UnsupportedEnvironmentError(f"local training needs a 1-D Box action space, {env.spec.id if env.spec else env} has {space}")
        self.low = space.low.astype(np.float64)
        self.high = space.high.astype(np.float64)
        if not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise UnsupportedEnvironmentError(f"action space {space} must be bounded: the policy's tanh output is rescaled to it")
        layout = getattr(env.unwrapped, "layout", None)
        if isinstance(layout, ObservationLayout):
            self.layout, self.flat = layout, False
        elif isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1:
            # with the space's bounds, as the trainer service and the worker build it: a policy trained here is then
            # the same layout that `tmrl-worker eval` and a worker on this env expect
            bounds = box_bounds(env.observation_space.low, env.observation_space.high)
            self.layout, self.flat = layout_for_box(int(env.observation_space.shape[0]), int(space.shape[0]), *bounds), True
        else:
            raise UnsupportedEnvironmentError(f"observation space {env.observation_space} is neither a flat Box nor described by an "
                                   "ObservationLayout attribute 'layout' on the unwrapped environment")
        if self.layout.action_dim != space.shape[0]:
            raise UnsupportedEnvironmentError(f"layout action_dim {self.layout.action_dim} differs from the action space {space}")

    def observation(self, raw) -> tuple[np.ndarray, ...]:
        return (np.asarray(raw, dtype=np.float32),) if self.flat else tuple(raw)

    def env_action(self, action: np.ndarray) -> np.ndarray:
        scaled = self.low + (np.asarray(action, dtype=np.float64) + 1.0) * 0.5 * (self.high - self.low)
        return np.clip(scaled, self.low, self.high).astype(self.env.action_space.dtype)


def evaluate(actor, adapter: _EnvAdapter, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of ``episodes`` deterministic episodes (reset seeds ``seed``, ``seed + 1``...)."""
    returns = []
    for episode in range(episodes):
        raw, _ = adapter.env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action = actor.act(adapter.observation(raw), deterministic=True)
            raw, reward, terminated, truncated, _ = adapter.env.step(adapter.env_action(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def train_local(
    env_id: str,
    steps: int,
    seed: int = 0,
    config: LocalTrainingConfig | None = None,
    on_progress: Callable[[int, dict[str, float]], None] | None = None,
    stop: threading.Event | None = None,
) -> LocalTrainingResult:
    """Train SAC on ``env_id`` for ``steps`` environment steps; evaluate deterministically at the end.

    ``on_progress(step, info)`` is called after every step (``info`` holds ``episode_return`` when one finished,
    ``eval_return`` after an evaluation): the CLI drives a progress bar with it. Once ``stop`` is set the run ends
    after the step it is in: it saves its checkpoint and skips the final evaluation (``result.stopped``).
    """
    config = config or LocalTrainingConfig()
    started = time.perf_counter()
    try:
        env, eval_env = gym.make(env_id), gym.make(env_id)
    except (gym.error.Error, ImportError) as exc:  # an unknown id, or gym:module:Id whose module does not import
        raise UnsupportedEnvironmentError(f"gymnasium cannot make {env_id!r}: {exc}") from exc
    adapter, eval_adapter = _EnvAdapter(env), _EnvAdapter(eval_env)
    layout = adapter.layout

    learner = make_learner(config.sac, config.sac.architecture(layout), device=config.device, seed=seed)
    learner.actor.noise_generator = torch.Generator(learner.device).manual_seed(seed + 2)
    memory = ReplayMemory(layout, capacity=config.memory_capacity, seed=seed + 3, n_step=config.sac.n_step,
                          gamma=config.sac.gamma)
    builder = SampleBatchBuilder(layout)
    metrics = TrainingMetrics(config.run_dir / "tensorboard" if config.run_dir else None)
    checkpoint_path = config.run_dir / "checkpoints" / LATEST_LOCAL_CHECKPOINT if config.run_dir else None
    exploration = np.random.default_rng(seed + 4)
    env.action_space.seed(seed)

    result = LocalTrainingResult(final_return=float("nan"), final_returns=[])
    batches = 0
    update_debt = 0.0
    raw, _ = env.reset(seed=seed)
    observation = adapter.observation(raw)
    builder.add_reset(observation)
    episode_return, episode_length = 0.0, 0

    def checkpoint(step: int) -> None:
        if checkpoint_path is not None:
            counters = {"env_steps": step, "episodes": result.episodes, "updates": learner.updates}
            result.checkpoint = save_checkpoint(checkpoint_path, learner, counters,
                                                memory if config.save_memory else None)

    def evaluation(step: int) -> float:
        returns = evaluate(learner.actor, eval_adapter, config.eval_episodes, seed=seed + 1_000_000)
        mean = float(np.mean(returns))
        result.evaluations.append((step, mean))
        metrics.log_evaluation(step, mean)
        result.final_returns = returns
        return mean

    try:
        for step in range(1, steps + 1):
            if stop is not None and stop.is_set():
                result.stopped = True
                break
            result.steps = step
            info: dict[str, float] = {}
            if len(memory) < config.sac.learning_starts:
                action = exploration.uniform(-1.0, 1.0, layout.action_dim).astype(np.float32)
            else:
                action = learner.actor.act(observation, deterministic=False)
            raw, reward, terminated, truncated, _ = env.step(adapter.env_action(action))
            observation = adapter.observation(raw)
            builder.add_step(action, observation, float(reward), bool(terminated), bool(truncated))
            episode_return += float(reward)
            episode_length += 1
            if terminated or truncated:
                result.episodes += 1
                metrics.log_episode(step, episode_return, episode_length)
                info["episode_return"] = episode_return
                raw, _ = env.reset()
                observation = adapter.observation(raw)
                builder.add_reset(observation)
                episode_return, episode_length = 0.0, 0
            memory.add_batch(LOCAL_WORKER_ID, builder.build(seq=batches, weights_version=learner.updates))
            batches += 1

            if len(memory) >= config.sac.learning_starts:
                update_debt += config.sac.utd
                while update_debt >= 1.0 and not (stop is not None and stop.is_set()):
                    update_debt -= 1.0
                    log_now = (learner.updates + 1) % config.log_every == 0
                    update_metrics = learner.update(memory.sample(config.sac.batch_size), with_metrics=log_now)
                    if log_now:
                        update_metrics["updates_rejected"] = learner.guard.report(learner.updates)
                        metrics.log_update(step, update_metrics)
                        metrics.log_rates(step, learner.updates, step)

            if config.eval_every and step % config.eval_every == 0 and step != steps and config.eval_episodes:
                info["eval_return"] = evaluation(step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step != steps:
                checkpoint(step)
            if on_progress is not None:
                on_progress(step, info)

        if config.eval_episodes and not result.stopped:
            result.final_return = evaluation(steps)
        checkpoint(result.steps)
    finally:
        metrics.close()
        env.close()
        eval_env.close()
    result.updates = learner.updates
    result.updates_rejected = learner.guard.report(learner.updates)
    result.wall_s = time.perf_counter() - started
    return result
