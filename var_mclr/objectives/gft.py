"""gft: Guidance-Free Training (Chen et al., ICML 2025, arXiv 2501.15420; thu-ml/GFT), docs/method.md, "GFT".

Two teacher-forced passes per micro-batch: the unconditional one (null class, strength 1) in evaluation mode without
gradients, the conditional one (label, beta) in training mode; the loss is the cross-entropy of the data tokens under
beta * z_cond + (1 - beta) * sg[z_uncond] (losses.gft_loss). Sampling then runs one pass at the chosen beta."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.objectives.base import ClassPlan, Objective, no_flags
from var_mclr.objectives.passes import unwrapped

RANDOM = "random"


@dataclass
class GFTConfig:
    # random: beta ~ U(0, 1) per image, given to the model (model.strength_cond): one model for every beta, chosen at
    # sampling time (GFT's --beta -1). A number in (0, 1]: that beta for every image (GFT's default 0.1).
    beta: float | str = RANDOM


def check(g: GFTConfig, cfg, selected: bool) -> list[str]:
    if isinstance(g.beta, str):
        if g.beta != RANDOM:
            return [f"loss.gft.beta = {g.beta!r} must be {RANDOM} or a number in (0, 1]"]
        if selected and not cfg.model.strength_cond:
            return [f"loss.gft.beta = {RANDOM} gives each image's beta to the model: set model.strength_cond: true"]
        return []
    if not (math.isfinite(g.beta) and 0 < g.beta <= 1):  # beta = 0 trains nothing: z would be the detached z_uncond
        return [f"loss.gft.beta = {g.beta!r} is out of range: must be {RANDOM} or a number in (0, 1]"]
    return []


def plan(cfg, label_G: torch.Tensor, num_classes: int, class_dropout: float, generator: torch.Generator) -> ClassPlan:
    """Class dropout as nll's (GFT: 10% of labels become the null class), then one beta per image."""
    drop_G = torch.rand(label_G.shape, generator=generator) < class_dropout
    pos_G = torch.where(drop_G, torch.full_like(label_G, num_classes), label_G)
    beta = cfg.gft.beta
    beta_G = torch.rand(label_G.shape, generator=generator) if beta == RANDOM else torch.full(label_G.shape, beta)
    return ClassPlan(pos_G.unsqueeze(1), no_flags(pos_G), strength_B=beta_G)


def score(cfg, var, ref, plan: ClassPlan, idx_BL: torch.Tensor, x_BLCv: torch.Tensor):
    """GFT's two passes and loss. A row whose label was dropped is the null class in the conditional pass, embedded at
    strength 1 (VAR.strength_input) while its logits are still mixed with its drawn beta, as in GFT's trainer."""
    label_B = plan.classes_BK[:, 0].to(idx_BL.device, non_blocking=True)
    beta_B = plan.strength_B.to(idx_BL.device, non_blocking=True)
    conditioned = unwrapped(var).strength_emb is not None  # fixed beta needs no strength input (GFT feeds none)
    null_B = torch.full_like(label_B, unwrapped(var).num_classes)
    was_training = var.training
    var.eval()  # GFT's unconditional target: no drop-path, no gradient
    with torch.no_grad():
        z_uncond_BLV = var(null_B, x_BLCv, strength_B=torch.ones_like(beta_B) if conditioned else None)
    var.train(was_training)
    z_cond_BLV = var(label_B, x_BLCv, strength_B=beta_B if conditioned else None)
    return losses.gft_loss(z_cond_BLV, z_uncond_BLV, beta_B, idx_BL)


def strength_input(beta: float) -> float:
    """--strength of eval/fid.py and eval/sample.py is beta itself, GFT's sampling input."""
    if not (math.isfinite(beta) and 0 < beta <= 1):
        raise ValueError(f"GFT's strength is beta in (0, 1] (1: no guidance), got {beta}")
    return beta


# logits_per_row 4: measured on the CPU (tests/test_plan.py): the loss's log-softmax output, its gradient, the gradient
# reaching z_cond and the head's; the fused head of the other objectives keeps none.
OBJECTIVE = Objective("gft", plan, None, settings=GFTConfig, check=check, contrasts_classes=False, score=score,
                      strength_input=strength_input, logits_per_row=4, no_grad_rows=1)
