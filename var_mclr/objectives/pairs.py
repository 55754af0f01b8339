"""CCA's pairing, shared by the three reference-model baselines (docs/method.md, "Baselines"): the negative is the
batch rolled by one, and uncond_ratio (CCA's default 0.1 keeps CFG usable) is the share of rows whose positive and
negative labels are both set to the null class; 0 selects CCA's unmasked form of each loss."""
from __future__ import annotations

import torch

from var_mclr.likelihood import cca_labels
from var_mclr.objectives.base import ClassPlan, Planner, out_of_range, share


def plan_pairs(section: str) -> Planner:
    """CCA's pairing with the null-masking share of loss.<section>.uncond_ratio."""
    def plan(cfg, label_G: torch.Tensor, num_classes: int, class_dropout: float,
             generator: torch.Generator) -> ClassPlan:
        uncond_ratio = getattr(cfg, section).uncond_ratio
        pos_G, neg_G, neg_is_pos_G = cca_labels(label_G, num_classes, uncond_ratio=uncond_ratio, generator=generator)
        return ClassPlan(torch.stack((pos_G, neg_G), 1),
                         torch.stack((torch.zeros_like(neg_is_pos_G), neg_is_pos_G), 1))
    return plan


def pair(l_BK: torch.Tensor, lref_BK: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(l_pos, lref_pos, l_neg, lref_neg) of the planned pairs."""
    return l_BK[:, 0], lref_BK[:, 0], l_BK[:, 1], lref_BK[:, 1]


def flags(uncond_ratio: float, mask_BK: torch.Tensor) -> torch.Tensor | None:
    # CCA's code uses the flagged (weighted, flipped, normalised) form only when it null-masks (uncond_ratio > 0).
    return mask_BK[:, 1] if uncond_ratio > 0 else None


def uncond_ratio_errors(section: str, settings) -> list[str]:
    return out_of_range(section, settings, [("uncond_ratio", share, "in [0, 1)")])
