"""The optimizer and learning-rate schedule of VAR training (docs/method.md, "Training schedule")."""
from __future__ import annotations

import math

import torch

from var_mclr.config import Config

# VAR's lin0 schedule (utils/lr_control.py): warm-up from this share of the peak, and the share of the post-warm-up
# steps held at the peak before the linear decay to min_lr_ratio.
LIN0_WARMUP_START, LIN0_HOLD = 0.005, 0.05


def lr_lambda(cfg: Config):
    """The learning-rate factor of every step."""
    t = cfg.train

    def lin0(step: int) -> float:
        if step < t.warmup_steps:
            return LIN0_WARMUP_START + (1 - LIN0_WARMUP_START) * step / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps)
        if progress < LIN0_HOLD:
            return 1.0
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * max(0.0, 1 - progress) / (1 - LIN0_HOLD)

    def factor(step: int) -> float:
        if t.lr_schedule == "lin0":
            return lin0(step)
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return factor


# Official VAR's rule (train.py, filter_params): no weight decay on 1-D parameters, biases, position and level
# embeddings, AdaLN's shared table and the attention temperature; class and word embeddings are decayed.
NO_WEIGHT_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "ada_gss", "scale_mul")


def make_optimizer(cfg: Config, var: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in var.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim == 1 or name.endswith("bias") or any(k in name for k in NO_WEIGHT_DECAY_KEYS)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on CUDA: one kernel for the whole update, and it can skip a non-finite step on the device (step_skip.py)
    fused = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=fused or None)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
