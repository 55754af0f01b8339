"""guided_sample: every path samples the exact guided/top-k/top-p distribution (checked against a float64
oracle), is reproducible per seed, and treats t = 0 exactly as the unguided step."""

import os

import torch

# See tests/test_kernels_logprob.py: triton.jit reads this when the Triton module is first (lazily) imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy import stats  # noqa: E402

import var_mclr.kernels.sampling as smp  # noqa: E402
from var_mclr.kernels import guided_sample  # noqa: E402

needs_triton = pytest.mark.skipif(not smp._triton_available(), reason="triton is not installed")
IMPLS = ["naive", "torch", pytest.param("triton", marks=needs_triton)]
PLAIN_IMPLS = ["naive", "torch"] + (["triton"] if smp._triton_available() else [])  # for hypothesis


def oracle(zc, zu, t, top_k, top_p):
    """Float64 numpy transcription of the documented semantics: the exact sampling probabilities per row."""
    zc = np.asarray(zc, np.float64)
    z = zc if zu is None or t == 0 else (1 + t) * zc - t * np.asarray(zu, np.float64)
    V = z.shape[-1]
    out = np.zeros_like(z)
    for r, row in enumerate(z.reshape(-1, V)):
        order = np.argsort(-row, kind="stable")
        n = top_k if 0 < top_k < V else V
        keep = order[:n]
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        if 0 < top_p < 1:
            before = np.cumsum(p) - p
            keep, p = keep[before < top_p], p[before < top_p]
            p /= p.sum()
        out.reshape(-1, V)[r, keep] = p
    return out


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# (t, top_k, top_p, with_uncond): guided + both filters, plain softmax, top-k only, top-p only.
CASES = [(0.5, 5, 0.85, True), (0.0, 0, 0.0, False), (2.0, 3, 0.0, True), (0.0, 0, 0.7, False)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}-k{}-p{}-u{}".format(*c))
def test_exact_distribution_chi_square(impl, case):
    t, top_k, top_p, with_uncond = case
    V, R = 7, 20000
    g = _gen(123)
    zc = torch.randn(V, generator=g) * 0.6
    zu = torch.randn(V, generator=g) * 0.4 if with_uncond else None
    expected = oracle(zc, zu, t, top_k, top_p)
    # One row repeated R times (stride-0 views: the kernels must honour strides, not assume contiguity).
    idx = guided_sample(zc.expand(R, V), zu.expand(R, V) if zu is not None else None, t, top_k, top_p,
                        _gen(7), impl=impl)
    counts = np.bincount(idx.numpy(), minlength=V)
    assert counts[expected == 0].sum() == 0, "sampled a token that top-k/top-p removed"
    kept = expected > 0
    assert kept.sum() >= 2  # the case is not degenerate
    chi2 = stats.chisquare(counts[kept], expected[kept] * R)
    assert chi2.pvalue > 1e-4, (counts, expected * R)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_rows_support_and_shape(impl):
    """150 distinct random rows: every sample lies in its own row's float64-oracle support (fixed seeds, so a
    float32-vs-float64 disagreement exactly at a cut-off cannot make this flaky)."""
    B, ell, V = 3, 50, 40
    g = _gen(5)
    zc, zu = torch.randn(B, ell, V, generator=g) * 2, torch.randn(B, ell, V, generator=g)
    t, top_k, top_p = 1.0, 12, 0.6
    idx = guided_sample(zc, zu, t, top_k, top_p, _gen(11), impl=impl)
    assert idx.shape == (B, ell) and idx.dtype == torch.long
    p = oracle(zc, zu, t, top_k, top_p).reshape(B * ell, V)
    assert np.all(p[np.arange(B * ell), idx.reshape(-1).numpy()] > 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_result_and_t0_is_unguided(impl):
    g = _gen(0)
    zc, zu = torch.randn(4, 30, 64, generator=g), torch.randn(4, 30, 64, generator=g)
    a = guided_sample(zc, zu, 1.5, 20, 0.9, _gen(42), impl=impl)
    b = guided_sample(zc, zu, 1.5, 20, 0.9, _gen(42), impl=impl)
    c = guided_sample(zc, zu, 1.5, 20, 0.9, _gen(43), impl=impl)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    zu_inf = zu.clone()
    zu_inf[0, 0, 0] = float("inf")  # 0 * inf would be NaN if t = 0 were mixed naively
    guided_t0 = guided_sample(zc, zu_inf, 0.0, 20, 0.9, _gen(9), impl=impl)
    unguided = guided_sample(zc, None, 0.0, 20, 0.9, _gen(9), impl=impl)
    assert torch.equal(guided_t0, unguided)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_logits_and_disabled_filters(impl):
    g = _gen(3)
    zc = (torch.randn(2, 9, 33, generator=g) * 3).bfloat16()
    zu = torch.randn(2, 9, 33, generator=g).bfloat16()
    top1 = guided_sample(zc, zu, 0.7, 1, 0.0, _gen(1), impl=impl)
    mixed = 1.7 * zc.float() - 0.7 * zu.float()
    assert torch.equal(top1, mixed.argmax(-1))
    # top_k >= V and top_p >= 1 mean "off"; still valid ids.
    out = guided_sample(zc, zu, 0.7, 33, 1.0, _gen(1), impl=impl)
    assert out.min() >= 0 and out.max() < 33


@settings(max_examples=15, deadline=None)
@given(R=st.integers(1, 30), V=st.integers(1, 50), seed=st.integers(0, 2**16), t=st.floats(0, 3),
       impl=st.sampled_from(PLAIN_IMPLS))
def test_greedy_limits_property(R, V, seed, t, impl):
    """top_k = 1, or a tiny top_p, leaves only the argmax of the mixed logits."""
    g = _gen(seed)
    zc, zu = torch.randn(R, V, generator=g), torch.randn(R, V, generator=g)
    want = ((1 + t) * zc - t * zu).argmax(-1)
    assert torch.equal(guided_sample(zc, zu, t, 1, 0.0, _gen(seed + 1), impl=impl), want)
    assert torch.equal(guided_sample(zc, zu, t, 0, 1e-6, _gen(seed + 2), impl=impl), want)


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    assert smp.resolve_impl("auto", cpu, 4096) == "torch"
    assert smp.resolve_impl("auto", torch.device("cuda"), 10**6) == "torch"  # row too wide for registers
    monkeypatch.setenv("VAR_MCLR_KERNELS", "naive")  # the choice is an argument: the environment has no say
    assert smp.resolve_impl("auto", cpu, 4096) == "torch"
    assert smp.resolve_impl("naive", cpu, 4096) == "naive"
    with pytest.raises(ValueError):
        smp.resolve_impl("fused", cpu, 4096)
