"""Per-token log-probabilities through the LM head without holding the full logits.

token_logprobs(h, W, b, target) == log_softmax(h @ W^T + b).gather(target), float32, differentiable w.r.t.
h, W and b. Three implementations share that contract:

- "naive":   the reference; materialises the N x V logits (and autograd keeps two more N x V buffers).
- "chunked": a torch.autograd.Function that walks the tokens in row chunks. Forward keeps only the
             per-token logsumexp; backward recomputes each chunk's logits and accumulates dh, dW, db.
             Peak extra memory is one chunk of logits instead of ~3 x N x V. Works on any device.
- "triton":  the same algorithm as fused Triton kernels (var_mclr/kernels/_triton_logprob.py): online
             logsumexp over vocabulary blocks in the forward, blockwise recompute in the backward.

Ignored rows: a negative target (use IGNORE_INDEX = -100, as torch's cross_entropy does) gives logp 0 and
contributes no gradient. Targets must otherwise lie in [0, V).

Precision: low-precision inputs (bf16/fp16) are multiplied in their dtype with float32 accumulation, and the
softmax and all reductions are float32. Triton keeps the float32 logits tile in registers; the chunked path
gets float32 logits on CUDA (mm out_dtype) and, on the CPU, logits rounded to bf16 like nn.Linear's (the
only bf16 matmul the CPU offers; upcasting instead would cost 4x the time). The gradient tile is rounded to
the input dtype before the dh/dW matmuls. Gradients are returned in the inputs' dtypes.

Dispatch: impl="auto" picks triton for CUDA tensors (when triton imports) and chunked otherwise. The choice is
an explicit argument (config train.kernels -> VAR(logprob_impl=...)), never process-wide state.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMPLS = ("auto", "naive", "chunked", "triton")

# Elements of float32 logits per chunk: 4M = 16 MiB, i.e. 1024 rows at V = 4096. Fewer, larger chunks keep
# the matmuls efficient and, on a busy 2-core CPU, give fewer parallel regions to stall (8 MiB chunks were
# ~10% slower there); at VAR-d16 head shapes the peak stays ~0.2x of the naive path's (bench_logprob.py).
_CHUNK_ELEMS = 4 * 1024 * 1024


# triton.knobs (which this package reads for the interpreter flag) arrived in Triton 3.4, the release torch 2.8
# ships with; pyproject's torch>=2.8 floor brings it. An older Triton (or none) makes "auto" use the chunked path.
TRITON_MIN = (3, 4)
_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:  # once per process: not on every forward of a training run
        _WARNED.add(msg)
        log.warning(msg)


def _triton_problem() -> str | None:
    """Why the Triton kernels cannot be used here, or None."""
    try:
        import triton
    except ImportError:
        return "triton is not importable"
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if version < TRITON_MIN:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_MIN))}"
    return None


def _triton_available() -> bool:
    return _triton_problem() is None


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"the token log-prob kernel must be one of {IMPLS}, got {impl!r}")
    return impl


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map "auto" to a concrete implementation name for tensors on `device`."""
    if check_impl(impl) == "auto":
        if device.type == "cuda":
            problem = _triton_problem()
            if problem is None:
                return "triton"
            _warn_once(f"{problem}; token_logprobs uses the chunked torch path on CUDA")
        return "chunked"
    return impl


_COMPILES: dict[tuple, bool] = {}


def _compile_failures() -> tuple[type[BaseException], ...]:
    import triton.compiler.errors as ce
    import triton.runtime.errors as re_

    return tuple(e for e in (ce.CompilationError, getattr(re_, "OutOfResources", None),
                             getattr(re_, "PTXASError", None), RuntimeError) if e is not None)


def triton_compiles(h_NC: torch.Tensor, w_VC: torch.Tensor, b_V: torch.Tensor | None) -> bool:
    """Whether both Triton kernels compile and run for this device, dtype and head shape: checked once per
    combination on a 16-row problem, so "auto" can fall back to the chunked path (with one warning) instead of
    failing in the first forward or, worse, in the first backward."""
    key = (h_NC.device, h_NC.dtype, tuple(w_VC.shape), b_V is not None)
    if key not in _COMPILES:
        _COMPILES[key] = _probe_triton(h_NC, w_VC, b_V)
    return _COMPILES[key]


