"""mclr: the capped inter-class likelihood-ratio loss (docs/method.md, "MCLR objective", "The cap", "Negatives").
Its cap `tau: auto` is measured from the starting model before the first step (prepare, below)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from var_mclr import losses
from var_mclr.errors import ConfigError
from var_mclr.likelihood import NEGATIVE_MODES, loglik_under_classes, sample_negatives
from var_mclr.objectives import dial
from var_mclr.objectives.base import ClassPlan, Objective, no_flags, nonnegative, out_of_range
from var_mclr.objectives.passes import score_rows

log = logging.getLogger(__name__)

AUTO = "auto"  # loss.mclr.tau: tau_multiple x the starting model's mean per-token log-ratio


@dataclass
class MCLRConfig:
    lam: float = 1.0
    K: int = 1
    # Per-token cap on the log-ratio (docs/method.md, "The cap"): a number; null = uncapped (collapses); "auto" =
    # tau_multiple x the starting model's mean per-token log-ratio on training pairs (prepare, below).
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
        raise ValueError(f"loss.mclr.tau = {m.tau!r} must be resolved to a number first (prepare)")
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
    m = cfg.mclr
    if saved is not None:
        tau = saved.get("mclr", {}).get("tau", AUTO) if m.tau == AUTO else m.tau
    elif m.tau == AUTO:
        tau = resolve_auto_tau(model, tokens, cfg, num_classes, seed)
    else:
        if m.tau is not None:
            check_fixed_tau(model, tokens, cfg, num_classes, seed)
        return cfg
    return dataclasses.replace(cfg, mclr=dataclasses.replace(m, tau=tau))


# ----------------------------------------------------------------------------------------------------- the cap
# A cap below the starting model's typical per-token log-ratio on the training pairs caps every pair, and MCLR becomes
# nll fine-tuning; a fixed number cannot be right for every dataset and model. tau: auto measures the mean per-token
# log-ratio of the starting model on training pairs drawn as MCLR draws them, and sets tau = tau_multiple x that mean
# (docs/method.md, "The cap").
# Below this the starting model barely tells classes apart (e.g. a fresh initialisation): no cap is informative.
MIN_MEAN_LOG_RATIO = 1e-3


# A fixed cap at or below the starting ratio of this share of the training pairs is refused: such a run is the nll
# control under MCLR's name (docs/method.md, "The cap").
MAX_CAPPED_SHARE = 0.9


@torch.no_grad()
def log_ratios_per_token(var, tokens, loss_cfg, num_classes: int, seed: int,
                         num_images: int = 512, batch_size: int = 64) -> list[torch.Tensor]:
    """(l(x, c) - l(x, c')) / L of up to num_images training images and their MCLR negatives (roll collisions
    excluded), one tensor per batch, with the model in evaluation mode."""
    was_training = var.training
    var.eval()
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(tokens), generator=gen)[:num_images]
    ratios = []
    for indices in chosen.split(batch_size):
        pairs = plan(loss_cfg, tokens.labels_N[indices], num_classes, 0.0, gen)
        idx_BL, x_BLCv = tokens.batch(indices)
        l_BK = loglik_under_classes(var, pairs.classes_BK.to(idx_BL.device), x_BLCv, idx_BL).float()
        keep_BK = ~pairs.mask_BK[:, 1:].to(l_BK.device)
        ratio_BK = (l_BK[:, :1] - l_BK[:, 1:]) / idx_BL.shape[1]
        ratios.append(ratio_BK[keep_BK])
    var.train(was_training)
    if sum(r.numel() for r in ratios) == 0:
        raise ValueError("every sampled negative equals its positive: the dataset needs at least two classes")
    return ratios


def mean_log_ratio_per_token(var, tokens, loss_cfg, num_classes: int, seed: int,
                             num_images: int = 512, batch_size: int = 64) -> float:
    """The mean of log_ratios_per_token (summed batch by batch, as the recorded caps were computed)."""
    batches = log_ratios_per_token(var, tokens, loss_cfg, num_classes, seed, num_images, batch_size)
    return sum(float(r.sum()) for r in batches) / sum(r.numel() for r in batches)


def check_fixed_tau(var, tokens, loss_cfg, num_classes: int, seed: int) -> None:
    """Refuse a fixed loss.mclr.tau that the starting model's pairs already reach: with the hard cap such pairs give
    the ratio term no gradient, so the run would be nll fine-tuning labelled MCLR."""
    tau = loss_cfg.mclr.tau
    ratios = torch.cat([r.float().cpu() for r in log_ratios_per_token(var, tokens, loss_cfg, num_classes, seed)])
    capped = float((ratios >= tau).float().mean())
    mean = float(ratios.double().mean())
    if capped >= MAX_CAPPED_SHARE:
        raise ConfigError(f"loss.mclr.tau = {tau:g} caps {100 * capped:.0f}% of the training pairs from step 0 (the "
                          f"starting model's mean log-ratio per token is {mean:.3g}), so MCLR would be the nll "
                          f"control; use loss.mclr.tau = auto ({loss_cfg.mclr.tau_multiple:g} x the mean) or a "
                          f"number above {mean:.3g}")
    # Half or more capped from step 0: MCLR acts on few pairs; allowed (a deliberate tight cap), but said loudly.
    log.log(logging.WARNING if capped >= 0.5 else logging.INFO, "loss.mclr.tau = %g: %.0f%% of training pairs start "
            "at or past the cap (mean log-ratio per token %.4f)", tau, 100 * capped, mean)


def resolve_auto_tau(var, tokens, loss_cfg, num_classes: int, seed: int) -> float:
    """The cap tau = loss.mclr.tau_multiple x the starting model's mean per-token log-ratio on training pairs."""
    m = loss_cfg.mclr
    mean = mean_log_ratio_per_token(var, tokens, loss_cfg, num_classes, seed)
    if mean < MIN_MEAN_LOG_RATIO:
        raise ConfigError(f"loss.mclr.tau = auto: the starting model's mean log-ratio per token on training pairs is "
                         f"{mean:.3g}, so it barely separates classes; fine-tune from a trained conditional model "
                         f"(model.init) or set loss.mclr.tau to a number")
    tau = m.tau_multiple * mean
    log.info("loss.mclr.tau = auto: mean log-ratio per token on training pairs %.4f x tau_multiple %g -> tau %.4f",
             mean, m.tau_multiple, tau)
    return tau


OBJECTIVE = Objective("mclr", plan, loss, settings=MCLRConfig, check=check, prepare=prepare, score=score,
                      strength_input=dial.strength_input)
