"""Training checkpoints: model, optimizer, scheduler and step, written atomically and found again on restart.

Each checkpoint is a directory ``checkpoints/step_0000123/`` built under a temporary name and renamed into place,
so a directory with a step name is always complete; a killed run leaves at worst a stray temporary directory, which
is ignored and cleaned up. Tensors go to safetensors; everything else to JSON. All randomness in training is drawn
from generators seeded by (seed, step), so the step number is the whole RNG state.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from var_mclr.checkpoints import save_model

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
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
    try:
        save_model(model, tmp / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        if final.exists():  # re-saving the same step (e.g. the final one): swap in the new copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp_*"):
        shutil.rmtree(stray, ignore_errors=True)
    return final


def load_training_state(ckpt_dir: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved by save_training_state into live objects; returns the JSON state."""
    state = json.loads((ckpt_dir / "state.json").read_text())
    weights = load_file(str(ckpt_dir / "model.safetensors"))
    model.load_state_dict(weights, strict=True)
    opt_sd = _unflatten_optimizer(load_file(str(ckpt_dir / "optimizer.safetensors")), state["optimizer"])
    optimizer.load_state_dict(opt_sd)
    scheduler.load_state_dict(state["scheduler"])
    return state
