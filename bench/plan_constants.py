"""The per-row activation constants of the memory plan (var_mclr/plan.py, ACTIVATION_BYTES), measured on the CPU at
the real widths of VAR-d16..d30 and L = 680 tokens (256 px).

    OMP_NUM_THREADS=1 python bench/plan_constants.py [--widths 1024 1280 1536 1920]

For one block and for the rest of the model (embeddings, head norm, fused log-prob head), the bytes a training
forward leaves alive for its backward are measured with torch.profiler's allocation events (var_mclr/memprobe.py) at
1 and at 2 rows; the difference is the cost of one row, divided here by L x C (bytes per token per channel). The
intercept (the bf16 weight copies autocast caches) is per model, not per row, and the plan counts it separately.
Takes about three minutes on one thread.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer.model import VAR_256_PATCH_NUMS, VQVAE, VQVAEConfig  # noqa: E402
from var_mclr.memprobe import peak_bytes, retained_bytes  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402

log = logging.getLogger("bench.plan_constants")
L = sum(p * p for p in VAR_256_PATCH_NUMS)


def _per_row(make_inputs, forward, precision: str) -> float:
    """Retained bytes of one more row: retained(2 rows) - retained(1 row). Inputs are made before the measurement:
    a block's input is the previous block's output, counted there."""
    kept = []
    for rows in (1, 2):
        inputs = make_inputs(rows)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                return forward(*inputs)
        k, out = retained_bytes(run)
        kept.append(k)
        del out
    return kept[1] - kept[0]


def block_constant(width: int, precision: str, checkpointing: bool) -> float:
    """Bytes per token per channel that one block keeps per row (its output included, the head excluded)."""
    var = VAR(VARConfig(depth=1, embed_dim=width, num_heads=width // 64, patch_nums=VAR_256_PATCH_NUMS))
    block, bias = var.blocks[0], var.attn_bias_for_masking

    def forward(x, cond):
        if checkpointing:  # as VAR.head_hidden does with activation_checkpointing
            return torch.utils.checkpoint.checkpoint(block, x, cond, bias, use_reentrant=False)
        return block(x, cond, bias)
    return _per_row(lambda rows: (torch.randn(rows, L, width, requires_grad=True), torch.randn(rows, width)),
                    forward, precision) / (L * width)


def head_constant(width: int, precision: str) -> float:
    """Bytes per token per channel kept per row by everything but the blocks: a depth-1 VAR minus its block."""
    var = VAR(VARConfig(depth=1, embed_dim=width, num_heads=width // 64, patch_nums=VAR_256_PATCH_NUMS),
              logprob_impl="chunked")
    g = torch.Generator().manual_seed(0)

    def make_inputs(rows):
        return (torch.randint(0, 1000, (rows,), generator=g), torch.randn(rows, L - 1, var.Cvae, generator=g),
                torch.randint(0, var.V, (rows, L), generator=g))
    total = _per_row(make_inputs, lambda label, x, idx: var(label, x, target_BL=idx).sum(), precision)
    return total / (L * width) - block_constant(width, precision, False)


def encode_bytes_per_pixel(vae_cfg: VQVAEConfig) -> float:
    """Peak bytes per input pixel of the tokenizer's no-grad encode (images -> token ids), one image."""
    vae = VQVAE(vae_cfg).eval()
    img = torch.randn(1, 3, vae.resolution, vae.resolution)
    return peak_bytes(lambda: vae.img_to_idxBl(img)) / vae.resolution ** 2


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 1920])
    args = ap.parse_args()
    torch.manual_seed(0)
    log.info("bytes per token per channel, per row, L = %d (CPU, torch %s)", L, torch.__version__)
    log.info("tokenizer encode (vae_ch160v4096z32 at 256 px): %.0f bytes per pixel",
             encode_bytes_per_pixel(VQVAEConfig()))
    log.info("%6s %5s %10s %14s %10s", "width", "prec", "block", "block(ckpt)", "rest")
    for width in args.widths:
        for precision in ("bf16", "fp32"):
            log.info("%6d %5s %10.2f %14.2f %10.2f", width, precision, block_constant(width, precision, False),
                     block_constant(width, precision, True), head_constant(width, precision))


if __name__ == "__main__":
    main()
