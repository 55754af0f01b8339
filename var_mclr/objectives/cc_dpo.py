"""cc_dpo: CCA's DPO branch, the same pairs without the flag rule (docs/method.md, "Baselines")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.objectives.base import Objective, out_of_range, positive
from var_mclr.objectives.pairs import pair, plan_pairs, uncond_ratio_errors


@dataclass
class DPOConfig:
    beta: float = 0.02
    uncond_ratio: float = 0.1


def check(d: DPOConfig, cfg, selected: bool) -> list[str]:
    return (out_of_range("cc_dpo", d, [("beta", positive, "a finite number > 0")])
            + uncond_ratio_errors("cc_dpo", d))


def loss(cfg, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.cc_dpo_loss(*pair(l_BK, lref_BK), beta=cfg.cc_dpo.beta)


OBJECTIVE = Objective("cc_dpo", plan_pairs("cc_dpo"), loss, settings=DPOConfig, check=check, needs_reference=True)
