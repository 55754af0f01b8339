"""Sample a reference model for DDO: guidance-free, class-balanced token sequences, stored with how they were drawn.

    python -m var_mclr.reference_samples --ckpt RUN_DIR/model.safetensors --n-per-class N --out DIR
    python -m var_mclr.reference_samples --ckpt var_d16.pth --tokenizer vae_ch160v4096z32.pth --n-per-class N --out DIR

The samples are p_ref itself: no guidance, no top-k or top-p (DDO's loss compares data with the reference's own
distribution; docs/method.md, "DDO"). Each batch draws from a generator seeded by (seed, its first index): the same
seed and batch size give the same set, and settings.json records both. DIR is written as one unit
(var_mclr/sample_store.py); a DDO run takes it as loss.ddo.samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch

from tokenizer.model import VQVAE, VQVAEConfig
from var_mclr.checkpoints import (CheckpointError, is_official_checkpoint, load_model, load_official_var,
                                  load_tokenizer, read_model_info, weights_sha256)
from var_mclr.errors import add_debug_flag, reporting_user_errors
from var_mclr.model import VAR
from var_mclr.sample_store import SampleSetError, write_sample_set
from var_mclr.sampling import SamplingConfig, sample_tokens

log = logging.getLogger("var_mclr.reference_samples")


def load_reference(ckpt: str, tokenizer: str | None) -> tuple[VQVAE, VAR, str]:
    """The VAR to sample and its tokenizer (--tokenizer, else the one our checkpoint recorded), checked to fit."""
    if is_official_checkpoint(ckpt):
        if tokenizer is None:
            raise SampleSetError(f"--ckpt {ckpt} is an official VAR: name its tokenizer with --tokenizer")
        vae = load_tokenizer(tokenizer, VQVAEConfig() if is_official_checkpoint(tokenizer) else None)
        return vae, load_official_var(ckpt, vae=vae), tokenizer
    var = load_model(ckpt)
    if not isinstance(var, VAR):
        raise CheckpointError(f"--ckpt {ckpt} holds a {type(var).__name__}, not a VAR")
    recorded = read_model_info(ckpt).get("tokenizer", {})
    path = tokenizer or recorded.get("checkpoint")
    if path is None:
        raise SampleSetError(f"--ckpt {ckpt} records no tokenizer: pass --tokenizer")
    declared = VQVAEConfig(**recorded["config"]) if is_official_checkpoint(path) and "config" in recorded else None
    vae = load_tokenizer(path, declared)
    if recorded.get("weights_sha256") not in (None, weights_sha256(vae)):
        raise SampleSetError(f"--tokenizer {path} is not the tokenizer {ckpt} was trained with "
                             f"({recorded.get('checkpoint')}): its tokens would mean other images")
    if (vae.V, vae.Cvae, tuple(vae.patch_nums)) != (var.V, var.Cvae, tuple(var.patch_nums)):
        raise SampleSetError(f"tokenizer {path} does not fit the VAR {ckpt} (vocabulary, latent width or patch_nums)")
    return vae, var, path


@torch.no_grad()
def draw(var: VAR, vae: VQVAE, label_N: torch.Tensor, sampling: SamplingConfig, batch_size: int,
         seed: int) -> torch.Tensor:
    """Token indices (N, L) on the CPU, one seeded generator per batch."""
    device, chunks, tic = var.lvl_1L.device, [], time.perf_counter()
    for start in range(0, len(label_N), batch_size):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        result = sample_tokens(var, vae.quantize, label_N[start:start + batch_size].to(device), sampling, gen)
        chunks.append(torch.cat(result.idx_Bl, dim=1).cpu())
        log.info("sampled %d / %d (%.1f s)", min(start + batch_size, len(label_N)), len(label_N),
                 time.perf_counter() - tic)
    return torch.cat(chunks)


def make_reference_samples(ckpt: str, n_per_class: int, out: Path, tokenizer: str | None = None,
                           batch_size: int = 64, seed: int = 0, mixed_precision: str = "no",
                           device: str | None = None) -> Path:
    """Sample `n_per_class` sequences of every class from ckpt and write them, with their settings, to out."""
    if n_per_class < 1 or batch_size < 1:
        raise SampleSetError(f"--n-per-class and --batch-size must be >= 1, got {n_per_class}, {batch_size}")
    if Path(out).exists():  # before any model is loaded or sampled
        raise SampleSetError(f"--out {out} already exists: a sample set is never overwritten")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae, var, tok_path = load_reference(ckpt, tokenizer)
    vae, var = vae.to(dev).eval(), var.to(dev).eval()
    sampling = SamplingConfig(guidance="none", top_k=0, top_p=0.0, mixed_precision=mixed_precision)
    label_N = torch.arange(var.num_classes).repeat_interleave(n_per_class)  # class-balanced, class by class
    idx_NL = draw(var, vae, label_N, sampling, batch_size, seed)
    settings = {"made_by": "python -m var_mclr.reference_samples", "n_per_class": n_per_class,
                "num_classes": var.num_classes, "patch_nums": list(var.patch_nums), "seed": seed,
                "batch_size": batch_size, "seeding": "batch starting at index i: generator seed * 1000003 + i",
                "device": dev.type, "sampling": dataclasses.asdict(sampling),
                "source": {"checkpoint": str(ckpt), "weights_sha256": weights_sha256(var),
                           "tokenizer": str(tok_path), "tokenizer_weights_sha256": weights_sha256(vae)}}
    return write_sample_set(Path(out), idx_NL, label_N, settings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the reference VAR: our .safetensors or an official var_d*.pth")
    p.add_argument("--tokenizer", help="default: the tokenizer --ckpt was trained with (needed for a .pth)")
    p.add_argument("--n-per-class", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="a new directory (written as one unit)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    args = add_debug_flag(p).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with reporting_user_errors(args.debug):
        out = make_reference_samples(args.ckpt, args.n_per_class, args.out, args.tokenizer, args.batch_size,
                                     args.seed, args.mixed_precision, args.device)
        log.info("wrote %s", out)


if __name__ == "__main__":
    main()
