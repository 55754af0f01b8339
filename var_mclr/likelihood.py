"""Exact image log-likelihoods under VAR, evaluated under one or many classes (docs/method.md, "Likelihood").

l(x, c) = sum_t log softmax(z_theta(x, c)_t)[x_t] comes from one teacher-forced pass: VAR predicts every
token of scale s from scales < s, so the whole sequence is scored at once and the result is exact (no
sampling). Every loss and every likelihood-based metric goes through `token_logprobs_of`, which goes
through the fused kernel `var_mclr.kernels.token_logprobs`, so the (B, L, V) logits are never needed.

Also here: the implicit classifier log p(c | x) and the samplers of mismatched classes used by MCLR / CCA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


NEGATIVE_MODES = ("uniform", "roll", "null", "mixed", "all")


# ---- log-likelihoods -------------------------------------------------------------------------------------
def token_logprobs_of(var, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                      idx_BL: torch.Tensor, strength_B: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_t | scales before t's, c) for every token: (B, L) float32, differentiable w.r.t. var.

    Goes through var's forward (the fused log-prob kernel sits behind its target_BL argument), so a
    DDP-wrapped model works too. strength_B: the strength input of a strength-conditioned model (model.py).
    """
    if strength_B is None:
        return var(label_B, x_BLCv_wo_first_l, target_BL=idx_BL)
    return var(label_B, x_BLCv_wo_first_l, target_BL=idx_BL, strength_B=strength_B)


def loglik(var, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, idx_BL: torch.Tensor,
           strength_B: torch.Tensor | None = None) -> torch.Tensor:
    """l(x, c) = log p(x | c) summed over all L tokens: (B,) float32."""
    return token_logprobs_of(var, label_B, x_BLCv_wo_first_l, idx_BL, strength_B).sum(dim=-1)


def loglik_under_classes(var, classes_BK: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, idx_BL: torch.Tensor,
                         max_rows: int | None = None, strength_BK: torch.Tensor | None = None) -> torch.Tensor:
    """l(x_b, classes_BK[b, k]) for every image and each of its K classes: (B, K) float32.

    One batched teacher-forced pass over B*K rows (row b*K + k holds image b under class classes_BK[b, k]),
    so the true class, K mismatched classes and the null class cost one forward and one backward.
    max_rows (optional) splits the B*K rows into chunks of at most that many, bounding activation memory
    when K is large (e.g. the implicit classifier over 1000 classes); the result and its gradient are the same.
    strength_BK (optional): the strength input of every row, for a strength-conditioned model.
    """
    if classes_BK.ndim != 2:
        raise ValueError(f"classes_BK must be (B, K), got shape {tuple(classes_BK.shape)}")
    B, K = classes_BK.shape
    if x_BLCv_wo_first_l.shape[0] != B or idx_BL.shape[0] != B:
        raise ValueError(f"batch mismatch: classes {B}, x {x_BLCv_wo_first_l.shape[0]}, idx {idx_BL.shape[0]}")
    # expand + reshape keeps the row order b*K + k, which the final view(B, K) relies on.
    label_N = classes_BK.reshape(B * K)
    x_NLC = x_BLCv_wo_first_l.unsqueeze(1).expand(B, K, *x_BLCv_wo_first_l.shape[1:]).reshape(
        B * K, *x_BLCv_wo_first_l.shape[1:])
    idx_NL = idx_BL.unsqueeze(1).expand(B, K, idx_BL.shape[1]).reshape(B * K, idx_BL.shape[1])
    if strength_BK is not None and tuple(strength_BK.shape) != (B, K):
        raise ValueError(f"strength_BK must be {(B, K)}, got shape {tuple(strength_BK.shape)}")
    strength_N = None if strength_BK is None else strength_BK.reshape(B * K)
    if max_rows is None or max_rows >= B * K:
        l_N = loglik(var, label_N, x_NLC, idx_NL, strength_N)
    else:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        l_N = torch.cat([loglik(var, label_N[i:i + max_rows], x_NLC[i:i + max_rows], idx_NL[i:i + max_rows],
                                None if strength_N is None else strength_N[i:i + max_rows])
                         for i in range(0, B * K, max_rows)])
    return l_N.view(B, K)


def loglik_all_classes(var, x_BLCv_wo_first_l: torch.Tensor, idx_BL: torch.Tensor, include_null: bool = False,
                       max_rows: int | None = None) -> torch.Tensor:
    """l(x, c) for c = 0..num_classes-1 (and the null class last if include_null): (B, C) or (B, C+1)."""
    B = idx_BL.shape[0]
    n = var.num_classes + (1 if include_null else 0)
    classes_BK = torch.arange(n, device=idx_BL.device).unsqueeze(0).expand(B, n)
    return loglik_under_classes(var, classes_BK, x_BLCv_wo_first_l, idx_BL, max_rows=max_rows)


