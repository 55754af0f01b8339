"""The MCLR strength dial (loss.mclr.lam_range; docs/method.md, "A strength dial for MCLR"): each image's lambda is
drawn from a range and given to a strength-conditioned model (model.strength_cond), so that one fine-tuning serves every
strength in the range, chosen at sampling time with eval --strength LAMBDA.

The model's input for lambda is 1 / (1 + lambda): GFT's beta for CFG at w = lambda (beta = 1 / (1 + w)), which is the
guidance MCLR at lambda matches to first order against its negatives (docs/method.md, "Equivalence with CFG"). So the
input lies in (0, 1] as GFT's does, lambda = 0 (plain nll, no guidance) is the neutral input 1 that the null class
always gets, and the same input means about the same guidance for a GFT model and a dial."""
from __future__ import annotations

import math

import torch

DRAWS = ("log", "uniform")  # log-uniform (the strength grids here are geometric), or uniform, over the range


def lam_input(lam):
    """The model's strength input for lambda (a float or a tensor): 1 / (1 + lambda)."""
    return 1.0 / (1.0 + lam)


def strength_input(lam: float) -> float:
    """eval --strength LAMBDA of a dial model -> the model's input."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"the MCLR dial's strength is lambda >= 0, got {lam}")
    return lam_input(lam)


def draw_lambda(lam_range: list[float], draw: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """n lambdas in [lo, hi]: lo * (hi / lo)^u (log) or lo + (hi - lo) u (uniform), u ~ U(0, 1) from generator."""
    lo, hi = lam_range
    u_N = torch.rand(n, generator=generator)
    if draw == "log":
        return lo * (hi / lo) ** u_N
    return lo + (hi - lo) * u_N


def dial_errors(lam_range, draw: str, model_conditioned: bool, selected: bool) -> list[str]:
    """The value rules of loss.mclr.lam_range and loss.mclr.lam_draw."""
    errors = [] if draw in DRAWS else [f"loss.mclr.lam_draw = {draw!r} is not one of {DRAWS}"]
    if lam_range is None:
        return errors
    if not (len(lam_range) == 2 and all(math.isfinite(v) for v in lam_range) and 0 <= lam_range[0] < lam_range[1]):
        return errors + [f"loss.mclr.lam_range = {lam_range!r} is out of range: must be [lo, hi] with 0 <= lo < hi, "
                         "finite (or null: one lambda, loss.mclr.lam)"]
    if draw == "log" and lam_range[0] <= 0:
        errors.append(f"loss.mclr.lam_range = {lam_range!r}: lam_draw log needs lo > 0 (or set lam_draw: uniform)")
    if selected and not model_conditioned:
        errors.append("loss.mclr.lam_range gives each image's lambda to the model: set model.strength_cond: true")
    return errors
