"""impl="auto" falls back to the chunked path, with one warning, when Triton is missing, too old or fails to compile;
the backward kernel's atomics are relaxed when compiled for a GPU."""
import logging
import os
import re
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():  # before the lazy import of the Triton module (see test_kernels_logprob.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import var_mclr.kernels.logprob as lp  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device(os.environ.get("VAR_MCLR_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
needs_triton = pytest.mark.skipif(not lp._triton_available(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(lp, "_WARNED", set())
    monkeypatch.setattr(lp, "_COMPILES", {})


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == lp.log.name]


def test_a_missing_or_old_triton_gives_chunked_and_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(lp, "_triton_problem", lambda: "triton 3.2.0 is older than 3.4")
    with caplog.at_level(logging.WARNING):
        impls = [lp.resolve_impl("auto", torch.device("cuda")) for _ in range(3)]
    assert impls == ["chunked"] * 3
    assert len(_warnings(caplog)) == 1 and "older than 3.4" in _warnings(caplog)[0].getMessage()
    assert lp.resolve_impl("triton", torch.device("cuda")) == "triton"  # asked for by name: no fallback


def test_the_version_check_reads_the_installed_triton(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    assert "older than 3.4" in lp._triton_problem()
    monkeypatch.setattr(triton, "__version__", "3.10.0")  # numeric, not string, comparison
    assert lp._triton_problem() is None


def _head(N=20, C=16, V=32):
    g = torch.Generator().manual_seed(0)
    return tuple(x.to(DEVICE) for x in (torch.randn(N, C, generator=g), torch.randn(V, C, generator=g),
                                        torch.randn(V, generator=g), torch.randint(0, V, (N,), generator=g)))


@needs_triton
def test_a_kernel_that_fails_to_compile_gives_chunked_and_one_warning(monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources

    from var_mclr.kernels import _triton_logprob

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(300_000, 232_448, "shared memory")
    monkeypatch.setattr(_triton_logprob, "forward", failing)
    monkeypatch.setattr(lp, "resolve_impl", lambda impl, device: "triton")  # what auto gives on a CUDA machine
    h, w, b, t = _head()
    with caplog.at_level(logging.WARNING):
        got = [lp.token_logprobs(h, w, b, t, impl="auto") for _ in range(3)]
    expected = lp._naive(h, w, b, t)
    assert all(torch.allclose(g, expected, atol=1e-5) for g in got)
    assert len(calls) == 1  # probed once per device, dtype and head shape
    assert len(_warnings(caplog)) == 1 and "OutOfResources" in _warnings(caplog)[0].getMessage()


@needs_triton
def test_a_kernel_that_compiles_is_used(monkeypatch):
    from var_mclr.kernels import _triton_logprob

    used = []
    real = _triton_logprob.forward
    monkeypatch.setattr(_triton_logprob, "forward", lambda *a, **k: used.append(1) or real(*a, **k))
    monkeypatch.setattr(lp, "resolve_impl", lambda impl, device: "triton")
    h, w, b, t = _head()
    got = lp.token_logprobs(h, w, b, t, impl="auto")
    assert torch.allclose(got, lp._naive(h, w, b, t), atol=1e-5)
    assert len(used) == 2  # the probe, then the real forward


@pytest.mark.slow
@needs_triton
def test_backward_atomics_are_relaxed_on_sm90():
    code = textwrap.dedent(
        """
        import re, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from var_mclr.kernels import _triton_logprob as L
        fn = L._bwd_kernel
        sig = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*fp32", t_ptr="*i64", N="i32", V="i32", C="i32",
                   stride_h="i32", stride_w="i32", lse_ptr="*fp32", g_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32",
                   db_ptr="*fp32")
        const = dict(HAS_BIAS=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, BLOCK_N=64, BLOCK_V=128, BLOCK_C=64,
                     DOT_PRECISION="ieee", UPCAST=False)
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}},
                        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        except FileNotFoundError as e:
            print("SKIP", e); raise SystemExit(0)
        print(" ".join(m.group(0) for m in re.finditer(r"\\b(atom|red)\\.[\\w.]+", ptx)))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    atomics = res.stdout.split()
    assert atomics and all(re.fullmatch(r"(atom|red)\.global\.gpu\.relaxed\.add\.f32", a) for a in atomics), atomics
