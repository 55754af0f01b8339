"""Training checkpoints: model, optimizer, scheduler and step, written atomically and found again on restart.

Each checkpoint is a directory ``checkpoints/step_0000123/`` built under a temporary name and renamed into place,
so a directory with a step name is always complete; a killed run leaves at worst a stray temporary directory, which
is ignored and cleaned up. Weights holding inf/NaN are never written. A checkpoint that still cannot be used (a disk
that filled up, a file edited by hand) is skipped on resume with a warning naming it, for the one before it.
Tensors go to safetensors; everything else to JSON. All randomness in training is drawn from generators seeded by
(seed, step), so the step number is the whole RNG state.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from var_mclr.checkpoints import CheckpointError, parameters_in, read_safetensors, require_finite, save_model
from var_mclr.files import atomic_write, make_temp_dir, write_text_atomic

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{7})$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"state.{pid}.{name}": torch.as_tensor(v).detach().cpu().contiguous()
               for pid, state in sd["state"].items() for name, v in state.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def save_training_state(out_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    require_finite(parameters_in(model, model.state_dict()), f"the model at step {step}")
    tmp = make_temp_dir(root, ".tmp_")
    try:
        save_model(model, tmp / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        atomic_write(tmp / "optimizer.safetensors", lambda f: save_file(opt_tensors, f))  # keeps the umask
        state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, **extra}
        write_text_atomic(tmp / "state.json", json.dumps(state, indent=2, default=str))
        if final.exists():  # re-saving the same step (e.g. the final one): swap in the new copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for newer in [d for d in checkpoint_dirs(out_dir) if step_of(d) > step]:
        # Only a resume that skipped it as unusable leaves a newer one: pruning must not keep it over good ones.
        log.warning("removing %s, newer than the resumed run and skipped as unusable", newer)
        shutil.rmtree(newer, ignore_errors=True)
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp_*"):
        shutil.rmtree(stray, ignore_errors=True)
    return final


def step_of(ckpt_dir: Path) -> int:
    return int(STEP_DIR.match(ckpt_dir.name).group(1))


def load_training_state(ckpt_dir: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved by save_training_state into live objects; returns the JSON state.

    Every file is read and checked (complete, finite) before anything is restored."""
    state = json.loads((ckpt_dir / "state.json").read_text())
    weights = read_safetensors(ckpt_dir / "model.safetensors")
    require_finite(parameters_in(model, weights), str(ckpt_dir / "model.safetensors"))
    opt_tensors = read_safetensors(ckpt_dir / "optimizer.safetensors")
    require_finite(opt_tensors, str(ckpt_dir / "optimizer.safetensors"))
    model.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    return state


def resume_newest(out_dir: Path, model, optimizer, scheduler) -> tuple[Path, dict] | None:
    """Restore the newest checkpoint that loads and holds finite weights; None when there is none at all.

    An unusable checkpoint is skipped with a warning naming it and why; when every one is unusable, the error lists
    them all rather than silently starting over."""
    dirs = checkpoint_dirs(out_dir)
    problems = []
    for ckpt in reversed(dirs):
        try:
            return ckpt, load_training_state(ckpt, model, optimizer, scheduler)
        except Exception as e:  # any failure to read or restore: the older checkpoint may still be fine
            problems.append(f"{ckpt.name}: {type(e).__name__}: {' '.join(str(e).split())}")
            log.warning("checkpoint %s is unusable (%s: %s); falling back to the one before it", ckpt,
                        type(e).__name__, e)
    if dirs:
        raise CheckpointError(f"no usable checkpoint in {out_dir / 'checkpoints'} ({'; '.join(problems)}); "
                              "rerun with --fresh to start this run over")
    return None
