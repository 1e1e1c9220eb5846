"""The learner guard: an update whose loss or gradient is not finite is not applied, and non-finite weights never
leave the learner.

Why (issue 13, finding 4): ten batches of finite but absurd values (rewards of 3e38; actions or LIDAR of 1e30) make
the critic loss overflow to inf, its gradient is NaN, and one Adam step with it turns the weights NaN; the trainer
then published and checkpointed them and died again after every restart. Rejecting values outside the layout's
bounds at ingest is the first line of defence; this is the second, and it holds whatever reached the replay memory.

:meth:`UpdateGuard.check` runs once per update, between the backward pass and the Adam step:

* the update is applied only when the losses and the squared norm of every gradient are finite in float32. The
  squared norm also catches a finite gradient beyond about 1.8e19, whose square would overflow Adam's second moment
  to inf and freeze that weight for good;
* the verdict stays on the device as a 0-d tensor (no host synchronisation per update): it is handed to the fused Adam
  kernel as ``found_inf`` (the mechanism torch's ``GradScaler`` uses), which leaves weights, moments and step count
  untouched when it is 1, and it scales the polyak step of the target critics to 0. Rejected updates are counted on
  the device too; :meth:`UpdateGuard.rejected_updates` reads the count (one synchronisation) when a report is due.

:func:`first_non_finite` is the check before weights are published or checkpointed, and when a checkpoint is loaded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping

import torch

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
"""At most one warning about rejected updates per this many seconds (each one counts what happened since the last)."""

GUARDED_VALUES = ("critic_loss", "actor_loss", "alpha_loss", "gradient_square_norm")
"""What :meth:`UpdateGuard.check` looks at, in the order of :attr:`UpdateGuard.last_rejected`."""


class UpdateGuard:
    """Decides, on the device, whether each SAC update may be applied, and counts the ones that may not."""

    def __init__(self, device: torch.device) -> None:
        self._zero = torch.zeros((), device=device)
        self._rejected = torch.zeros((), device=device)
        self._last_rejected = torch.full((len(GUARDED_VALUES),), math.nan, device=device)
        self._reported = 0
        self._reported_at = -math.inf

    def check(self, critic_loss: torch.Tensor, actor_loss: torch.Tensor, alpha_loss: torch.Tensor | None,
              gradients: Iterable[torch.Tensor] = (), rejected_before: torch.Tensor | None = None,
              square_norm: torch.Tensor | None = None) -> torch.Tensor:
        """0-d float tensor on the device: 1.0 when the update with these losses (``alpha_loss`` ``None`` when alpha
        is fixed) and ``gradients`` must not be applied, else 0.0. ``rejected_before`` (a :func:`non_finite` verdict
        taken earlier in the same update: the critics' in the ``critic-first`` order) rejects it too.
        ``square_norm``: the gradients' squared norm, where the learner has computed it already (``gradients`` is
        then not read)."""
        gradient_norm = _square_norm(gradients) if square_norm is None else square_norm
        values = torch.stack([critic_loss.detach(), actor_loss.detach(),
                              self._zero if alpha_loss is None else alpha_loss.detach(), gradient_norm])
        rejected = values.sum().isfinite().logical_not()  # any inf or NaN (or an overflowing sum) makes the sum one
        if rejected_before is not None:
            rejected = rejected.logical_or(rejected_before.bool())
        self._rejected += rejected
        self._last_rejected = torch.where(rejected, values, self._last_rejected)
        return rejected.float()

    def rejected_updates(self) -> int:
        """Updates not applied so far (reads a device counter: call it when reporting, not every update)."""
        return int(self._rejected.item())

    def report(self, updates: int) -> int:
        """Log a warning when updates were rejected since the last warning (at most every :data:`LOG_EVERY_S`);
        return the total rejected so far."""
        rejected = self.rejected_updates()
        now = time.monotonic()
        if rejected > self._reported and now - self._reported_at >= LOG_EVERY_S:
            last = dict(zip(GUARDED_VALUES, self._last_rejected.tolist(), strict=True))
            log.warning("%d SAC update(s) not applied since the last report (%d of %d in all): a loss or gradient was "
                        "not finite (last one: %s). Weights and Adam state were left as they were. Either the replay "
                        "memory holds extreme but accepted values (ingest's bounds, max_abs_observation and "
                        "max_abs_reward, passed them: look at the workers' data) or the learning diverged (lower the "
                        "learning rates or reward_scale)",
                        rejected - self._reported, rejected, updates,
                        ", ".join(f"{name} {value:.3g}" for name, value in last.items()))
            self._reported, self._reported_at = rejected, now
        return rejected


def _square_norm(gradients: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in gradients]).sum()


def non_finite(loss: torch.Tensor, gradients: Iterable[torch.Tensor] = (),
               square_norm: torch.Tensor | None = None) -> torch.Tensor:
    """0-d float tensor on the device, 1.0 when ``loss`` or the squared norm of ``gradients`` (or ``square_norm``,
    computed already) is not finite: the critics' part of :meth:`UpdateGuard.check`, for the ``critic-first`` order,
    whose critics step before the actor's loss exists. Counts nothing (the update's :meth:`UpdateGuard.check` does,
    given this as ``rejected_before``)."""
    norm = _square_norm(gradients) if square_norm is None else square_norm
    return (loss.detach() + norm).isfinite().logical_not().float()


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding an inf or a NaN, or ``None``."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
