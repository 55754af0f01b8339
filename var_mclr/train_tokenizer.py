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
(+ model.json); an existing result is never overwritten. Tokenizer training runs in one process (ImageNet users load
the official tokenizer); like VAR training it reads as setup / resume / train_step / after_step / finish, through
accelerate (device, run.log_with trackers).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from tokenizer.model import VQVAE
from var_mclr.batches import RankBatchSampler, step_generator
from var_mclr.checkpoints import is_complete_result, parameters_in, require_finite, save_model
from var_mclr.config import Config, ConfigError, run_from_command_line, save_config, vqvae_config
from var_mclr.data import build_dataset, dataset_args  # the data VAR training reads, exactly
from var_mclr.machine import machine_record
from var_mclr.run_dir import RunDirError, check_resume, claim_run_dir, record_changes, run_dir_lock
from var_mclr.tokenizer_heldout import ReconstructionStopper
from var_mclr.train_state import resume_newest, save_training_state

log = logging.getLogger("var_mclr.train_tokenizer")

# Unused codes are re-seeded every this many steps, over the first three quarters of training (docs/method.md).
RESEED_EVERY = 100


@dataclass
class TokenizerRun:
    """What one tokenizer run trains with, built once by setup()."""
    cfg: Config
    accelerator: Accelerator
    out_dir: Path
    vae: VQVAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator  # every random draw of the run; its state goes into each checkpoint
    images_N3HW: torch.Tensor | None  # an in-memory dataset, indexed directly
    dataset: object
    stopper: ReconstructionStopper | None  # run.eval_every > 0: held-out reconstruction decides the length
    batches: object = None  # an image folder: DataLoader batches from the resumed step on


@dataclass
class TokenizerLoop:
    start_step: int = 0
    done: int = 0
    rec_value: float = math.nan
    hits_window_V: torch.Tensor | None = None  # code hits since the last re-seeding
    history: list = field(default_factory=list)


@torch.no_grad()
def reseed_dead_codes(vae: VQVAE, f_BChw: torch.Tensor, hits_V: torch.Tensor, generator: torch.Generator) -> int:
    """Replace codes no scale has used lately by random encoder vectors of this batch."""
    dead = (hits_V == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pool_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
    pick = torch.randint(0, pool_NC.shape[0], (dead.numel(),), generator=generator).to(pool_NC.device)
    noise = torch.randn(dead.numel(), pool_NC.shape[1], generator=generator).to(pool_NC.device)
    vae.quantize.embedding.weight[dead] = pool_NC[pick] + 1e-3 * noise
    return dead.numel()


def train_tokenizer(cfg: Config, fresh: bool = False) -> Path:
    """Train (or resume) the configured tokenizer; returns the path of its weights. fresh: first delete what an
    earlier run left in run.out_dir."""
    out_dir = Path(cfg.run.out_dir)
    with run_dir_lock(out_dir):  # one writer per directory
        claim_run_dir(out_dir, cfg, fresh)
        run = setup(cfg)
        loop = resume(run)
        steps = cfg.tokenizer_train.steps
        last = loop.start_step if run.stopper is not None and run.stopper.stopped else steps  # resumed after a stop
        for step in (progress := tqdm(range(loop.start_step, last), initial=loop.start_step, total=steps,
                                      desc="tokenizer", dynamic_ncols=True)):
            batch, rec_loss, vq_loss, hits_SV = train_step(run, step)
            if after_step(run, loop, step, batch, rec_loss, vq_loss, hits_SV, progress):
                break
        return finish(run, loop)


def setup(cfg: Config) -> TokenizerRun:
    out = Path(cfg.run.out_dir) / "model.safetensors"
    if out.exists() and is_complete_result(out):
        raise RunDirError(f"{out} exists; choose another run.out_dir (nothing was overwritten)")
    if out.exists():  # weights without their hyperparameters (saved by an older version): the checkpoints rebuild it
        log.warning("%s is incomplete (no hyperparameters); rebuilding it from the training checkpoints", out)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
                              project_config=ProjectConfiguration(project_dir=cfg.run.out_dir,
                                                                  logging_dir=str(Path(cfg.run.out_dir) / "tb")))
    if accelerator.num_processes > 1:
        raise ConfigError(f"tokenizer training runs in one process, got {accelerator.num_processes}: run "
                          "`python -m var_mclr.train_tokenizer` without accelerate launch")
    torch.manual_seed(cfg.run.seed)
    tc = cfg.tokenizer_train
    vae = VQVAE(vqvae_config(cfg.tokenizer))
    if vae.resolution != cfg.data.resolution:
        raise ConfigError(f"the tokenizer's patch schedule and downsampling give {vae.resolution}px images but "
                          f"data.resolution is {cfg.data.resolution}")
    # VAR training's transform; its random crops are augmentation here, since nothing is cached.
    dataset = build_dataset(dataset_args(dataclasses.asdict(cfg.data)), "train")
    images_N3HW = dataset.tensors[0] if isinstance(dataset, TensorDataset) else None
    gen = torch.Generator().manual_seed(cfg.run.seed)
    with torch.no_grad():  # the codebook starts from encoder outputs
        first = torch.randperm(len(dataset), generator=gen)[:256]
        init = images_N3HW[first] if images_N3HW is not None else torch.stack([dataset[int(i)][0] for i in first])
        reseed_dead_codes(vae, vae.quant_conv(vae.encoder(init)), torch.zeros(vae.V), gen)
    optimizer = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    vae, optimizer = accelerator.prepare(vae, optimizer)
    # docs/method.md, "Training length"; var_mclr/tokenizer_heldout.py
    stopper = (ReconstructionStopper(dataset_args(dataclasses.asdict(cfg.data)), cfg.run.eval_images)
               if cfg.run.eval_every else None)
    return TokenizerRun(cfg, accelerator, Path(cfg.run.out_dir), vae, optimizer, scheduler, gen, images_N3HW,
                        dataset, stopper)


