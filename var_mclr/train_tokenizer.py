"""Train a multi-scale VQ-VAE tokenizer on the configured dataset (the embedded demo's own tokenizer).

    python -m var_mclr.train_tokenizer --cfg configs/mnist/tokenizer.yaml

Losses need no downloaded network: L1 + L2 reconstruction plus the quantiser's commitment/codebook loss. The
codebook is initialised from encoder outputs and unused codes are re-seeded from the current batch, so usage
stays high; the share of codes used per scale is logged. Real users load the official tokenizer instead.
Writes run.out_dir/model.safetensors (+ model.json); an existing result is never overwritten.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tokenizer.model import VQVAE
from var_mclr.checkpoints import save_model
from var_mclr.config import Config, config_arg_parser, load_config, vqvae_config
from var_mclr.data import build_dataset

log = logging.getLogger("var_mclr.train_tokenizer")


@torch.no_grad()
def reseed_dead_codes(vae: VQVAE, f_BChw: torch.Tensor, hits_V: torch.Tensor, generator: torch.Generator) -> int:
    """Replace codes no scale has used lately by random encoder vectors of this batch."""
    dead = (hits_V == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pool_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
    pick = torch.randint(0, pool_NC.shape[0], (dead.numel(),), generator=generator)
    vae.quantize.embedding.weight[dead] = pool_NC[pick] + 1e-3 * torch.randn(dead.numel(), pool_NC.shape[1],
                                                                             generator=generator)
    return dead.numel()


def train_tokenizer(cfg: Config) -> Path:
    out = Path(cfg.run.out_dir) / "model.safetensors"
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another run.out_dir (nothing was overwritten)")
    torch.manual_seed(cfg.run.seed)
    tc = cfg.tokenizer_train
    vae = VQVAE(vqvae_config(cfg.tokenizer))
    if vae.resolution != cfg.data.resolution:
        raise ValueError(f"the tokenizer's patch schedule and downsampling give {vae.resolution}px images but "
                         f"data.resolution is {cfg.data.resolution}")
    if cfg.data.name not in ("mnist", "synthetic"):
        raise ValueError(f"tokenizer training reads in-memory datasets (mnist, synthetic), not {cfg.data.name!r}; "
                         "for ImageNet use the official tokenizer")
    images_N3HW = build_dataset({"name": cfg.data.name, "resolution": cfg.data.resolution,
                                 "num_classes": cfg.data.num_classes}, "train").tensors[0]
    gen = torch.Generator().manual_seed(cfg.run.seed)
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(images_N3HW[torch.randperm(len(images_N3HW), generator=gen)[:256]]))
        reseed_dead_codes(vae, f, torch.zeros(vae.V), gen)
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    writer = SummaryWriter(str(Path(cfg.run.out_dir) / "tb"))
    hits_window_V = torch.zeros(vae.V)
    vae.train()
    for step in (progress := tqdm(range(tc.steps), desc="tokenizer", dynamic_ncols=True)):
        batch = images_N3HW[torch.randint(0, len(images_N3HW), (tc.batch_size,), generator=gen)]
        rec, hits_SV, vq_loss = vae(batch)
        rec_loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        hits_window_V += hits_SV.sum(0)
        if (step + 1) % 100 == 0:
            usage = float((hits_window_V > 0).float().mean())
            with torch.no_grad():
                f = vae.quant_conv(vae.encoder(batch))
            reseeded = reseed_dead_codes(vae, f, hits_window_V, gen) if step + 1 < tc.steps * 3 // 4 else 0
            hits_window_V.zero_()
            writer.add_scalar("tokenizer/rec_loss", rec_loss.item(), step)
            writer.add_scalar("tokenizer/vq_loss", vq_loss.item(), step)
            writer.add_scalar("tokenizer/codebook_usage", usage, step)
            progress.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{vq_loss.item():.4f}", usage=f"{usage:.2f}")
            log.info("step %d rec %.4f vq %.4f codebook usage %.1f%% (re-seeded %d)", step + 1, rec_loss.item(),
                     vq_loss.item(), 100 * usage, reseeded)
    writer.close()
    vae.eval()
    save_model(vae, out, extra={"steps": tc.steps, "final_rec_loss": rec_loss.item()})
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = config_arg_parser(__doc__).parse_args(argv)
    train_tokenizer(load_config(args.cfg, args.set))


if __name__ == "__main__":
    sys.exit(main())
