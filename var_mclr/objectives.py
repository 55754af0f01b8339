"""The registry of training objectives: one entry per objective says which classes each image is scored under,
whether a frozen reference model is needed, and which loss reads the log-likelihoods (docs/method.md, "MCLR
objective" and "Baselines"). The trainer, the config checker and the benchmarks all read OBJECTIVES; an unknown
name is an error.

Randomness (class dropout, mismatched classes) is drawn for the global batch from a generator seeded by the step,
then each process takes its slice: one process or many, resumed or not, every sample sees the same classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from var_mclr import losses
from var_mclr.likelihood import NEGATIVE_MODES, cca_labels, loglik_under_classes, sample_negatives


# ---- the loss sections of a run config -------------------------------------------------------------------------
@dataclass
class MCLRConfig:
    lam: float = 1.0
    K: int = 1
    # Per-token cap on the log-ratio (docs/method.md, "The cap"): a number; null = uncapped (collapses); "auto" =
    # tau_multiple x the starting model's mean per-token log-ratio on training pairs (var_mclr/calibration.py).
    tau: float | str | None = "auto"
    tau_multiple: float = field(default=2.0, metadata={"omitted_at_default": True})  # config.OMITTED_AT_DEFAULT
    negatives: str = "uniform"  # uniform | roll | null | mixed
    smooth_cap: bool = False


# The three reference-model baselines share CCA's pairing (docs/method.md, "Baselines"): uncond_ratio is the share
# of rows whose positive and negative labels are both set to the null class (CCA's default 0.1 keeps CFG usable);
# 0 selects CCA's unmasked form of each loss.
@dataclass
class CCAConfig:
    beta: float = 0.02
    lam: float = 50.0
    uncond_ratio: float = 0.1


@dataclass
class DPOConfig:
    beta: float = 0.02
    uncond_ratio: float = 0.1


@dataclass
class UnlearningConfig:
    lam: float = 1.0
    uncond_ratio: float = 0.1


@dataclass
class LossConfig:
    mclr: MCLRConfig = field(default_factory=MCLRConfig)
    cca: CCAConfig = field(default_factory=CCAConfig)
    cc_dpo: DPOConfig = field(default_factory=DPOConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)


# ---- which classes each image is scored under ----------------------------------------------------------------
@dataclass
class ClassPlan:
    classes_BK: torch.Tensor  # column 0: the positive class; columns 1..: the classes it is contrasted with
    mask_BK: torch.Tensor  # per-column flags: MCLR excludes roll collisions; CCA flags collisions and null-masked rows

    def slice(self, sl: slice) -> "ClassPlan":
        return ClassPlan(self.classes_BK[sl], self.mask_BK[sl])


def _no_flags(label_G: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(label_G, dtype=torch.bool).unsqueeze(1)


def plan_nll(cfg: LossConfig, label_G: torch.Tensor, num_classes: int, class_dropout: float,
             generator: torch.Generator) -> ClassPlan:
    drop_G = torch.rand(label_G.shape, generator=generator) < class_dropout
    pos_G = torch.where(drop_G, torch.full_like(label_G, num_classes), label_G)
    return ClassPlan(pos_G.unsqueeze(1), _no_flags(pos_G))


def plan_mclr(cfg: LossConfig, label_G: torch.Tensor, num_classes: int, class_dropout: float,
              generator: torch.Generator) -> ClassPlan:
    m = cfg.mclr
    neg_GK, exclude_GK = sample_negatives(label_G, num_classes, K=m.K, mode=m.negatives, generator=generator)
    pos_G = label_G
    if class_dropout > 0:  # dropped rows train the null class by nll alone: their ratio terms are excluded
        drop_G = torch.rand(label_G.shape, generator=generator) < class_dropout
        pos_G = torch.where(drop_G, torch.full_like(label_G, num_classes), label_G)
        exclude_GK = exclude_GK | drop_G.unsqueeze(1)
    return ClassPlan(torch.cat((pos_G.unsqueeze(1), neg_GK), 1), torch.cat((_no_flags(label_G), exclude_GK), 1))


def _plan_pairs(uncond_ratio: float, label_G: torch.Tensor, num_classes: int,
                generator: torch.Generator) -> ClassPlan:
    pos_G, neg_G, neg_is_pos_G = cca_labels(label_G, num_classes, uncond_ratio=uncond_ratio, generator=generator)
    return ClassPlan(torch.stack((pos_G, neg_G), 1), torch.stack((torch.zeros_like(neg_is_pos_G), neg_is_pos_G), 1))


def plan_pairs(section: str) -> "Planner":
    """CCA's pairing with the null-masking share of loss.<section>.uncond_ratio (cca, cc_dpo, unlearning)."""
    def plan(cfg: LossConfig, label_G: torch.Tensor, num_classes: int, class_dropout: float,
             generator: torch.Generator) -> ClassPlan:
        return _plan_pairs(getattr(cfg, section).uncond_ratio, label_G, num_classes, generator)
    return plan


