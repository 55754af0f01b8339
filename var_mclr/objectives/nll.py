"""nll: plain maximum-likelihood fine-tuning, the control every fine-tuning objective is compared with."""
from __future__ import annotations

import torch

from var_mclr import losses
from var_mclr.objectives.base import ClassPlan, Objective, no_flags


def plan(cfg, label_G: torch.Tensor, num_classes: int, class_dropout: float, generator: torch.Generator) -> ClassPlan:
    drop_G = torch.rand(label_G.shape, generator=generator) < class_dropout
    pos_G = torch.where(drop_G, torch.full_like(label_G, num_classes), label_G)
    return ClassPlan(pos_G.unsqueeze(1), no_flags(pos_G))


def loss(cfg, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.nll_loss(l_BK[:, 0], L)


OBJECTIVE = Objective("nll", plan, loss, contrasts_classes=False)
