"""cca: Condition Contrastive Alignment, CCA's VAR trainer exactly (docs/method.md, "Baselines")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.objectives.base import Objective, nonnegative, out_of_range, positive
from var_mclr.objectives.pairs import flags, pair, plan_pairs, uncond_ratio_errors


@dataclass
class CCAConfig:
    beta: float = 0.02
    lam: float = 50.0
    uncond_ratio: float = 0.1


def check(c: CCAConfig, cfg, selected: bool) -> list[str]:
    return out_of_range("cca", c, [("beta", positive, "a finite number > 0"),
                                   ("lam", nonnegative, "a finite number >= 0")]) + uncond_ratio_errors("cca", c)


def loss(cfg, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.cca_loss(*pair(l_BK, lref_BK), beta=cfg.cca.beta, lam=cfg.cca.lam,
                           flagged_B=flags(cfg.cca.uncond_ratio, mask_BK))


OBJECTIVE = Objective("cca", plan_pairs("cca"), loss, settings=CCAConfig, check=check, needs_reference=True)
