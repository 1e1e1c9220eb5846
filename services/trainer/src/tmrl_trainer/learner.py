"""The learner seam: :func:`make_learner` is the one place that chooses how the SAC update is computed.

* ``reference``: :class:`~tmrl_trainer.reference.ReferenceLearner`, plain PyTorch, the oracle the others are tested
  against;
* ``cpu-fast``: :class:`~tmrl_trainer.cpu_fast.SACLearner`, flat parameters, hand-written critic and policy backward
  passes, direct fused Adam calls (the CPU default);
* ``cpu-compiled``: :class:`~tmrl_trainer.cpu_compiled.CompiledLearner`, cpu-fast's passes called without autograd
  and compiled by ``torch.compile`` into three graphs (MLP observations, ReLU, plain critics; 4-12 % faster than
  ``cpu-fast`` at batch 256 and one thread, 10-18 % at two, after seconds of compiling per process; on request
  only);
* ``cuda-graph``: :class:`~tmrl_trainer.cuda_graph.CudaGraphLearner`, the reference update recorded once as a CUDA
  graph and replayed (the CUDA default; its step runs eagerly on a CPU device);
* ``auto``: ``cuda-graph`` on a CUDA device, ``cpu-fast`` elsewhere (``reference`` for critics with LayerNorm,
  ``sac.critic_layer_norm``, which ``cpu-fast`` does not compute).

All of them take the same seed to the same initial weights and random draws, give parameters that agree to float
tolerance after the same batches, apply the learner guard, and read and write the same checkpoints
(``tests/trainer/test_learner_backends.py``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from tmrl_common.networks import Actor, CriticEnsemble, PolicyArchitecture

from tmrl_trainer.cpu_compiled import CompiledLearner
from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.cuda_graph import CudaGraphLearner
from tmrl_trainer.guard import UpdateGuard
from tmrl_trainer.memory import TransitionBatch
from tmrl_trainer.reference import ReferenceLearner
from tmrl_trainer.sac import Backend, SACConfig, resolve_device

BACKENDS: dict[str, type] = {"reference": ReferenceLearner, "cpu-fast": SACLearner, "cpu-compiled": CompiledLearner,
                             "cuda-graph": CudaGraphLearner}


class Learner(Protocol):
    """What the trainer service, local training and checkpoints use of a learner (Acme's ``Learner`` role)."""

    config: SACConfig
    architecture: PolicyArchitecture
    device: torch.device
    actor: Actor
    critics: CriticEnsemble
    target_critics: CriticEnsemble
    log_alpha: torch.Tensor
    guard: UpdateGuard
    updates: int
    learning_rates_overridden: dict[str, tuple[float, float]]

    def update(self, batch: TransitionBatch, with_metrics: bool = True) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resolve_backend(backend: Backend, device: torch.device, config: SACConfig | None = None) -> str:
    """``auto`` → ``cuda-graph`` on a CUDA device, otherwise ``cpu-fast``, or ``reference`` when ``config`` is an
    update ``cpu-fast`` does not compute (:meth:`SACLearner.computes`); any other name is returned as is."""
    if backend == "auto":
        if device.type == "cuda":
            return "cuda-graph"
        return "cpu-fast" if config is None or SACLearner.computes(config) else "reference"
    return backend


def make_learner(config: SACConfig, architecture: PolicyArchitecture, device: str | torch.device = "auto",
                 seed: int = 0, backend: Backend | None = None) -> Learner:
    """The learner for ``config`` on ``device``, computed by ``backend`` (default: ``config.backend``)."""
    resolved_device = resolve_device(device)
    name = resolve_backend(backend or config.backend, resolved_device, config)
    return BACKENDS[name](config, architecture, device=resolved_device, seed=seed)


def backend_name(learner: Learner) -> str:
    """The :data:`BACKENDS` name of ``learner``'s implementation (what ``auto`` resolved to)."""
    return next((name for name, cls in BACKENDS.items() if type(learner) is cls), type(learner).__name__)
