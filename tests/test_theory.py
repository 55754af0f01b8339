"""The identities behind MCLR, checked through the project's own sampler and losses (docs/method.md).

- "CFG": what guided_sample and sample_tokens draw from at guidance t is the power reweighting
  p_c^(1+t) p_u^(-t) / Z, computed here independently in float64; sample_tokens applies the documented per-scale
  ramp t_s = w * s / (S - 1) (or the constant t_s = w).
- "Population optimum": a tabular model fitted with mclr_loss on exact expectations (uncapped, or a cap that
  never binds) lands on the additive optimum q = (1+lam) p_c - lam p_neg; the registry's "mclr" entry computes
  the same loss as mclr_loss.
- "MCLR objective" and "The cap": mclr_loss's gradients with respect to the log-likelihoods equal the analytic ones
  (hard cap: an indicator, smooth cap: a sigmoid weight), so a cap that binds on every pair leaves exactly the nll
  gradient.
- "Equivalence with CFG": the paper's theorem is stated for diffusion score matching, which no project code
  implements. What the project shows instead: the registry's uncapped MCLR optimum at strength lam agrees with
  the sampler's CFG distribution at t = lam C / (C - 1) to first order in p_c / p_u - 1, within the bound
  t (1 + t) chi^2(p_c || p_u) of docs/method.md; CFG at another strength, no guidance, or a target moved at first
  order fail the same check.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import tiny_vae, tiny_var
import var_mclr.sampling as sampling_module
from var_mclr.kernels import guided_sample
from var_mclr.losses import mclr_loss, nll_loss
from var_mclr.objectives import OBJECTIVES, LossConfig, MCLRConfig
from var_mclr.sampling import SamplingConfig, sample_tokens

SETTINGS = settings(max_examples=25, deadline=None)


def power_reweighting(z_c, z_u, t: float) -> np.ndarray:
    """p_c^(1+t) p_u^(-t) / Z in float64, from the two softmaxes: powers of probabilities, no logit mixing."""
    z_c, z_u = np.asarray(z_c, np.float64), np.asarray(z_u, np.float64)
    p_c, p_u = np.exp(z_c - z_c.max()), np.exp(z_u - z_u.max())
    p_c, p_u = p_c / p_c.sum(), p_u / p_u.sum()
    reweighted = p_c ** (1 + t) * p_u ** (-t)
    return reweighted / reweighted.sum()


def chi_square_pvalue(draws: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of integer draws to probs; categories expected fewer than 5 times are pooled."""
    counts = np.bincount(draws, minlength=len(probs)).astype(np.float64)
    expected = probs * len(draws)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue)


