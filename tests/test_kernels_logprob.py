"""token_logprobs: chunked and Triton (interpreted on CPU) paths against log_softmax + gather."""

import os
import subprocess
import sys
import textwrap

import torch

# triton.jit decides "interpreted or compiled" when var_mclr.kernels._triton_* is first imported (lazily, on
# the first Triton call), so the flag must be in the environment before that; CI has no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Where the problems live: the GPU when there is one (compiled Triton kernels on CUDA tensors; bench/gpu_check.py
# runs this file there), else the CPU (Triton interpreted).
DEVICE = torch.device(os.environ.get("VAR_MCLR_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import var_mclr.kernels.logprob as lp  # noqa: E402
from var_mclr.kernels import IGNORE_INDEX, token_logprobs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(not lp._triton_available(), reason="triton is not installed")
FUSED = ["chunked", pytest.param("triton", marks=needs_triton)]


@pytest.fixture
def small_chunks(monkeypatch):
    # 1-3 rows per chunk at these V: the chunk loops, ragged last chunk included, run at tiny sizes.
    monkeypatch.setattr(lp, "_CHUNK_ELEMS", 64)


def _problem(N, C, V, dtype=torch.float32, seed=0, n_ignored=0, bias=True, lead=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) / C**0.5 * 3  # logits of a few units, like a trained head
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        t[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE_INDEX
    gout = torch.randn(N, generator=g)  # arbitrary per-token weights: the backward must not assume a mean
    if lead is not None:
        h, t, gout = h.reshape(*lead, C), t.reshape(lead), gout.reshape(lead)
    return (h.to(DEVICE, dtype), w.to(DEVICE, dtype), (b.to(DEVICE, dtype) if b is not None else None), t.to(DEVICE),
            gout.to(DEVICE))


def _run(impl, h, w, b, t, gout, upcast=False):
    """Value and (dh, dW, db) of sum(gout * logp); upcast=True runs on float32 copies (the reference)."""
    leaves = [x.detach().clone() if x is not None else None for x in (h, w, b)]
    if upcast:
        leaves = [x.float() if x is not None else None for x in leaves]
    for x in leaves:
        if x is not None:
            x.requires_grad_(True)
    logp = token_logprobs(leaves[0], leaves[1], leaves[2], t, impl=impl)
    (logp * gout).sum().backward()
    return [logp.detach()] + [x.grad if x is not None else None for x in leaves]


def _assert_close(got, ref, rtol):
    for name, g_, r_ in zip(["logp", "dh", "dW", "db"], got, ref, strict=True):
        if r_ is None:
            assert g_ is None, name
            continue
        assert g_.shape == r_.shape, name
        # atol relative to the tensor's scale: entries far below it (e.g. rare-class dW rows) are noise.
        atol = rtol * max(1.0, r_.abs().max().item())
        torch.testing.assert_close(g_.float(), r_.float(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [
    (37, 23, 53),  # nothing divides the 16-wide Triton tiles
    (32, 32, 48),  # everything divides
    (5, 16, 1),  # a vocabulary of one: logp == 0, all gradients 0
    (6, 8, 4096),  # the VAR vocabulary
]


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_naive(impl, shape, small_chunks):
    prob = _problem(*shape, n_ignored=2)
    _assert_close(_run(impl, *prob), _run("naive", *prob), rtol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", [(37, 40, 70), (9, 16, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_inputs_float32_accumulation(impl, shape, small_chunks):
    prob = _problem(*shape, dtype=torch.bfloat16, n_ignored=3)
    got = _run(impl, *prob)
    assert got[0].dtype == torch.float32
    assert [x.dtype for x in got[1:]] == [torch.bfloat16] * 3
    # Reference: the same bf16 values, computed entirely in float32.
    _assert_close(got, _run("naive", *prob, upcast=True), rtol=1e-2)


@pytest.mark.parametrize("impl", FUSED)
def test_ignored_rows_give_zero_and_no_gradient(impl):
    h, w, b, t, gout = _problem(20, 24, 33, n_ignored=0)
    t_masked = t.clone()
    t_masked[::3] = IGNORE_INDEX
    logp, dh, dw, db = _run(impl, h, w, b, t_masked, gout)
    ign = t_masked < 0
    assert torch.all(logp[ign] == 0)
    assert torch.all(dh[ign] == 0)
    # W and b see exactly the kept rows' contributions.
    ref = _run("naive", h[~ign], w, b, t[~ign], gout[~ign])
    _assert_close([logp[~ign], dh[~ign], dw, db], ref, rtol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_leading_dims_no_bias_and_frozen_weight(impl):
    h, w, b, t, gout = _problem(2 * 3 * 5, 16, 29, bias=False, lead=(2, 3, 5), n_ignored=4)
    hh = h.clone().requires_grad_(True)
    hr = h.clone().requires_grad_(True)
    logp = token_logprobs(hh, w, None, t, impl=impl)  # w.requires_grad is False: no dW work, no dW
    ref = token_logprobs(hr, w, None, t, impl="naive")
    assert logp.shape == (2, 3, 5)
    (logp * gout).sum().backward()
    (ref * gout).sum().backward()
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_no_grad_and_empty(impl):
    h, w, b, t, _ = _problem(7, 16, 19)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(h, w, b, t, impl=impl), token_logprobs(h, w, b, t, impl="naive"))
    empty = token_logprobs(h[:0], w, b, t[:0], impl=impl)
    assert empty.shape == (0,) and empty.dtype == torch.float32


@needs_triton
def test_triton_vocab_splits_merge_exactly():
    from var_mclr.kernels import _triton_logprob

    h, w, b, t, _ = _problem(21, 16, 83, n_ignored=2)
    ref = token_logprobs(h, w, b, t, impl="naive")
    for splits in (1, 2, 3, 6):  # 83 -> 6 vocabulary tiles of 16: uneven and single-tile splits
        logp, lse = _triton_logprob.forward(h, w, b, t, splits=splits)
        torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, torch.logsumexp(h @ w.T + b, -1), rtol=1e-5, atol=1e-5)


def test_autocast_follows_the_autocast_dtype(small_chunks):
    h, w, b, t, _ = _problem(11, 16, 37)
    ref = token_logprobs(h, w, b, t, impl="naive")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = token_logprobs(h, w, b, t, impl="chunked")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=5e-2)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 20), C=st.integers(1, 20), V=st.integers(1, 40), seed=st.integers(0, 2**16),
    frac_ignored=st.floats(0, 1), bias=st.booleans(),
)
def test_chunked_property(N, C, V, seed, frac_ignored, bias):
    prob = _problem(N, C, V, seed=seed, n_ignored=int(frac_ignored * N), bias=bias)
    old = lp._CHUNK_ELEMS
    lp._CHUNK_ELEMS = 3 * V  # 3-row chunks (hypothesis and function-scoped fixtures do not mix)
    try:
        got = _run("chunked", *prob)
    finally:
        lp._CHUNK_ELEMS = old
    _assert_close(got, _run("naive", *prob), rtol=1e-5)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(N=st.integers(1, 40), C=st.integers(1, 40), V=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_triton_property(N, C, V, seed):
    prob = _problem(N, C, V, seed=seed, n_ignored=N // 4)
    _assert_close(_run("triton", *prob), _run("naive", *prob), rtol=1e-5)


def test_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lp.resolve_impl("auto", cpu) == "chunked"
    assert lp.resolve_impl("auto", cuda) == ("triton" if lp._triton_available() else "chunked")
    monkeypatch.setenv("VAR_MCLR_KERNELS", "naive")  # the choice is an argument: the environment has no say
    assert lp.resolve_impl("auto", cpu) == "chunked"
    assert lp.resolve_impl("naive", cuda) == "naive"
    with pytest.raises(ValueError, match="must be one of"):
        lp.resolve_impl("fast", cpu)


@pytest.mark.slow
def test_import_is_lazy_and_triton_compiles_for_sm90():
    """One subprocess (no TRITON_INTERPRET): importing the package must not import triton, and the kernels
    must compile for a real GPU target (sm_90), which the interpreter alone would never check."""
    code = textwrap.dedent(
        """
        import sys
        import var_mclr.kernels
        assert "triton" not in sys.modules, "importing var_mclr.kernels imported triton"
        try:
            import triton
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
        except ImportError:
            print("SKIP no triton"); sys.exit(0)
        from var_mclr.kernels import _triton_logprob as L, _triton_sampling as S

        def compile_(fn, sig, const, num_warps):
            sig = {**sig, **{k: "constexpr" for k in const}}
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

        try:
            dt = "*bf16"
            common = dict(h_ptr=dt, w_ptr=dt, b_ptr="*fp32", t_ptr="*i64", N="i32", V="i32", C="i32",
                          stride_h="i32", stride_w="i32")
            tiles = dict(HAS_BIAS=True, BLOCK_N=64, BLOCK_V=128, BLOCK_C=64, DOT_PRECISION="ieee", UPCAST=False)
            compile_(L._fwd_kernel, dict(common, lse_part_ptr="*fp32", tgt_part_ptr="*fp32",
                                         blocks_per_split="i32"), tiles, 8)
            compile_(L._bwd_kernel, dict(common, lse_ptr="*fp32", g_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32",
                                         db_ptr="*fp32"), dict(tiles, NEED_DH=True, NEED_DW=True, NEED_DB=True), 8)
            compile_(S._sample_kernel, dict(zc_ptr="*fp32", zu_ptr="*fp32", seed_ptr="*i32", out_ptr="*i64",
                                            R="i32", V="i32", stride_c="i32", stride_u="i32", t="fp32",
                                            top_k="fp32", top_p="fp32"),
                     dict(HAS_UNCOND=True, DO_TOPK=True, DO_TOPP=True, BLOCK_R=1, BLOCK_V=4096), 8)
        except FileNotFoundError as e:  # no ptxas shipped with this triton build
            print("SKIP", e); sys.exit(0)
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.strip().startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.stdout.strip().endswith("OK")
