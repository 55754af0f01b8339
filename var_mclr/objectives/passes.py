"""The registry's default forward passes (var_mclr/objectives/__init__.py, objective_loss): one teacher-forced pass over
every (image, class) row of a plan, and the frozen reference's over the same rows."""
from __future__ import annotations

import torch

from var_mclr.likelihood import loglik_under_classes
from var_mclr.objectives.base import ClassPlan


def score_rows(var, ref, plan: ClassPlan, idx_BL: torch.Tensor, x_BLCv: torch.Tensor, needs_reference: bool,
               strength_BK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(l_BK, reference l_BK or None, the plan's flags on the device): l(x_b, classes_BK[b, k]) for every row, at
    strength_BK for a strength-conditioned model."""
    # non_blocking: a blocking copy from host memory waits for the whole GPU queue (a host sync every micro-step);
    # the plan's tensors are fresh per step, so the copy may run behind the host.
    classes_BK = plan.classes_BK.to(idx_BL.device, non_blocking=True)
    mask_BK = plan.mask_BK.to(idx_BL.device, non_blocking=True)
    l_BK = loglik_under_classes(var, classes_BK, x_BLCv, idx_BL, strength_BK=strength_BK)
    lref_BK = None
    if needs_reference:
        with torch.no_grad():
            lref_BK = loglik_under_classes(ref, classes_BK, x_BLCv, idx_BL, strength_BK=strength_BK)
    return l_BK, lref_BK, mask_BK


def unwrapped(var) -> torch.nn.Module:
    """The VAR behind a DistributedDataParallel wrapper (which forwards calls but not attributes)."""
    return getattr(var, "module", var)
