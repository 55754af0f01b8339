"""One training loop for every VAR objective: pretraining (nll), MCLR, CCA, CC-DPO, unlearning.

    accelerate launch var_mclr/train.py --cfg configs/var_d16.yaml [--set train.lr=1e-5 ...]
    python -m var_mclr.train --cfg configs/mnist/mclr.yaml

Rerunning the same command resumes from the newest checkpoint in run.out_dir that loads and holds finite weights.
The final weights are written to run.out_dir/model.safetensors (hyperparameters embedded; model.json a readable copy)
for eval/fid.py. One run at a time holds run.out_dir; a directory that holds a run of another objective, architecture
or data, a checkpoint past train.steps, a resume from other tokenizer or model.init weights, and a finished result
whose checkpoints are gone are refused unless --fresh (delete that run's outputs and start over) is given
(var_mclr/run_dir.py). Weights holding inf/NaN are never saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from var_mclr.builders import build_tokenizer, build_var, frozen_copy, tokenizer_record
from var_mclr.calibration import AUTO, check_fixed_tau, resolve_auto_tau
from var_mclr.checkpoints import (CheckpointError, nonfinite_entries, parameters_in, read_model_info,
                                  read_safetensors, save_model)
from var_mclr.config import Config, ConfigError, run_from_command_line, save_config
from var_mclr.data import build_dataset, dataset_args
from var_mclr.objectives import get_objective, objective_loss
from var_mclr.plan import resolve_batch, sharding_of
from var_mclr.step_skip import PendingSteps, device_skip_available, skip_unless
from var_mclr.errors import UserError
from var_mclr.files import write_text_atomic
from var_mclr.heldout import HeldoutTracker, is_improvement
from var_mclr.run_dir import check_resume, claim_run_dir, input_hashes, record_changes, run_dir_lock
from var_mclr.tokens import TokenStore
from var_mclr.train_state import resume_newest, save_training_state

log = logging.getLogger("var_mclr.train")


class NonFiniteLossError(UserError, RuntimeError):
    pass


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """All randomness of one micro-batch, derived from (seed, step): resuming needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


@functools.lru_cache(maxsize=2)  # the epoch being read and the next (a micro-batch may straddle the two)
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of epoch `epoch`: drawn once per epoch (13 ms at 1.28M images), a function of (seed, epoch) only,
    so a resumed run reads the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))


def batch_indices(seed: int, micro_index: int, global_batch: int, n: int) -> torch.Tensor:
    """Dataset indices of one global micro-batch: a stream of seeded per-epoch permutations."""
    positions = torch.arange(micro_index * global_batch, (micro_index + 1) * global_batch)
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = epoch_permutation(seed, epoch, n)
        sel = positions.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n]
    return out


class RankBatchSampler(Sampler):
    """This process's share of every global micro-batch from micro-step `start` on (for DataLoader workers)."""

    def __init__(self, seed: int, global_batch: int, n: int, rank: int, batch_size: int, start: int, stop: int):
        self.seed, self.global_batch, self.n = seed, global_batch, n
        self.mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.start, self.stop = start, stop

    def __iter__(self):
        for micro_index in range(self.start, self.stop):
            yield batch_indices(self.seed, micro_index, self.global_batch, self.n)[self.mine].tolist()

    def __len__(self) -> int:
        return self.stop - self.start


# VAR's lin0 schedule (utils/lr_control.py): warm-up from this share of the peak, and the share of the post-warm-up
# steps held at the peak before the linear decay to min_lr_ratio.
LIN0_WARMUP_START, LIN0_HOLD = 0.005, 0.05


def lr_lambda(cfg: Config):
    """The learning-rate factor of every step (docs/method.md, "Training schedule")."""
    t = cfg.train

    def lin0(step: int) -> float:
        if step < t.warmup_steps:
            return LIN0_WARMUP_START + (1 - LIN0_WARMUP_START) * step / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps)
        if progress < LIN0_HOLD:
            return 1.0
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * max(0.0, 1 - progress) / (1 - LIN0_HOLD)

    def factor(step: int) -> float:
        if t.lr_schedule == "lin0":
            return lin0(step)
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return factor


