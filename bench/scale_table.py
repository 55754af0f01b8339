"""The README-ready table of docs/scale.md: what each ImageNet config needs, and its epoch time, on 8 x 80 GB,
8 x 40 GB and 4 x 80 GB, from the memory and time plan (var_mclr/plan.py).

    python bench/scale_table.py [--gpu-tflops 312 --mfu 0.35]

For every config and objective it takes the shipped settings when they fit; otherwise the first that fits of
train.micro_batch = auto, then activation checkpointing, then FSDP, then FSDP with checkpointing. Writes markdown to
stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from var_mclr import plan as plan_mod  # noqa: E402
from var_mclr.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETUPS = [(8, 80.0), (8, 40.0), (4, 80.0)]
OBJECTIVES = [("nll", "nll"), ("mclr", "mclr K=1"), ("cca", "cca / cc_dpo / unlearning")]


def _with(cfg, **train):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def first_fit(cfg, world: int, memory: float, tflops: float, mfu: float):
    """(what to change, plan) of the first setting that fits, or (None, plan at the smallest micro-batch)."""
    tries = [("shipped", cfg, "ddp"), ("micro_batch auto", _with(cfg, micro_batch="auto"), "ddp"),
             ("+ checkpointing", _with(cfg, micro_batch="auto", activation_checkpointing=True), "ddp"),
             ("FSDP", _with(cfg, micro_batch="auto"), "fsdp"),
             ("FSDP + checkpointing", _with(cfg, micro_batch="auto", activation_checkpointing=True), "fsdp")]
    p = None
    for name, c, sharding in tries:
        p = plan_mod.plan_config(c, world, memory, sharding, gpu_tflops=tflops, mfu=mfu)
        if p.fits:
            return name, p
    return None, p


def cell(cfg, world, memory, tflops, mfu) -> str:
    name, p = first_fit(cfg, world, memory, tflops, mfu)
    if name is None:
        return f"does not fit ({p.peak / plan_mod.GIB:.0f} GiB)"
    if name.startswith("FSDP"):
        name = f"needs {name} (configs/accelerate/fsdp.yaml)"
    return f"{name}: {p.micro_batch} x {p.grad_accum}, {p.peak / plan_mod.GIB:.0f} GiB, {p.epoch_s / 3600:.1f} h"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-tflops", type=float, default=plan_mod.GPU_TFLOPS)
    ap.add_argument("--mfu", type=float, default=plan_mod.MFU)
    args = ap.parse_args()
    head = " | ".join(f"{w} x {m:.0f} GB" for w, m in SETUPS)
    lines = [f"| config | objective | {head} |", "|---|---|" + "---|" * len(SETUPS)]
    for depth in (16, 20, 24, 30):
        for objective, label in OBJECTIVES:
            cfg = load_config(CONFIGS / f"var_d{depth}.yaml", [f"train.objective={objective}"], check_files=False)
            cells = [cell(cfg, w, m, args.gpu_tflops, args.mfu) for w, m in SETUPS]
            lines.append(f"| var_d{depth} ({plan_mod.arch(cfg).params / 1e9:.2f}B) | {label} | " + " | ".join(cells)
                         + " |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
