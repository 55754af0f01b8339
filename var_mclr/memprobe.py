"""CPU memory measurements for the memory plan (var_mclr/plan.py): the profiler's allocation events, replayed.

torch.profiler(profile_memory=True) records every CPU allocation and free made while it runs, with its size. Replaying
them in time order gives the bytes live at every moment: `peak_bytes` is the highest point and `retained_bytes` what
is still live at the end (e.g. the activations a forward leaves for its backward). Only memory allocated inside the
measured call counts, so tensors created before it (weights, inputs) are not part of the result unless the call makes
them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def _memory_events(run: Callable[[], object]) -> tuple[list[int], object]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return [n for _, n in events], out


def peak_and_retained(run: Callable[[], object]) -> tuple[int, int, object]:
    """(peak live bytes, bytes still live at the end, run's return value) of run() on the CPU. Keep the return value
    alive to count what it holds (a loss keeps its graph's saved tensors)."""
    sizes, out = _memory_events(run)
    cur = peak = 0
    for n in sizes:
        cur += n
        peak = max(peak, cur)
    return peak, cur, out


def peak_bytes(run: Callable[[], object]) -> int:
    return peak_and_retained(run)[0]


def retained_bytes(run: Callable[[], object]) -> tuple[int, object]:
    _, kept, out = peak_and_retained(run)
    return kept, out


def train_steps_peak(cfg, steps: int = 2, seed: int = 0) -> int:
    """Peak CPU bytes of building the model (and reference) of cfg and running `steps` optimizer steps of its objective
    on random tokens, the way var_mclr/train.py steps (autocast over forward and backward, grad accumulation,
    clipping, AdamW, grads set to None): what var_mclr.plan predicts for one process. cache_tokens runs only (the
    tokenizer is not part of it)."""
    from var_mclr.config import var_config, vqvae_config
    from var_mclr.model import VAR
    from var_mclr.objectives import get_objective, objective_loss

    t, vae_cfg = cfg.train, vqvae_config(cfg.tokenizer)
    var_cfg = var_config(cfg.model, vae_cfg.vocab_size, vae_cfg.z_channels, cfg.data.num_classes, vae_cfg.v_patch_nums)
    objective = get_objective(t.objective)
    micro = t.micro_batch if t.global_batch else t.batch_size
    accum = t.global_batch // micro if t.global_batch else t.grad_accum
    g = torch.Generator().manual_seed(seed)
    L = sum(p * p for p in vae_cfg.v_patch_nums)
    batches = [(torch.randint(0, vae_cfg.vocab_size, (micro, L), generator=g),
                torch.randn(micro, L - 1, vae_cfg.z_channels, generator=g),
                torch.randint(0, cfg.data.num_classes, (micro,), generator=g)) for _ in range(accum)]
    lowp = t.mixed_precision != "no"

    def run():
        torch.manual_seed(seed)
        var = VAR(var_cfg, logprob_impl="chunked")
        var.activation_checkpointing = t.activation_checkpointing
        ref = VAR(var_cfg, logprob_impl="chunked").requires_grad_(False) if objective.needs_reference else None
        opt = torch.optim.AdamW(var.parameters(), lr=1e-6)
        for step in range(steps):
            for idx, x, label in batches:
                plan = objective.plan(cfg.loss, label, cfg.data.num_classes, 0.0, torch.Generator().manual_seed(step))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowp):
                    loss, _ = objective_loss(objective, cfg.loss, var, ref, plan, idx, x)
                    (loss / accum).backward()
                del loss
            torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return peak_bytes(run)
