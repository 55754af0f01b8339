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
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from var_mclr.batches import RankBatchSampler, batch_indices, step_generator
from var_mclr.builders import build_tokenizer, build_var, frozen_copy, tokenizer_record
from var_mclr.checkpoints import CheckpointError, read_model_info, read_safetensors, save_model
from var_mclr.config import Config, ConfigError, run_from_command_line, save_config
from var_mclr.data import build_dataset, dataset_args
from var_mclr.errors import UserError
from var_mclr.files import write_text_atomic
from var_mclr.heldout import HeldoutTracker, is_improvement
from var_mclr.machine import machine_record
from var_mclr.objectives import Objective, get_objective, objective_loss
from var_mclr.objectives.base import RowSource
from var_mclr.optim import make_optimizer, make_scheduler
from var_mclr.plan import resolve_batch, sharding_of
from var_mclr import sharding
from var_mclr.run_dir import check_resume, claim_run_dir, input_hashes, record_changes, run_dir_lock
from var_mclr.step_skip import PendingSteps, device_skip_available, skip_unless
from var_mclr.tokens import TokenStore
from var_mclr.train_state import resume_newest, save_training_state

log = logging.getLogger("var_mclr.train")


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced inf/NaN: in the loss or gradients too many steps in a row, or in the weights."""


class NoHeldoutResultError(UserError, RuntimeError):
    """train.keep = best_heldout, but no held-out evaluation gave a finite nll."""


@dataclass
class Run:
    """What one run trains with, built once by setup(). cfg is the resolved config (batch, steps and the objective's
    measured settings filled in), a copy: the caller's config is never written to."""
    cfg: Config
    accelerator: Accelerator
    objective: Objective
    out_dir: Path
    vae: torch.nn.Module
    var: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    model: torch.nn.Module  # the unwrapped VAR: what is saved and evaluated
    ref: torch.nn.Module | None  # the frozen reference of objectives that need one
    dataset: object
    tokens: TokenStore
    tracker: HeldoutTracker | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    inputs: dict  # hashes of the files the run starts from (run_dir.check_resume)
    device_skip: bool  # CUDA: a non-finite step is skipped on the device (var_mclr/step_skip.py)
    images: object = None  # an iterator of image batches when tokens are encoded on the fly
    rows: RowSource | None = None  # the objective's second data source (Objective.extra_rows: DDO's samples)

    @property
    def global_micro_batch(self) -> int:  # images of one micro-step over all processes
        return self.cfg.train.batch_size * self.accelerator.num_processes


@dataclass
class LoopState:
    """The counters the loop carries from step to step; saved in every checkpoint."""
    start_step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    last_ckpt: Path | None = None
    resumed_from: Path | None = None
    best: dict | None = None  # {"step", "heldout_nll"} of best.safetensors, when train.keep = best_heldout
    history: list = field(default_factory=list)  # settings changed by resumes (run_dir.record_changes)
    pending: PendingSteps = field(default_factory=PendingSteps)

    def last_good(self) -> str:
        if self.last_ckpt is not None:
            return f"The last good checkpoint is {self.last_ckpt}"
        if self.resumed_from is not None:  # not one finite step since the resume: the checkpoint itself is bad
            return (f"No good checkpoint: the one this run resumed from, {self.resumed_from}, gives non-finite losses "
                    "itself (rerun with --fresh to start over)")
        return "No good checkpoint was written yet"


@dataclass
class StepOutcome:
    stats_sum: dict  # per-process means over the micro-batches, still on the device
    grad_norm: torch.Tensor
    seconds: float


def train(cfg: Config, fresh: bool = False) -> Path:
    """Run (or resume) the configured training; returns the path of the final weights. fresh: first delete what an
    earlier run left in run.out_dir (required to change its objective or architecture)."""
    with claimed_run_dir(cfg, fresh), flushing_denormals(cfg.train.flush_denormal):
        run = setup(cfg)
        run, loop = resume(run)
        steps = run.cfg.train.steps
        progress = tqdm(range(loop.start_step, steps), initial=loop.start_step, total=steps, desc=run.objective.name,
                        disable=not run.accelerator.is_main_process, dynamic_ncols=True)
        for step in progress:
            outcome = train_step(run, loop, step)
            after_step(run, loop, step, outcome, progress)
        return finish(run, loop)


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


