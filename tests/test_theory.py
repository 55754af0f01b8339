"""The identities MCLR rests on (spec sections 2-4), checked numerically with closed forms.

- CFG identity: mixing logits is a power-law reweighting of the two distributions.
- Additive optimum: (1+lam) E_pc[log q] - lam E_pneg[log q] is maximised by q = (1+lam) p_c - lam p_neg when
  that is a distribution, both for the bare objective and for mclr_loss on a tabular model.
- Equivalence theorem: sample-adaptive weighted denoising score matching is minimised by the CFG score,
  on 1-D and 2-D Gaussian mixtures where every density and score is closed-form.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import trapezoid
from scipy.optimize import minimize

from var_mclr.losses import mclr_loss

SETTINGS = settings(max_examples=30, deadline=None)


# ---- CFG identity ------------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 64), t=st.floats(0.0, 8.0), scale=st.floats(0.1, 3.0))
def test_cfg_logit_mixing_is_power_reweighting(seed, V, t, scale):
    rng = np.random.default_rng(seed)
    z_c, z_u = rng.normal(0, scale, V), rng.normal(0, scale, V) + rng.normal(0, 5)  # offsets must not matter
    mixed = torch.softmax(torch.tensor((1 + t) * z_c - t * z_u), dim=0).numpy()
    p_c, p_u = np.exp(z_c - z_c.max()), np.exp(z_u - z_u.max())
    p_c, p_u = p_c / p_c.sum(), p_u / p_u.sum()
    reweighted = p_c ** (1 + t) * p_u ** (-t)  # in probability space, float64: no log-space shortcut
    np.testing.assert_allclose(mixed, reweighted / reweighted.sum(), rtol=1e-9, atol=1e-12)


# ---- additive optimum --------------------------------------------------------------------------------------
def _objective(q, p_c, p_neg, lam):
    return (1 + lam) * np.dot(p_c, np.log(q)) - lam * np.dot(p_neg, np.log(q))


def _maximise_over_simplex(p_c, p_neg, lam):
    m = (1 + lam) * p_c - lam * p_neg

    def neg_obj(theta):  # q = softmax(theta); d/dtheta sum_i m_i log q_i = m - q * sum(m)
        logq = theta - np.logaddexp.reduce(theta)
        return -np.dot(m, logq), -(m - np.exp(logq) * m.sum())

    res = minimize(neg_obj, np.zeros_like(p_c), jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 5000})
    return np.exp(res.x - np.logaddexp.reduce(res.x))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 12), lam=st.floats(0.0, 10.0))
def test_additive_optimum_over_simplex(seed, V, lam):
    rng = np.random.default_rng(seed)
    # Build p_c from the intended optimum so that (1+lam) p_c - lam p_neg is a distribution by construction.
    q_star, p_neg = rng.dirichlet(np.ones(V)) * 0.98 + 0.02 / V, rng.dirichlet(np.ones(V))
    p_c = (q_star + lam * p_neg) / (1 + lam)
    q = _maximise_over_simplex(p_c, p_neg, lam)
    target = np.clip((1 + lam) * p_c - lam * p_neg, 0, None)
    np.testing.assert_allclose(q, target / target.sum(), atol=1e-6)
    # and it is a global maximum: random points of the simplex do no better
    for q_other in rng.dirichlet(np.ones(V), size=20):
        assert _objective(q, p_c, p_neg, lam) >= _objective(q_other, p_c, p_neg, lam) - 1e-9


def test_additive_objective_unbounded_when_a_coefficient_is_negative():
    # Where lam * p_neg > (1+lam) p_c, the objective grows without bound as q -> 0 there: this is the collapse
    # the ratio cap tau prevents.
    p_c, p_neg, lam = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.2, 0.6]), 1.0
    m = (1 + lam) * p_c - lam * p_neg
    assert m[2] < 0
    rest = m[:2] / m[:2].sum()
    values = [_objective(np.array([*(rest * (1 - e)), e]), p_c, p_neg, lam) for e in 10.0 ** -np.arange(1, 12)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] - values[0] > -m[2] * np.log(1e9)  # linear in -log(eps): no finite maximum


def test_mclr_loss_population_optimum_is_additive():
    """A tabular model q(x|c) trained on the exact population MCLR loss (uniform negatives, lam fixed, no cap)
    lands on q_c = (1+lam) p_c - lam * mean_{c' != c} p_c'."""
    torch.manual_seed(0)
    C, V, lam = 3, 5, 0.8
    base = torch.distributions.Dirichlet(torch.ones(V)).sample().double() * 0.8 + 0.2 / V
    p_CV = base + 0.05 * (torch.rand(C, V, dtype=torch.float64) - 0.5)
    p_CV = p_CV / p_CV.sum(1, keepdim=True)
    p_neg_CV = torch.stack([p_CV[[j for j in range(C) if j != c]].mean(0) for c in range(C)])
    target_CV = (1 + lam) * p_CV - lam * p_neg_CV
    assert bool((target_CV > 0).all())

    theta = torch.zeros(C, V, dtype=torch.float64, requires_grad=True)
    neg_CK = torch.tensor([[j for j in range(C) if j != c] for c in range(C)])  # all C-1 negatives: exact mean

    def population_loss():
        logq_CV = torch.log_softmax(theta, dim=1)
        total = 0.0
        for c in range(C):  # every (x, c) data pair, weighted by its probability (uniform class prior)
            loss_V, _ = zip(*[mclr_loss(logq_CV[c, x].view(1), logq_CV[neg_CK[c], x].view(1, -1), L=1, lam=lam)
                              for x in range(V)])
            total = total + (p_CV[c] * torch.stack(loss_V)).sum() / C
        return total

    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = population_loss()
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(torch.softmax(theta, 1).detach().numpy(), target_CV.numpy(), atol=1e-6)


# ---- equivalence theorem (spec section 4) ------------------------------------------------------------------
def _gauss(x, mean, var):
    return np.exp(-0.5 * (x - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)


class Mixture1D:
    """Class-conditional 1-D data p_0(x0|c): a 2-component Gaussian mixture per class, uniform class prior.
    Noising x_t = x0 + sigma * eps, so p_t(x|c) = sum_j w_cj N(x; m_cj, s_cj^2 + sigma^2)."""

    def __init__(self, rng, C=3, J=2):
        self.w_CJ = rng.dirichlet(np.ones(J), size=C)
        self.m_CJ = rng.uniform(-3, 3, size=(C, J))
        self.s2_CJ = rng.uniform(0.3, 1.5, size=(C, J)) ** 2
        self.prior_C = np.full(C, 1.0 / C)

    def p0(self, x0, c):
        return sum(w * _gauss(x0, m, s2) for w, m, s2 in zip(self.w_CJ[c], self.m_CJ[c], self.s2_CJ[c]))

    def p0_all(self, x0):
        return sum(pc * self.p0(x0, c) for c, pc in enumerate(self.prior_C))

    def pt(self, x, c, sigma):
        return sum(w * _gauss(x, m, s2 + sigma**2) for w, m, s2 in zip(self.w_CJ[c], self.m_CJ[c], self.s2_CJ[c]))

    def pt_all(self, x, sigma):
        return sum(pc * self.pt(x, c, sigma) for c, pc in enumerate(self.prior_C))

    def score(self, x, c, sigma):
        num = sum(w * _gauss(x, m, s2 + sigma**2) * (-(x - m) / (s2 + sigma**2))
                  for w, m, s2 in zip(self.w_CJ[c], self.m_CJ[c], self.s2_CJ[c]))
        return num / self.pt(x, c, sigma)

    def score_all(self, x, sigma):
        num = sum(pc * self.pt(x, c, sigma) * self.score(x, c, sigma) for c, pc in enumerate(self.prior_C))
        return num / self.pt_all(x, sigma)


X0_GRID = np.linspace(-16.0, 16.0, 64001)


def _weighted_dsm_minimiser_1d(mix, c, w, sigma, x_t, adaptive=True):
    """argmin_s of the DSM objective restricted to x_t, by quadrature over x0:
         a_c(x_t) E_{x0~p(.|c)}[k(x_t|x0) (s - g)^2] + a_u(x_t) E_{x0~p}[k(x_t|x0) (s - g)^2],
    g = grad_{x_t} log k(x_t|x0) = -(x_t - x0)/sigma^2. A weighted quadratic A s^2 - 2 B s + const is minimised
    at B / A (A > 0 is asserted). Returns (s*, A)."""
    k = _gauss(x_t, X0_GRID, sigma**2)
    g = -(x_t - X0_GRID) / sigma**2
    if adaptive:
        a_c, a_u = (1 + w) / mix.pt(x_t, c, sigma), -w / mix.pt_all(x_t, sigma)
    else:  # same signed weights without the density division: the control that must fail
        a_c, a_u = 1 + w, -w
    dens = a_c * mix.p0(X0_GRID, c) * k + a_u * mix.p0_all(X0_GRID) * k
    A, B = trapezoid(dens, X0_GRID), trapezoid(dens * g, X0_GRID)
    assert A > 0
    return B / A, A


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(0, 2), w=st.floats(0.0, 5.0), sigma=st.floats(0.1, 2.0),
       x_t=st.floats(-4.0, 4.0))
def test_equivalence_theorem_1d_gaussian_mixture(seed, c, w, sigma, x_t):
    mix = Mixture1D(np.random.default_rng(seed))
    s_star, A = _weighted_dsm_minimiser_1d(mix, c, w, sigma, x_t)
    cfg = (1 + w) * mix.score(x_t, c, sigma) - w * mix.score_all(x_t, sigma)
    assert abs(A - 1.0) < 1e-6  # the signed, density-normalised weights sum to one
    assert abs(s_star - cfg) < 1e-4


def test_equivalence_needs_sample_adaptive_weights():
    mix = Mixture1D(np.random.default_rng(7))
    w, sigma, x_t, c = 2.0, 0.5, 0.3, 1
    cfg = (1 + w) * mix.score(x_t, c, sigma) - w * mix.score_all(x_t, sigma)
    s_adaptive, _ = _weighted_dsm_minimiser_1d(mix, c, w, sigma, x_t, adaptive=True)
    s_const, _ = _weighted_dsm_minimiser_1d(mix, c, w, sigma, x_t, adaptive=False)
    assert abs(s_adaptive - cfg) < 1e-4
    assert abs(s_const - cfg) > 1e-2


@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
def test_equivalence_theorem_2d_full_covariance(w):
    """2-D mixture with correlated components; brute-force 2-D quadrature over x0."""
    rng = np.random.default_rng(3)
    C, J, sigma = 3, 2, 0.6
    w_CJ = rng.dirichlet(np.ones(J), size=C)
    m_CJ2 = rng.uniform(-2.5, 2.5, size=(C, J, 2))
    cov_CJ22 = np.empty((C, J, 2, 2))
    for c in range(C):
        for j in range(J):
            a = rng.normal(0, 0.6, size=(2, 2))
            cov_CJ22[c, j] = a @ a.T + 0.15 * np.eye(2)

    def gauss2(x_N2, mean, cov):
        d = x_N2 - mean
        prec = np.linalg.inv(cov)
        return np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, prec, d)) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))

    def p0(x_N2, c):
        return sum(w_CJ[c, j] * gauss2(x_N2, m_CJ2[c, j], cov_CJ22[c, j]) for j in range(J))

    def pt_and_score(x2, c):  # closed form: component covariances grow by sigma^2 I
        p, num = 0.0, np.zeros(2)
        for j in range(J):
            cov_t = cov_CJ22[c, j] + sigma**2 * np.eye(2)
            pj = w_CJ[c, j] * gauss2(x2[None], m_CJ2[c, j], cov_t)[0]
            p, num = p + pj, num - pj * np.linalg.solve(cov_t, x2 - m_CJ2[c, j])
        return p, num / p

    ax = np.linspace(-9.0, 9.0, 721)
    X0_N2 = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    dA = (ax[1] - ax[0]) ** 2
    p0_C_N = np.stack([p0(X0_N2, c) for c in range(C)])
    p0_all_N = p0_C_N.mean(0)
    c = 0
    for x_t in [np.array([0.2, -0.4]), np.array([1.5, 1.0]), np.array([-2.0, 0.5])]:
        k_N = np.exp(-0.5 * ((x_t - X0_N2) ** 2).sum(1) / sigma**2) / (2 * np.pi * sigma**2)
        g_N2 = -(x_t - X0_N2) / sigma**2
        pt_c, score_c = pt_and_score(x_t, c)
        pts_scores = [pt_and_score(x_t, cc) for cc in range(C)]
        pt_all = np.mean([p for p, _ in pts_scores])
        score_all = sum(p * s for p, s in pts_scores) / C / pt_all
        dens_N = ((1 + w) / pt_c * p0_C_N[c] - w / pt_all * p0_all_N) * k_N
        A = dens_N.sum() * dA
        s_star = (dens_N[:, None] * g_N2).sum(0) * dA / A
        assert abs(A - 1.0) < 1e-6
        np.testing.assert_allclose(s_star, (1 + w) * score_c - w * score_all, atol=1e-4)
