"""FSDP2 through accelerate: what the trainer needs beyond plain DDP (configs/accelerate/fsdp.yaml).

accelerate shards the model (each AdaLNSelfAttn block one unit, the embeddings, head norm and head in the root unit)
and remaps the optimizer in `accelerator.prepare(model, optimizer)`. Around that, a sharded run needs:
- the precision policy: bf16 weights gathered for compute, gradients reduced in fp32, every unit's output (a block's
  residual stream, the log-likelihoods) in fp32 and its inputs not cast, so under autocast the stream between blocks
  stays fp32 as under DDP (`fsdp_plugin`);
- the full model and optimizer state gathered on the main process for checkpoints and the saved model, in the same
  files and layout DDP writes, and a full state scattered back onto the shards on resume (`FullModel`,
  `FullOptimizer`, which stand in for the model and optimizer that train_state.py and checkpoints.py read);
- checks that read sharded parameters (`nonfinite_parameters`) and a gradient norm that is a DTensor (`plain`);
- no `no_sync` while accumulating: FSDP2 would keep every unsharded gradient until the last micro-batch
  (`accumulation_sync`);
- forwards outside the training step (held-out tracking, calibration) under autocast, since the gathered weights
  are bf16 (`evaluation_precision`), and the same number of them on every process (heldout.py's lockstep).
accelerate runs FSDP only on GPUs: on a CPU it drops the FSDP config and trains with DDP, so a launch with an FSDP
config that did not give FSDP is refused (`check_sharding`).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from var_mclr.checkpoints import nonfinite_entries, parameters_in
from var_mclr.errors import UserError

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_requested() -> bool:
    """accelerate launch was given an FSDP config (it exports ACCELERATE_USE_FSDP to every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def fsdp_plugin(mixed_precision: str):
    """The FSDP plugin for Accelerator(fsdp_plugin=...) when FSDP was asked for, else None. Its other settings come
    from the accelerate config (wrapping, resharding); the precision policy is the run's: accelerate's default
    would gather bf16 weights but also reduce gradients in bf16 and cast every unit's inputs and outputs to bf16
    (a bf16 residual stream and bf16 log-likelihoods). The root unit's embeddings are gathered in bf16 too, so the
    stream enters the first block rounded to bf16 (under DDP's autocast it starts in fp32)."""
    if not fsdp_requested():
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = LOW_PRECISION.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                  output_dtype=torch.float32 if dtype else None, cast_forward_inputs=False)
    return FullyShardedDataParallelPlugin(mixed_precision_policy=policy)


def check_sharding(accelerator) -> None:
    """Refuse an FSDP launch that accelerate turned into something else (on a CPU it silently trains with DDP)."""
    if fsdp_requested() and not is_sharded(accelerator):
        raise UserError(f"accelerate was launched with an FSDP config, but runs {accelerator.distributed_type} "
                        "here: accelerate shards only on GPUs. Launch with configs/accelerate/ddp.yaml (or "
                        "--multi_gpu on a CPU-only machine)")


def plain(t):
    """A tensor from what clip_grad_norm_ returns: under FSDP2 the total norm is a replicated DTensor."""
    from torch.distributed.tensor import DTensor

    t = torch.as_tensor(t)
    return t.full_tensor() if isinstance(t, DTensor) else t


def accumulation_sync(accelerator, model, last_micro: bool):
    """The context of one micro-batch's backward: DDP skips the all-reduce until the last micro-batch; FSDP2
    reduce-scatters every micro-batch, keeping gradients sharded (no_sync would hold them all unsharded)."""
    if last_micro or is_sharded(accelerator):
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def nonfinite_parameters(accelerator, model: torch.nn.Module) -> dict[str, int]:
    """{name: count of inf/NaN values} of the model's parameters, the same on every process."""
    if not is_sharded(accelerator):
        return nonfinite_entries(parameters_in(model, model.state_dict()))
    names, counts = [], []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        names.append(name)
        counts.append((~torch.isfinite(local.detach())).sum())
    total = torch.stack(counts)
    torch.distributed.all_reduce(total)  # each process counted its own shard
    return {n: int(c) for n, c in zip(names, total.tolist()) if c}


_FULL_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the whole state, on rank 0's CPU


class FullModel:
    """The full state of a model as save_model, train_state.py and a strict load see it. `gather` must run on every
    process (it is a collective); the main process then holds every tensor, the others none. Loading scatters a
    full state dict (every process holds it) onto the shards."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None):
        self.model, self.cfg, self._state = model, model.cfg, state

    @classmethod
    def gather(cls, accelerator, model: torch.nn.Module):
        """The model itself under DDP (its state dict is already full), else its gathered full state."""
        if not is_sharded(accelerator):
            return model
        state = get_model_state_dict(model, options=_FULL_OPTIONS)
        return cls(model, state if accelerator.is_main_process else None)

    def named_parameters(self):
        return self.model.named_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            raise RuntimeError("FullModel.state_dict: the full state was not gathered (use FullModel.gather)")
        return self._state

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        return set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


class FullOptimizer:
    """The optimizer's full state in torch's own layout (state keyed by parameter index in param_groups order), the
    layout DDP checkpoints hold, so a checkpoint resumes under either. Gathering and loading as FullModel."""

    def __init__(self, model: torch.nn.Module, optimizer, state: dict | None = None):
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)
        self._state = state

    @classmethod
    def gather(cls, accelerator, model: torch.nn.Module, optimizer):
        if not is_sharded(accelerator):
            return optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        full = get_optimizer_state_dict(model, inner, options=_FULL_OPTIONS)
        return cls(model, optimizer, _by_index(full) if accelerator.is_main_process else None)

    def state_dict(self) -> dict:
        if self._state is None:
            raise RuntimeError("FullOptimizer.state_dict: the full state was not gathered (use FullOptimizer.gather)")
        return self._state

    def load_state_dict(self, state: dict) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        by_name = {"state": {order[int(i)]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                    for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _by_index(full: dict) -> dict:
    """A full optimizer state keyed by parameter names (torch.distributed.checkpoint's) keyed by index instead."""
    index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    return {"state": {index[n]: s for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def restorable(accelerator, model: torch.nn.Module, optimizer):
    """(model, optimizer) as train_state.resume_newest loads them: themselves under DDP, else FullModel and
    FullOptimizer, which scatter the checkpoint's full state onto the shards."""
    if not is_sharded(accelerator):
        return model, optimizer
    return FullModel(model), FullOptimizer(model, optimizer)


def evaluation_precision(accelerator):
    """The context of a forward outside the training step (held-out tracking, calibration): FSDP gathers bf16
    weights for every forward, which only autocast turns into bf16 matmuls over fp32 activations."""
    if is_sharded(accelerator) and accelerator.mixed_precision != "no":
        return accelerator.autocast()
    return contextlib.nullcontext()
