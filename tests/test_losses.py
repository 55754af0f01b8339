"""Losses as pure functions: hand-computed values, the cap, the lambda = 0 limit, shift invariance, baselines."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from var_mclr import kernels
from var_mclr.likelihood import cca_labels, sample_negatives
from var_mclr.losses import cc_dpo_loss, cca_loss, mclr_loss, nll_loss, ratio_cap, unlearning_loss

SETTINGS = settings(max_examples=40, deadline=None)


def logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


# ---- nll and MCLR values -------------------------------------------------------------------------------------
def test_nll_per_token():
    loss, stats = nll_loss(torch.tensor([-10.0, -20.0]), L=5)
    assert loss.item() == pytest.approx(3.0) and stats["nll"].item() == pytest.approx(3.0)


def test_mclr_hand_computed_hard_cap():
    l_pos = torch.tensor([-10.0, -20.0])
    l_neg = torch.tensor([[-12.0, -9.0], [-30.0, -25.0]])  # ratios [2, -1], [10, 5]; cap tau*L = 2.5
    loss, stats = mclr_loss(l_pos, l_neg, L=5, lam=2.0, tau=0.5)
    # sample 0: (10 - 2 * (2 - 1)/2) / 5 = 1.8; sample 1: (20 - 2 * (2.5 + 2.5)/2) / 5 = 3.0
    assert loss.item() == pytest.approx(2.4)
    assert stats["nll"].item() == pytest.approx(3.0)
    assert stats["log_ratio"].item() == pytest.approx((2 - 1 + 10 + 5) / 4 / 5)
    assert stats["ratio_acc"].item() == pytest.approx(0.75)
    assert stats["capped_frac"].item() == pytest.approx(0.5)


def test_mclr_hand_computed_smooth_cap_and_uncapped():
    l_pos, l_neg = torch.tensor([-10.0]), torch.tensor([[-13.0]])  # ratio 3
    loss, _ = mclr_loss(l_pos, l_neg, L=4, lam=1.5, tau=0.5, smooth_cap=True)  # cap 2
    psi = 2.0 - math.log1p(math.exp(2.0 - 3.0))
    assert loss.item() == pytest.approx((10 - 1.5 * psi) / 4)
    for tau in (None, math.inf):
        loss, stats = mclr_loss(l_pos, l_neg, L=4, lam=1.5, tau=tau)
        assert loss.item() == pytest.approx((10 - 1.5 * 3) / 4) and stats["capped_frac"].item() == 0


def test_ratio_cap_shapes():
    r = torch.tensor([-5.0, 0.0, 1.0, 3.0, 50.0])
    assert torch.equal(ratio_cap(r, None), r) and torch.equal(ratio_cap(r, math.inf), r)
    assert torch.equal(ratio_cap(r, 1.0), torch.tensor([-5.0, 0.0, 1.0, 1.0, 1.0]))
    smooth = ratio_cap(r, 1.0, smooth=True)
    assert bool((smooth <= 1.0).all()) and bool((smooth <= r).all())  # below both the cap and the identity
    assert bool((smooth[:4] < torch.clamp(r[:4], max=1.0)).all())
    assert smooth[-1].item() == pytest.approx(1.0, abs=1e-6) and smooth[0].item() == pytest.approx(-5.0, abs=3e-3)


def test_mclr_exclusion_of_collisions():
    l_pos = torch.tensor([-10.0, -20.0], requires_grad=True)
    l_neg = torch.tensor([[-10.0, -14.0], [-30.0, -20.0]], requires_grad=True)
    excl = torch.tensor([[True, False], [False, True]])
    loss, stats = mclr_loss(l_pos, l_neg, L=2, lam=1.0, tau=None, exclude_BK=excl)
    # kept ratios: 4 (sample 0), 10 (sample 1); excluded terms contribute 0 but the 1/K factor stays
    assert loss.item() == pytest.approx(((10 - 4 / 2) / 2 + (20 - 10 / 2) / 2) / 2)
    assert stats["ratio_acc"].item() == 1.0 and stats["kept_frac"].item() == 0.5
    assert stats["log_ratio"].item() == pytest.approx((4 + 10) / 2 / 2)
    loss.backward()
    assert l_neg.grad[0, 0].item() == 0 and l_neg.grad[1, 1].item() == 0 and l_neg.grad[0, 1].item() > 0


# ---- MCLR properties -----------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), K=st.integers(1, 4), L=st.integers(1, 700),
       lam=st.floats(0.0, 50.0), tau=st.floats(0.0, 2.0), smooth=st.booleans(), spread=st.floats(0.1, 1e4))
def test_capped_mclr_is_bounded_below(seed, B, K, L, lam, tau, smooth, spread):
    g = torch.Generator().manual_seed(seed)
    l_pos = -torch.rand(B, generator=g, dtype=torch.float64) * spread  # log-likelihoods of discrete data are <= 0
    l_neg = -torch.rand(B, K, generator=g, dtype=torch.float64) * spread * 10
    loss, _ = mclr_loss(l_pos, l_neg, L=L, lam=lam, tau=tau, smooth_cap=smooth)
    assert loss.item() >= -lam * tau - 1e-9
    # the bound is tight: perfect fit of the positive and a vanishing negative reach it
    tight, _ = mclr_loss(torch.zeros(B, dtype=torch.float64), torch.full((B, K), -1e9, dtype=torch.float64),
                         L=L, lam=lam, tau=tau, smooth_cap=smooth)
    assert tight.item() == pytest.approx(-lam * tau, abs=1e-9)


def test_hard_cap_stops_the_gradient_past_tau():
    l_pos = torch.tensor([-10.0, -10.0], requires_grad=True)
    l_neg = torch.tensor([[-11.0], [-30.0]], requires_grad=True)  # ratios 1 (below cap 5) and 20 (past it)
    loss, _ = mclr_loss(l_pos, l_neg, L=10, lam=3.0, tau=0.5)
    loss.backward()
    assert l_neg.grad[1, 0].item() == 0.0
    assert l_neg.grad[0, 0].item() == pytest.approx(3.0 / 10 / 2)  # lam / (K L B)
    assert l_pos.grad.tolist() == pytest.approx([-(1 + 3.0) / 10 / 2, -1 / 10 / 2])


class TinyAR(torch.nn.Module):
    """A small class-conditional token model: logits_BLV = head(tanh(emb(c) + pos)); enough to carry gradients."""

    def __init__(self, C=4, L=6, V=5, D=8):
        super().__init__()
        self.emb, self.pos, self.head = torch.nn.Embedding(C, D), torch.nn.Parameter(torch.randn(L, D)), \
            torch.nn.Linear(D, V)

    def hidden(self, c_N):
        return torch.tanh(self.emb(c_N)[:, None] + self.pos)

    def loglik(self, c_N, idx_NL):
        return kernels.token_logprobs(self.hidden(c_N), self.head.weight, self.head.bias, idx_NL).sum(-1)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 3), tau=st.one_of(st.none(), st.floats(0.0, 1.0)),
       smooth=st.booleans())
def test_mclr_with_lambda_zero_has_exactly_the_nll_gradient(seed, K, tau, smooth):
    torch.manual_seed(seed)
    model, B, L = TinyAR(), 5, 6
    label_B, idx_BL = torch.randint(0, 4, (B,)), torch.randint(0, 5, (B, L))
    neg_BK, _ = sample_negatives(label_B, 4, K=K, mode="uniform", generator=torch.Generator().manual_seed(seed))

    def grads(use_mclr):
        model.zero_grad()
        l_pos = model.loglik(label_B, idx_BL)
        if use_mclr:
            l_neg = model.loglik(neg_BK.flatten(), idx_BL.repeat_interleave(K, 0)).view(B, K)
            loss, _ = mclr_loss(l_pos, l_neg, L=L, lam=0.0, tau=tau, smooth_cap=smooth)
        else:
            loss, _ = nll_loss(l_pos, L=L)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss_m, g_m), (loss_n, g_n) = grads(True), grads(False)
    assert torch.equal(loss_m, loss_n)
    for a, b in zip(g_m, g_n):
        assert torch.equal(a, b)  # bit for bit: the ratio term adds exact zeros


# ---- shift invariance ----------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shift_scale=st.floats(0.0, 30.0))
def test_per_position_logit_shift_changes_no_logprob_loss_or_gradient(seed, shift_scale):
    """Adding a constant a_bt to every logit of position (b, t) is invisible to log-softmax. We realise the shift
    inside the kernel's own inputs (an extra hidden unit carrying a_bt, with weight 1 in every vocabulary row),
    so the check runs through var_mclr.kernels.token_logprobs, then through every loss."""
    g = torch.Generator().manual_seed(seed)
    B, K, L, C, V = 3, 2, 7, 6, 11
    N = B * (1 + K)  # rows: B positives, then B*K negatives (same images, other classes)
    h = torch.randn(N, L, C, generator=g)
    W, b = torch.randn(V, C, generator=g), torch.randn(V, generator=g)
    idx = torch.randint(0, V, (N, L), generator=g)
    shift = torch.randn(N, L, 1, generator=g) * shift_scale

    def run(shifted):
        hh, WW, bb = (t.clone().requires_grad_(True) for t in (h, W, b))
        if shifted:
            logp = kernels.token_logprobs(torch.cat([hh, shift], -1), torch.cat([WW, torch.ones(V, 1)], -1), bb, idx)
        else:
            logp = kernels.token_logprobs(hh, WW, bb, idx)
        l_N = logp.sum(-1)
        l_pos, l_neg = l_N[:B], l_N[B:].view(B, K)
        l_ref = l_N.detach() * 0.9
        losses = [
            nll_loss(l_pos, L)[0], mclr_loss(l_pos, l_neg, L, lam=2.0, tau=0.1)[0],
            mclr_loss(l_pos, l_neg, L, lam=2.0, tau=0.1, smooth_cap=True)[0],
            cca_loss(l_pos, l_ref[:B], l_neg[:, 0], l_ref[B:B * 2], beta=0.1, lam=3.0)[0],
            cc_dpo_loss(l_pos, l_ref[:B], l_neg[:, 0], l_ref[B:B * 2], beta=0.1)[0],
            unlearning_loss(l_pos, l_ref[:B], l_neg[:, 0], l_ref[B:B * 2], lam=0.5)[0],
        ]
        total = sum(w * x for w, x in zip([1.0, 0.7, 0.3, 0.2, 0.5, 0.01], losses))
        total.backward()
        return logp.detach(), torch.stack(losses).detach(), [t.grad for t in (hh, WW, bb)]

    (lp0, ls0, g0), (lp1, ls1, g1) = run(False), run(True)
    tol = 1e-5 * (1 + shift_scale)  # float32 rounding of logits of size ~shift_scale
    torch.testing.assert_close(lp1, lp0, atol=tol, rtol=0)
    torch.testing.assert_close(ls1, ls0, atol=tol * L, rtol=1e-5)
    for a, b_ in zip(g1, g0):
        torch.testing.assert_close(a, b_, atol=tol * 10, rtol=1e-4)


# ---- CCA, CC-DPO, unlearning against hand computation (thu-ml/CCA, VAR_CCA_trainer.py) ---------------------
def _cca_case():
    """Five rows: row 0 a roll collision, row 4 null-masked (both labels -> the null class 10)."""
    labels = torch.tensor([3, 3, 5, 1, 7])
    pos, neg, collided = cca_labels(labels, 10)  # neg = [3, 5, 1, 7, 3]: row 0 collides
    assert collided.tolist() == [True, False, False, False, False]
    pos[4], neg[4] = 10, 10
    flagged = neg == pos
    assert flagged.tolist() == [True, False, False, False, True]
    d_pos, d_neg = [12.0, -30.0, 5.0, 0.0, 7.0], [40.0, 25.0, -60.0, 8.0, 7.0]
    lref_pos = torch.tensor([-100.0, -200.0, -150.0, -120.0, -90.0])
    lref_neg = torch.tensor([-110.0, -190.0, -140.0, -125.0, -90.0])  # row 4: same label, same image
    l_pos, l_neg = lref_pos + torch.tensor(d_pos), lref_neg + torch.tensor(d_neg)
    return flagged, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg


def test_cca_labels_flag_null_masked_rows_and_collisions():
    """What CCA's pairing must give, from the inputs alone: the negative is the next row's label, a masked row has
    both labels null, the masked share is uncond_ratio, and the flags are exactly the masked rows plus the rows
    whose label equals the next row's."""
    N, C, ratio = 20000, 10, 0.1
    labels = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(1))
    pos, neg, flagged = cca_labels(labels, C, uncond_ratio=ratio, generator=torch.Generator().manual_seed(0))
    masked = pos == C
    assert abs(float(masked.float().mean()) - ratio) < 0.01  # 4.7 standard errors
    assert torch.equal(neg == C, masked)  # one decision per row, for both labels
    assert torch.equal(pos[~masked], labels[~masked])
    next_label = torch.cat([labels[1:], labels[:1]])
    assert torch.equal(neg[~masked], next_label[~masked])
    collides = labels == next_label
    assert 0.05 < float(collides.float().mean()) < 0.15  # C = 10: about one row in ten collides
    assert torch.equal(flagged, masked | collides)
    # The mask is drawn from the generator, not from the labels: same seed, other labels, same rows.
    _, _, flagged_again = cca_labels(torch.arange(N) % C, C, uncond_ratio=ratio,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(flagged_again, masked)  # arange % C rolled never collides
    assert not bool(cca_labels(labels, C)[2][~collides].any())  # uncond_ratio 0: collisions only


def test_cca_hand_computed_masked_form():
    flagged, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    beta, lam = 0.02, 50.0
    pos_terms = [-logsig(beta * d) for d in d_pos]
    # flagged rows (0, 4): weight 1 and the sign flipped (pushed up); the rest weight lam, pushed down
    neg_terms = [-logsig(beta * d_neg[0]), *(lam * -logsig(-beta * d) for d in d_neg[1:4]), -logsig(beta * d_neg[4])]
    expected = (sum(pos_terms) / 5 + sum(neg_terms) / 5) / lam  # divided by max(lam, 1)
    loss, stats = cca_loss(l_pos, lref_pos, l_neg, lref_neg, beta, lam, flagged_B=flagged)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["delta_pos"].item() == pytest.approx(sum(d_pos) / 5, rel=1e-5)
    assert stats["pair_acc"].item() == pytest.approx(0.2)  # only row 2 has d_pos > d_neg
    assert stats["flagged_frac"].item() == pytest.approx(0.4)
    # lam < 1 is not rescaled up: max(lam, 1) = 1
    loss_small, _ = cca_loss(l_pos, lref_pos, l_neg, lref_neg, beta, 0.5, flagged_B=flagged)
    neg_small = [-logsig(beta * d_neg[0]), *(0.5 * -logsig(-beta * d) for d in d_neg[1:4]), -logsig(beta * d_neg[4])]
    assert loss_small.item() == pytest.approx(sum(pos_terms) / 5 + sum(neg_small) / 5, rel=1e-6)


def test_cca_hand_computed_unmasked_form():
    # uncond_ratio = 0: CCA's plain loss, no flipping (a collision is pushed down too), no normalisation
    _, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    beta, lam = 0.02, 50.0
    expected = sum(-logsig(beta * d) for d in d_pos) / 5 + lam * sum(-logsig(-beta * d) for d in d_neg) / 5
    loss, stats = cca_loss(l_pos, lref_pos, l_neg, lref_neg, beta, lam)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert "flagged_frac" not in stats


def test_cca_flagged_row_gradient_at_lambda_50():
    """A flagged row's negative is weighted 1, not lam: at lam = 50 its gradient is 1/50 of a mismatched row's
    weight (CCA's code), and the null class of a masked row is trained with total weight 2, not 1 + lam."""
    flagged, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    beta, lam, B = 0.02, 50.0, 5
    l_pos, l_neg = l_pos.clone().requires_grad_(True), l_neg.clone().requires_grad_(True)
    cca_loss(l_pos, lref_pos, l_neg, lref_neg, beta, lam, flagged_B=flagged)[0].backward()
    sig = lambda z: 1 / (1 + math.exp(-z))
    # d/dl of -log sigmoid(s beta l) = -s beta sigmoid(-s beta l)
    assert l_neg.grad[0].item() == pytest.approx(-beta * sig(-beta * d_neg[0]) / B / lam, rel=1e-5)
    assert l_neg.grad[1].item() == pytest.approx(lam * beta * sig(beta * d_neg[1]) / B / lam, rel=1e-5)
    masked_total = l_pos.grad[4].item() + l_neg.grad[4].item()
    assert masked_total == pytest.approx(-2 * beta * sig(-beta * d_pos[4]) / B / lam, rel=1e-5)


def test_cca_gradient_directions_and_frozen_reference():
    flagged, *_, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    l_pos, l_neg = l_pos.clone().requires_grad_(True), l_neg.clone().requires_grad_(True)
    lref_pos.requires_grad_(True)
    loss, _ = cca_loss(l_pos, lref_pos, l_neg, lref_neg, 0.1, 5.0, flagged_B=flagged)
    loss.backward()
    assert bool((l_pos.grad < 0).all())  # descent raises every positive likelihood
    assert (l_neg.grad < 0).tolist() == flagged.tolist()  # flagged rows raised, mismatched ones lowered
    assert lref_pos.grad is None  # the reference is frozen


def test_cc_dpo_hand_computed():
    flagged, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    beta = 0.1
    expected = sum(-logsig(beta * (a - b)) for a, b in zip(d_pos, d_neg)) / 5
    loss, stats = cc_dpo_loss(l_pos, lref_pos, l_neg, lref_neg, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["margin"].item() == pytest.approx(sum(a - b for a, b in zip(d_pos, d_neg)) / 5, rel=1e-5)
    # a null-masked or collided pair (same class, same image) has zero margin: log 2 and no gradient
    l = torch.tensor([-50.0], requires_grad=True)
    loss, _ = cc_dpo_loss(l, torch.tensor([-60.0]), l, torch.tensor([-60.0]), beta)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and l.grad.item() == 0


def test_unlearning_hand_computed():
    flagged, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    lam = 4.0
    plain = -sum(d_pos) / 5 + lam * sum(d_neg) / 5
    loss, _ = unlearning_loss(l_pos, lref_pos, l_neg, lref_neg, lam)
    assert loss.item() == pytest.approx(plain, rel=1e-6)
    masked = (-sum(d_pos) / 5 + (-d_neg[0] + lam * sum(d_neg[1:4]) - d_neg[4]) / 5) / lam
    loss, _ = unlearning_loss(l_pos, lref_pos, l_neg, lref_neg, lam, flagged_B=flagged)
    assert loss.item() == pytest.approx(masked, rel=1e-6)


def test_objectives_use_the_masked_form_only_when_null_masking():
    from var_mclr.objectives import OBJECTIVES, LossConfig
    flagged, d_pos, d_neg, l_pos, lref_pos, l_neg, lref_neg = _cca_case()
    l_BK, lref_BK = torch.stack((l_pos, l_neg), 1), torch.stack((lref_pos, lref_neg), 1)
    mask_BK = torch.stack((torch.zeros_like(flagged), flagged), 1)
    for name, fn, section in (("cca", cca_loss, "cca"), ("unlearning", unlearning_loss, "unlearning")):
        for u in (0.0, 0.1):
            cfg = LossConfig()
            getattr(cfg, section).uncond_ratio = u
            got, _ = OBJECTIVES[name].loss(cfg, l_BK, lref_BK, mask_BK, 7)
            kw = {"beta": cfg.cca.beta, "lam": cfg.cca.lam} if name == "cca" else {"lam": cfg.unlearning.lam}
            want, _ = fn(l_pos, lref_pos, l_neg, lref_neg, **kw, flagged_B=flagged if u > 0 else None)
            assert got.item() == want.item(), (name, u)


@pytest.mark.parametrize("name", ["cca", "cc_dpo", "unlearning"])
def test_every_reference_objective_null_masks_both_labels(name):
    from var_mclr.objectives import OBJECTIVES, LossConfig
    cfg = LossConfig()
    getattr(cfg, name).uncond_ratio = 0.5
    labels = torch.arange(8) % 4
    plan = OBJECTIVES[name].plan(cfg, labels, 4, 0.0, torch.Generator().manual_seed(1))
    masked = plan.classes_BK[:, 0] == 4
    assert 0 < int(masked.sum()) < 8
    assert bool((plan.classes_BK[masked, 1] == 4).all()) and bool(plan.mask_BK[masked, 1].all())


def test_input_validation():
    with pytest.raises(ValueError):
        mclr_loss(torch.zeros(3), torch.zeros(3), L=1, lam=1.0)
    with pytest.raises(ValueError):
        mclr_loss(torch.zeros(3), torch.zeros(3, 1), L=1, lam=-1.0)
    with pytest.raises(ValueError):
        cca_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), 0.1, 1.0)