# ---------------------------------------------------------------------------------------------------------- setup

def setup(cfg: Config) -> Run:
    """The accelerator, models, data, held-out tracker, optimizer and schedule of a run, and its resolved config."""
    accelerator = make_accelerator(cfg)
    cfg = with_batch(cfg, accelerator)
    set_seed(cfg.run.seed)  # the same fresh initialisation on every process and every rerun
    vae, var, ref, inputs = build_models(cfg, accelerator.device)
    objective = get_objective(cfg.train.objective)
    # DDO's reference samples: opened, and checked to be model.init's, before anything is written
    rows = objective.extra_rows(cfg, ref, vae, accelerator.device) if objective.extra_rows is not None else None
    dataset, tokens = load_training_data(cfg, accelerator, vae, var)
    cfg = with_steps(cfg, len(tokens), accelerator.num_processes)
    tracker = (HeldoutTracker(dataset_args(dataclasses.asdict(cfg.data)), cfg.run.eval_images, vae,
                              accelerator.device, cfg.data.num_classes) if cfg.run.eval_every else None)
    optimizer = make_optimizer(cfg, var)
    scheduler = make_scheduler(cfg, optimizer)
    var, optimizer = accelerator.prepare(var, optimizer)
    return Run(cfg=cfg, accelerator=accelerator, objective=objective,
               out_dir=Path(cfg.run.out_dir), vae=vae, var=var, model=accelerator.unwrap_model(var), ref=ref,
               dataset=dataset, tokens=tokens, tracker=tracker, optimizer=optimizer, scheduler=scheduler,
               inputs=inputs, device_skip=device_skip_available(optimizer, accelerator.device,
                                                                cfg.train.mixed_precision), rows=rows)


def make_accelerator(cfg: Config) -> Accelerator:
    # run.log_with: experiment trackers through accelerate (TensorBoard under run.out_dir/tb by default, or wandb).
    # An FSDP launch (configs/accelerate/fsdp.yaml) gets the run's precision policy (var_mclr/sharding.py).
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                              log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
                              project_config=ProjectConfiguration(project_dir=cfg.run.out_dir,
                                                                  logging_dir=str(Path(cfg.run.out_dir) / "tb")),
                              fsdp_plugin=sharding.fsdp_plugin(cfg.train.mixed_precision))
    sharding.check_sharding(accelerator)
    return accelerator


def with_batch(cfg: Config, accelerator: Accelerator) -> Config:
    """train.global_batch: the micro-batch and accumulation this process count needs; on CUDA the memory plan must
    fit first (var_mclr/plan.py), so a config that cannot fit stops here, naming the keys to change."""
    t, world = cfg.train, accelerator.num_processes
    batch_size, grad_accum = resolve_batch(cfg, world, accelerator.device, sharding_of(accelerator))
    log.info("world size %d (%s), global batch %d = micro-batch %d x %d processes x %d accumulation; peak lr %g "
             "(%s schedule, %d warm-up steps)", world, accelerator.distributed_type, batch_size * world * grad_accum,
             batch_size, world, grad_accum, t.lr, t.lr_schedule, t.warmup_steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=batch_size, grad_accum=grad_accum))


def with_steps(cfg: Config, num_images: int, world: int) -> Config:
    """train.epochs, when set, decides train.steps at this global batch."""
    t = cfg.train
    if t.epochs is None:
        return cfg
    global_batch = t.batch_size * world * t.grad_accum
    steps = steps_for_epochs(t.epochs, num_images, global_batch)
    log.info("train.epochs = %g over %d training images at a global batch of %d: %d steps", t.epochs, num_images,
             global_batch, steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps))


