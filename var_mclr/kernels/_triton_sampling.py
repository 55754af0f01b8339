"""Triton kernel for guided_sample (imported lazily by sampling.py; importing it imports triton).

Each program owns BLOCK_R whole rows (BLOCK_R x BLOCK_V in registers, BLOCK_V >= V):
1. load z_c (and z_u) and mix: z = (1 + t) z_c - t z_u;
2. map z to int32 keys whose integer order is the float order, then bisect on the key (32 steps) for
   - top-k: the largest key T with #{key >= T} >= k (the k-th largest logit);
   - top-p: the largest key T with mass{key >= T} >= top_p * mass(top-k set) (the nucleus cut-off);
   exact cut-offs without sorting and without writing anything row-sized to global memory;
3. Gumbel-max over the kept logits with Philox noise from a seed drawn from the caller's generator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _bisect_keys(key, weight, target, valid, BLOCK_R: tl.constexpr):
    """Per row, the largest int32 T with sum(weight where key >= T) >= target (weight/target: count or mass)."""
    lo = tl.full((BLOCK_R,), -2147483648, dtype=tl.int64)
    hi = tl.full((BLOCK_R,), 2147483647, dtype=tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        above = valid & (key >= mid[:, None])
        ok = tl.sum(tl.where(above, weight, 0.0), axis=1) >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _sample_kernel(zc_ptr, zu_ptr, seed_ptr, out_ptr, R, V, stride_c, stride_u, t, top_k, top_p,
                   HAS_UNCOND: tl.constexpr, DO_TOPK: tl.constexpr, DO_TOPP: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_V)
    mask_r = rows < R
    mask_v = cols < V
    mask = mask_r[:, None] & mask_v[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(zc_ptr + rows64[:, None] * stride_c + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        zu = tl.load(zu_ptr + rows64[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = (1.0 + t) * z - t * zu
    valid = mask_v[None, :] & (rows >= 0)[:, None]  # full 2-D shape; padded rows are never stored
    z = tl.where(valid, z, float("-inf"))
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    keep = valid
    if DO_TOPK:
        kth = _bisect_keys(key, 1.0, top_k, valid, BLOCK_R)
        keep = keep & (key >= kth[:, None])
    if DO_TOPP:
        m = tl.max(tl.where(keep, z, float("-inf")), axis=1)
        e = tl.where(keep, tl.exp(z - m[:, None]), 0.0)
        cut = _bisect_keys(key, e, top_p * tl.sum(e, axis=1), keep, BLOCK_R)
        keep = keep & (key >= cut[:, None])
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, rows[:, None] * V + cols[None, :])
    # Gumbel(0,1) = -log(-log u); u == 0 gives -inf noise, i.e. that lane just cannot win.
    score = tl.where(keep, z - tl.log(-tl.log(u)), float("-inf"))
    idx = tl.argmax(score, axis=1)
    tl.store(out_ptr + rows, idx.to(tl.int64), mask=mask_r)


def _config(R: int, V: int, device: torch.device) -> dict:
    block_v = triton.next_power_of_2(V)
    # Interpreter: many rows per program (numpy vectorises them). GPU: ~4K elements per program.
    elems = 1 << 14 if device.type != "cuda" else 4096
    block_r = max(1, min(triton.next_power_of_2(max(R, 1)), elems // block_v))
    num_warps = 4 if block_r * block_v <= 4096 else 8
    return dict(BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps)


def sample(zc_RV, zu_RV, t, top_k, top_p, generator):
    """See sampling.guided_sample; top_k/top_p are already normalised (0 = off)."""
    R, V = zc_RV.shape
    dev = zc_RV.device
    if dev.type != "cuda" and not INTERPRETED:
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if R * triton.next_power_of_2(V) >= 2**31:
        raise ValueError("too many rows for the Triton sampler's int32 Philox offsets; use impl='torch'")
    if zc_RV.stride(-1) != 1:
        zc_RV = zc_RV.contiguous()
    if zu_RV is not None and zu_RV.stride(-1) != 1:
        zu_RV = zu_RV.contiguous()
    # The seed stays on the device (no host sync); one draw per call keeps calls independent.
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=dev, dtype=torch.int64).to(torch.int32)
    out_R = torch.empty(R, dtype=torch.long, device=dev)
    cfg = _config(R, V, dev)
    if R > 0:
        _sample_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
            zc_RV, zu_RV if zu_RV is not None else zc_RV, seed, out_R,
            R, V, zc_RV.stride(0), (zu_RV if zu_RV is not None else zc_RV).stride(0),
            # top_k as a float: an int arg equal to 1 would be specialised into a constexpr.
            float(t), float(top_k), float(top_p),
            HAS_UNCOND=zu_RV is not None, DO_TOPK=top_k > 0, DO_TOPP=top_p > 0.0,
            BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
        )
    return out_R
