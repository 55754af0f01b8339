"""One guided sampling step: mix conditional/unconditional logits, top-k, top-p, sample.

guided_sample(logits_cond, logits_uncond, t, top_k, top_p, generator) -> idx (long, logits' leading shape)

Semantics, shared by every implementation:
- mixing: z = (1 + t) z_c - t z_u when logits_uncond is given and t != 0; otherwise z = z_c (so t = 0 with an
  unconditional batch is exactly the unguided step, random stream included).
- top-k (0 < top_k < V): keep the top_k largest logits.
- top-p (0 < top_p < 1): over the top-k survivors sorted by probability, keep rank r while the probability
  mass strictly above it is < top_p (the smallest prefix whose mass reaches top_p; the top token always stays).
- sample from softmax(z) renormalised over the kept tokens. Ties at a cut-off are measure-zero for real logits;
  paths may break them differently.

Implementations (same distribution, different random streams; each is deterministic for a given seed):
- "naive":  unfused reference (masked copies of the full V row, a full sort for top-p, multinomial).
- "torch":  lean CPU/GPU torch: works on the top_k candidates only (topk returns them sorted, so top-p needs
            no full-vocabulary sort) and samples by inverse CDF with one uniform per row, reusing the cumsum
            that top-p already needs. Rows are processed in cache-sized chunks.
- "triton": one kernel per row block: mixes in registers, finds the top-k and top-p cut-offs by bisection on
            the logits' order-preserving integer keys, and samples by Gumbel-max with a seed drawn from the
            generator. Nothing row-sized is written to global memory except the sampled ids.
impl="auto" -> triton for CUDA tensors (when triton imports and V fits a register tile), torch otherwise. The
choice is an explicit argument (SamplingConfig.kernel), never process-wide state.
"""

from __future__ import annotations


import torch

from var_mclr.kernels.logprob import _triton_available

IMPLS = ("auto", "naive", "torch", "triton")
# Rows per chunk in the torch path: 512 rows x V=4096 float32 = 8 MiB of mixed logits at a time.
_CHUNK_ELEMS = 1 << 21
TRITON_MAX_V = 16384  # a whole row lives in registers in the Triton kernel


def resolve_impl(impl: str, device: torch.device, V: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and V <= TRITON_MAX_V and _triton_available():
            return "triton"
        return "torch"
    return impl


def guided_sample(
    logits_cond_BlV: torch.Tensor,
    logits_uncond_BlV: torch.Tensor | None = None,
    t: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Sample one token id per row of logits_cond (..., V); returns long (...)."""
    if logits_uncond_BlV is not None and logits_uncond_BlV.shape != logits_cond_BlV.shape:
        raise ValueError(f"cond {tuple(logits_cond_BlV.shape)} vs uncond {tuple(logits_uncond_BlV.shape)}")
    t = float(t)
    if t == 0.0:
        logits_uncond_BlV = None  # exact: no (1+0)*z - 0*z_u rounding, no NaN from 0 * inf
    V = logits_cond_BlV.shape[-1]
    lead = logits_cond_BlV.shape[:-1]
    top_k = int(top_k) if 0 < int(top_k) < V else 0
    top_p = float(top_p) if 0.0 < float(top_p) < 1.0 else 0.0
    zc_RV = logits_cond_BlV.reshape(-1, V)
    zu_RV = logits_uncond_BlV.reshape(-1, V) if logits_uncond_BlV is not None else None
    impl = resolve_impl(impl, zc_RV.device, V)
    if impl == "naive":
        idx_R = _reference(zc_RV, zu_RV, t, top_k, top_p, generator)
    elif impl == "torch":
        idx_R = _lean_torch(zc_RV, zu_RV, t, top_k, top_p, generator)
    else:
        from var_mclr.kernels import _triton_sampling

        idx_R = _triton_sampling.sample(zc_RV, zu_RV, t, top_k, top_p, generator)
    return idx_R.reshape(lead)


def _reference(zc_RV, zu_RV, t, top_k, top_p, generator):
    z = zc_RV.float()
    if zu_RV is not None:
        z = (1.0 + t) * z - t * zu_RV.float()
    if top_k:
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(top_k, dim=-1).indices, True)
        z = z.masked_fill(~keep, float("-inf"))
    if top_p:
        z_sorted, order = z.sort(dim=-1, descending=True)
        cdf_sorted = z_sorted.softmax(-1).cumsum(-1)
        drop_sorted = torch.zeros_like(cdf_sorted, dtype=torch.bool)
        drop_sorted[:, 1:] = cdf_sorted[:, :-1] >= top_p  # rank r goes once the mass above it reaches top_p
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
    probs = z.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _lean_torch(zc_RV, zu_RV, t, top_k, top_p, generator):
    R, V = zc_RV.shape
    dev = zc_RV.device
    # All uniforms up front so the result does not depend on the chunk size.
    u_R1 = torch.rand(R, 1, generator=generator, device=dev)
    idx_R = torch.empty(R, dtype=torch.long, device=dev)
    rows = max(1, _CHUNK_ELEMS // max(V, 1))
    for i in range(0, R, rows):
        j = min(i + rows, R)
        z = zc_RV[i:j].float()  # a view for float32 input: never written to
        if zu_RV is not None:
            # lerp(z_u, z_c, 1 + t) = z_u + (1 + t)(z_c - z_u) = (1 + t) z_c - t z_u, one pass, one buffer.
            z = torch.lerp(zu_RV[i:j].float(), z, 1.0 + t)
        if top_k:
            vals, ids = z.topk(top_k, dim=-1, sorted=True)  # only the k candidates from here on
            top = vals[:, :1].clone()
        elif top_p:
            vals, ids = z.sort(dim=-1, descending=True)
            top = vals[:, :1].clone()
        else:
            vals, ids = z, None
            top = vals.amax(-1, keepdim=True)
        # Unnormalised CDF over the candidates (sorted descending when filtering), built in one buffer.
        cdf = (vals - top).exp_().cumsum_(-1)
        n = cdf.shape[-1]
        if top_p:
            # Keep ranks up to the first whose inclusive mass reaches top_p (cdf is non-decreasing).
            n_keep = torch.searchsorted(cdf, top_p * cdf[:, -1:]).add_(1).clamp_(max=n)
            mass = cdf.gather(-1, n_keep - 1)
        else:
            n_keep, mass = None, cdf[:, -1:]
        # Inverse CDF: the first rank whose cumulative mass exceeds u * (kept mass).
        r = torch.searchsorted(cdf, u_R1[i:j] * mass, right=True)
        r = torch.minimum(r, n_keep - 1) if n_keep is not None else r.clamp_(max=n - 1)
        idx_R[i:j] = (ids.gather(-1, r) if ids is not None else r).squeeze(1)
    return idx_R