def steps_for_epochs(epochs: float, num_images: int, global_batch: int) -> int:
    """Optimiser steps of `epochs` passes over num_images at this global batch (micro-batches x processes)."""
    return max(1, math.ceil(epochs * num_images / global_batch))


def build_models(cfg: Config, device: torch.device):
    """(tokenizer, VAR, frozen reference or None, hashes of the files they start from)."""
    vae = build_tokenizer(cfg).to(device)
    var = build_var(cfg, vae).to(device)
    var.activation_checkpointing = cfg.train.activation_checkpointing
    inputs = input_hashes(cfg, vae, var)  # what a resume must start from again (run_dir.check_resume)
    # CCA's trainer runs its frozen reference in training mode: with drop-path on, the reference drops paths too.
    ref = frozen_copy(var).train().to(device) if get_objective(cfg.train.objective).needs_reference else None
    if cfg.train.compile:  # after the reference copy, which stays eager; names and checkpoints are unchanged
        var.compile_blocks()
    return vae, var, ref, inputs


def load_training_data(cfg: Config, accelerator: Accelerator, vae, var):
    """(the training dataset, its tokens: cached, or encoded on the fly), checked against the model's classes."""
    out_dir = Path(cfg.run.out_dir)
    if cfg.data.cache_tokens and cfg.data.name == "imagefolder" and cfg.data.crop == "imagenet":
        log.warning("data.crop = imagenet draws a random crop per read, which the token cache would freeze once per "
                    "image: caching the centre crop instead (data.cache_tokens=false trains on random crops)")
    with accelerator.main_process_first():  # one process lists (and with data.verify, opens) every file, once
        dataset = build_dataset(dataset_args(dataclasses.asdict(cfg.data)), "train",
                                deterministic=cfg.data.cache_tokens, index_cache=str(out_dir.parent / "index_cache"))
    if dataset.num_classes != cfg.data.num_classes:
        raise ConfigError(f"the dataset has {dataset.num_classes} classes "
                          f"but data.num_classes is {cfg.data.num_classes}")
    with accelerator.main_process_first():  # one process encodes the token cache, the others then read it
        tokens = TokenStore(dataset, vae, accelerator.device, cache_dir=str(out_dir.parent / "token_cache")
                            if cfg.data.cache_tokens else None, data_key=f"{cfg.data.name}-{cfg.data.resolution}-train",
                            with_flips=cfg.data.hflip)
    labels = tokens.labels_N
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= var.num_classes):
        raise ConfigError(f"dataset labels span [{int(labels.min())}, {int(labels.max())}] but the "
                          f"model has {var.num_classes} classes")  # checked once: the forward pass never syncs for it
    return dataset, tokens


# --------------------------------------------------------------------------------------------------------- resume

def resume(run: Run) -> tuple[Run, LoopState]:
    """Continue from the newest usable checkpoint of run.out_dir, or start fresh; the objective's measured settings
    are resolved here (kept from the run's start on a resume). Writes the resolved config.yaml."""
    cfg, loop, saved_loss = run.cfg, LoopState(), None
    # under FSDP the checkpoint's full state is scattered onto the shards (sharding.restorable)
    resumed = resume_newest(run.out_dir, *sharding.restorable(run.accelerator, run.model, run.optimizer),
                            run.scheduler)
    if resumed:
        loop.resumed_from, state = resumed
        check_resume(loop.resumed_from, state, cfg, run.inputs, cfg.train.steps)
        loop.start_step, loop.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        loop.best = state.get("best_heldout")
        saved_loss = state.get("config", {}).get("loss", {})
        log.info("resumed from %s at step %d", loop.resumed_from, loop.start_step)
    if run.objective.prepare is not None:  # every process measures the same pairs
        with sharding.evaluation_precision(run.accelerator):
            loss = run.objective.prepare(cfg.loss, run.model, run.tokens, cfg.data.num_classes, cfg.run.seed,
                                         saved_loss)
        cfg = dataclasses.replace(cfg, loss=loss)
    if resumed:
        loop.history = record_changes(state.get("config", {}), cfg.to_dict(), loop.start_step,
                                      state.get("config_history", []))
    if run.accelerator.is_main_process:  # also before any checkpoint: a run killed early logged steps it will redo
        _truncate_metrics(run.out_dir / "metrics.jsonl", loop.start_step)
        save_config(cfg, run.out_dir / "config.yaml")  # what this run trains with (the resolved cap included)
    run = dataclasses.replace(run, cfg=cfg, images=_image_batches(run, cfg, loop.start_step))
    run.accelerator.init_trackers("var-mclr", init_kwargs={"wandb": {"name": run.out_dir.name}})
    return run, loop


