"""One training step (forward + backward + AdamW) per objective at the same batch: time and peak memory as
ratios to nll, measured side by side in one run.

    python bench/bench_train_step.py [--depth 4] [--width 256] [--batch 4] [--repeats 5]

The VAR keeps the 256-px head shapes (L = 680 tokens, V = 4096, 1000 classes) with a shallow backbone so the CPU run
finishes; pass --depth 16 --width 1024 on a GPU for VAR-d16. Each objective's bound is the work it must do relative
to nll, counting a row scored with gradients as 1 and a no-grad row as 1/3 (a forward is about a third of
forward + backward):
- mclr K scores 1 + K rows with gradients; cca and cc_dpo score 2 with gradients plus 2 by the frozen reference.
- nll strength_cond: nll on the strength-conditioned VAR (model.strength_cond) that gft and the dial train: 1 row, 1.
- mclr dial K=1 (loss.mclr.lam_range [0.3, 10], log draw, on that VAR): the rows of mclr K=1, 2.
- gft (loss.gft.beta random, on that VAR): its conditional pass with gradients plus its unconditional one without,
  1 + 1/3; its loss keeps the (L, V) logits where the others use the fused head (Objective.logits_per_row).
- ddo: B data rows and F = B reference-sample rows (train.py: one per data image, the process's share of the global
  micro-batch) with gradients, plus the reference on both, 2 + 2/3.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_logprob import peak_bytes, time_all  # noqa: E402

from tokenizer.model import VAR_256_PATCH_NUMS, VQVAE, VQVAEConfig  # noqa: E402
from var_mclr.builders import frozen_copy  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402
from var_mclr.objectives import OBJECTIVES, ExtraRows, LossConfig, objective_loss  # noqa: E402
from var_mclr.sample_store import ReferenceSamples  # noqa: E402

DIAL = [0.3, 10.0]  # configs/mnist/mclr_dial.yaml's range
BOUNDS = {"nll": 1.0, "mclr K=1": 2.0, "mclr K=3": 4.0, "cca": 2 + 2 / 3, "cc_dpo": 2 + 2 / 3,
          "nll strength_cond": 1.0, "mclr dial K=1": 2.0, "gft": 1 + 1 / 3, "ddo": 2 + 2 / 3}


def build_var(args, device: torch.device, strength_cond: bool = False) -> VAR:
    torch.manual_seed(0)
    var = VAR(VARConfig(num_classes=1000, depth=args.depth, embed_dim=args.width, num_heads=max(1, args.width // 64),
                        patch_nums=VAR_256_PATCH_NUMS, strength_cond=strength_cond)).to(device)
    var.init_weights()
    return var


def sample_rows(var: VAR, batch: int, device: torch.device) -> ExtraRows:
    """DDO's rows of one micro-step as train.py draws them (ReferenceSamples.rows: this process's share of a global
    micro-batch of `batch` samples, F = B), from a set of random tokens; their teacher-forcing input comes from a
    narrow random tokenizer's quantizer, whose codebook shapes are VAR's (V, Cvae)."""
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=var.V, z_channels=var.Cvae, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=0,
                            v_patch_nums=VAR_256_PATCH_NUMS)).to(device).eval()
    g = torch.Generator().manual_seed(2)
    idx_NL = torch.randint(0, var.V, (4 * batch, var.L), generator=g, dtype=torch.int32)  # stored as int32, as a set
    label_N = torch.randint(0, 1000, (4 * batch,), generator=g)
    return ReferenceSamples(idx_NL, label_N, vae, device).rows(0, 0, batch, slice(0, batch))


def step_for(name, var, ref, opt, data, K=1, lam_range=None, extra=None):
    """One step of objective `name`, through the trainer's calls: its planner, then objective_loss."""
    objective, loss_cfg = OBJECTIVES[name], LossConfig()
    loss_cfg.mclr.tau = 0.1  # a number: "auto" is resolved by the trainer from a real starting model
    loss_cfg.mclr.K = K
    loss_cfg.mclr.lam_range, loss_cfg.mclr.lam_draw = lam_range, "log"  # None: no dial
    idx_BL, x_BLCv, label_B = data

    def run():
        plan = objective.plan(loss_cfg, label_B, 1000, 0.0, torch.Generator().manual_seed(1))
        loss, _ = objective_loss(objective, loss_cfg, var, ref, plan, idx_BL, x_BLCv, extra)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def build_steps(args, device: torch.device):
    """The steps of every row, and a reset that clears every optimizer's gradients."""
    var, var_s = build_var(args, device), build_var(args, device, strength_cond=True)
    ref = frozen_copy(var).to(device)
    opt, opt_s = (torch.optim.AdamW(v.parameters(), lr=1e-6) for v in (var, var_s))
    g = torch.Generator().manual_seed(0)
    idx_BL = torch.randint(0, var.V, (args.batch, var.L), generator=g).to(device)
    x_BLCv = torch.randn(args.batch, var.L - 1, var.Cvae, generator=g).to(device)
    data = (idx_BL, x_BLCv, torch.randint(0, 1000, (args.batch,), generator=g))
    runs = {"nll": step_for("nll", var, ref, opt, data), "mclr K=1": step_for("mclr", var, ref, opt, data),
            "mclr K=3": step_for("mclr", var, ref, opt, data, K=3), "cca": step_for("cca", var, ref, opt, data),
            "cc_dpo": step_for("cc_dpo", var, ref, opt, data),
            "nll strength_cond": step_for("nll", var_s, None, opt_s, data),
            "mclr dial K=1": step_for("mclr", var_s, None, opt_s, data, lam_range=DIAL),
            "gft": step_for("gft", var_s, None, opt_s, data),
            "ddo": step_for("ddo", var, ref, opt, data, extra=sample_rows(var, args.batch, device))}

    def reset():
        for o in (opt, opt_s):
            o.zero_grad(set_to_none=True)

    return runs, reset, var.L, var.V


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
    runs, reset, L, V = build_steps(args, device)
    times = time_all(runs, device, args.repeats)
    peaks = {name: peak_bytes(run, reset, device) for name, run in runs.items()}
    print(f"device {device}, VAR depth {args.depth} width {args.width}, batch {args.batch}, L {L}, "
          f"V {V}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print("| objective | time per image (ms) | time / nll | bound / nll | peak per image (MiB) | peak / nll |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs:
        print(f"| {name} | {times[name] * 1e3 / args.batch:.0f} | {times[name] / times['nll']:.2f} | "
              f"{BOUNDS[name]:.2f} | {peaks[name] / 2**20 / args.batch:.0f} | {peaks[name] / peaks['nll']:.2f} |")
    print(f"mclr K=1 / cca: time {times['mclr K=1'] / times['cca']:.2f} (bound {2 / (2 + 2 / 3):.2f}), "
          f"peak {peaks['mclr K=1'] / peaks['cca']:.2f}")


if __name__ == "__main__":
    main()
