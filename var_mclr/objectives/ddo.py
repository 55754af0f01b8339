"""ddo: Direct Discriminative Optimization (Zheng et al., ICML 2025, arXiv 2503.01103; docs/method.md, "DDO").

The discriminator is the likelihood ratio to a frozen reference, d(x, c) = beta (l_theta(x, c) - l_ref(x, c)); it is
trained to call data images real and the reference model's own samples (loss.ddo.samples, drawn beforehand by
python -m var_mclr.reference_samples) fake. Each data image is scored under its own label (train.class_dropout is not
used: a null-class row would need the reference's unconditional samples), each sample under the class it was drawn
for. Rounds: each round's model.init and reference is the previous round's result, with samples drawn from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.objectives.base import ClassPlan, Objective, no_flags, nonnegative, out_of_range, positive


@dataclass
class DDOConfig:
    alpha: float = 1.0  # weight of the samples' term; 1: the GAN discriminator loss (the paper's VAR value: not found)
    beta: float = 0.02  # the paper's VAR setting (its Figure 6c: "alpha under beta = 0.02"), per sequence as CCA's
    # The reference-sample set (a directory made by python -m var_mclr.reference_samples from model.init); the run
    # refuses to start without one, or with one another model drew.
    samples: str | None = None


def check(c: DDOConfig, cfg, selected: bool) -> list[str]:
    return out_of_range("ddo", c, [("alpha", nonnegative, "a finite number >= 0"),
                                   ("beta", positive, "a finite number > 0")])


def plan(cfg, label_G: torch.Tensor, num_classes: int, class_dropout: float, generator: torch.Generator) -> ClassPlan:
    return ClassPlan(label_G.unsqueeze(1), no_flags(label_G))


def loss(cfg, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int,
         l_F: torch.Tensor | None = None, lref_F: torch.Tensor | None = None):
    if l_F is None or lref_F is None:
        raise ValueError("ddo scores the reference samples beside the data batch: objective_loss must be given them")
    return losses.ddo_loss(l_BK[:, 0], lref_BK[:, 0], l_F, lref_F, beta=cfg.ddo.beta, alpha=cfg.ddo.alpha)


def open_rows(cfg, ref, vae, device: torch.device):
    # Imported here: var_mclr.sample_store imports this package's base module (ExtraRows).
    from var_mclr.sample_store import open_reference_samples
    return open_reference_samples(cfg.loss.ddo.samples, "loss.ddo.samples", ref, vae, device)


OBJECTIVE = Objective("ddo", plan, loss, settings=DDOConfig, check=check, needs_reference=True,
                      contrasts_classes=False, extra_rows=open_rows)