def implicit_classifier_logprobs(l_BC: torch.Tensor) -> torch.Tensor:
    """log p(c | x) by Bayes with a uniform class prior: log_softmax over the class axis of l(x, c).

    Pass only real classes (not the null one) for a classifier over C classes. Its accuracy measures the
    inter-class separation MCLR raises; log p(c|x) - log p(c'|x) == l(x, c) - l(x, c') exactly.
    """
    return F.log_softmax(l_BC.to(torch.promote_types(l_BC.dtype, torch.float32)), dim=-1)


# ---- mismatched classes ----------------------------------------------------------------------------------
def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    # Draw on the generator's device (torch requires it), then move to where the labels live.
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def sample_negatives(label_B: torch.Tensor, num_classes: int, K: int = 1, mode: str = "uniform",
                     generator: torch.Generator | None = None,
                     null_frac: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """K mismatched classes per sample: returns (neg_BK long, collision_BK bool with neg == label).
    docs/method.md, "Negatives".

    Modes:
      uniform: uniform over the C-1 classes other than label (exact: draw r in [0, C-2] and skip the label,
               so no rejection loop and no bias). The K draws are independent (with replacement), as in the
               objective's (1/K) sum_k, an unbiased estimate of the mean over all C-1 classes. A null-class
               label (class-dropped sample) has no true class; its negatives are uniform over all C classes.
               Collisions are impossible.
      roll:    CCA's in-batch negatives, neg[b, k] = label[(b + k + 1) % B] (k = 0 is CCA's roll by one,
               torch.roll(label, -1)). Equal labels in the batch collide; the mask reports them so the loss
               can apply its rule (CCA: treat as positive; MCLR: the ratio is identically 0, exclude it).
      null:    the null class (index num_classes) for every k, i.e. the ratio to the unconditional model.
               Deterministic, so K > 1 only repeats it.
      mixed:   each negative independently is the null class with probability null_frac (default 1/2) and
               otherwise a uniform mismatched class; in expectation the loss is the average of the two modes.
      all:     every mismatched class once (K must be C - 1): the exact mean over classes, no sampling.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"unknown negative mode {mode!r}; expected one of {NEGATIVE_MODES}")
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if num_classes < 2 and mode in ("uniform", "mixed"):
        raise ValueError("uniform mismatched classes need num_classes >= 2")
    label_B = label_B.long()
    B, device = label_B.shape[0], label_B.device
    label_BK = label_B.unsqueeze(1).expand(B, K)

    if mode == "roll":
        src_BK = (torch.arange(B, device=device).unsqueeze(1) + torch.arange(1, K + 1, device=device)) % B
        neg_BK = label_B[src_BK]
        return neg_BK, neg_BK == label_BK

    if mode == "null":
        neg_BK = torch.full((B, K), num_classes, dtype=torch.long, device=device)
        return neg_BK, neg_BK == label_BK

    if mode == "all":
        if K != num_classes - 1:
            raise ValueError(f"negatives = all scores every mismatched class: K must be {num_classes - 1}, got {K}")
        if bool((label_B >= num_classes).any()):
            raise ValueError("negatives = all needs a true class for every sample (no null-class labels)")
        r_BK = torch.arange(K, device=device).unsqueeze(0).expand(B, K)
        neg_BK = r_BK + (r_BK >= label_BK).long()
        return neg_BK, neg_BK == label_BK

    # uniform: r in [0, C-2], shifted past the label, hits each wrong class exactly once.
    r_BK = _randint(num_classes - 1, (B, K), generator, device)
    neg_BK = r_BK + (r_BK >= label_BK).long()
    is_null_label_BK = label_BK >= num_classes
    if bool(is_null_label_BK.any()):
        neg_BK = torch.where(is_null_label_BK, _randint(num_classes, (B, K), generator, device), neg_BK)
    if mode == "mixed":
        gen_device = generator.device if generator is not None else device
        to_null_BK = (torch.rand((B, K), generator=generator, device=gen_device) < null_frac).to(device)
        neg_BK = torch.where(to_null_BK, torch.full_like(neg_BK, num_classes), neg_BK)
    return neg_BK, neg_BK == label_BK


def cca_labels(label_B: torch.Tensor, num_classes: int, uncond_ratio: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCA's pairing: (pos_label_B, neg_label_B, neg_is_pos_B).

    The negative is the batch rolled by one; a share uncond_ratio of samples (CCA: 0.1) has both labels set to
    the null class so the unconditional model keeps being trained and CFG stays usable. Samples whose
    negative equals the positive (roll collisions, and all null-masked ones) are flagged: CCA's loss
    treats their negative term as a positive one.
    """
    neg_B1, _ = sample_negatives(label_B, num_classes, K=1, mode="roll")
    pos_B, neg_B = label_B.long(), neg_B1[:, 0]
    if uncond_ratio > 0:
        gen_device = generator.device if generator is not None else label_B.device
        to_null_B = (torch.rand(label_B.shape[0], generator=generator, device=gen_device)
                     < uncond_ratio).to(label_B.device)
        pos_B = torch.where(to_null_B, torch.full_like(pos_B, num_classes), pos_B)
        neg_B = torch.where(to_null_B, torch.full_like(neg_B, num_classes), neg_B)
    return pos_B, neg_B, neg_B == pos_B