# ---- the losses, reading l(x, c) of every planned row ---------------------------------------------------------
def loss_nll(cfg: LossConfig, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.nll_loss(l_BK[:, 0], L)


def loss_mclr(cfg: LossConfig, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    m = cfg.mclr
    if isinstance(m.tau, str):
        raise ValueError(f"loss.mclr.tau = {m.tau!r} must be resolved to a number first (var_mclr.calibration)")
    return losses.mclr_loss(l_BK[:, 0], l_BK[:, 1:], L, lam=m.lam, tau=m.tau, smooth_cap=m.smooth_cap,
                            exclude_BK=mask_BK[:, 1:])


def _pair(l_BK: torch.Tensor, lref_BK: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return l_BK[:, 0], lref_BK[:, 0], l_BK[:, 1], lref_BK[:, 1]


def _flags(uncond_ratio: float, mask_BK: torch.Tensor) -> torch.Tensor | None:
    # CCA's code uses the flagged (weighted, flipped, normalised) form only when it null-masks (uncond_ratio > 0).
    return mask_BK[:, 1] if uncond_ratio > 0 else None


def loss_cca(cfg: LossConfig, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.cca_loss(*_pair(l_BK, lref_BK), beta=cfg.cca.beta, lam=cfg.cca.lam,
                           flagged_B=_flags(cfg.cca.uncond_ratio, mask_BK))


def loss_cc_dpo(cfg: LossConfig, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int):
    return losses.cc_dpo_loss(*_pair(l_BK, lref_BK), beta=cfg.cc_dpo.beta)


def loss_unlearning(cfg: LossConfig, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor,
                    L: int):
    return losses.unlearning_loss(*_pair(l_BK, lref_BK), lam=cfg.unlearning.lam,
                                  flagged_B=_flags(cfg.unlearning.uncond_ratio, mask_BK))


# ---- the registry ---------------------------------------------------------------------------------------------
Planner = Callable[[LossConfig, torch.Tensor, int, float, torch.Generator], ClassPlan]
LossFn = Callable[[LossConfig, torch.Tensor, "torch.Tensor | None", torch.Tensor, int],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Objective:
    name: str
    plan: Planner  # (loss config, global labels, num_classes, class_dropout, generator) -> classes to score
    loss: LossFn  # (loss config, l_BK, reference l_BK or None, flags, L) -> (loss, stats)
    needs_reference: bool = False  # a frozen copy of the starting model scores the same rows without gradients


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("nll", plan_nll, loss_nll),
    Objective("mclr", plan_mclr, loss_mclr),
    Objective("cca", plan_pairs("cca"), loss_cca, needs_reference=True),
    Objective("cc_dpo", plan_pairs("cc_dpo"), loss_cc_dpo, needs_reference=True),
    Objective("unlearning", plan_pairs("unlearning"), loss_unlearning, needs_reference=True),
)}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective = {name!r} is not one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_loss(objective: Objective, cfg: LossConfig, var, ref, plan: ClassPlan, idx_BL: torch.Tensor,
                   x_BLCv: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One teacher-forced pass over every (image, class) row of the plan, then the objective's loss."""
    # non_blocking: a blocking copy from host memory waits for the whole GPU queue (a host sync every micro-step);
    # the plan's tensors are fresh per step, so the copy may run behind the host.
    classes_BK = plan.classes_BK.to(idx_BL.device, non_blocking=True)
    mask_BK = plan.mask_BK.to(idx_BL.device, non_blocking=True)
    l_BK = loglik_under_classes(var, classes_BK, x_BLCv, idx_BL)
    lref_BK = None
    if objective.needs_reference:
        with torch.no_grad():
            lref_BK = loglik_under_classes(ref, classes_BK, x_BLCv, idx_BL)
    return objective.loss(cfg, l_BK, lref_BK, mask_BK, idx_BL.shape[1])