def _image_batches(run: Run, cfg: Config, start_step: int):
    """Uncached tokens: DataLoader workers decode this process's images ahead of the loop, from start_step on."""
    if run.tokens.cached:
        return None
    t = cfg.train
    sampler = RankBatchSampler(cfg.run.seed, run.global_micro_batch, len(run.tokens), run.accelerator.process_index,
                               t.batch_size, start_step * t.grad_accum, t.steps * t.grad_accum)
    return iter(DataLoader(run.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                           pin_memory=run.accelerator.device.type == "cuda"))


# ----------------------------------------------------------------------------------------------------------- step

def train_step(run: Run, loop: LoopState, step: int) -> StepOutcome:
    """One optimizer step: gradients of every micro-batch, then the update unless the step was non-finite."""
    tic = time.perf_counter()
    run.var.train()
    loss_sum, stats_sum = accumulate_gradients(run, step)
    grad_norm = apply_update(run, loop, step, loss_sum)
    return StepOutcome(stats_sum, grad_norm, time.perf_counter() - tic)


def accumulate_gradients(run: Run, step: int) -> tuple[torch.Tensor, dict]:
    """Forward and backward of train.grad_accum micro-batches; the classes, flips and drop-path of each are drawn
    from (seed, step), so every process count and every resume sees the same (docs/method.md)."""
    cfg, t, accelerator = run.cfg, run.cfg.train, run.accelerator
    rank = accelerator.process_index
    stats_sum: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(t.grad_accum):
        gen = step_generator(cfg.run.seed, step, micro)
        idx_G = batch_indices(cfg.run.seed, step * t.grad_accum + micro, run.global_micro_batch, len(run.tokens))
        plan = run.objective.plan(cfg.loss, run.tokens.labels_N[idx_G], cfg.data.num_classes, t.class_dropout, gen)
        flip_G = (torch.rand(run.global_micro_batch, generator=gen) < 0.5) if cfg.data.hflip else None
        if cfg.model.drop_path_rate > 0:  # drop-path draws from torch's RNG: reseed it so a resumed run matches
            torch.manual_seed(gen.initial_seed() + 7_919 * (rank + 1))
        mine = slice(rank * t.batch_size, (rank + 1) * t.batch_size)
        idx_BL, x_BLCv = run.tokens.batch(idx_G[mine], None if flip_G is None else flip_G[mine],
                                          None if run.images is None else next(run.images)[0])
        extra = (None if run.rows is None else  # drawn from (seed, micro-step), as the data batch is
                 run.rows.rows(cfg.run.seed, step * t.grad_accum + micro, run.global_micro_batch, mine))
        sync = sharding.accumulation_sync(accelerator, run.var, micro == t.grad_accum - 1)
        with sync, accelerator.autocast():
            loss, stats = objective_loss(run.objective, cfg.loss, run.var, run.ref, plan.slice(mine), idx_BL, x_BLCv,
                                         extra)
            accelerator.backward(loss / t.grad_accum)
        loss_sum += loss.detach()
        for k, v in stats.items():  # kept on the device; reduced across processes only at log steps
            stats_sum[k] = stats_sum.get(k, 0.0) + v.detach() / t.grad_accum
    return loss_sum, stats_sum