# Official VAR's rule (train.py, filter_params): no weight decay on 1-D parameters, biases, position and level
# embeddings, AdaLN's shared table and the attention temperature; class and word embeddings are decayed.
NO_WEIGHT_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "ada_gss", "scale_mul")


def make_optimizer(cfg: Config, var: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in var.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim == 1 or name.endswith("bias") or any(k in name for k in NO_WEIGHT_DECAY_KEYS)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on CUDA: one kernel for the whole update, and it can skip a non-finite step on the device (step_skip.py)
    fused = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=fused or None)


@contextlib.contextmanager
def flushing_denormals(enabled: bool):
    """CPU: treat subnormal floats as zero while training (train.flush_denormal), and restore torch's default."""
    if not enabled:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def train(cfg: Config, fresh: bool = False) -> Path:
    """Run (or resume) the configured training; returns the path of the final weights. fresh: first delete what an
    earlier run left in run.out_dir (required to change its objective or architecture)."""
    with claimed_run_dir(cfg, fresh), flushing_denormals(cfg.train.flush_denormal):
        return _train(cfg)


@contextlib.contextmanager
def claimed_run_dir(cfg: Config, fresh: bool):
    """The main process locks run.out_dir and checks it may hold this run, before anything is written; every process
    learns the outcome, so none is left waiting for a main process that gave up."""
    state = PartialState(cpu=not torch.cuda.is_available())
    with contextlib.ExitStack() as held:
        error = None
        if state.is_main_process:
            try:
                held.enter_context(run_dir_lock(Path(cfg.run.out_dir)))
                claim_run_dir(Path(cfg.run.out_dir), cfg, fresh)
            except UserError as e:
                error = e
        error = broadcast_object_list([error])[0]
        if error is not None:
            raise error
        yield


def _last_good(last_ckpt: Path | None, resumed_from: Path | None) -> str:
    if last_ckpt is not None:
        return f"The last good checkpoint is {last_ckpt}"
    if resumed_from is not None:  # not one finite step since the resume: the checkpoint itself is bad
        return (f"No good checkpoint: the one this run resumed from, {resumed_from}, gives non-finite losses itself "
                "(rerun with --fresh to start over)")
    return "No good checkpoint was written yet"


def _savable(model: torch.nn.Module, step: int, nonfinite_in_row: int, last_good: str) -> bool:
    """Whether the weights after `step` may be saved as a checkpoint or as the result.

    Parameters holding inf/NaN stop the run (no later step can repair them). Finite weights whose latest step gave a
    non-finite loss (e.g. blown up by too high a learning rate) are not saved either: False, and the caller skips
    that checkpoint."""
    bad = nonfinite_entries(parameters_in(model, model.state_dict()))
    if bad:
        raise NonFiniteLossError(
            f"after step {step} the parameters hold {sum(bad.values())} inf/NaN values (e.g. {next(iter(bad))}); "
            f"nothing was saved. {last_good}; lower train.lr or check the objective's settings")
    return nonfinite_in_row == 0


