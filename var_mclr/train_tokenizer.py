"""Train a multi-scale VQ-VAE tokenizer on the configured dataset: the embedded MNIST digits or any image folder.

    python -m var_mclr.train_tokenizer --cfg configs/mnist/tokenizer.yaml
    python -m var_mclr.train_tokenizer --cfg configs/folder/tokenizer.yaml --set data.root=DIR --set data.num_classes=N

Losses need no downloaded network: L1 + L2 reconstruction plus the quantiser's commitment/codebook loss. The
codebook is initialised from encoder outputs and unused codes are re-seeded from the current batch, so usage
stays high; the share of codes used per scale is logged. ImageNet users load the official tokenizer instead.

In-memory datasets (mnist, synthetic) are indexed directly; an image folder is streamed through a DataLoader with the
transform VAR training uses (data.crop, data.hflip). Like VAR training, a checkpoint is written atomically every
run.ckpt_every steps (var_mclr/train_state.py) and rerunning the command resumes from the newest usable one with the
same random stream; one run at a time holds run.out_dir (--fresh starts it over). Writes run.out_dir/model.safetensors
(+ model.json); an existing result is never overwritten.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tokenizer.model import VQVAE
from var_mclr.checkpoints import is_complete_result, parameters_in, require_finite, save_model
from var_mclr.config import Config, ConfigError, run_from_command_line, save_config, vqvae_config
from var_mclr.data import build_dataset, dataset_args  # the data VAR training reads, exactly
from var_mclr.run_dir import RunDirError, check_resume, claim_run_dir, record_changes, run_dir_lock
from var_mclr.tokenizer_heldout import ReconstructionStopper
from var_mclr.batches import RankBatchSampler, step_generator
from var_mclr.train_state import resume_newest, save_training_state

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


def train_tokenizer(cfg: Config, fresh: bool = False) -> Path:
    """Train (or resume) the configured tokenizer; returns the path of its weights. fresh: first delete what an
    earlier run left in run.out_dir."""
    out_dir = Path(cfg.run.out_dir)
    with run_dir_lock(out_dir):  # one writer per directory
        claim_run_dir(out_dir, cfg, fresh)
        return _train_tokenizer(cfg)


def _train_tokenizer(cfg: Config) -> Path:
    out_dir = Path(cfg.run.out_dir)
    out = out_dir / "model.safetensors"
    if out.exists() and is_complete_result(out):
        raise RunDirError(f"{out} exists; choose another run.out_dir (nothing was overwritten)")
    if out.exists():  # weights without their hyperparameters (saved by an older version): the checkpoints rebuild it
        log.warning("%s is incomplete (no hyperparameters); rebuilding it from the training checkpoints", out)
    torch.manual_seed(cfg.run.seed)
    tc = cfg.tokenizer_train
    vae = VQVAE(vqvae_config(cfg.tokenizer))
    if vae.resolution != cfg.data.resolution:
        raise ConfigError(f"the tokenizer's patch schedule and downsampling give {vae.resolution}px images but "
                         f"data.resolution is {cfg.data.resolution}")
    # VAR training's transform; its random crops are augmentation here, since nothing is cached.
    dataset = build_dataset(dataset_args(dataclasses.asdict(cfg.data)), "train")
    images_N3HW = dataset.tensors[0] if isinstance(dataset, TensorDataset) else None  # in memory: index directly
    gen = torch.Generator().manual_seed(cfg.run.seed)  # every draw of the run; its state goes into each checkpoint
    with torch.no_grad():
        first = torch.randperm(len(dataset), generator=gen)[:256]
        init = images_N3HW[first] if images_N3HW is not None else torch.stack([dataset[int(i)][0] for i in first])
        f = vae.quant_conv(vae.encoder(init))
        reseed_dead_codes(vae, f, torch.zeros(vae.V), gen)
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    start_step, hits_window_V, rec_value, history = 0, torch.zeros(vae.V), math.nan, []
    # run.eval_every > 0: tokenizer_train.steps is a ceiling, the held-out reconstruction decides (docs/method.md,
    # "Training length"; var_mclr/tokenizer_heldout.py)
    stopper = ReconstructionStopper(dataset_args(dataclasses.asdict(cfg.data)), cfg.run.eval_images) \
        if cfg.run.eval_every else None
    resumed = resume_newest(out_dir, vae, opt, sched)
    if resumed:
        ckpt, state = resumed
        check_resume(ckpt, state, cfg, {}, tc.steps)
        history = record_changes(state.get("config", {}), cfg.to_dict(), state["step"], state.get("config_history", []))
        start_step, rec_value = state["step"], state.get("rec_loss", math.nan)
        gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        hits_window_V = torch.tensor(state["codebook_hits"], dtype=torch.float32)
        if stopper is not None:
            stopper.restore(state.get("heldout_rec"))
        log.info("resumed from %s at step %d", ckpt, start_step)
    save_config(cfg, out_dir / "config.yaml")
    batches = None
    if images_N3HW is None:  # an image folder: DataLoader workers decode ahead, batches seeded by (seed, step)
        sampler = RankBatchSampler(cfg.run.seed, tc.batch_size, len(dataset), 0, tc.batch_size, start_step, tc.steps)
        batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers))
    writer = SummaryWriter(str(out_dir / "tb"))
    vae.train()
    done = start_step
    last = start_step if stopper is not None and stopper.stopped else tc.steps  # resumed after an early stop
    for step in (progress := tqdm(range(start_step, last), initial=start_step, total=tc.steps, desc="tokenizer",
                                  dynamic_ncols=True)):
        if batches is None:
            batch = images_N3HW[torch.randint(0, len(images_N3HW), (tc.batch_size,), generator=gen)]
        else:
            batch = next(batches)[0]
        if cfg.data.hflip:  # mirrored as VAR training mirrors: half the images, drawn from (seed, step)
            flip_B = torch.rand(len(batch), generator=step_generator(cfg.run.seed, step, 0)) < 0.5
            batch = torch.where(flip_B.view(-1, 1, 1, 1), batch.flip(-1), batch)
        rec, hits_SV, vq_loss = vae(batch)
        rec_loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        rec_value = rec_loss.item()
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
        done = step + 1
        stop = stopper is not None and done % cfg.run.eval_every == 0 and stopper.update(vae, done, out_dir)
        if done % cfg.run.ckpt_every == 0 or done == tc.steps or stop:  # var_mclr/train_state.py: atomic, finite
            save_training_state(out_dir, done, vae, opt, sched,
                                {"generator": gen.get_state().tolist(), "codebook_hits": hits_window_V.tolist(),
                                 "rec_loss": rec_value, "config": cfg.to_dict(), "config_history": history,
                                 **({"heldout_rec": stopper.state()} if stopper else {})},
                                keep=cfg.run.keep_ckpts)
        if stop:
            log.info("tokenizer: held-out reconstruction stopped improving; stopping after step %d of at most %d",
                     done, tc.steps)
            break
    writer.close()
    vae.eval()
    if not math.isfinite(rec_value):
        raise ConfigError(f"the tokenizer's reconstruction loss ended non-finite ({rec_value}); nothing was "
                          "saved; lower tokenizer_train.lr")
    extra = {"steps": tc.steps, "final_rec_loss": rec_value, "config_history": history}
    if stopper is not None and stopper.best is not None:
        extra.update(steps_run=done, selected=stopper.load_best(vae, out_dir))
    require_finite(parameters_in(vae, vae.state_dict()), "the trained tokenizer")
    save_model(vae, out, extra=extra)
    return out


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(train_tokenizer, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