# ---- CFG ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 64), t=st.floats(0.05, 8.0), scale=st.floats(0.1, 3.0))
def test_reference_sampler_draws_from_power_reweighting(seed, V, t, scale):
    # The reference path hands its final probabilities to torch.multinomial: capture them exactly.
    g = torch.Generator().manual_seed(seed)
    z_c = torch.randn(2, V, generator=g, dtype=torch.float64) * scale
    z_u = torch.randn(2, V, generator=g, dtype=torch.float64) * scale + torch.randn(2, 1, generator=g) * 5
    seen = []
    original = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.detach().double().clone())
        return original(probs, *args, **kwargs)

    with mock.patch.object(torch, "multinomial", spy):
        guided_sample(z_c.float(), z_u.float(), t, impl="naive", generator=torch.Generator().manual_seed(0))
    (probs,) = seen
    for row in range(2):
        np.testing.assert_allclose(probs[row].numpy(), power_reweighting(z_c[row], z_u[row], t),
                                   rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("t", [0.5, 3.0])
def test_sampled_frequencies_match_power_reweighting(impl, t):
    V, R = 6, 40000
    g = torch.Generator().manual_seed(11)
    z_c, z_u = torch.randn(V, generator=g), torch.randn(V, generator=g)
    draws = guided_sample(z_c.expand(R, V), z_u.expand(R, V), t, impl=impl,
                          generator=torch.Generator().manual_seed(1)).numpy()
    assert chi_square_pvalue(draws, power_reweighting(z_c, z_u, t)) > 1e-4
    # The test has power: the same draws reject the unguided distribution.
    assert chi_square_pvalue(draws, power_reweighting(z_c, z_u, 0.0)) < 1e-8


@pytest.mark.parametrize("guidance,schedule", [("cfg", "linear"), ("cfg", "constant"), ("none", "linear")])
def test_sampler_uses_documented_guidance_per_scale(guidance, schedule):
    vae = tiny_vae()
    var = tiny_var(vae)
    S, w = len(var.patch_nums), 2.5
    calls = []
    original = sampling_module.guided_sample

    def spy(logits_cond, logits_null, t, *args, **kwargs):
        calls.append((t, logits_null is not None))
        return original(logits_cond, logits_null, t, *args, **kwargs)

    cfg = SamplingConfig(guidance=guidance, cfg_scale=w, cfg_schedule=schedule)
    with mock.patch.object(sampling_module, "guided_sample", spy):
        sample_tokens(var, vae.quantize, torch.tensor([0, 3]), cfg, torch.Generator().manual_seed(0))
    if guidance == "none":
        documented = [0.0] * S
    elif schedule == "linear":  # VAR's ramp: no guidance on the first scale, full w on the last
        documented = [w * s / (S - 1) for s in range(S)]
    else:
        documented = [w] * S
    assert [t for t, _ in calls] == pytest.approx(documented, abs=1e-12)
    assert all(has_null == (guidance == "cfg") for _, has_null in calls)


def test_sampler_first_scale_draws_follow_power_reweighting():
    # Scale 0 is one token whose logits depend on the class only, so many rows of one class are i.i.d. draws
    # from a single guided distribution; the constant schedule puts t = w there.
    vae = tiny_vae()
    var = tiny_var(vae)
    B, w, label = 2000, 1.5, 2
    cfg = SamplingConfig(guidance="cfg", cfg_scale=w, cfg_schedule="constant")
    res = sample_tokens(var, vae.quantize, torch.full((B,), label), cfg, torch.Generator().manual_seed(4),
                        keep_logits=True)
    z_c, z_u = res.logits_cond_BlV[0][:, 0], res.logits_null_BlV[0][:, 0]
    assert torch.allclose(z_c, z_c[:1].expand_as(z_c)) and torch.allclose(z_u, z_u[:1].expand_as(z_u))
    draws = res.idx_Bl[0][:, 0].numpy()
    guided = power_reweighting(z_c[0], z_u[0], w)
    assert chi_square_pvalue(draws, guided) > 1e-4
    assert chi_square_pvalue(draws, power_reweighting(z_c[0], z_u[0], 0.0)) < 1e-8


# ---- population optimum ------------------------------------------------------------------------------------
def mclr_direct(lam, tau=None, smooth_cap=False):
    return lambda l_pos, l_neg: mclr_loss(l_pos, l_neg, L=1, lam=lam, tau=tau, smooth_cap=smooth_cap)[0]


def mclr_via_registry(lam, tau=None, smooth_cap=False):
    cfg = LossConfig(mclr=MCLRConfig(lam=lam, tau=tau, smooth_cap=smooth_cap))
    objective = OBJECTIVES["mclr"]

    def loss(l_pos, l_neg):
        l_BK = torch.cat((l_pos.view(-1, 1), l_neg), 1)
        return objective.loss(cfg, l_BK, None, torch.zeros_like(l_BK, dtype=torch.bool), 1)[0]

    return loss


def tabular_population_loss(theta_CV, row_weight_CV, loss_fn):
    """sum over data pairs (x, c) of row_weight[c, x] * loss(l(x, c), [l(x, c') for every c' != c]).

    The model is one token (L = 1) with free logits theta[c] per class; every other class is a negative, so
    the (1/K) sum over negatives is the exact mean over the C - 1 mismatched classes."""
    C, V = theta_CV.shape
    logq_CV = torch.log_softmax(theta_CV, dim=1)
    total = theta_CV.new_zeros(())
    for c in range(C):
        others = [o for o in range(C) if o != c]
        for x in range(V):
            total = total + row_weight_CV[c, x] * loss_fn(logq_CV[c, x].view(1), logq_CV[others, x].view(1, -1))
    return total


def maximise_tabular(row_weight_CV, loss_fn):
    theta = torch.zeros(row_weight_CV.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = tabular_population_loss(theta, row_weight_CV, loss_fn)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(theta.detach(), 1)


def class_tables(C, V, seed, spread):
    g = torch.Generator().manual_seed(seed)
    base_V = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    p_CV = base_V + spread * (torch.rand(C, V, generator=g, dtype=torch.float64) - 0.5)
    return p_CV / p_CV.sum(1, keepdim=True)


def tables_with_additive_optimum(C, V, lam, seed):
    """Class tables p_c whose additive optimum against the other classes' mean is a chosen positive table q.

    Inverts (1+lam) p_c - lam/(C-1) sum_{c' != c} p_c' = q_c: with S = sum_c q_c, p_c = (q_c + lam/(C-1) S) /
    (1 + lam C/(C-1)), which is a distribution for any distributions q_c."""
    g = torch.Generator().manual_seed(seed)
    q_CV = torch.rand(C, V, generator=g, dtype=torch.float64) ** 2 + 0.05
    q_CV = q_CV / q_CV.sum(1, keepdim=True)
    return (q_CV + lam / (C - 1) * q_CV.sum(0, keepdim=True)) / (1 + lam * C / (C - 1))


@pytest.mark.parametrize("lam,tau,smooth_cap", [(0.8, None, False), (2.0, None, False), (0.8, 50.0, False),
                                                (0.8, 50.0, True)])
def test_mclr_loss_population_optimum_is_additive(lam, tau, smooth_cap):
    C, V = 3, 5
    p_CV = tables_with_additive_optimum(C, V, lam, seed=0)
    p_neg_CV = torch.stack([p_CV[[o for o in range(C) if o != c]].mean(0) for c in range(C)])
    additive_CV = (1 + lam) * p_CV - lam * p_neg_CV
    assert bool((additive_CV > 0).all())  # the case where the additive optimum is a distribution
    row_weight_CV = p_CV / C  # uniform class prior, x ~ p_c: the exact expectation
    q_CV = maximise_tabular(row_weight_CV, mclr_direct(lam, tau, smooth_cap))
    np.testing.assert_allclose(q_CV.numpy(), additive_CV.numpy(), atol=1e-6)
    # A linear mixture, not the power (CFG-like) reweighting: the two differ by far more than the tolerance.
    power_CV = p_CV ** (1 + lam) * p_neg_CV ** (-lam)
    assert float((power_CV / power_CV.sum(1, keepdim=True) - q_CV).abs().max()) > 5e-3


@pytest.mark.parametrize("mcfg", [MCLRConfig(lam=0.8, tau=None), MCLRConfig(lam=3.0, tau=0.3),
                                  MCLRConfig(lam=3.0, tau=0.3, smooth_cap=True), MCLRConfig(lam=0.0, tau=0.05)])
def test_registry_mclr_entry_is_mclr_loss(mcfg):
    g = torch.Generator().manual_seed(3)
    p_CV = class_tables(3, 5, seed=1, spread=0.3)
    theta_CV = torch.randn(3, 5, generator=g, dtype=torch.float64)
    args = (mcfg.lam, mcfg.tau, mcfg.smooth_cap)
    direct = tabular_population_loss(theta_CV, p_CV / 3, mclr_direct(*args))
    registry = tabular_population_loss(theta_CV, p_CV / 3, mclr_via_registry(*args))
    torch.testing.assert_close(registry, direct, rtol=0, atol=1e-12)
    # With roll negatives the registry plans the collisions and the loss excludes them, as mclr_loss does.
    cfg = LossConfig(mclr=MCLRConfig(lam=mcfg.lam, tau=mcfg.tau, smooth_cap=mcfg.smooth_cap, negatives="roll", K=2))
    labels = torch.tensor([1, 1, 4, 2, 2, 2])
    plan = OBJECTIVES["mclr"].plan(cfg, labels, 5, 0.0, torch.Generator().manual_seed(0))
    assert bool(plan.mask_BK[:, 1:].any())  # the batch has collisions to exclude
    l_BK = (torch.randn(plan.classes_BK.shape, generator=g) * 20 - 100).requires_grad_()
    L = 30
    got, _ = OBJECTIVES["mclr"].loss(cfg, l_BK, None, plan.mask_BK, L)
    want, _ = mclr_loss(l_BK[:, 0], l_BK[:, 1:], L, lam=mcfg.lam, tau=mcfg.tau, smooth_cap=mcfg.smooth_cap,
                        exclude_BK=plan.classes_BK[:, 1:] == labels.view(-1, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- gradients and the cap ---------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), K=st.integers(1, 4), L=st.integers(1, 700),
       lam=st.floats(0.0, 20.0), tau=st.one_of(st.none(), st.floats(0.0, 0.5)), smooth_cap=st.booleans(),
       with_exclusion=st.booleans())
def test_mclr_gradient_matches_analytic(seed, B, K, L, lam, tau, smooth_cap, with_exclusion):
    g = torch.Generator().manual_seed(seed)
    l_pos = (-L * (1 + torch.rand(B, generator=g, dtype=torch.float64))).requires_grad_()
    # Ratios spread around the cap (tau * L) so that some bind and some do not.
    spread = torch.randn(B, K, generator=g, dtype=torch.float64) * max(1.0, L * 0.3)
    cap = None if tau is None else tau * L
    l_neg = (l_pos.detach().unsqueeze(1) - (0.0 if cap is None else cap) - spread).requires_grad_()
    exclude = torch.rand(B, K, generator=g) < 0.3 if with_exclusion else None
    loss, _ = mclr_loss(l_pos, l_neg, L, lam=lam, tau=tau, smooth_cap=smooth_cap, exclude_BK=exclude)
    grad_pos, grad_neg = torch.autograd.grad(loss, (l_pos, l_neg))

    r = (l_pos.unsqueeze(1) - l_neg).detach()
    if cap is None:
        dpsi = torch.ones_like(r)
    elif smooth_cap:
        dpsi = torch.sigmoid(cap - r)  # d/dr [cap - softplus(cap - r)]
    else:
        dpsi = (r < cap).double()
    if exclude is not None:
        dpsi = dpsi * (~exclude).double()
    # rtol 1e-8: torch's softplus returns its input past 20, so its slope there is 1, not sigmoid(20) = 1 - 2e-9.
    torch.testing.assert_close(grad_pos, -(1 + lam * dpsi.sum(1) / K) / (B * L), rtol=1e-8, atol=1e-15)
    torch.testing.assert_close(grad_neg, lam * dpsi / (K * B * L), rtol=1e-8, atol=1e-15)


def test_binding_cap_leaves_exactly_the_nll_gradient():
    # Every pair's per-token ratio (0.06 to 0.1) is above the cap tau = 0.05: the situation of a cap below the
    # base model's typical log-ratio on training pairs.
    g = torch.Generator().manual_seed(0)
    B, K, L, lam, tau = 8, 2, 680, 3.0, 0.05
    l_pos = (-L * (2 + torch.rand(B, generator=g))).requires_grad_()
    l_neg = (l_pos.detach().unsqueeze(1) - L * (0.06 + 0.04 * torch.rand(B, K, generator=g))).requires_grad_()
    loss, stats = mclr_loss(l_pos, l_neg, L, lam=lam, tau=tau)
    grad_pos, grad_neg = torch.autograd.grad(loss, (l_pos, l_neg))
    nll, _ = nll_loss(l_pos, L)
    (nll_grad_pos,) = torch.autograd.grad(nll, l_pos)
    assert stats["capped_frac"].item() == 1.0
    assert torch.equal(grad_neg, torch.zeros_like(grad_neg))
    assert torch.equal(grad_pos, nll_grad_pos)
    assert loss.item() == pytest.approx(nll.item() - lam * tau, rel=1e-5)
    # The smooth cap keeps a small sigmoid-weighted pull on the same pairs instead of none.
    loss, _ = mclr_loss(l_pos, l_neg, L, lam=lam, tau=tau, smooth_cap=True)
    (grad_neg,) = torch.autograd.grad(loss, l_neg)
    r = (l_pos.unsqueeze(1) - l_neg).detach()
    torch.testing.assert_close(grad_neg, lam * torch.sigmoid(tau * L - r) / (K * B * L))
    assert bool((grad_neg > 0).all())


# ---- equivalence with CFG ----------------------------------------------------------------------------------
def balanced_tables(C, V, eps, seed=0):
    """Class tables p_c = p_u (1 + eps d_c) of balanced classes: the d_c sum to 0 over classes (so p_u is their
    mean, the unconditional distribution) and have mean 0 under p_u (so every p_c is a distribution)."""
    g = torch.Generator().manual_seed(seed)
    p_u_V = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    p_u_V = p_u_V / p_u_V.sum()
    d_CV = torch.randn(C, V, generator=g, dtype=torch.float64)
    d_CV = d_CV - d_CV.mean(0, keepdim=True)
    d_CV = d_CV - (d_CV * p_u_V).sum(1, keepdim=True)  # the subtracted means sum to 0 too: the class sum stays 0
    return p_u_V * (1 + eps * d_CV)


def cfg_target(strength):
    """CFG's distribution of every class, as the sampler draws it, at guidance t = strength(lam, C)."""
    def target(p_CV, lam):
        t, log_u = strength(lam, p_CV.shape[0]), p_CV.mean(0).log()
        return np.stack([power_reweighting(p_c.log(), log_u, t) for p_c in p_CV])
    return target


MATCHED_CFG = cfg_target(lambda lam, C: lam * C / (C - 1))  # docs/method.md, "Equivalence with CFG"


def fitted_optimum(C, V, eps, lam):
    p_CV = balanced_tables(C, V, eps)
    return p_CV, maximise_tabular(p_CV / C, mclr_via_registry(lam)).numpy()


def assert_agrees_to_first_order(target, lam, C=3, V=5):
    """The registry's uncapped MCLR optimum q and the target agree to first order in p_c / p_u - 1: their L1
    distance is within the stated bound t (1 + t) chi^2(p_c || p_u) and shrinks 4x when the class differences
    halve (an error of first order would only halve)."""
    t = lam * C / (C - 1)
    errors = []
    for eps in (0.05, 0.025):
        p_CV, q_CV = fitted_optimum(C, V, eps, lam)
        p_u_V = p_CV.mean(0)
        chi2_C = (((p_CV - p_u_V) ** 2) / p_u_V).sum(1).numpy()
        errors.append(np.abs(q_CV - target(p_CV, lam)).sum(1))
        assert bool((errors[-1] <= t * (1 + t) * chi2_C).all()), (eps, errors[-1], t * (1 + t) * chi2_C)
    shrink = errors[0] / errors[1]
    assert bool(((shrink > 3.5) & (shrink < 4.5)).all()), shrink


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_mclr_optimum_agrees_with_cfg_to_first_order(lam):
    assert_agrees_to_first_order(MATCHED_CFG, lam)


def moved_cfg(p_CV, lam):
    """CFG moved at first order along another direction: each class's differences from p_u shifted by one token."""
    d_CV = (p_CV / p_CV.mean(0) - 1).numpy()
    moved_CV = MATCHED_CFG(p_CV, lam) * (1 + np.roll(d_CV, 1, axis=1))
    return moved_CV / moved_CV.sum(1, keepdims=True)


@pytest.mark.parametrize("target", [
    cfg_target(lambda lam, C: lam),  # CFG at t = lam: the strengths do not map one to one
    cfg_target(lambda lam, C: 1.2 * lam * C / (C - 1)),
    lambda p_CV, lam: p_CV.numpy(),  # no guidance at all
    moved_cfg,
], ids=["t=lam", "t*1.2", "unguided", "moved"])
def test_first_order_check_refuses_targets_other_than_cfg(target):
    with pytest.raises(AssertionError):
        assert_agrees_to_first_order(target, lam=1.0)