def _probe_triton(h_NC, w_VC, b_V) -> bool:
    from var_mclr.kernels import _triton_logprob

    h = h_NC[:16].detach().contiguous()
    w, b = w_VC.detach().contiguous(), b_V.detach().contiguous() if b_V is not None else None
    t = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    try:
        with torch.no_grad():
            _, lse = _triton_logprob.forward(h, w, b, t)
            _triton_logprob.backward(h, w, b, t, lse, torch.ones_like(lse), True, True, b is not None)
    except _compile_failures() as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        _warn_once(f"the Triton log-prob kernels failed to compile or run for {h.dtype} on {h.device} "
                   f"({type(e).__name__}: {str(e)[:200]}); token_logprobs uses the chunked torch path")
        return False
    return True


def _common_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Under autocast the head matmul would run in the autocast dtype; mirror that so every impl computes
    # the same thing the model's nn.Linear would.
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def token_logprobs(
    h_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    bias_V: torch.Tensor | None,
    target_N: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """log softmax(h @ W^T + b)[target] per token, as float32 with the shape of target.

    h_NC: (..., C); weight_VC: (V, C); bias_V: (V,) or None; target_N: (...) long, negative = ignored.
    """
    if h_NC.shape[:-1] != target_N.shape:
        raise ValueError(f"h {tuple(h_NC.shape)} and target {tuple(target_N.shape)} disagree on leading dims")
    if weight_VC.dim() != 2 or weight_VC.shape[1] != h_NC.shape[-1]:
        raise ValueError(f"weight {tuple(weight_VC.shape)} does not match hidden size {h_NC.shape[-1]}")
    auto = impl == "auto"
    impl = resolve_impl(impl, h_NC.device)
    out_shape = target_N.shape
    h2_NC = h_NC.reshape(-1, h_NC.shape[-1])
    t_N = target_N.reshape(-1).long()

    if impl == "naive":
        return _naive(h2_NC, weight_VC, bias_V, t_N).reshape(out_shape)

    dtype = _common_dtype(h2_NC, weight_VC)
    h2_NC, w_VC = h2_NC.to(dtype), weight_VC.to(dtype)
    with torch.autocast(h2_NC.device.type, enabled=False):
        if impl == "triton" and auto and h2_NC.shape[0] and not triton_compiles(h2_NC, w_VC, bias_V):
            impl = "chunked"
        if impl == "chunked":
            logp_N = _FusedLogprob.apply(h2_NC, w_VC, bias_V, t_N, _Chunked)
        else:
            from var_mclr.kernels import _triton_logprob

            h2_NC, w_VC, t_N = h2_NC.contiguous(), w_VC.contiguous(), t_N.contiguous()
            bias_V = bias_V.contiguous() if bias_V is not None else None
            logp_N = _FusedLogprob.apply(h2_NC, w_VC, bias_V, t_N, _triton_logprob)
    return logp_N.reshape(out_shape)


def _naive(h_NC, weight_VC, bias_V, t_N):
    logits_NV = F.linear(h_NC, weight_VC, bias_V).float()
    valid_N = t_N >= 0
    logp_N = logits_NV.log_softmax(-1).gather(1, t_N.clamp_min(0)[:, None]).squeeze(1)
    # torch.where (not multiplication) so ignored rows get exactly zero gradient even if their logits are odd.
    return torch.where(valid_N, logp_N, torch.zeros_like(logp_N))


def _chunk_rows(V: int) -> int:
    return max(1, _CHUNK_ELEMS // max(V, 1))


def _has_mm_out_dtype() -> bool:
    """torch.mm(..., out_dtype=) exists (the aten::mm.dtype overload, torch >= 2.8); before it, CUDA takes the
    CPU's path (the product rounded to the input dtype, then widened)."""
    return "dtype" in torch.ops.aten.mm.overloads()


_MM_OUT_DTYPE = _has_mm_out_dtype()


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b as float32, multiplied in the inputs' dtype (both share one).

    Low precision (bf16/fp16) keeps the fast matmul units and accumulates in float32: CUDA returns the float32
    result (mm out_dtype); the CPU only offers a result rounded to the input dtype (what nn.Linear in bf16
    gives too), widened here.
    """
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.device.type == "cuda" and _MM_OUT_DTYPE:
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    r = torch.mm(a, b)
    return out.copy_(r) if out is not None else r.float()


def _accumulate_mm_(acc_f32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32; a and b share a dtype."""
    if a.dtype == torch.float32:
        acc_f32.addmm_(a, b)
    elif a.device.type == "cuda" and _MM_OUT_DTYPE:
        acc_f32 += torch.mm(a, b, out_dtype=torch.float32)
    else:
        acc_f32 += torch.mm(a, b)  # bf16 product, widened inside the add (no float32 temporary)


def _logits_into(out_nV, h_nC, w_VC, b32_V):
    """out = h @ W^T + b as float32."""
    _mm_f32(h_nC, w_VC.t(), out=out_nV)
    if b32_V is not None:
        out_nV += b32_V
    return out_nV


class _FusedLogprob(torch.autograd.Function):
    """Fused head + log_softmax + gather. Saves h, W, b, target and the per-token logsumexp only; the engine
    (the chunked torch functions below, or the Triton module) computes forward and backward from those."""

    @staticmethod
    def forward(ctx, h_NC, w_VC, b_V, t_N, engine):
        logp_N, lse_N = engine.forward(h_NC, w_VC, b_V, t_N)
        ctx.engine = engine
        ctx.save_for_backward(h_NC, w_VC, b_V, t_N, lse_N)
        ctx.mark_non_differentiable(t_N)
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):
        h_NC, w_VC, b_V, t_N, lse_N = ctx.saved_tensors
        return (*ctx.engine.backward(h_NC, w_VC, b_V, t_N, lse_N, grad_N, *ctx.needs_input_grad[:3]), None, None)


class _Chunked:
    """Row-chunked engine: h and W share a dtype; softmax statistics, grad_logits and the dW/db accumulators are
    float32."""

    @staticmethod
    def forward(h_NC, w_VC, b_V, t_N):
        N, V = h_NC.shape[0], w_VC.shape[0]
        b32_V = b_V.float() if b_V is not None else None
        rows = _chunk_rows(V)
        lse_N = torch.empty(N, dtype=torch.float32, device=h_NC.device)
        tgt_N = torch.empty(N, dtype=torch.float32, device=h_NC.device)
        buf = torch.empty(min(rows, N), V, dtype=torch.float32, device=h_NC.device)
        tc_N = t_N.clamp_min(0)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            z = _logits_into(buf[: j - i], h_NC[i:j], w_VC, b32_V)
            torch.gather(z, 1, tc_N[i:j, None], out=tgt_N[i:j, None])
            m = z.amax(1, keepdim=True)
            # In place: the chunk buffer becomes exp(z - max); no second chunk-sized temporary.
            torch.log(z.sub_(m).exp_().sum(1), out=lse_N[i:j])
            lse_N[i:j] += m.squeeze(1)
        del buf
        valid_N = t_N >= 0
        logp_N = torch.where(valid_N, tgt_N - lse_N, torch.zeros_like(tgt_N))
        return logp_N, lse_N

    @staticmethod
    def backward(h_NC, w_VC, b_V, t_N, lse_N, grad_N, need_h: bool, need_w: bool, need_b: bool):
        N, V = h_NC.shape[0], w_VC.shape[0]
        lowp = h_NC.dtype != torch.float32
        b32_V = b_V.float() if b_V is not None else None
        g_N = torch.where(t_N >= 0, grad_N.float(), torch.zeros((), device=grad_N.device))
        tc_N = t_N.clamp_min(0)
        # Each dh row is written once, so it can be produced in h's dtype directly; dW and db accumulate
        # over chunks and stay float32 until the end.
        dh_NC = torch.empty(h_NC.shape, dtype=h_NC.dtype, device=h_NC.device) if need_h else None
        dw_VC = torch.zeros(V, h_NC.shape[1], dtype=torch.float32, device=h_NC.device) if need_w else None
        db_V = torch.zeros(V, dtype=torch.float32, device=h_NC.device) if (need_b and b_V is not None) else None
        rows = _chunk_rows(V)
        buf = torch.empty(min(rows, N), V, dtype=torch.float32, device=h_NC.device)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            g = g_N[i:j]
            # d logp / d logits = onehot - softmax; scaled by g and built in place in the recomputed buffer.
            z = _logits_into(buf[: j - i], h_NC[i:j], w_VC, b32_V)
            z.sub_(lse_N[i:j, None]).exp_().mul_(-g[:, None])
            z.scatter_add_(1, tc_N[i:j, None], g[:, None])
            if db_V is not None:
                db_V += z.sum(0)
            # Low precision: the gradient tile is rounded to the input dtype for the fast matmuls (as in the
            # Triton kernel), with float32 accumulation inside them.
            zm = z.to(h_NC.dtype) if lowp else z
            if dh_NC is not None:
                torch.mm(zm, w_VC, out=dh_NC[i:j])
            if dw_VC is not None:
                _accumulate_mm_(dw_VC, zm.t(), h_NC[i:j])
        dw = dw_VC.to(w_VC.dtype) if dw_VC is not None else None
        db = db_V.to(b_V.dtype) if db_V is not None else None
        return dh_NC, dw, db
