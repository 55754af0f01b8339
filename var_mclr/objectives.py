"""What each training objective evaluates: which classes each image is scored under, and which loss reads them.

Randomness (class dropout, mismatched classes) is drawn for the global batch from a generator seeded by the step,
then each process takes its slice: one process or many, resumed or not, every sample sees the same classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.config import Config
from var_mclr.likelihood import cca_labels, loglik_under_classes, sample_negatives

NEEDS_REFERENCE = ("cca", "cc_dpo", "unlearning")


@dataclass
class ClassPlan:
    classes_BK: torch.Tensor  # column 0: the positive class; columns 1..: the classes it is contrasted with
    mask_BK: torch.Tensor  # per-column flags: MCLR excludes roll collisions; CCA treats them as positives

    def slice(self, sl: slice) -> "ClassPlan":
        return ClassPlan(self.classes_BK[sl], self.mask_BK[sl])


def plan_classes(cfg: Config, label_G: torch.Tensor, generator: torch.Generator) -> ClassPlan:
    objective, C = cfg.train.objective, cfg.data.num_classes
    if objective == "nll":
        drop_G = torch.rand(label_G.shape, generator=generator) < cfg.train.class_dropout
        pos_G = torch.where(drop_G, torch.full_like(label_G, C), label_G)
        return ClassPlan(pos_G.unsqueeze(1), torch.zeros_like(pos_G, dtype=torch.bool).unsqueeze(1))
    if objective == "mclr":
        m = cfg.loss.mclr
        neg_GK, collision_GK = sample_negatives(label_G, C, K=m.K, mode=m.negatives, generator=generator)
        no_flag = torch.zeros_like(label_G, dtype=torch.bool).unsqueeze(1)
        return ClassPlan(torch.cat((label_G.unsqueeze(1), neg_GK), 1), torch.cat((no_flag, collision_GK), 1))
    uncond_ratio = cfg.loss.cca.uncond_ratio if objective == "cca" else 0.0
    pos_G, neg_G, neg_is_pos_G = cca_labels(label_G, C, uncond_ratio=uncond_ratio, generator=generator)
    return ClassPlan(torch.stack((pos_G, neg_G), 1), torch.stack((torch.zeros_like(neg_is_pos_G), neg_is_pos_G), 1))


def objective_loss(cfg: Config, var, ref, plan: ClassPlan, idx_BL: torch.Tensor,
                   x_BLCv: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One teacher-forced pass over every (image, class) row of the plan, then the objective's loss."""
    objective, L = cfg.train.objective, idx_BL.shape[1]
    classes_BK = plan.classes_BK.to(idx_BL.device)
    mask_BK = plan.mask_BK.to(idx_BL.device)
    l_BK = loglik_under_classes(var, classes_BK, x_BLCv, idx_BL)
    if objective == "nll":
        return losses.nll_loss(l_BK[:, 0], L)
    if objective == "mclr":
        m = cfg.loss.mclr
        return losses.mclr_loss(l_BK[:, 0], l_BK[:, 1:], L, lam=m.lam, tau=m.tau, smooth_cap=m.smooth_cap,
                                exclude_BK=mask_BK[:, 1:])
    with torch.no_grad():
        lref_BK = loglik_under_classes(ref, classes_BK, x_BLCv, idx_BL)
    pair = (l_BK[:, 0], lref_BK[:, 0], l_BK[:, 1], lref_BK[:, 1])
    if objective == "cca":
        return losses.cca_loss(*pair, beta=cfg.loss.cca.beta, lam_cca=cfg.loss.cca.lam, neg_is_pos_mask_B=mask_BK[:, 1])
    if objective == "cc_dpo":
        return losses.cc_dpo_loss(*pair, beta=cfg.loss.cc_dpo.beta)
    return losses.unlearning_loss(*pair, lam=cfg.loss.unlearning.lam, neg_is_pos_mask_B=mask_BK[:, 1])
