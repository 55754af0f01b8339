"""Peak host memory of eval/fid.py at two sample counts, at 256 px with Inception features.

    python bench/bench_eval_memory.py [--counts 100 400]

A random tokenizer with VAR's 256 px patch schedule (1..16, narrow and shallow so the CPU decodes it quickly), a
random 2-block VAR over it, random TF-FID-layout Inception weights and a 256 px ADM-layout reference batch. Each count
runs in its own process, its RSS read once a second: the peak (a per-batch transient of the decoder and Inception)
and the low point between batches over the second half (what stays resident), beside the bound the shards imply:
a fixed part (models, one batch) plus the feature network's outputs per sample (2048 + 1008 float32 with Inception:
12.2 KB), against 196.6 KB per sample for the uint8 images alone (786 KB as float32, what fid.py held before).
"""
from __future__ import annotations

import argparse
import json
import contextlib
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from tokenizer.model import VAR_256_PATCH_NUMS, VQVAE, VQVAEConfig
from var_mclr.checkpoints import save_model
from var_mclr.model import VAR, VARConfig

REPO = Path(__file__).resolve().parents[1]


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


def rss_trace_mb(work: Path, ckpt: Path, count: int, batch_size: int) -> list[float]:
    """RSS (MB) of one fid.py process scoring count samples, read from /proc once a second."""
    argv = [sys.executable, str(REPO / "eval" / "fid.py"), "--ckpt", str(ckpt), "--tokenizer",
            str(work / "tok.safetensors"), "--features", "inception", "--inception-weights",
            str(work / "inception.pth"), "--reference", str(work / "ref.npz"), "--num-samples", str(count),
            "--batch-size", str(batch_size), "--out-dir", str(work / f"out{count}")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace = []
    while proc.poll() is None:
        with contextlib.suppress(OSError, IndexError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            trace.append(int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024)
        time.sleep(1.0)
    if proc.returncode:
        raise SystemExit(f"fid.py failed for {count} samples (exit {proc.returncode})")
    return trace


def summary(trace: list[float]) -> dict:
    """Peak, and the low point between batches over the second half (what stays resident)."""
    return {"peak_mb": max(trace), "resident_second_half_mb": min(trace[len(trace) // 2:])}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs=2, default=[100, 400])
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = write_models(work)
        runs = {n: summary(rss_trace_mb(work, ckpt, n, args.batch_size)) for n in sorted(args.counts)}
    (lo, r_lo), (hi, r_hi) = sorted(runs.items())
    growth_kb = (r_hi["peak_mb"] - r_lo["peak_mb"]) * 1024 / (hi - lo)
    result = {"runs": runs, "peak_growth_kb_per_sample": growth_kb, "bound_kb_per_sample": 12.2,
              "uint8_image_kb_at_256px": 196.6, "float32_image_kb_at_256px": 786.4}
    print(json.dumps(result, indent=2))  # the benchmark's output, as the other bench/ scripts print theirs


if __name__ == "__main__":
    main()
