"""One training loop for every VAR objective: pretraining (nll), MCLR, CCA, CC-DPO, unlearning.

    accelerate launch var_mclr/train.py --cfg configs/var_d16.yaml [--set train.lr=1e-5 ...]
    python -m var_mclr.train --cfg configs/mnist/mclr.yaml

Rerunning the same command resumes from the newest checkpoint in run.out_dir. The final weights are written to
run.out_dir/model.safetensors (+ model.json) for eval/fid.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from var_mclr.builders import build_tokenizer, build_var, frozen_copy
from var_mclr.calibration import AUTO, resolve_auto_tau
from var_mclr.checkpoints import save_model
from var_mclr.config import Config, config_arg_parser, load_config, save_config
from var_mclr.data import build_dataset
from var_mclr.objectives import get_objective, objective_loss
from var_mclr.tokens import TokenStore
from var_mclr.train_state import checkpoint_dirs, load_training_state, save_training_state

log = logging.getLogger("var_mclr.train")


class NonFiniteLossError(RuntimeError):
    pass


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """All randomness of one micro-batch, derived from (seed, step): resuming needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def batch_indices(seed: int, micro_index: int, global_batch: int, n: int) -> torch.Tensor:
    """Dataset indices of one global micro-batch: a stream of seeded per-epoch permutations."""
    positions = torch.arange(micro_index * global_batch, (micro_index + 1) * global_batch)
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
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
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


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


def train(cfg: Config) -> Path:
    """Run (or resume) the configured training; returns the path of the final weights."""
    with flushing_denormals(cfg.train.flush_denormal):
        return _train(cfg)


def _train(cfg: Config) -> Path:
    t = cfg.train
    objective = get_objective(t.objective)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    out_dir = Path(cfg.run.out_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    set_seed(cfg.run.seed)  # the same fresh initialisation on every process and every rerun
    vae = build_tokenizer(cfg).to(device)
    var = build_var(cfg, vae).to(device)
    # CCA's trainer runs its frozen reference in training mode: with drop-path on, the reference drops paths too.
    ref = frozen_copy(var).train().to(device) if objective.needs_reference else None
    dataset = build_dataset(_dataset_args(cfg), "train")
    if dataset.num_classes != cfg.data.num_classes:
        raise ValueError(f"the dataset has {dataset.num_classes} classes "
                         f"but data.num_classes is {cfg.data.num_classes}")
    data_key = f"{cfg.data.name}-{cfg.data.resolution}-train"
    with accelerator.main_process_first():  # one process encodes the token cache, the others then read it
        tokens = TokenStore(dataset, vae, device, cache_dir=str(out_dir.parent / "token_cache")
                            if cfg.data.cache_tokens else None, data_key=data_key, with_flips=cfg.data.hflip)
    if len(tokens.labels_N) and (int(tokens.labels_N.min()) < 0 or int(tokens.labels_N.max()) >= var.num_classes):
        raise ValueError(f"dataset labels span [{int(tokens.labels_N.min())}, {int(tokens.labels_N.max())}] but the "
                         f"model has {var.num_classes} classes")  # checked once: the forward pass never syncs for it

    optimizer = make_optimizer(cfg, var)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    var, optimizer = accelerator.prepare(var, optimizer)
    model = accelerator.unwrap_model(var)

    start_step, nonfinite_total = 0, 0
    existing = checkpoint_dirs(out_dir)
    if existing:
        state = load_training_state(existing[-1], model, optimizer, scheduler)
        start_step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        log.info("resumed from %s at step %d", existing[-1], start_step)
        if cfg.loss.mclr.tau == AUTO:  # resolved when the run started; never re-measured on the fine-tuned model
            cfg.loss.mclr.tau = state.get("config", {}).get("loss", {}).get("mclr", {}).get("tau", AUTO)
        changed = _changed_keys(state.get("config", {}), cfg.to_dict())
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        if accelerator.is_main_process:
            _truncate_metrics(out_dir / "metrics.jsonl", start_step)
    else:
        if t.objective == "mclr" and cfg.loss.mclr.tau == AUTO:  # every process measures the same pairs
            cfg.loss.mclr.tau = resolve_auto_tau(model, tokens, cfg.loss, cfg.data.num_classes, cfg.run.seed)
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.yaml")  # with the resolved cap

    images = None
    if not tokens.cached:  # decode and encode images on the fly, DataLoader workers reading ahead
        sampler = RankBatchSampler(cfg.run.seed, t.batch_size * world, len(tokens), rank, t.batch_size,
                                   start_step * t.grad_accum, t.steps * t.grad_accum)
        images = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                 pin_memory=device.type == "cuda"))
    writer = SummaryWriter(str(out_dir / "tb")) if accelerator.is_main_process else None
    global_batch = t.batch_size * world
    nonfinite_in_row = 0
    last_ckpt = existing[-1] if existing else None
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
        # One host sync per step decides whether to update: a non-finite loss on any process, or a non-finite
        # gradient norm (the same on every process after DDP's all-reduce), skips the step.
        grad_norm = accelerator.clip_grad_norm_(var.parameters(), t.grad_clip)
        finite = bool(torch.isfinite(accelerator.reduce(loss_sum, "sum")) & torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            optimizer.step()
            nonfinite_in_row = 0
        else:
            nonfinite_total += 1
            nonfinite_in_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
                        step, nonfinite_in_row, nonfinite_total)
            if nonfinite_in_row >= t.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"{nonfinite_in_row} non-finite steps in a row at step {step}; stopping. The last good "
                    f"checkpoint is {last_ckpt or 'none (no checkpoint was written yet)'}; lower train.lr or check "
                    f"the objective's settings")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        dt = time.perf_counter() - tic
        if step % cfg.run.log_every == 0 or step == t.steps - 1:
            stats_mean = {k: float(accelerator.reduce(v, "mean")) for k, v in stats_sum.items()}  # all processes
        if writer is not None and (step % cfg.run.log_every == 0 or step == t.steps - 1):
            scalars = {**stats_mean, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": global_batch * t.grad_accum * model.L / dt, "nonfinite_total": nonfinite_total}
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, step)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            progress.set_postfix({k: f"{stats_mean[k]:.4f}" for k in list(stats_mean)[:4]})
            log.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in scalars.items()))
        done = step + 1
        if done % cfg.run.ckpt_every == 0 or done == t.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_ckpt = save_training_state(out_dir, done, model, optimizer, scheduler,
                                                {"nonfinite_total": nonfinite_total, "config": cfg.to_dict()},
                                                keep=cfg.run.keep_ckpts)
    accelerator.wait_for_everyone()
    final = out_dir / "model.safetensors"
    if accelerator.is_main_process:
        save_model(model, final, extra={"objective": t.objective, "steps": t.steps, "source_config": cfg.to_dict()})
        writer.close()
    accelerator.end_training()
    return final


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drop log lines of steps that a resumed run will redo."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < start_step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _dataset_args(cfg: Config) -> dict:
    d = cfg.data
    args = {"name": d.name, "resolution": d.resolution, "num_classes": d.num_classes}
    if d.name == "imagefolder":
        args["root"] = d.root
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = config_arg_parser(__doc__).parse_args(argv)
    cfg = load_config(args.cfg, args.set)
    train(cfg)


if __name__ == "__main__":
    sys.exit(main())