def resume(run: TokenizerRun) -> TokenizerLoop:
    cfg, tc = run.cfg, run.cfg.tokenizer_train
    loop = TokenizerLoop(hits_window_V=torch.zeros(run.vae.V))
    resumed = resume_newest(run.out_dir, run.vae, run.optimizer, run.scheduler)
    if resumed:
        ckpt, state = resumed
        check_resume(ckpt, state, cfg, {}, tc.steps)
        loop.history = record_changes(state.get("config", {}), cfg.to_dict(), state["step"],
                                      state.get("config_history", []))
        loop.start_step, loop.rec_value = state["step"], state.get("rec_loss", math.nan)
        run.gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        loop.hits_window_V = torch.tensor(state["codebook_hits"], dtype=torch.float32)
        if run.stopper is not None:
            run.stopper.restore(state.get("heldout_rec"))
        log.info("resumed from %s at step %d", ckpt, loop.start_step)
    loop.done = loop.start_step
    save_config(cfg, run.out_dir / "config.yaml")
    if run.images_N3HW is None:  # an image folder: DataLoader workers decode ahead, batches seeded by (seed, step)
        sampler = RankBatchSampler(cfg.run.seed, tc.batch_size, len(run.dataset), 0, tc.batch_size, loop.start_step,
                                   tc.steps)
        run.batches = iter(DataLoader(run.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers))
    run.accelerator.init_trackers("var-mclr-tokenizer")
    run.vae.train()
    return loop


