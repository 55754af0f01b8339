"""Our VAR beside the official FoundationVision/VAR code: a training step and CFG sampling, same shapes, same weights.

    git clone https://github.com/FoundationVision/VAR /tmp/official_var   # anywhere outside this repository
    python bench/bench_official.py --official-root /tmp/official_var [--threads 1] [--repeats 11]

The official code is never part of this repository: it is imported from --official-root at run time, and without
it this script says so and exits (it is not run by `make bench` or CI). Shapes: depth 6, width 384 (6 heads),
patch_nums 1,2,3,4,6,8 (L = 130), V = 512, 1000 classes; flash/fused kernels off in the official model (the CPU has
none). Our model loads the official state dict (the parameter names match) and its logits are checked against the
official ones first.

- train step: forward + backward + grad clip + AdamW (the same optimizer settings for both). Official: its forward
  (class dropout 0.1) and CrossEntropyLoss(reduction="none") weighted 1/L, as its trainer does; ours: the nll
  objective (class dropout 0.1) through the fused token log-prob kernel, as var_mclr/train.py does.
- CFG sampling, tokens only: official autoregressive_infer_cfg (its final decode replaced by the identity on that
  instance) vs our sample_tokens, w = 1.5, top-k 128, top-p 0.96; both run 2B rows through the transformer.
Ratio = ours / official time: median and interquartile range of the per-repeat ratios, the two interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer.model import VQVAE, VQVAEConfig  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402
from var_mclr.objectives import OBJECTIVES, LossConfig, objective_loss  # noqa: E402
from var_mclr.sampling import SamplingConfig, sample_tokens  # noqa: E402

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def import_official(root: Path):
    """The official VQVAE and VAR classes, imported from a checkout outside this repository."""
    sys.path.insert(0, str(root))
    try:
        from models.var import VAR as OfficialVAR
        from models.vqvae import VQVAE as OfficialVQVAE
    finally:
        sys.path.remove(str(root))
    return OfficialVQVAE, OfficialVAR


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return times


def row(what: str, times: dict[str, list[float]]) -> str:
    r = sorted(a / b for a, b in zip(times["ours"], times["official"]))
    return (f"| {what} | {statistics.median(times['official']) * 1e3:.0f} | {statistics.median(times['ours']) * 1e3:.0f}"
            f" | {statistics.median(r):.3f} ({r[len(r) // 4]:.3f}-{r[(3 * len(r)) // 4]:.3f}) |")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", type=Path, default=None, help="an extracted FoundationVision/VAR checkout")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args()


def build_pair(args: argparse.Namespace):
    """(official tokenizer, official VAR, our tokenizer, our VAR) with the same random weights."""
    OfficialVQVAE, OfficialVAR = import_official(args.official_root.resolve())
    torch.manual_seed(0)
    o_vae = OfficialVQVAE(vocab_size=512, z_channels=32, ch=32, test_mode=True, share_quant_resi=4,
                          v_patch_nums=PATCH_NUMS)
    official = OfficialVAR(o_vae, num_classes=1000, depth=args.depth, embed_dim=args.width,
                           num_heads=args.width // 64, drop_path_rate=0.0, cond_drop_rate=0.0, attn_l2_norm=True,
                           patch_nums=PATCH_NUMS, flash_if_available=False, fused_if_available=False)
    official.init_weights(init_std=-1)
    vae = VQVAE(VQVAEConfig(vocab_size=512, z_channels=32, ch=32, v_patch_nums=PATCH_NUMS))
    vae.load_state_dict(o_vae.state_dict())
    vae.eval().requires_grad_(False)
    o_vae.eval().requires_grad_(False)
    ours = VAR(VARConfig(vocab_size=512, Cvae=32, num_classes=1000, depth=args.depth, embed_dim=args.width,
                         num_heads=args.width // 64, patch_nums=PATCH_NUMS))
    ours.load_state_dict(official.state_dict())
    return o_vae, official, vae, ours


def train_step_times(official, ours, batch: tuple, repeats: int) -> dict[str, list[float]]:
    """One optimizer step of each (nll, 10% class dropout, clipping), interleaved."""
    idx_BL, x_BLCv, label_B = batch
    B = len(label_B)
    official.train(), ours.train()
    official.cond_drop_rate = 0.1
    loss_weight_1L = torch.full((1, ours.L), 1 / ours.L)
    cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.05)
            for m in (official, ours)}
    nll, loss_cfg = OBJECTIVES["nll"], LossConfig()

    def official_step() -> None:
        logits_BLV = official(label_B, x_BLCv)
        loss = cross_entropy(logits_BLV.view(-1, 512), idx_BL.view(-1)).view(B, -1).mul(loss_weight_1L).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(official.parameters(), 2.0)
        opts[official].step()
        opts[official].zero_grad(set_to_none=True)

    def our_step() -> None:
        plan = nll.plan(loss_cfg, label_B, 1000, 0.1, torch.Generator().manual_seed(1))
        loss, _ = objective_loss(nll, loss_cfg, ours, None, plan, idx_BL, x_BLCv)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 2.0)
        opts[ours].step()
        opts[ours].zero_grad(set_to_none=True)

    return interleaved({"official": official_step, "ours": our_step}, repeats)


def sampling_times(o_vae, official, vae, ours, labels_S: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """CFG sampling of tokens (no decoding) by each, interleaved."""
    official.eval(), ours.eval()
    o_vae.fhat_to_img = lambda f_hat: f_hat  # tokens only: the official sampler always decodes at its end
    S = len(labels_S)
    cfg = SamplingConfig(guidance="cfg", cfg_scale=1.5, top_k=128, top_p=0.96)
    return interleaved({
        "official": lambda: official.autoregressive_infer_cfg(S, labels_S, g_seed=0, cfg=1.5, top_k=128, top_p=0.96),
        "ours": lambda: sample_tokens(ours, vae.quantize, labels_S, cfg, torch.Generator().manual_seed(0)),
    }, repeats)


def main() -> None:
    args = parse_args()
    if args.official_root is None or not (args.official_root / "models" / "var.py").is_file():
        print(f"skipped: --official-root must point at an extracted FoundationVision/VAR checkout "
              f"(models/var.py), got {args.official_root}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    o_vae, official, vae, ours = build_pair(args)
    g = torch.Generator().manual_seed(0)
    B = args.train_batch
    idx_BL = torch.randint(0, 512, (B, ours.L), generator=g)
    x_BLCv = torch.randn(B, ours.L - 1, 32, generator=g)
    label_B = torch.randint(0, 1000, (B,), generator=g)
    official.eval(), ours.eval()
    with torch.no_grad():
        gap = (official(label_B, x_BLCv) - ours(label_B, x_BLCv)).abs().max().item()
    print(f"threads {torch.get_num_threads()}, depth {args.depth}, width {args.width}, L {ours.L}, V 512; "
          f"max |logits ours - official| = {gap:.2g}")
    train_times = train_step_times(official, ours, (idx_BL, x_BLCv, label_B), args.repeats)
    S = args.sample_batch
    sample_times = sampling_times(o_vae, official, vae, ours, torch.randint(0, 1000, (S,), generator=g), args.repeats)
    print(f"median of {args.repeats}, interleaved\n")
    print("| what | official ms | ours ms | ours / official (IQR) |")
    print("|---|---:|---:|---:|")
    print(row(f"train step, batch {B}", train_times))
    print(row(f"CFG sampling (tokens), batch {S} ({2 * S} rows)", sample_times))


if __name__ == "__main__":
    main()
