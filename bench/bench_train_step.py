"""One training step (forward + backward + AdamW) per objective at the same batch: time and peak memory as
ratios to nll, measured side by side in one run.

    python bench/bench_train_step.py [--depth 4] [--width 256] [--batch 4] [--repeats 5]

The VAR keeps the 256-px head shapes (L = 680 tokens, V = 4096, 1000 classes) with a shallow backbone so the CPU run
finishes; pass --depth 16 --width 1024 on a GPU for VAR-d16. Each objective's bound is the work it must do relative
to nll, counting a row scored with gradients as 1 and a no-grad reference row as 1/3 (a forward is about a third of
forward + backward): mclr K scores 1 + K rows with gradients; cca and cc_dpo score 2 with gradients plus 2 by the
frozen reference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_logprob import peak_bytes, time_all  # noqa: E402

from tokenizer.model import VAR_256_PATCH_NUMS  # noqa: E402
from var_mclr.builders import frozen_copy  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402
from var_mclr.objectives import OBJECTIVES, LossConfig, objective_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    var = VAR(VARConfig(num_classes=1000, depth=args.depth, embed_dim=args.width, num_heads=max(1, args.width // 64),
                        patch_nums=VAR_256_PATCH_NUMS)).to(device)
    var.init_weights()
    ref = frozen_copy(var).to(device)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    idx_BL = torch.randint(0, var.V, (args.batch, var.L), generator=g).to(device)
    x_BLCv = torch.randn(args.batch, var.L - 1, var.Cvae, generator=g).to(device)
    label_B = torch.randint(0, 1000, (args.batch,), generator=g)

    def step_for(name, K=1):
        objective, loss_cfg = OBJECTIVES[name], LossConfig()
        loss_cfg.mclr.tau = 0.1  # a number: "auto" is resolved by the trainer from a real starting model
        loss_cfg.mclr.K = K

        def run():
            plan = objective.plan(loss_cfg, label_B, 1000, 0.0, torch.Generator().manual_seed(1))
            loss, _ = objective_loss(objective, loss_cfg, var, ref, plan, idx_BL, x_BLCv)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    runs = {"nll": step_for("nll"), "mclr K=1": step_for("mclr"), "mclr K=3": step_for("mclr", K=3),
            "cca": step_for("cca"), "cc_dpo": step_for("cc_dpo")}
    bounds = {"nll": 1.0, "mclr K=1": 2.0, "mclr K=3": 4.0, "cca": 2 + 2 / 3, "cc_dpo": 2 + 2 / 3}
    times = time_all(runs, device, args.repeats)
    peaks = {name: peak_bytes(run, lambda: opt.zero_grad(set_to_none=True), device) for name, run in runs.items()}
    print(f"device {device}, VAR depth {args.depth} width {args.width}, batch {args.batch}, L {var.L}, "
          f"V {var.V}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print("| objective | time per image (ms) | time / nll | bound / nll | peak per image (MiB) | peak / nll |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs:
        print(f"| {name} | {times[name] * 1e3 / args.batch:.0f} | {times[name] / times['nll']:.2f} | "
              f"{bounds[name]:.2f} | {peaks[name] / 2**20 / args.batch:.0f} | {peaks[name] / peaks['nll']:.2f} |")
    print(f"mclr K=1 / cca: time {times['mclr K=1'] / times['cca']:.2f} (bound {2 / (2 + 2 / 3):.2f}), "
          f"peak {peaks['mclr K=1'] / peaks['cca']:.2f}")


if __name__ == "__main__":
    main()