def _train(cfg: Config) -> Path:
    t = cfg.train
    objective = get_objective(t.objective)
    # run.log_with: experiment trackers through accelerate (TensorBoard under run.out_dir/tb by default, or wandb).
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(),
                              log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
                              project_config=ProjectConfiguration(project_dir=cfg.run.out_dir,
                                                                  logging_dir=str(Path(cfg.run.out_dir) / "tb")))
    out_dir = Path(cfg.run.out_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    # train.global_batch: the micro-batch and accumulation this process count needs; on CUDA the memory plan must
    # fit first (var_mclr/plan.py), so a config that cannot fit stops here, naming the keys to change.
    t.batch_size, t.grad_accum = resolve_batch(cfg, world, device, sharding_of(accelerator))
    log.info("world size %d (%s), global batch %d = micro-batch %d x %d processes x %d accumulation; peak lr %g "
             "(%s schedule, %d warm-up steps)", world, accelerator.distributed_type,
             t.batch_size * world * t.grad_accum, t.batch_size, world, t.grad_accum, t.lr, t.lr_schedule,
             t.warmup_steps)

    set_seed(cfg.run.seed)  # the same fresh initialisation on every process and every rerun
    vae = build_tokenizer(cfg).to(device)
    var = build_var(cfg, vae).to(device)
    var.activation_checkpointing = t.activation_checkpointing
    inputs = input_hashes(cfg, vae, var)  # what a resume must start from again (run_dir.check_resume)
    # CCA's trainer runs its frozen reference in training mode: with drop-path on, the reference drops paths too.
    ref = frozen_copy(var).train().to(device) if objective.needs_reference else None
    if t.compile:  # after the reference copy, which stays eager; names and checkpoints are unchanged
        var.compile_blocks()
    if cfg.data.cache_tokens and cfg.data.name == "imagefolder" and cfg.data.crop == "imagenet":
        log.warning("data.crop = imagenet draws a random crop per read, which the token cache would freeze once per "
                    "image: caching the centre crop instead (data.cache_tokens=false trains on random crops)")
    with accelerator.main_process_first():  # one process lists (and with data.verify, opens) every file, once
        dataset = build_dataset(dataset_args(dataclasses.asdict(cfg.data)), "train",
                                deterministic=cfg.data.cache_tokens, index_cache=str(out_dir.parent / "index_cache"))
    if dataset.num_classes != cfg.data.num_classes:
        raise ConfigError(f"the dataset has {dataset.num_classes} classes "
                         f"but data.num_classes is {cfg.data.num_classes}")
    data_key = f"{cfg.data.name}-{cfg.data.resolution}-train"
    with accelerator.main_process_first():  # one process encodes the token cache, the others then read it
        tokens = TokenStore(dataset, vae, device, cache_dir=str(out_dir.parent / "token_cache")
                            if cfg.data.cache_tokens else None, data_key=data_key, with_flips=cfg.data.hflip)
    if len(tokens.labels_N) and (int(tokens.labels_N.min()) < 0 or int(tokens.labels_N.max()) >= var.num_classes):
        raise ConfigError(f"dataset labels span [{int(tokens.labels_N.min())}, {int(tokens.labels_N.max())}] but the "
                         f"model has {var.num_classes} classes")  # checked once: the forward pass never syncs for it
    if t.epochs is not None:
        t.steps = steps_for_epochs(t.epochs, len(tokens), t.batch_size * world * t.grad_accum)
        log.info("train.epochs = %g over %d training images at a global batch of %d: %d steps", t.epochs,
                 len(tokens), t.batch_size * world * t.grad_accum, t.steps)
    tracker = (HeldoutTracker(dataset_args(dataclasses.asdict(cfg.data)), cfg.run.eval_images, vae, device,
                              cfg.data.num_classes) if cfg.run.eval_every else None)

    optimizer = make_optimizer(cfg, var)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    var, optimizer = accelerator.prepare(var, optimizer)
    model = accelerator.unwrap_model(var)

    start_step, nonfinite_total, last_ckpt, resumed_from, best, history = 0, 0, None, None, None, []
    resumed = resume_newest(out_dir, model, optimizer, scheduler)
    if resumed:
        resumed_from, state = resumed
        check_resume(resumed_from, state, cfg, inputs, t.steps)
        start_step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        best = state.get("best_heldout")  # {"step", "heldout_nll"} of best.safetensors, when train.keep chooses
        log.info("resumed from %s at step %d", resumed_from, start_step)
        if cfg.loss.mclr.tau == AUTO:  # resolved when the run started; never re-measured on the fine-tuned model
            cfg.loss.mclr.tau = state.get("config", {}).get("loss", {}).get("mclr", {}).get("tau", AUTO)
        history = record_changes(state.get("config", {}), cfg.to_dict(), start_step, state.get("config_history", []))
    elif t.objective == "mclr" and cfg.loss.mclr.tau == AUTO:  # every process measures the same pairs
        cfg.loss.mclr.tau = resolve_auto_tau(model, tokens, cfg.loss, cfg.data.num_classes, cfg.run.seed)
    elif t.objective == "mclr" and cfg.loss.mclr.tau is not None:  # a fixed cap that caps every pair is refused
        check_fixed_tau(model, tokens, cfg.loss, cfg.data.num_classes, cfg.run.seed)
    if accelerator.is_main_process:  # also before any checkpoint: a run killed early logged steps it will redo
        _truncate_metrics(out_dir / "metrics.jsonl", start_step)
        save_config(cfg, out_dir / "config.yaml")  # what this run trains with (the resolved cap included)

    images = None
    if not tokens.cached:  # decode and encode images on the fly, DataLoader workers reading ahead
        sampler = RankBatchSampler(cfg.run.seed, t.batch_size * world, len(tokens), rank, t.batch_size,
                                   start_step * t.grad_accum, t.steps * t.grad_accum)
        images = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                 pin_memory=device.type == "cuda"))
    accelerator.init_trackers("var-mclr", init_kwargs={"wandb": {"name": out_dir.name}})
    global_batch = t.batch_size * world
    nonfinite_in_row = 0
    pending, device_skip = PendingSteps(), device_skip_available(optimizer, device, t.mixed_precision)
    progress = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc=t.objective,
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in progress:
        tic = time.perf_counter()
        var.train()
        stats_sum: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            gen = step_generator(cfg.run.seed, step, micro)
            idx_G = batch_indices(cfg.run.seed, step * t.grad_accum + micro, global_batch, len(tokens))
            plan = objective.plan(cfg.loss, tokens.labels_N[idx_G], cfg.data.num_classes, t.class_dropout, gen)
            flip_G = (torch.rand(global_batch, generator=gen) < 0.5) if cfg.data.hflip else None
            if cfg.model.drop_path_rate > 0:  # drop-path draws from torch's RNG: reseed it so a resumed run matches
                torch.manual_seed(gen.initial_seed() + 7_919 * (rank + 1))
            mine = slice(rank * t.batch_size, (rank + 1) * t.batch_size)
            idx_BL, x_BLCv = tokens.batch(idx_G[mine], None if flip_G is None else flip_G[mine],
                                          None if images is None else next(images)[0])
            sync = accelerator.no_sync(var) if micro < t.grad_accum - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss, stats = objective_loss(objective, cfg.loss, var, ref, plan.slice(mine), idx_BL, x_BLCv)
                accelerator.backward(loss / t.grad_accum)
            loss_sum += loss.detach()
            for k, v in stats.items():  # kept on the device; reduced across processes only at log steps
                stats_sum[k] = stats_sum.get(k, 0.0) + v.detach() / t.grad_accum
        # A non-finite loss on any process, or a non-finite gradient norm (the same on every process after DDP's
        # all-reduce), skips the step. On CUDA the fused AdamW skips it on the device and the host reads the
        # outcome at the next log or checkpoint step (var_mclr/step_skip.py): no host sync in between.
        grad_norm = accelerator.clip_grad_norm_(var.parameters(), t.grad_clip)
        finite = torch.isfinite(accelerator.reduce(loss_sum, "sum")) & torch.isfinite(torch.as_tensor(grad_norm))
        pending.append(step, finite)
        if device_skip:
            skip_unless(optimizer, finite)
            optimizer.step()
        settle = (not device_skip or step % cfg.run.log_every == 0 or (step + 1) % cfg.run.ckpt_every == 0
                  or step == t.steps - 1)
        for at, updated in pending.settle() if settle else []:
            if updated:
                if not device_skip:
                    optimizer.step()
                nonfinite_in_row = 0
                last_ckpt = last_ckpt or resumed_from  # it gave a finite step: a good checkpoint to name
                continue
            nonfinite_total += 1
            nonfinite_in_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
                        at, nonfinite_in_row, nonfinite_total)
            if nonfinite_in_row >= t.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"{nonfinite_in_row} non-finite steps in a row at step {at}; stopping. "
                    f"{_last_good(last_ckpt, resumed_from)}; lower train.lr or check the objective's settings")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        dt = time.perf_counter() - tic
        if step % cfg.run.log_every == 0 or step == t.steps - 1:
            stats_mean = {k: float(accelerator.reduce(v, "mean")) for k, v in stats_sum.items()}  # all processes
        if accelerator.is_main_process and (step % cfg.run.log_every == 0 or step == t.steps - 1):
            scalars = {**stats_mean, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": global_batch * t.grad_accum * model.L / dt, "nonfinite_total": nonfinite_total}
            accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            progress.set_postfix({k: f"{stats_mean[k]:.4f}" for k in list(stats_mean)[:4]})
            log.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in scalars.items()))
        done = step + 1
        if tracker is not None and (done % cfg.run.eval_every == 0 or done == t.steps):
            best = _track(tracker, accelerator, model, step, t.keep, best, out_dir, cfg)
        if done % cfg.run.ckpt_every == 0 or done == t.steps:
            savable = _savable(model, done, nonfinite_in_row, _last_good(last_ckpt, resumed_from))  # same on all
            accelerator.wait_for_everyone()
            if not savable:
                log.warning("step %d: no checkpoint, the weights gave a non-finite loss at the last step", done)
            elif accelerator.is_main_process:
                last_ckpt = save_training_state(out_dir, done, model, optimizer, scheduler,
                                                {"nonfinite_total": nonfinite_total, "config": cfg.to_dict(),
                                                 "best_heldout": best, "inputs": inputs,
                                                 "config_history": history},
                                                keep=cfg.run.keep_ckpts)
    if not _savable(model, t.steps, nonfinite_in_row, _last_good(last_ckpt, resumed_from)):
        raise NonFiniteLossError(f"the last {nonfinite_in_row} step(s) gave a non-finite loss or gradient, so the "
                                 f"final weights were not saved. {_last_good(last_ckpt, resumed_from)}; lower "
                                 "train.lr or check the objective's settings")
    accelerator.wait_for_everyone()
    final = out_dir / "model.safetensors"
    extra = {"objective": t.objective, "steps": t.steps, "source_config": cfg.to_dict(), "inputs": inputs,
             "config_history": history,
             "tokenizer": tokenizer_record(cfg.tokenizer.checkpoint, vae)}
    if t.keep == "best_heldout":
        _load_best(model, out_dir, best)
        extra["selected"] = best
    if accelerator.is_main_process:
        save_model(model, final, extra=extra)
    accelerator.end_training()  # also closes the trackers
    return final


