"""Training objectives as pure functions of log-likelihoods (docs/method.md, "MCLR objective" and "Baselines").

Every function takes sequence log-likelihoods l(x, c) = log p(x | c) (sums over the L tokens, from
var_mclr.likelihood) and returns (loss, stats): loss is a differentiable scalar, stats maps names to detached
0-d tensors (no host sync inside the training step; call .item() when logging).

Scales:
  - nll and MCLR are per token (divided by L), so lambda and tau are comparable across patch schedules.
  - CCA, CC-DPO, unlearning and DDO are per sequence, as in CCA's code: beta multiplies the sequence-level
    Delta = l_theta - l_ref, so CCA's published beta (0.02 for VAR at L = 680; DDO's paper uses the same for VAR)
    keeps its meaning. Their stats are reported per sequence too.
Reference log-likelihoods (l_ref) are detached here: the reference model is frozen by definition.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def _check_B(name: str, t: torch.Tensor, B: int) -> None:
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},), got {tuple(t.shape)}")


# ---- maximum likelihood ------------------------------------------------------------------------------------
def nll_loss(l_pos_B: torch.Tensor, L: int) -> tuple[torch.Tensor, Stats]:
    """Mean negative log-likelihood per token: -(1/L) mean_b l(x_b, c_b)."""
    loss = -l_pos_B.mean() / L
    return loss, {"loss": _d(loss), "nll": _d(loss)}


# ---- MCLR --------------------------------------------------------------------------------------------------
def ratio_cap(r: torch.Tensor, cap: float | None, smooth: bool = False) -> torch.Tensor:
    """psi(r): min(r, cap), or the smooth cap - softplus(cap - r); identity when cap is None or inf."""
    if cap is None or math.isinf(cap):
        return r
    if smooth:
        return cap - F.softplus(cap - r)
    return torch.clamp(r, max=cap)


def mclr_loss(l_pos_B: torch.Tensor, l_neg_BK: torch.Tensor, L: int, lam: float | torch.Tensor,
              tau: float | None = None,
              smooth_cap: bool = False, exclude_BK: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """MCLR: (1/L) * [ -l(x, c) - lam * (1/K) sum_k psi(l(x, c) - l(x, c'_k)) ], averaged over the batch.

    psi caps the sequence log-ratio at tau * L (tau per token; None or inf: uncapped, which is unbounded
    below and collapses in practice). smooth_cap uses psi(r) = tau*L - softplus(tau*L - r) instead; both caps
    satisfy psi <= tau*L, so the loss is bounded below by -lam * tau. Gradients flow through l_pos and l_neg.
    exclude_BK (optional, True = drop) removes negatives that are not mismatched (roll collisions, whose ratio
    is identically 0): their term is zeroed (the 1/K factor is kept) and they leave the statistics.
    lam may be a (B,) tensor, one strength per image (the MCLR dial, docs/method.md, "A strength dial for MCLR"):
    the ratio term is then mean_b lam_b * (1/K) sum_k psi(...).

    Stats: nll (per token), log_ratio (mean Lambda per token over kept negatives), ratio_acc (share of kept
    negatives with l_pos > l_neg), capped_frac (share of kept ratios at or past the cap tau*L).
    """
    if l_neg_BK.ndim != 2:
        raise ValueError(f"l_neg_BK must be (B, K), got {tuple(l_neg_BK.shape)}")
    B, K = l_neg_BK.shape
    _check_B("l_pos_B", l_pos_B, B)
    if isinstance(lam, torch.Tensor):
        _check_B("lam", lam, B)  # its values are the planner's (loss.mclr.lam_range), checked by the config
    elif lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if tau is not None and tau < 0:
        raise ValueError(f"tau must be >= 0 (or None for no cap), got {tau}")
    cap = None if tau is None or math.isinf(tau) else tau * L

    ratio_BK = l_pos_B.unsqueeze(1) - l_neg_BK
    psi_BK = ratio_cap(ratio_BK, cap, smooth_cap)
    keep_BK = torch.ones_like(ratio_BK, dtype=torch.bool) if exclude_BK is None else ~exclude_BK.bool()
    psi_BK = torch.where(keep_BK, psi_BK, torch.zeros_like(psi_BK))

    # Written as nll + ratio term so that lam = 0 reproduces nll_loss bit for bit (value and gradient).
    if isinstance(lam, torch.Tensor):
        loss = -l_pos_B.mean() / L - (lam.to(psi_BK) * (psi_BK.sum(dim=1) / K)).mean() / L
    else:
        loss = -l_pos_B.mean() / L - lam * (psi_BK.sum(dim=1) / K).mean() / L

    with torch.no_grad():
        kept = keep_BK.float()
        n_kept = kept.sum().clamp(min=1.0)
        r = ratio_BK.float()
        stats = {
            "loss": _d(loss),
            "nll": _d(-l_pos_B.mean() / L),
            "log_ratio": (r * kept).sum() / n_kept / L,
            "ratio_acc": ((r > 0).float() * kept).sum() / n_kept,
            "capped_frac": (((r >= cap).float() * kept).sum() / n_kept) if cap is not None
            else torch.zeros((), device=r.device),
            "kept_frac": kept.mean(),
        }
    return loss, stats


# ---- GFT (Chen et al., ICML 2025, arXiv 2501.15420) -------------------------------------------------------------
def gft_loss(z_cond_BLV: torch.Tensor, z_uncond_BLV: torch.Tensor, beta_B: torch.Tensor,
             idx_BL: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Guidance-free training (docs/method.md, "GFT"): the cross-entropy of the data tokens under the mixed logits

        z = beta_b * z_cond + (1 - beta_b) * sg[z_uncond],

    averaged over every token of every row (GFT's F.cross_entropy over B * L). Only z_cond carries gradient: the
    unconditional logits are a stop-gradient target, detached here whatever the caller passes.

    Stats (per token): nll of the conditional logits alone, nll_uncond of the unconditional ones, and the mean beta.
    """
    if z_cond_BLV.ndim != 3 or z_cond_BLV.shape != z_uncond_BLV.shape:
        raise ValueError(f"z_cond_BLV and z_uncond_BLV must be the same (B, L, V), got {tuple(z_cond_BLV.shape)} "
                         f"and {tuple(z_uncond_BLV.shape)}")
    B, L, V = z_cond_BLV.shape
    _check_B("beta_B", beta_B, B)
    if tuple(idx_BL.shape) != (B, L):
        raise ValueError(f"idx_BL must have shape {(B, L)}, got {tuple(idx_BL.shape)}")
    beta_B11 = beta_B.to(z_cond_BLV).view(B, 1, 1)
    z_BLV = beta_B11 * z_cond_BLV + (1 - beta_B11) * z_uncond_BLV.detach()
    target_N = idx_BL.reshape(B * L)
    loss = F.cross_entropy(z_BLV.reshape(B * L, V), target_N)
    with torch.no_grad():
        stats = {"loss": _d(loss), "nll": _d(F.cross_entropy(z_cond_BLV.reshape(B * L, V), target_N)),
                 "nll_uncond": _d(F.cross_entropy(z_uncond_BLV.reshape(B * L, V), target_N)),
                 "beta": _d(beta_B.float().mean())}
    return loss, stats


# ---- baselines with a frozen reference (CCA paper, arXiv 2410.09347) ---------------------------------------
def _deltas(l_pos_B, lref_pos_B, l_neg_B, lref_neg_B) -> tuple[torch.Tensor, torch.Tensor]:
    B = l_pos_B.shape[0]
    for name, t in (("l_pos_B", l_pos_B), ("lref_pos_B", lref_pos_B), ("l_neg_B", l_neg_B),
                    ("lref_neg_B", lref_neg_B)):
        _check_B(name, t, B)
    return l_pos_B - lref_pos_B.detach(), l_neg_B - lref_neg_B.detach()


def _pair_stats(loss: torch.Tensor, d_pos_B: torch.Tensor, d_neg_B: torch.Tensor,
                flagged_B: torch.Tensor | None = None) -> Stats:
    with torch.no_grad():
        stats = {
            "loss": _d(loss),
            "delta_pos": _d(d_pos_B.mean()),     # CCA's "chosen reward" (per sequence, before beta)
            "delta_neg": _d(d_neg_B.mean()),     # "rejected reward"
            "margin": _d((d_pos_B - d_neg_B).mean()),
            "pair_acc": _d((d_pos_B > d_neg_B).float().mean()),
        }
        if flagged_B is not None:
            stats["flagged_frac"] = flagged_B.float().mean()
        return stats


def _flag_weight_and_sign(flagged_B: torch.Tensor, lam: float, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # CCA's masked form: a flagged row's negative is not a mismatched class (null-masked, or a roll collision),
    # so its term is pushed up like a positive (sign +1) with weight 1; every other row keeps weight lam, sign -1.
    _check_B("flagged_B", flagged_B, like.shape[0])
    flagged = flagged_B.to(device=like.device, dtype=torch.bool)
    weight_B = torch.where(flagged, torch.ones_like(like), torch.full_like(like, lam))
    sign_B = flagged.to(like.dtype) * 2 - 1
    return weight_B, sign_B


def cca_loss(l_pos_B: torch.Tensor, lref_pos_B: torch.Tensor, l_neg_B: torch.Tensor, lref_neg_B: torch.Tensor,
             beta: float, lam: float, flagged_B: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """Condition Contrastive Alignment, per sequence, exactly as CCA's VAR trainer (docs/method.md, "Baselines").

    flagged_B=None is CCA's form for uncond_ratio = 0 (no null masking):
        mean_b[-log sigmoid(beta Delta(x, c))] + lam mean_b[-log sigmoid(-beta Delta(x, c-))]
    flagged_B given is its form for uncond_ratio > 0 (True = null-masked row or roll collision):
        ( mean_b[-log sigmoid(beta Delta(x, c))] + mean_b[w_b (-log sigmoid(s_b beta Delta(x, c-)))] ) / max(lam, 1)
    with w_b = 1, s_b = +1 on flagged rows and w_b = lam, s_b = -1 elsewhere.
    """
    d_pos_B, d_neg_B = _deltas(l_pos_B, lref_pos_B, l_neg_B, lref_neg_B)
    pos_term = -F.logsigmoid(beta * d_pos_B).mean()
    if flagged_B is None:
        loss = pos_term - lam * F.logsigmoid(-beta * d_neg_B).mean()
    else:
        weight_B, sign_B = _flag_weight_and_sign(flagged_B, lam, d_neg_B)
        loss = (pos_term - (weight_B * F.logsigmoid(sign_B * beta * d_neg_B)).mean()) / max(lam, 1.0)
    return loss, _pair_stats(loss, d_pos_B, d_neg_B, flagged_B)


def cc_dpo_loss(l_pos_B: torch.Tensor, lref_pos_B: torch.Tensor, l_neg_B: torch.Tensor, lref_neg_B: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, Stats]:
    """Condition-contrastive DPO, per sequence: mean_b[ -log sigmoid(beta * (Delta(x, c) - Delta(x, c-))) ].

    A pair whose negative label equals its positive (null-masked row or roll collision) has margin identically
    0: it adds log 2 to the loss and nothing to the gradient, as in CCA's code, which applies no flag rule here.
    """
    d_pos_B, d_neg_B = _deltas(l_pos_B, lref_pos_B, l_neg_B, lref_neg_B)
    loss = -F.logsigmoid(beta * (d_pos_B - d_neg_B)).mean()
    return loss, _pair_stats(loss, d_pos_B, d_neg_B)


def unlearning_loss(l_pos_B: torch.Tensor, lref_pos_B: torch.Tensor, l_neg_B: torch.Tensor,
                    lref_neg_B: torch.Tensor, lam: float, flagged_B: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, Stats]:
    """Likelihood unlearning, per sequence, exactly as CCA's code (docs/method.md, "Baselines").

    flagged_B=None (uncond_ratio = 0): -mean_b Delta(x, c) + lam mean_b Delta(x, c-).
    flagged_B given (uncond_ratio > 0): ( -mean_b Delta(x, c) - mean_b w_b s_b Delta(x, c-) ) / max(lam, 1), with
    w_b, s_b as in cca_loss. The reference only shifts the value (its gradient is 0); it is kept so the reported
    loss is comparable with CCA's.
    """
    d_pos_B, d_neg_B = _deltas(l_pos_B, lref_pos_B, l_neg_B, lref_neg_B)
    if flagged_B is None:
        loss = -d_pos_B.mean() + lam * d_neg_B.mean()
    else:
        weight_B, sign_B = _flag_weight_and_sign(flagged_B, lam, d_neg_B)
        loss = (-d_pos_B.mean() - (weight_B * sign_B * d_neg_B).mean()) / max(lam, 1.0)
    return loss, _pair_stats(loss, d_pos_B, d_neg_B, flagged_B)


# ---- DDO (Zheng et al., ICML 2025, arXiv 2503.01103) ---------------------------------------------------------
def ddo_loss(l_data_B: torch.Tensor, lref_data_B: torch.Tensor, l_fake_F: torch.Tensor, lref_fake_F: torch.Tensor,
             beta: float, alpha: float) -> tuple[torch.Tensor, Stats]:
    """Direct Discriminative Optimization, per sequence (docs/method.md, "DDO"). With the implied discriminator
    d(x, c) = beta * (l_theta(x, c) - l_ref(x, c)):

        mean_b[-log sigmoid(d(x_b, c_b))] + alpha * mean_f[-log(1 - sigmoid(d(x~_f, c_f)))]

    x_b are data images, x~_f the reference model's own samples (drawn before training, each with the class it was
    sampled for). -log(1 - sigmoid(d)) is computed as -log sigmoid(-d), which is exact and does not underflow.
    The batches may differ in size (B data rows, F sample rows).

    Stats (per sequence, before beta): delta_data and delta_fake, the mean Delta = l_theta - l_ref on each side;
    real_acc and fake_acc, the shares the discriminator calls right (d > 0 on data, d < 0 on samples).
    """
    if l_data_B.ndim != 1 or l_fake_F.ndim != 1:
        raise ValueError(f"l_data_B and l_fake_F must be 1-D, got {tuple(l_data_B.shape)}, {tuple(l_fake_F.shape)}")
    _check_B("lref_data_B", lref_data_B, l_data_B.shape[0])
    _check_B("lref_fake_F", lref_fake_F, l_fake_F.shape[0])
    if not (math.isfinite(beta) and beta > 0) or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"need beta > 0 and alpha >= 0 (finite), got beta={beta}, alpha={alpha}")
    delta_data_B = l_data_B - lref_data_B.detach()
    delta_fake_F = l_fake_F - lref_fake_F.detach()
    loss = -F.logsigmoid(beta * delta_data_B).mean() - alpha * F.logsigmoid(-beta * delta_fake_F).mean()
    with torch.no_grad():
        stats = {"loss": _d(loss), "delta_data": _d(delta_data_B.mean()), "delta_fake": _d(delta_fake_F.mean()),
                 "real_acc": _d((delta_data_B > 0).float().mean()), "fake_acc": _d((delta_fake_F < 0).float().mean())}
    return loss, stats
