"""unlearning: raise the reference-relative likelihood of the true class, lower the mismatched one's
(docs/method.md, "Baselines")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.objectives.base import Objective, nonnegative, out_of_range
from var_mclr.objectives.pairs import flags, pair, plan_pairs, uncond_ratio_errors


@dataclass
class UnlearningConfig:
    lam: float = 1.0
    uncond_ratio: float = 0.1


def check(u: UnlearningConfig, cfg, selected: bool) -> list[str]:
    return (out_of_range("unlearning", u, [("lam", nonnegative, "a finite number >= 0")])
            + uncond_ratio_errors("unlearning", u))


def loss(cfg, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.unlearning_loss(*pair(l_BK, lref_BK), lam=cfg.unlearning.lam,
                                  flagged_B=flags(cfg.unlearning.uncond_ratio, mask_BK))


OBJECTIVE = Objective("unlearning", plan_pairs("unlearning"), loss, settings=UnlearningConfig, check=check,
                      needs_reference=True)