def steps_for_epochs(epochs: float, num_images: int, global_batch: int) -> int:
    """Optimiser steps of `epochs` passes over num_images at this global batch (micro-batches x processes)."""
    return max(1, math.ceil(epochs * num_images / global_batch))


def _track(tracker: HeldoutTracker, accelerator: Accelerator, model: torch.nn.Module, step: int, keep: str,
           best: dict | None, out_dir: Path, cfg: Config) -> dict | None:
    """One held-out evaluation after `step`: logged, and with train.keep = best_heldout a new lowest held-out nll
    saves the weights as best.safetensors. Returns the (possibly new) best."""
    scores = tracker.evaluate(model, accelerator.process_index, accelerator.num_processes,
                              lambda t: accelerator.reduce(t, "sum"))
    improved = keep == "best_heldout" and is_improvement(scores["heldout_nll"], best and best["heldout_nll"])
    if improved:
        best = {"step": step + 1, "heldout_nll": scores["heldout_nll"]}
    if accelerator.is_main_process:
        accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        log.info("step %d held-out tracking: %s%s", step, " ".join(f"{k}={v:.4f}" for k, v in scores.items()),
                 " (best so far: saved best.safetensors)" if improved else "")
        if improved:
            save_model(model, out_dir / "best.safetensors",
                       extra={"objective": cfg.train.objective, "selected": best, "source_config": cfg.to_dict()})
    return best


def _load_best(model: torch.nn.Module, out_dir: Path, best: dict | None) -> None:
    """train.keep = best_heldout: the run's result is the weights of its lowest held-out nll."""
    path = out_dir / "best.safetensors"
    if best is None:
        raise NonFiniteLossError(f"train.keep = best_heldout: no held-out evaluation of {out_dir} gave a finite nll; "
                                 "nothing was saved as the result")
    state = read_safetensors(path)
    info = read_model_info(path)
    if info.get("selected") != best:
        raise CheckpointError(f"{path} holds the weights of {info.get('selected')}, but this run's best held-out "
                              f"evaluation was {best}; rerun with --fresh")
    model.load_state_dict(state, strict=True)
    log.info("train.keep = best_heldout: the result is the weights after step %d (held-out nll %.4f per token)",
             best["step"], best["heldout_nll"])


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drop log lines of steps that a resumed run will redo, and a line torn by a kill mid-write."""
    if not path.is_file():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            step = json.loads(ln)["step"]
        except (ValueError, KeyError, TypeError):
            if ln.strip():
                log.warning("dropping a torn line of %s: %.80r", path, ln)
            continue
        if step < start_step:
            kept.append(ln)
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(train, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
