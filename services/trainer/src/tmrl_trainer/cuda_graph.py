"""The ``cuda-graph`` backend: the reference update, recorded once as a CUDA graph and replayed for every minibatch.

What is captured: the whole of :meth:`ReferenceLearner.losses <tmrl_trainer.reference.ReferenceLearner.losses>`
(critic target, critic, actor and entropy losses), the backward pass, the learner guard, one fused Adam step and the
polyak step. Nothing in it asks the host anything, so an update is one ``graph.replay()`` plus the copy of the batch
into the graph's static input tensors (``non_blocking`` from pinned host memory):

* Adam is ``torch.optim.Adam(fused=True, capturable=True)``: step counts live on the device, and the guard's verdict
  is the fused kernel's ``found_inf`` (weights, moments and step count unchanged when it is 1);
* the polyak step is ``lerp`` by ``tau * (1 - rejected)``, a device tensor, instead of an ``if``;
* random draws (policy noise, REDQ subsets) come from the learner's own generator, registered with the graph so that
  every replay draws fresh numbers;
* metrics stay in a static device tensor; :meth:`CudaGraphLearner.update` reads it (one synchronisation) only when
  ``with_metrics`` is asked for, which the trainer does every ``publish_every`` updates.

The first :data:`WARMUP_UPDATES` updates run eagerly on a side stream (CUDA graphs need their kernels initialised,
and Adam needs its state) and count as real updates. Loading a checkpoint drops the graph (the optimizer's state
tensors are replaced); the graph is recorded again after as many eager updates.

On a CPU device, or with ``capture=False``, the same step runs eagerly: that is how its maths is tested against the
reference on a machine without a GPU (``tests/trainer/test_learner_backends.py``); the graph itself is tested only
where CUDA is available.

Not done yet (issue 16): sampling the minibatch on the device from a device-resident copy of the replay memory; today
the batch is sampled on the host and copied into the graph's inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from tmrl_common.networks import PolicyArchitecture

from tmrl_trainer.memory import TransitionBatch
from tmrl_trainer.reference import ReferenceLearner
from tmrl_trainer.sac import SACConfig

WARMUP_UPDATES = 3
"""Eager updates before the graph is recorded (the documented CUDA-graph recipe uses a few on a side stream)."""


class CudaGraphLearner(ReferenceLearner):
    """:class:`ReferenceLearner`'s update with device-side guard, fused capturable Adam, and (on CUDA) graph replay."""

    def __init__(self, config: SACConfig, architecture: PolicyArchitecture, device: str | torch.device = "auto",
                 seed: int = 0, capture: bool | None = None) -> None:
        super().__init__(config, architecture, device=device, seed=seed)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, not {self.device}")
        self._zero_gradients()  # gradients are allocated once and zeroed in place: the graph holds their addresses
        self._graph: torch.cuda.CUDAGraph | None = None
        self._warmup_left = WARMUP_UPDATES
        self._inputs: TransitionBatch | None = None
        self._metrics: torch.Tensor | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self._parameter_groups(), fused=True, capturable=self.device.type == "cuda")

    def _zero_gradients(self) -> None:
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        torch._foreach_zero_(self._gradients())

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    def step(self, batch: TransitionBatch) -> torch.Tensor:
        """One guarded update without a host synchronisation; returns the metrics tensor (on the device)."""
        losses = self.losses(batch)
        learned_alpha_loss = losses.alpha if self.config.learn_alpha else None
        self._zero_gradients()
        (losses.critic + losses.actor + (0.0 if learned_alpha_loss is None else learned_alpha_loss)).backward()
        rejected = self.guard.check(losses.critic, losses.actor, learned_alpha_loss, self._gradients())
        self.optimizer.found_inf = rejected  # read by the fused Adam kernel, as GradScaler sets it
        self.optimizer.step()
        with torch.no_grad():
            weight = self.config.tau * (1.0 - rejected)
            for target, online in zip(self.target_critics.parameters(), self.critics.parameters(), strict=True):
                target.lerp_(online, weight)
        return losses.metrics()

    def update(self, batch: TransitionBatch, with_metrics: bool = True) -> dict[str, float]:
        if not self.capture:
            metrics = self.step(batch.to(self.device))
        elif self._graph is None and self._warmup_left > 0:
            metrics = self._eager_on_side_stream(batch)
            self._warmup_left -= 1
        else:
            if self._graph is None:
                self._record(batch)
            self._copy_into_inputs(batch)
            self._graph.replay()  # type: ignore[union-attr]
            metrics = self._metrics  # type: ignore[assignment]
        self.updates += 1
        if not with_metrics:
            return {}
        return dict(zip(self.METRICS, metrics.tolist(), strict=True))

    # ----------------------------------------------------------------------------------------------- the graph

    def _eager_on_side_stream(self, batch: TransitionBatch) -> torch.Tensor:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            metrics = self.step(batch.to(self.device))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return metrics

    def _record(self, batch: TransitionBatch) -> None:
        self._inputs = _static_copy(batch, self.device)
        torch.cuda.synchronize(self.device)
        self._graph = torch.cuda.CUDAGraph()
        if not hasattr(self._graph, "register_generator_state"):  # torch < 2.4: only the default generator replays
            raise RuntimeError(f"the cuda-graph backend needs torch >= 2.4 (CUDAGraph.register_generator_state); "
                               f"this is torch {torch.__version__}: use backend 'cpu-fast' or 'reference'")
        self._graph.register_generator_state(self.generator)
        with torch.cuda.graph(self._graph):
            self._metrics = self.step(self._inputs)

    def _copy_into_inputs(self, batch: TransitionBatch) -> None:
        assert self._inputs is not None
        if batch.action.shape != self._inputs.action.shape:
            raise ValueError(f"a CUDA graph replays one batch shape: recorded {tuple(self._inputs.action.shape)}, "
                             f"given {tuple(batch.action.shape)} (keep sac.batch_size fixed)")
        for static, new in zip(_flat(self._inputs), _flat(batch), strict=True):
            static.copy_(new, non_blocking=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._graph, self._inputs, self._metrics = None, None, None  # recorded around the replaced Adam state
        self._warmup_left = WARMUP_UPDATES
        self._zero_gradients()


def _flat(batch: TransitionBatch) -> list[torch.Tensor]:
    return [*batch.observation, batch.action, batch.reward, *batch.next_observation, batch.terminated, batch.truncated]


def _static_copy(batch: TransitionBatch, device: torch.device) -> TransitionBatch:
    """Device tensors shaped like ``batch``'s, holding its values: the graph's inputs."""
    clone = lambda t: t.to(device, copy=True)  # noqa: E731
    return TransitionBatch(tuple(map(clone, batch.observation)), clone(batch.action), clone(batch.reward),
                           tuple(map(clone, batch.next_observation)), clone(batch.terminated), clone(batch.truncated))
