"""MCLR's cap chosen from the model being fine-tuned (docs/method.md, "The cap").

A cap below the starting model's typical per-token log-ratio on the training pairs caps every pair, and MCLR becomes
nll fine-tuning; a fixed number cannot be right for every dataset and model. `loss.mclr.tau: auto` measures the
mean per-token log-ratio of the starting model on training pairs drawn as MCLR draws them, and sets
tau = tau_multiple x that mean.
"""
from __future__ import annotations

import logging

import torch

from var_mclr.config import ConfigError
from var_mclr.likelihood import loglik_under_classes
from var_mclr.objectives import LossConfig, plan_mclr
from var_mclr.objectives.mclr import AUTO  # noqa: F401 (the value of loss.mclr.tau it resolves)
from var_mclr.tokens import TokenStore

log = logging.getLogger(__name__)

# Below this the starting model barely tells classes apart (e.g. a fresh initialisation): no cap is informative.
MIN_MEAN_LOG_RATIO = 1e-3


# A fixed cap at or below the starting ratio of this share of the training pairs is refused: such a run is the nll
# control under MCLR's name (docs/method.md, "The cap").
MAX_CAPPED_SHARE = 0.9


@torch.no_grad()
def log_ratios_per_token(var, tokens: TokenStore, loss_cfg: LossConfig, num_classes: int, seed: int,
                         num_images: int = 512, batch_size: int = 64) -> list[torch.Tensor]:
    """(l(x, c) - l(x, c')) / L of up to num_images training images and their MCLR negatives (roll collisions
    excluded), one tensor per batch, with the model in evaluation mode."""
    was_training = var.training
    var.eval()
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(tokens), generator=gen)[:num_images]
    ratios = []
    for indices in chosen.split(batch_size):
        plan = plan_mclr(loss_cfg, tokens.labels_N[indices], num_classes, 0.0, gen)
        idx_BL, x_BLCv = tokens.batch(indices)
        l_BK = loglik_under_classes(var, plan.classes_BK.to(idx_BL.device), x_BLCv, idx_BL).float()
        keep_BK = ~plan.mask_BK[:, 1:].to(l_BK.device)
        ratio_BK = (l_BK[:, :1] - l_BK[:, 1:]) / idx_BL.shape[1]
        ratios.append(ratio_BK[keep_BK])
    var.train(was_training)
    if sum(r.numel() for r in ratios) == 0:
        raise ValueError("every sampled negative equals its positive: the dataset needs at least two classes")
    return ratios


def mean_log_ratio_per_token(var, tokens: TokenStore, loss_cfg: LossConfig, num_classes: int, seed: int,
                             num_images: int = 512, batch_size: int = 64) -> float:
    """The mean of log_ratios_per_token (summed batch by batch, as the recorded caps were computed)."""
    batches = log_ratios_per_token(var, tokens, loss_cfg, num_classes, seed, num_images, batch_size)
    return sum(float(r.sum()) for r in batches) / sum(r.numel() for r in batches)


def check_fixed_tau(var, tokens: TokenStore, loss_cfg: LossConfig, num_classes: int, seed: int) -> None:
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


def resolve_auto_tau(var, tokens: TokenStore, loss_cfg: LossConfig, num_classes: int, seed: int) -> float:
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
