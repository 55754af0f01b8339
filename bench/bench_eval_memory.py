"""Peak host memory of eval/fid.py at two sample counts, at 256 px with Inception features.

    python bench/bench_eval_memory.py [--counts 100 400]

A random tokenizer with VAR's 256 px patch schedule (1..16, narrow and shallow so the CPU decodes it quickly), a
random 2-block VAR over it, random TF-FID-layout Inception weights and a 256 px ADM-layout reference batch. Each count
runs in its own process; the peak RSS of each is printed beside the bound the shards imply: a fixed part (models,
one batch) plus the feature network's outputs per sample (2048 + 1008 float32 with Inception: 12.2 KB), against
196.6 KB per sample for the uint8 images alone (786 KB as float32, what fid.py held before shards).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision

from tokenizer.model import VAR_256_PATCH_NUMS, VQVAE, VQVAEConfig
from var_mclr.checkpoints import save_model
from var_mclr.model import VAR, VARConfig

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.eval_memory")


def write_models(work: Path) -> Path:
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=0,
                            v_patch_nums=VAR_256_PATCH_NUMS, using_sa=False, using_mid_sa=False))
    save_model(vae, work / "tok")
    var = VAR(VARConfig(vocab_size=64, Cvae=8, num_classes=10, depth=2, embed_dim=32, num_heads=2,
                        patch_nums=VAR_256_PATCH_NUMS))
    var.init_weights()
    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), work / "inception.pth")
    rng = np.random.default_rng(0)
    with open(work / "ref.npz", "wb") as f:
        np.savez(f, arr_0=rng.integers(0, 256, (20, 256, 256, 3), dtype=np.uint8))
    return save_model(var, work / "var")


def peak_rss_mb(work: Path, ckpt: Path, count: int) -> float:
    """Peak RSS (MB) of one fid.py process scoring count samples (ru_maxrss of the finished child)."""
    argv = [sys.executable, str(REPO / "eval" / "fid.py"), "--ckpt", str(ckpt), "--tokenizer",
            str(work / "tok.safetensors"), "--features", "inception", "--inception-weights",
            str(work / "inception.pth"), "--reference", str(work / "ref.npz"), "--num-samples", str(count),
            "--batch-size", "50", "--out-dir", str(work / f"out{count}")]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(argv, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:  # ru_maxrss of children is the largest so far: counts must grow for it to read each run
        log.warning("peak of %d samples not above the earlier run's; run the counts in increasing order", count)
    return after / 1024


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs=2, default=[100, 400])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = write_models(work)
        peaks = {n: peak_rss_mb(work, ckpt, n) for n in sorted(args.counts)}
    (lo, p_lo), (hi, p_hi) = sorted(peaks.items())
    per_sample_kb = (p_hi - p_lo) * 1024 / (hi - lo)
    result = {"peak_rss_mb": peaks, "measured_kb_per_sample": per_sample_kb, "bound_kb_per_sample": 12.2,
              "uint8_image_kb_at_256px": 196.6, "float32_image_kb_at_256px": 786.4,
              "implied_gb_at_50000": (p_lo + per_sample_kb * (50_000 - lo) / 1024) / 1024}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
