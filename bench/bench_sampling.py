"""Sampling: guidance-free vs CFG (tokens only and end to end), and the guided sampling step (unfused vs fused),
each table measured side by side in one run.

    python bench/bench_sampling.py [--device cpu|cuda] [--threads 1] [--repeats 7] [--compile]

Whole sampling at VAR shapes scaled to the CPU: depth 6, width 384 (6 heads), patch_nums 1,2,3,4,6,8 (L = 130),
V = 512, 1000 classes, B = 16 images, top-k 128, top-p 0.96, CFG w = 1.5 (linear ramp). "tokens" runs the transformer
and the guided sampling step at every scale; "end to end" adds the tokenizer's decoder (VQVAE, ch 64, 128 px).
Bound: CFG pushes 2B rows through the transformer and guidance-free B, so CFG / guidance-free is at most 2 for tokens
(the per-scale sampling step and the tokenizer run on B rows in both) and lower end to end, where the decoder's time
is shared. --compile adds the compiled per-scale forward (SamplingConfig.compile) beside eager, with its compile time.

Guided sampling step at VAR-d16's last scale: B = 16 images, l = 16 x 16 = 256 tokens, V = 4096; CFG doubles the
batch, so the model returns (2B, l, V) logits whose halves are the conditional and null-class rows. t = 1.5 (VAR-d16's
w = 1.5 ramp at the last scale), top_k = 900, top_p = 0.96 (VAR's FID settings). Fused = "torch" (lean) on the CPU and
"triton" on CUDA (the lean torch path is timed there too).

Medians over --repeats with the implementations interleaved (A B A B ...), so contention hits each alike; the spread
is the interquartile range of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer.model import VQVAE, VQVAEConfig  # noqa: E402
from var_mclr.kernels import guided_sample  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402
from var_mclr.sampling import SamplingConfig, sample_tokens  # noqa: E402

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, list]:
    """Seconds per call of every run, one call of each per repeat in turn, after one warm-up call each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list], a: str, b: str) -> str:
    """Median a / b with the interquartile range of the per-repeat ratios."""
    r = sorted(x / y for x, y in zip(times[a], times[b]))
    return f"{statistics.median(r):.2f} ({r[len(r) // 4]:.2f}-{r[(3 * len(r)) // 4]:.2f})"


def ms(times: dict[str, list], k: str) -> str:
    return f"{statistics.median(times[k]) * 1e3:.0f}"


def bench_step(args, device: torch.device, sync: Callable[[], None]) -> None:
    fused = "triton" if device.type == "cuda" else "torch"
    impls = ["naive", fused] + (["torch"] if device.type == "cuda" else [])
    B, l, V = 16, 256, 4096
    g = torch.Generator(device="cpu").manual_seed(0)
    logits_2BlV = (torch.randn(2 * B, l, V, generator=g) * 3).to(device)
    cond, uncond = logits_2BlV[:B], logits_2BlV[B:]
    gens = {k: torch.Generator(device=device).manual_seed(1) for k in impls}
    runs = {k: (lambda k=k: guided_sample(cond, uncond, 1.5, 900, 0.96, gens[k], impl=k)) for k in impls}
    times = interleaved(runs, args.repeats, sync)
    print(f"\nGuided sampling step: B={B} l={l} V={V} (CFG: {2 * B} rows of logits), t=1.5, top_k=900, top_p=0.96\n")
    print("| impl | step ms | time / naive |")
    print("|---|---:|---:|")
    for k in impls:
        print(f"| {k} | {ms(times, k)} | {ratio(times, k, 'naive')} |")


def bench_sampling(args, device: torch.device, sync: Callable[[], None]) -> None:
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=512, z_channels=32, ch=64, v_patch_nums=PATCH_NUMS)).to(device).eval()
    var = VAR(VARConfig(vocab_size=512, Cvae=32, num_classes=1000, depth=args.depth, embed_dim=args.width,
                        num_heads=max(1, args.width // 64), patch_nums=PATCH_NUMS)).to(device).eval()
    var.init_weights()
    label_B = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(0)).to(device)
    configs = {"none": SamplingConfig(guidance="none", top_k=128, top_p=0.96),
               "cfg": SamplingConfig(guidance="cfg", cfg_scale=1.5, top_k=128, top_p=0.96)}

    def tokens(cfg: SamplingConfig) -> Callable[[], object]:
        return lambda: sample_tokens(var, vae.quantize, label_B, cfg, torch.Generator(device=device).manual_seed(0))

    def end_to_end(cfg: SamplingConfig) -> Callable[[], object]:
        return lambda: vae.fhat_to_img(tokens(cfg)().f_hat)

    runs = {f"{k} tokens": tokens(c) for k, c in configs.items()}
    runs.update({f"{k} end to end": end_to_end(c) for k, c in configs.items()})
    compile_s = {}
    if args.compile:
        for k, c in configs.items():
            compiled = SamplingConfig(**{**c.__dict__, "compile": True})
            t0 = time.perf_counter()
            tokens(compiled)()  # the first call compiles (dynamic shapes: one compilation for every scale)
            compile_s[k] = time.perf_counter() - t0
            runs[f"{k} tokens, compiled"] = tokens(compiled)
    with torch.no_grad():
        times = interleaved(runs, args.repeats, sync)
    print(f"\nSampling: VAR depth {args.depth} width {args.width}, patch_nums {','.join(map(str, PATCH_NUMS))} "
          f"(L = {var.L}), V = 512, B = {args.batch}, top_k 128, top_p 0.96, CFG w = 1.5, decoder VQVAE ch 64 "
          f"({vae.downsample * PATCH_NUMS[-1]} px)\n")
    print("| what | guidance-free ms | CFG ms | CFG / guidance-free (IQR) | bound |")
    print("|---|---:|---:|---:|---:|")
    print(f"| tokens | {ms(times, 'none tokens')} | {ms(times, 'cfg tokens')} | "
          f"{ratio(times, 'cfg tokens', 'none tokens')} | 2 |")
    print(f"| end to end | {ms(times, 'none end to end')} | {ms(times, 'cfg end to end')} | "
          f"{ratio(times, 'cfg end to end', 'none end to end')} | < 2 |")
    if args.compile:
        print("\n| compiled tokens | eager ms | compiled ms | compiled / eager (IQR) | first call (compile) s |")
        print("|---|---:|---:|---:|---:|")
        for k in configs:
            print(f"| {k} | {ms(times, f'{k} tokens')} | {ms(times, f'{k} tokens, compiled')} | "
                  f"{ratio(times, f'{k} tokens, compiled', f'{k} tokens')} | {compile_s[k]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also time the compiled per-scale forward")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"device: {device.type}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, implementations interleaved")
    bench_sampling(args, device, sync)
    bench_step(args, device, sync)


if __name__ == "__main__":
    main()
