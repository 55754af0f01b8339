"""Host time per training step spent on the data path at ImageNet's size (1,281,167 images), as var_mclr/train.py
does it on one of 8 processes: the DataLoader sampler's indices, the loop's own indices, the objective's class plan,
the flip draw and the per-step generator. The images themselves are decoded by DataLoader workers and encoded on the
GPU, off this path; the flip now runs on the device, so the CPU flip it replaced is timed for comparison only.

    OMP_NUM_THREADS=1 python bench/bench_data_path.py [--images 1281167 --global-batch 256 --world 8 --steps 200]

Prints the median and 95th percentile of host milliseconds per step, with and without the per-epoch permutation
cache (the old path drew a permutation of the whole dataset twice per micro-step).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from var_mclr import batches  # noqa: E402
from var_mclr.objectives import LossConfig, get_objective  # noqa: E402

log = logging.getLogger("bench.data_path")


def host_step(labels_N, sampler_iter, seed: int, step: int, accum: int, global_micro: int, mine: slice,
              objective, loss_cfg) -> None:
    """The host work of one optimizer step of train.py's loop (rank 0's share), without the model."""
    for micro in range(accum):
        next(sampler_iter)  # the DataLoader's batch sampler runs in the main process too
        gen = batches.step_generator(seed, step, micro)
        idx_G = batches.batch_indices(seed, step * accum + micro, global_micro, len(labels_N))
        plan = objective.plan(loss_cfg, labels_N[idx_G], 1000, 0.0, gen)
        flip_G = torch.rand(global_micro, generator=gen) < 0.5
        plan.slice(mine), idx_G[mine], flip_G[mine]


def time_steps(args, cached: bool) -> list[float]:
    n, world = args.images, args.world
    micro = args.global_batch // world // args.accum
    labels_N = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    if not cached:  # the old path: a fresh permutation on every call
        batches.epoch_permutation.cache_clear()
        original = batches.epoch_permutation
        batches.epoch_permutation = original.__wrapped__
    sampler = iter(batches.RankBatchSampler(0, micro * world, n, 0, micro, 0, 10 ** 9))
    loss_cfg = LossConfig()
    out = []
    try:
        for step in range(args.steps + 5):
            t0, c0 = time.perf_counter(), time.thread_time()
            host_step(labels_N, sampler, 0, step, args.accum, micro * world, slice(0, micro), get_objective("mclr"),
                      loss_cfg)
            out.append((time.perf_counter() - t0, time.thread_time() - c0))
    finally:
        if not cached:
            batches.epoch_permutation = original
    return out[5:]


def cpu_flip_ms(micro: int, resolution: int = 256) -> float:
    img = torch.randn(micro, 3, resolution, resolution)
    flip = torch.rand(micro) < 0.5
    t0 = time.perf_counter()
    for _ in range(5):
        torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img)
    return (time.perf_counter() - t0) / 5 * 1e3


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    log.info("%d images, global batch %d over %d processes, %d accumulation; host ms per step (rank 0):",
             args.images, args.global_batch, args.world, args.accum)
    for cached, name in ((True, "permutation once per epoch"), (False, "old: permutation per call")):
        args.steps = args.steps if cached else min(args.steps, 20)  # the old path is slow
        wall, cpu = zip(*time_steps(args, cached))
        ms = sorted(1e3 * t for t in wall)
        log.info("  %-28s wall median %7.2f ms, p95 %7.2f ms; CPU time mean %7.2f ms (wall includes waiting for "
                 "a core on a shared machine)", name, statistics.median(ms), ms[int(0.95 * (len(ms) - 1))],
                 1e3 * statistics.mean(cpu))
    log.info("  (moved to the device) CPU flip of the %d-image micro-batch: %.1f ms",
             args.global_batch // args.world, cpu_flip_ms(args.global_batch // args.world))


if __name__ == "__main__":
    main()
