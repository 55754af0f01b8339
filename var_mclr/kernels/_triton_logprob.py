"""Triton kernels for token_logprobs (imported lazily by logprob.py; importing this module imports triton).

Forward: grid (token blocks, vocabulary splits). Each program streams its vocabulary range in BLOCK_V tiles,
computes the logits tile h @ W^T + b with a float32 accumulator over BLOCK_C slices of the hidden size, and
keeps an online logsumexp plus the target logit. The splits' partial logsumexps are merged in torch (a
(splits, N) tensor): splitting the vocabulary gives the GPU enough programs when N is small.

Backward: grid (token blocks, vocabulary blocks). Each program recomputes its logits tile, forms
grad_logits = g * (onehot - softmax) in registers, and atomically adds its contributions to db, dh (tile @ W)
and dW (tile^T @ h) in float32 buffers. The N x V logits never reach global memory in either direction.

Run on the CPU with TRITON_INTERPRET=1 (set before this module is imported: triton.jit reads it then).
The GPU tile sizes below are reasoned, not tuned (no GPU was available while writing this); the tests also
compile every kernel for sm_90. bench/bench_logprob.py times triton against chunked and the bare head
matmuls on a GPU: if the backward's float32 atomics make triton lose to chunked there, flip "auto".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# triton.jit chose interpreted or compiled kernels when this module was imported; remember which.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter's tl.dot multiplies bf16 tensors' uint16 storage as integers (triton 3.8), so when
    # interpreted we upcast: bf16 x bf16 products are exact in float32, so this is the GPU dot's arithmetic.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, C, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_h = offs_n.to(tl.int64)[:, None] * stride_h
    row_w = offs_v.to(tl.int64)[:, None] * stride_w
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        h_tile = tl.load(h_ptr + row_h + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        w_tile = tl.load(w_ptr + row_w + offs_c[None, :], mask=mask_v[:, None] & mask_c[None, :], other=0.0)
        acc = _dot(h_tile, tl.trans(w_tile), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_part_ptr, tgt_part_ptr,
                N, V, C, stride_h, stride_w, blocks_per_split,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(t_ptr + offs_n, mask=mask_n, other=-1)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
    # Every split starts below V (the launcher guarantees it), so each tile has a finite entry and the
    # running max never stays -inf after the first tile.
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, C, stride_h, stride_w,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION, UPCAST)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(lse_part_ptr + out, m_i + tl.log(s_i), mask=mask_n)
    tl.store(tgt_part_ptr + out, t_i, mask=mask_n)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                N, V, C, stride_h, stride_w,
                HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, C, stride_h, stride_w,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION, UPCAST)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)  # zero on ignored rows (set by the launcher)
    tgt = tl.load(t_ptr + offs_n, mask=mask_n, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
    grad = g[:, None] * (onehot - p)
    # where (not a product) so padded lanes, whose exp may overflow, cannot leak NaN into the sums.
    grad = tl.where(mask_n[:, None] & mask_v[None, :], grad, 0.0)
    # Relaxed atomics: the sums are only read after the kernel ends, so no ordering between programs is needed;
    # the default acq_rel puts a memory barrier behind every one of the ~49 atomics per thread and C slice.
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(grad, axis=0), mask=mask_v, sem="relaxed")
    grad_in = grad.to(h_ptr.dtype.element_ty)
    row_h = offs_n.to(tl.int64)[:, None] * stride_h
    row_w = offs_v.to(tl.int64)[:, None] * stride_w
    row_dh = offs_n.to(tl.int64)[:, None] * C
    row_dw = offs_v.to(tl.int64)[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if NEED_DH:
            w_tile = tl.load(w_ptr + row_w + offs_c[None, :], mask=mask_v[:, None] & mask_c[None, :], other=0.0)
            dh_tile = _dot(grad_in, w_tile, None, DOT_PRECISION, UPCAST)
            tl.atomic_add(dh_ptr + row_dh + offs_c[None, :], dh_tile, mask=mask_n[:, None] & mask_c[None, :],
                          sem="relaxed")
        if NEED_DW:
            h_tile = tl.load(h_ptr + row_h + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            dw_tile = _dot(tl.trans(grad_in), h_tile, None, DOT_PRECISION, UPCAST)
            tl.atomic_add(dw_ptr + row_dw + offs_c[None, :], dw_tile, mask=mask_v[:, None] & mask_c[None, :],
                          sem="relaxed")


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs follow torch's own matmul setting, so "triton" matches what nn.Linear would compute.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _blocks(h_NC: torch.Tensor, V: int) -> dict:
    if h_NC.device.type != "cuda":
        # Interpreter (CPU): the smallest tiles tl.dot accepts, so odd test sizes exercise every mask; wider
        # vocabulary tiles for big V, where the interpreter's per-program cost dominates.
        return dict(BLOCK_N=16, BLOCK_V=16 if V <= 256 else 128, BLOCK_C=16, num_warps=1)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_C=64 if h_NC.element_size() <= 2 else 32, num_warps=8)


def _num_splits(n_blocks_n: int, n_blocks_v: int, device: torch.device, splits: int | None) -> int:
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = triton.cdiv(2 * sms, n_blocks_n)
        else:
            splits = 1
    return max(1, min(splits, n_blocks_v))


def forward(h_NC, w_VC, b_V, t_N, splits: int | None = None):
    """Returns (logp_N, lse_N), both float32. h_NC and w_VC must share a dtype and be contiguous."""
    if h_NC.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    N, C = h_NC.shape
    V = w_VC.shape[0]
    cfg = _blocks(h_NC, V)
    n_blocks_n = triton.cdiv(N, cfg["BLOCK_N"])
    n_blocks_v = triton.cdiv(V, cfg["BLOCK_V"])
    splits = _num_splits(n_blocks_n, n_blocks_v, h_NC.device, splits)
    blocks_per_split = triton.cdiv(n_blocks_v, splits)
    splits = triton.cdiv(n_blocks_v, blocks_per_split)  # drop empty trailing splits
    lse_part = torch.empty(splits, N, dtype=torch.float32, device=h_NC.device)
    tgt_part = torch.empty(splits, N, dtype=torch.float32, device=h_NC.device)
    if N > 0:
        _fwd_kernel[(n_blocks_n, splits)](
            h_NC, w_VC, b_V if b_V is not None else h_NC, t_N, lse_part, tgt_part,
            N, V, C, h_NC.stride(0), w_VC.stride(0), blocks_per_split,
            HAS_BIAS=b_V is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
            BLOCK_C=cfg["BLOCK_C"], DOT_PRECISION=_dot_precision(h_NC.dtype), UPCAST=INTERPRETED,
            num_warps=cfg["num_warps"],
        )
    lse_N = torch.logsumexp(lse_part, dim=0)
    logp_N = torch.where(t_N >= 0, tgt_part.sum(0) - lse_N, torch.zeros_like(lse_N))
    return logp_N, lse_N


def backward(h_NC, w_VC, b_V, t_N, lse_N, grad_N, need_h: bool, need_w: bool, need_b: bool):
    N, C = h_NC.shape
    V = w_VC.shape[0]
    cfg = _blocks(h_NC, V)
    dev = h_NC.device
    g_N = torch.where(t_N >= 0, grad_N.float(), torch.zeros((), device=dev)).contiguous()
    need_b = need_b and b_V is not None
    dh = torch.zeros(N, C, dtype=torch.float32, device=dev) if need_h else None
    dw = torch.zeros(V, C, dtype=torch.float32, device=dev) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    if N > 0 and (need_h or need_w or need_b):
        dummy = lse_N
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _bwd_kernel[grid](
            h_NC, w_VC, b_V if b_V is not None else h_NC, t_N, lse_N, g_N,
            dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy,
            N, V, C, h_NC.stride(0), w_VC.stride(0),
            HAS_BIAS=b_V is not None, NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_C=cfg["BLOCK_C"],
            DOT_PRECISION=_dot_precision(h_NC.dtype), UPCAST=INTERPRETED, num_warps=cfg["num_warps"],
        )
    return (
        dh.to(h_NC.dtype) if dh is not None else None,
        dw.to(w_VC.dtype) if dw is not None else None,
        db.to(b_V.dtype) if db is not None else None,
    )
