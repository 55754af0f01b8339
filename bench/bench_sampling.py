"""One guided sampling step at VAR-d16's last scale: unfused reference vs fused, ratio printed.

    python bench/bench_sampling.py [--device cpu|cuda] [--repeats 7]

Shape: B = 16 images, l = 16 x 16 = 256 tokens, V = 4096; CFG doubles the batch, so the model returns
(2B, l, V) logits whose halves are the conditional and null-class rows. t = 1.5 (VAR-d16's w = 1.5 ramp at the
last scale), top_k = 900, top_p = 0.96 (VAR's FID settings). Fused = "torch" (lean) on the CPU and "triton"
on CUDA (the lean torch path is timed there too). Medians over --repeats, implementations interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from var_mclr.kernels import guided_sample  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--l", type=int, default=256)
    ap.add_argument("--V", type=int, default=4096)
    ap.add_argument("--t", type=float, default=1.5)
    ap.add_argument("--top_k", type=int, default=900)
    ap.add_argument("--top_p", type=float, default=0.96)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = "triton" if device.type == "cuda" else "torch"
    impls = ["naive", fused] + (["torch"] if device.type == "cuda" else [])

    g = torch.Generator(device="cpu").manual_seed(0)
    logits_2BlV = (torch.randn(2 * args.B, args.l, args.V, generator=g) * 3).to(device)
    cond, uncond = logits_2BlV[: args.B], logits_2BlV[args.B :]
    gens = {k: torch.Generator(device=device).manual_seed(1) for k in impls}

    def run(k):
        return guided_sample(cond, uncond, args.t, args.top_k, args.top_p, gens[k], impl=k)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in impls}
    for k in impls:
        run(k)  # warm-up (Triton compilation, allocator)
    for _ in range(args.repeats):
        for k in impls:
            sync()
            t0 = time.perf_counter()
            run(k)
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device: {device.type}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B={args.B} l={args.l} V={args.V} (CFG: {2 * args.B} rows of logits), t={args.t}, "
          f"top_k={args.top_k}, top_p={args.top_p}, median of {args.repeats}\n")
    print("| impl | step ms | time / naive |")
    print("|---|---:|---:|")
    for k in impls:
        print(f"| {k} | {med[k] * 1e3:.1f} | {med[k] / med['naive']:.2f} |")


if __name__ == "__main__":
    main()
