"""Forward+backward of token_logprobs at VAR-d16 head shapes: naive vs fused, one run, ratios printed.

    python bench/bench_logprob.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 5]

Shapes: N = 8 x 680 tokens (batch 8 at 256px), C = 1024, V = 4096, and 2N (MCLR with K = 1 evaluates the
true class and one mismatched class in one batched pass). The backward uses random per-token weights, as the
MCLR loss does (a plain mean would let an implementation cheat with a uniform gradient).

Fused = chunked on the CPU, triton on CUDA (chunked is also timed there). On CUDA a "matmuls" row times the
head alone (F.linear forward plus its two backward matmuls, no softmax), the floor any fused kernel is
compared with.

Peak memory is measured above what exists before the call (inputs), over forward+backward, grads included:
CUDA via torch.cuda.max_memory_allocated; CPU by replaying the profiler's allocator events (every torch
CPU allocation and free, in time order), which sees exactly what tracemalloc cannot.
"fwd-only" times the no-grad forward (scoring). Timings are medians over --repeats runs with the
implementations interleaved, so background load drifts affect all of them alike. On a shared 2-core machine,
--threads 1 gives steadier ratios (one busy neighbour stalls every 2-thread parallel region).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from var_mclr.kernels import token_logprobs  # noqa: E402


def make_inputs(N, C, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, C, generator=g).to(device, dtype)
    w = (torch.randn(V, C, generator=g) / C**0.5 * 3).to(device, dtype)
    b = torch.randn(V, generator=g).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    gout = torch.randn(N, generator=g).to(device)
    return h, w, b, t, gout


def step_fn(impl, h, w, b, t, gout):
    leaves = [x.detach().requires_grad_(True) for x in (h, w, b)]

    def run():
        for x in leaves:
            x.grad = None
        if impl == "matmuls":
            logits = F.linear(*leaves)
            logits.backward(gout[:, None].to(logits.dtype).expand_as(logits))
        else:
            logp = token_logprobs(leaves[0], leaves[1], leaves[2], t, impl=impl)
            (logp * gout).sum().backward()

    def reset():
        for x in leaves:
            x.grad = None

    @torch.no_grad()
    def forward_only():  # scoring without gradients (eval, likelihood under many classes)
        if impl == "matmuls":
            F.linear(*leaves)
        else:
            token_logprobs(leaves[0], leaves[1], leaves[2], t, impl=impl)

    return run, reset, forward_only


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(run, reset, device):
    reset()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for _, nbytes in sorted(events, key=lambda x: x[0]):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def time_all(runs, device, repeats):
    times = {k: [] for k in runs}
    for run in runs.values():  # warm-up (allocator, thread pools, Triton compilation)
        run()
    for _ in range(repeats):
        for k, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=8 * 680)
    ap.add_argument("--C", type=int, default=1024)
    ap.add_argument("--V", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    fused = "triton" if device.type == "cuda" else "chunked"
    impls = ["naive", fused] + (["chunked", "matmuls"] if device.type == "cuda" else [])

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device.type} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {dtype}, C={args.C}, V={args.V}, median of {repeats}\n")
    print("| tokens | impl | fwd+bwd ms | peak MiB | time / naive | peak / naive | fwd-only ms | fwd / naive |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in (args.tokens, 2 * args.tokens):
        inputs = make_inputs(n, args.C, args.V, dtype, device)
        runs = {k: step_fn(k, *inputs) for k in impls}
        times = time_all({k: r[0] for k, r in runs.items()}, device, repeats)
        fwd = time_all({k: r[2] for k, r in runs.items()}, device, repeats)
        peaks = {k: peak_bytes(run, reset, device) for k, (run, reset, _) in runs.items()}
        for k in impls:
            print(f"| {n} | {k} | {times[k] * 1e3:.1f} | {peaks[k] / 2**20:.1f} | "
                  f"{times[k] / times['naive']:.2f} | {peaks[k] / peaks['naive']:.2f} | "
                  f"{fwd[k] * 1e3:.1f} | {fwd[k] / fwd['naive']:.2f} |")
        if device.type == "cuda":
            print(f"| {n} | {fused} / matmuls | | | {times[fused] / times['matmuls']:.2f} | | | "
                  f"{fwd[fused] / fwd['matmuls']:.2f} |")
        del runs, inputs


if __name__ == "__main__":
    main()