def apply_update(run: Run, loop: LoopState, step: int, loss_sum: torch.Tensor) -> torch.Tensor:
    """Clip, then step the optimizer unless the step was non-finite. A non-finite loss on any process, or a
    non-finite gradient norm (the same on every process after DDP's all-reduce), skips the step. On CUDA the fused
    AdamW skips it on the device and the host reads the outcome at the next log or checkpoint step
    (var_mclr/step_skip.py): no host sync in between."""
    t, accelerator, optimizer = run.cfg.train, run.accelerator, run.optimizer
    grad_norm = sharding.plain(accelerator.clip_grad_norm_(run.var.parameters(), t.grad_clip))
    finite = torch.isfinite(accelerator.reduce(loss_sum, "sum")) & torch.isfinite(torch.as_tensor(grad_norm))
    loop.pending.append(step, finite)
    if run.device_skip:
        skip_unless(optimizer, finite)
        optimizer.step()
    if not run.device_skip or is_log_step(run.cfg, step) or is_checkpoint_step(run.cfg, step + 1):
        for at, updated in loop.pending.settle():
            if updated and not run.device_skip:
                optimizer.step()
            _count_nonfinite(run.cfg, loop, at, updated)
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return grad_norm


def _count_nonfinite(cfg: Config, loop: LoopState, step: int, updated: bool) -> None:
    if updated:
        loop.nonfinite_in_row = 0
        loop.last_ckpt = loop.last_ckpt or loop.resumed_from  # it gave a finite step: a good checkpoint to name
        return
    loop.nonfinite_total += 1
    loop.nonfinite_in_row += 1
    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
                step, loop.nonfinite_in_row, loop.nonfinite_total)
    if loop.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
        raise NonFiniteLossError(f"{loop.nonfinite_in_row} non-finite steps in a row at step {step}; stopping. "
                                 f"{loop.last_good()}; lower train.lr or check the objective's settings")


def is_log_step(cfg: Config, step: int) -> bool:
    return step % cfg.run.log_every == 0 or step == cfg.train.steps - 1


def is_checkpoint_step(cfg: Config, done: int) -> bool:
    return done % cfg.run.ckpt_every == 0 or done == cfg.train.steps


# ----------------------------------------------------------------------------------------------------- after step

def after_step(run: Run, loop: LoopState, step: int, outcome: StepOutcome, progress: tqdm) -> None:
    """Logging, held-out tracking and checkpoints after `step`."""
    cfg, done = run.cfg, step + 1
    if is_log_step(cfg, step):
        _log_step(run, loop, step, outcome, progress)
    if run.tracker is not None and (done % cfg.run.eval_every == 0 or done == cfg.train.steps):
        loop.best = _track(run, step, loop.best)
    if is_checkpoint_step(cfg, done):
        require_finite_weights(run, done, loop)  # the same on every process
        run.accelerator.wait_for_everyone()
        if loop.nonfinite_in_row:
            log.warning("step %d: no checkpoint, the weights gave a non-finite loss at the last step", done)
            return
        # FSDP: every process takes part in gathering the full state onto the main process
        model, optimizer = (sharding.FullModel.gather(run.accelerator, run.model),
                            sharding.FullOptimizer.gather(run.accelerator, run.model, run.optimizer))
        if run.accelerator.is_main_process:
            loop.last_ckpt = save_training_state(
                run.out_dir, done, model, optimizer, run.scheduler,
                {"nonfinite_total": loop.nonfinite_total, "config": cfg.to_dict(), "best_heldout": loop.best,
                 "inputs": run.inputs, "config_history": loop.history}, keep=cfg.run.keep_ckpts)


def _log_step(run: Run, loop: LoopState, step: int, outcome: StepOutcome, progress: tqdm) -> None:
    accelerator = run.accelerator
    stats_mean = {k: float(accelerator.reduce(v, "mean")) for k, v in outcome.stats_sum.items()}  # all processes
    if not accelerator.is_main_process:
        return
    images = run.global_micro_batch * run.cfg.train.grad_accum
    scalars = {**stats_mean, "grad_norm": float(outcome.grad_norm), "lr": run.scheduler.get_last_lr()[0],
               "tokens_per_s": images * run.model.L / outcome.seconds, "nonfinite_total": loop.nonfinite_total}
    accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
    with open(run.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")
    progress.set_postfix({k: f"{stats_mean[k]:.4f}" for k in list(stats_mean)[:4]})
    log.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in scalars.items()))


