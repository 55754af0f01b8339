"""mclr: the capped inter-class likelihood-ratio loss (docs/method.md, "MCLR objective", "The cap", "Negatives").
Its cap `tau: auto` is measured from the starting model by var_mclr/calibration.py before the first step."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.likelihood import NEGATIVE_MODES, sample_negatives
from var_mclr.objectives import dial
from var_mclr.objectives.base import ClassPlan, Objective, no_flags, nonnegative, out_of_range
from var_mclr.objectives.passes import score_rows

AUTO = "auto"  # loss.mclr.tau: tau_multiple x the starting model's mean per-token log-ratio


@dataclass
class MCLRConfig:
    lam: float = 1.0
    K: int = 1
    # Per-token cap on the log-ratio (docs/method.md, "The cap"): a number; null = uncapped (collapses); "auto" =
    # tau_multiple x the starting model's mean per-token log-ratio on training pairs (var_mclr/calibration.py).
    tau: float | str | None = AUTO
    tau_multiple: float = 2.0
    negatives: str = "uniform"  # likelihood.NEGATIVE_MODES: uniform | roll | null | mixed | all
    smooth_cap: bool = False
    # The strength dial (var_mclr/objectives/dial.py): [lo, hi] draws each image's lambda from that range (lam_draw:
    # log-uniform or uniform) and gives it to the model (model.strength_cond), in place of lam. null: off.
    lam_range: list[float] | None = None
    lam_draw: str = "log"


def check(m: MCLRConfig, cfg, selected: bool) -> list[str]:
    errors = [] if m.negatives in NEGATIVE_MODES else [
        f"loss.mclr.negatives = {m.negatives!r} is not one of {NEGATIVE_MODES}"]
    errors += [] if m.K > 0 else [f"loss.mclr.K must be positive, got {m.K}"]
    if isinstance(m.tau, str) and m.tau != "auto":
        errors.append(f"loss.mclr.tau = {m.tau!r} must be a number > 0, null (uncapped) or auto")
    n = cfg.data.num_classes
    if selected and n >= 2 and m.negatives == "all" and m.K != n - 1:
        errors.append(f"loss.mclr.negatives = all scores every mismatched class: loss.mclr.K must be "
                      f"data.num_classes - 1 = {n - 1}, got {m.K}")
    if not m.tau_multiple > 0:
        errors.append(f"loss.mclr.tau_multiple must be > 0, got {m.tau_multiple}")
    errors += dial.dial_errors(m.lam_range, m.lam_draw, cfg.model.strength_cond, selected)
    return errors + out_of_range("mclr", m, [
        ("lam", nonnegative, "a finite number >= 0"),
        # tau = 0 caps every pair from step 0: the run would be the nll control under MCLR's name.
        ("tau", lambda v: v is None or isinstance(v, str) or v > 0,
         "a number > 0 (0 caps every pair: the nll control, train.objective = nll), null (uncapped) or auto")])


def plan(cfg, label_G: torch.Tensor, num_classes: int, class_dropout: float, generator: torch.Generator) -> ClassPlan:
    m = cfg.mclr
    neg_GK, exclude_GK = sample_negatives(label_G, num_classes, K=m.K, mode=m.negatives, generator=generator)
    pos_G = label_G
    if class_dropout > 0:  # dropped rows train the null class by nll alone: their ratio terms are excluded
        drop_G = torch.rand(label_G.shape, generator=generator) < class_dropout
        pos_G = torch.where(drop_G, torch.full_like(label_G, num_classes), label_G)
        exclude_GK = exclude_GK | drop_G.unsqueeze(1)
    # The dial draws last, so that without it every other draw (and every existing run) is unchanged.
    lam_G = None if m.lam_range is None else dial.draw_lambda(m.lam_range, m.lam_draw, len(label_G), generator)
    return ClassPlan(torch.cat((pos_G.unsqueeze(1), neg_GK), 1), torch.cat((no_flags(label_G), exclude_GK), 1),
                     strength_B=lam_G)


def loss(cfg, l_BK: torch.Tensor, lref_BK: torch.Tensor | None, mask_BK: torch.Tensor, L: int,
         lam: float | torch.Tensor | None = None):
    """MCLR at loss.mclr.lam, or at one lambda per image (the dial)."""
    m = cfg.mclr
    if isinstance(m.tau, str):
        raise ValueError(f"loss.mclr.tau = {m.tau!r} must be resolved to a number first (var_mclr.calibration)")
    return losses.mclr_loss(l_BK[:, 0], l_BK[:, 1:], L, lam=m.lam if lam is None else lam, tau=m.tau,
                            smooth_cap=m.smooth_cap, exclude_BK=mask_BK[:, 1:])


def score(cfg, var, ref, plan: ClassPlan, idx_BL: torch.Tensor, x_BLCv: torch.Tensor):
    """The registry's one pass over the plan's rows; with the dial, every row of image b at the model input of its
    lambda_b (dial.lam_input; the null class gets the neutral input whatever it is given) and the loss at lambda_b."""
    if plan.strength_B is None:
        l_BK, _, mask_BK = score_rows(var, ref, plan, idx_BL, x_BLCv, needs_reference=False)
        return loss(cfg, l_BK, None, mask_BK, idx_BL.shape[1])
    lam_B = plan.strength_B.to(idx_BL.device, non_blocking=True)
    strength_BK = dial.lam_input(lam_B).unsqueeze(1).expand(plan.classes_BK.shape)
    l_BK, _, mask_BK = score_rows(var, ref, plan, idx_BL, x_BLCv, needs_reference=False, strength_BK=strength_BK)
    return loss(cfg, l_BK, None, mask_BK, idx_BL.shape[1], lam=lam_B)


def prepare(cfg, model, tokens, num_classes: int, seed: int, saved: dict | None):
    """tau: auto measured on the starting model (a resumed run keeps the value its start measured); a fixed cap that
    would cap nearly every pair from step 0 is refused (docs/method.md, "The cap")."""
    from var_mclr import calibration  # here, not at the top: calibration draws its pairs with this file's planner

    m = cfg.mclr
    if saved is not None:
        tau = saved.get("mclr", {}).get("tau", AUTO) if m.tau == AUTO else m.tau
    elif m.tau == AUTO:
        tau = calibration.resolve_auto_tau(model, tokens, cfg, num_classes, seed)
    else:
        if m.tau is not None:
            calibration.check_fixed_tau(model, tokens, cfg, num_classes, seed)
        return cfg
    return dataclasses.replace(cfg, mclr=dataclasses.replace(m, tau=tau))


OBJECTIVE = Objective("mclr", plan, loss, settings=MCLRConfig, check=check, prepare=prepare, score=score,
                      strength_input=dial.strength_input)
