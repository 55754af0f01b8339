"""The cost of train.activation_checkpointing: forward + backward time and peak memory of a VAR with and without it,
measured side by side (alternating runs) in one process.

    OMP_NUM_THREADS=1 python bench/bench_checkpointing.py [--depth 2 --width 1024 --rows 1 --repeats 3]

Defaults: two blocks at VAR-d16's width, L = 680 (256 px), V = 4096, one row, fp32, on the CPU (about a minute).
Checkpointing adds one forward of every block to the backward: the expected time ratio is about
(3 F_blocks + 4 F_head + F_blocks) / (3 F_blocks + 4 F_head) with F from var_mclr.plan.forward_flops_per_row.
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
from tokenizer.model import VAR_256_PATCH_NUMS  # noqa: E402
from var_mclr.memprobe import peak_bytes  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402

log = logging.getLogger("bench.checkpointing")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    var = VAR(VARConfig(depth=args.depth, embed_dim=args.width, num_heads=args.width // 64,
                        patch_nums=VAR_256_PATCH_NUMS), logprob_impl="chunked")
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 1000, (args.rows,), generator=g)
    x = torch.randn(args.rows, var.L - 1, var.Cvae, generator=g)
    idx = torch.randint(0, var.V, (args.rows, var.L), generator=g)

    def step(ckpt: bool):
        var.activation_checkpointing = ckpt
        var(label, x, target_BL=idx).sum().backward()
        var.zero_grad(set_to_none=True)

    times = {False: [], True: []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for ckpt in (False, True):
            t0 = time.perf_counter()
            step(ckpt)
            times[ckpt].append(time.perf_counter() - t0)
    peaks = {ckpt: peak_bytes(lambda: step(ckpt)) for ckpt in (False, True)}
    t_off, t_on = (statistics.median(times[c][1:]) for c in (False, True))
    log.info("depth %d width %d rows %d L %d: fwd+bwd %.2f s without, %.2f s with checkpointing (x%.2f); peak %.0f "
             "MB without, %.0f MB with (x%.2f; weights' grads included)", args.depth, args.width, args.rows, var.L,
             t_off, t_on, t_on / t_off, peaks[False] / 1e6, peaks[True] / 1e6, peaks[True] / peaks[False])


if __name__ == "__main__":
    main()