def require_finite_weights(run: Run, step: int, loop: LoopState) -> None:
    """Parameters holding inf/NaN stop the run: no later step can repair them, and they are never saved."""
    bad = sharding.nonfinite_parameters(run.accelerator, run.model)
    if bad:
        raise NonFiniteLossError(
            f"after step {step} the parameters hold {sum(bad.values())} inf/NaN values (e.g. {next(iter(bad))}); "
            f"nothing was saved. {loop.last_good()}; lower train.lr or check the objective's settings")


def _track(run: Run, step: int, best: dict | None) -> dict | None:
    """One held-out evaluation after `step`: logged, and with train.keep = best_heldout a new lowest held-out nll
    saves the weights as best.safetensors. Returns the (possibly new) best."""
    accelerator, cfg = run.accelerator, run.cfg
    with sharding.evaluation_precision(accelerator):  # FSDP: every process runs as many forwards (lockstep)
        scores = run.tracker.evaluate(run.model, accelerator.process_index, accelerator.num_processes,
                                      lambda t: accelerator.reduce(t, "sum"), sharding.is_sharded(accelerator))
    improved = cfg.train.keep == "best_heldout" and is_improvement(scores["heldout_nll"], best and best["heldout_nll"])
    if improved:
        best = {"step": step + 1, "heldout_nll": scores["heldout_nll"]}
    model = sharding.FullModel.gather(accelerator, run.model) if improved else run.model  # on every process
    if accelerator.is_main_process:
        accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
        with open(run.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        log.info("step %d held-out tracking: %s%s", step, " ".join(f"{k}={v:.4f}" for k, v in scores.items()),
                 " (best so far: saved best.safetensors)" if improved else "")
        if improved:
            save_model(model, run.out_dir / "best.safetensors",
                       extra={"objective": cfg.train.objective, "selected": best, "source_config": cfg.to_dict()})
    return best


# --------------------------------------------------------------------------------------------------------- finish

def finish(run: Run, loop: LoopState) -> Path:
    """Write the run's result, model.safetensors: the final weights, or with train.keep = best_heldout those of the
    lowest held-out nll."""
    cfg = run.cfg
    require_finite_weights(run, cfg.train.steps, loop)
    if loop.nonfinite_in_row:
        raise NonFiniteLossError(f"the last {loop.nonfinite_in_row} step(s) gave a non-finite loss or gradient, so "
                                 f"the final weights were not saved. {loop.last_good()}; lower train.lr or check the "
                                 "objective's settings")
    run.accelerator.wait_for_everyone()
    final = run.out_dir / "model.safetensors"
    extra = {"objective": cfg.train.objective, "steps": cfg.train.steps, "source_config": cfg.to_dict(),
             "inputs": run.inputs, "config_history": loop.history,
             "tokenizer": tokenizer_record(cfg.tokenizer.checkpoint, run.vae), "machine": machine_record()}
    if cfg.train.keep == "best_heldout":
        _load_best(sharding.restorable(run.accelerator, run.model, run.optimizer)[0], run.out_dir, loop.best)
        extra["selected"] = loop.best
    model = sharding.FullModel.gather(run.accelerator, run.model)  # FSDP: the full state, on the main process
    if run.accelerator.is_main_process:
        save_model(model, final, extra=extra)
    # Every process past the gather and the save before the group is torn down: a rank destroying it while its
    # peer still works aborted at exit ("terminate called without an active exception") in the FSDP tests.
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()  # also closes the trackers
    return final


def _load_best(model: torch.nn.Module, out_dir: Path, best: dict | None) -> None:
    """train.keep = best_heldout: the run's result is the weights of its lowest held-out nll."""
    path = out_dir / "best.safetensors"
    if best is None:
        raise NoHeldoutResultError(f"train.keep = best_heldout: no held-out evaluation of {out_dir} gave a finite "
                                   "nll; nothing was saved as the result")
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