def train_step(run: TokenizerRun, step: int):
    """One update on L1 + L2 reconstruction plus the quantiser's loss; returns (batch, rec, vq, code hits)."""
    cfg, tc = run.cfg, run.cfg.tokenizer_train
    if run.batches is None:
        batch = run.images_N3HW[torch.randint(0, len(run.images_N3HW), (tc.batch_size,), generator=run.gen)]
    else:
        batch = next(run.batches)[0]
    batch = batch.to(run.accelerator.device)
    if cfg.data.hflip:  # mirrored as VAR training mirrors: half the images, drawn from (seed, step)
        flip_B = torch.rand(len(batch), generator=step_generator(cfg.run.seed, step, 0)) < 0.5
        batch = torch.where(flip_B.view(-1, 1, 1, 1).to(batch.device), batch.flip(-1), batch)
    rec, hits_SV, vq_loss = run.vae(batch)
    rec_loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch)
    run.optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(rec_loss + vq_loss)
    run.accelerator.clip_grad_norm_(run.vae.parameters(), tc.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return batch, rec_loss.detach(), vq_loss.detach(), hits_SV


def after_step(run: TokenizerRun, loop: TokenizerLoop, step: int, batch, rec_loss, vq_loss, hits_SV,
               progress: tqdm) -> bool:
    """Code re-seeding, logging, held-out tracking and checkpoints after `step`; True: stop training."""
    cfg, tc = run.cfg, run.cfg.tokenizer_train
    loop.rec_value = rec_loss.item()
    loop.hits_window_V += hits_SV.sum(0).cpu()
    loop.done = done = step + 1
    if done % RESEED_EVERY == 0:
        usage = float((loop.hits_window_V > 0).float().mean())
        with torch.no_grad():
            f = run.vae.quant_conv(run.vae.encoder(batch))
        reseeded = reseed_dead_codes(run.vae, f, loop.hits_window_V.to(f.device), run.gen) \
            if done < tc.steps * 3 // 4 else 0
        loop.hits_window_V.zero_()
        run.accelerator.log({"tokenizer/codebook_usage": usage}, step=step)
        log.info("step %d codebook usage %.1f%% (re-seeded %d)", done, 100 * usage, reseeded)
    if step % cfg.run.log_every == 0 or done == tc.steps:
        run.accelerator.log({"tokenizer/rec_loss": loop.rec_value, "tokenizer/vq_loss": vq_loss.item()}, step=step)
        progress.set_postfix(rec=f"{loop.rec_value:.4f}", vq=f"{vq_loss.item():.4f}")
        log.info("step %d rec %.4f vq %.4f", done, loop.rec_value, vq_loss.item())
    stop = run.stopper is not None and done % cfg.run.eval_every == 0 and run.stopper.update(run.vae, done,
                                                                                               run.out_dir)
    if done % cfg.run.ckpt_every == 0 or done == tc.steps or stop:  # var_mclr/train_state.py: atomic, finite
        save_training_state(run.out_dir, done, run.vae, run.optimizer, run.scheduler,
                            {"generator": run.gen.get_state().tolist(), "codebook_hits": loop.hits_window_V.tolist(),
                             "rec_loss": loop.rec_value, "config": cfg.to_dict(), "config_history": loop.history,
                             **({"heldout_rec": run.stopper.state()} if run.stopper else {})},
                            keep=cfg.run.keep_ckpts)
    if stop:
        log.info("tokenizer: held-out reconstruction stopped improving; stopping after step %d of at most %d",
                 done, tc.steps)
    return stop


def finish(run: TokenizerRun, loop: TokenizerLoop) -> Path:
    run.accelerator.end_training()
    vae = run.vae
    vae.eval()
    if not math.isfinite(loop.rec_value):
        raise ConfigError(f"the tokenizer's reconstruction loss ended non-finite ({loop.rec_value}); nothing was "
                          "saved; lower tokenizer_train.lr")
    extra = {"steps": run.cfg.tokenizer_train.steps, "final_rec_loss": loop.rec_value, "config_history": loop.history,
             "machine": machine_record()}
    if run.stopper is not None and run.stopper.best is not None:
        extra.update(steps_run=loop.done, selected=run.stopper.load_best(vae, run.out_dir))
    require_finite(parameters_in(vae, vae.state_dict()), "the trained tokenizer")
    out = run.out_dir / "model.safetensors"
    save_model(vae.cpu(), out, extra=extra)
    return out


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(train_tokenizer, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
