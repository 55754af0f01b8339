"""Checkpoint I/O: the official VAR releases (.pth) in, the project's own safetensors in and out.

Official files are plain state dicts saved with torch.save; they are read with weights_only=True and checked key by
key, so a wrong file fails with a message naming every missing, unexpected or mis-shaped entry. The project's own
checkpoints are a ``name.safetensors`` file holding the hyperparameters in its metadata (one atomic write), plus a
readable copy of them in ``name.json``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenizer.model import VQVAE, VQVAEConfig
from var_mclr.errors import UserError
from var_mclr.files import atomic_write
from var_mclr.model import VAR, VARConfig

log = logging.getLogger(__name__)

OFFICIAL_DEPTHS = (16, 20, 24, 30)
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")  # torch.save'd state dicts; ours are .safetensors


def is_official_checkpoint(path: str | os.PathLike) -> bool:
    """The one rule for "official layout" files: a torch.save'd state dict, told apart by its suffix."""
    return Path(path).suffix in OFFICIAL_SUFFIXES


class CheckpointError(UserError, ValueError):
    pass


def nonfinite_entries(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: count of inf/NaN values} of every floating-point tensor that holds any."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    return {k: n for k, n in counts.items() if n}


def parameters_in(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of state that are the model's parameters (buffers such as attention masks hold -inf by design)."""
    return {name: state[name] for name, _ in model.named_parameters() if name in state}


def require_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding inf/NaN: such a model samples garbage, and training from it cannot recover."""
    bad = nonfinite_entries(state)
    if bad:
        names = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        raise CheckpointError(f"{source} holds non-finite weights ({sum(bad.values())} inf/NaN values in "
                              f"{len(bad)} tensors: {names})")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} state dict from a torch.save'd file, refusing arbitrary pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal says which global it met; keep it in the message
        raise CheckpointError(f"{path} is not a plain tensor state dict loadable with weights_only=True: {e}") from e
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        kind = type(obj).__name__
        raise CheckpointError(f"{path} holds a {kind}, not a state dict of named tensors "
                              "(official VAR checkpoints are plain state dicts)")
    return obj


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     ignore_shape: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected))
                 if state[k].shape != expected[k].shape and k not in ignore_shape]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            problems.append(f"{len(items)} {title}: " + ", ".join(items))
    if problems:
        raise CheckpointError(f"{source} does not match {type(model).__name__}:\n  " + "\n  ".join(problems))


def checkpoint_depth(state: dict[str, torch.Tensor]) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def load_official_vae(vae_path: str | os.PathLike, cfg: VQVAEConfig | None = None) -> VQVAE:
    vae = VQVAE(cfg or VQVAEConfig())
    state = read_state_dict(vae_path)
    # The codebook-hit EMA is a training statistic whose first dim depends on the schedule it was trained with.
    stat = "quantize.ema_vocab_hit_SV"
    check_state_dict(vae, state, str(vae_path), ignore_shape=(stat,))
    require_finite(parameters_in(vae, state), str(vae_path))
    if stat in state and state[stat].shape != vae.quantize.ema_vocab_hit_SV.shape:
        state[stat] = vae.quantize.ema_vocab_hit_SV
    vae.load_state_dict(state, strict=True)
    return vae.eval().requires_grad_(False)


def load_official_var(var_path: str | os.PathLike, cfg: VARConfig) -> VAR:
    """A VAR of architecture cfg from an official-layout state dict; every disagreement is named."""
    state = read_state_dict(var_path)
    found = checkpoint_depth(state)
    if found != cfg.depth:
        raise CheckpointError(f"{var_path} holds a VAR of depth {found} ({found} blocks) "
                              f"but depth={cfg.depth} was asked for")
    var = VAR(cfg)
    check_state_dict(var, state, str(var_path))
    require_finite(parameters_in(var, state), str(var_path))
    var.load_state_dict(state, strict=True)
    return var


def load_official(vae_path: str | os.PathLike, var_path: str | os.PathLike, depth: int,
                  vae_cfg: VQVAEConfig | None = None, num_classes: int = 1000) -> tuple[VQVAE, VAR]:
    """The released tokenizer and VAR-d{depth} (official layout: torch.save'd state dicts)."""
    if depth not in OFFICIAL_DEPTHS:
        log.warning("depth %d is not one of the released depths %s", depth, OFFICIAL_DEPTHS)
    vae = load_official_vae(vae_path, vae_cfg)
    cfg = VARConfig.official(depth, vocab_size=vae.V, Cvae=vae.Cvae, num_classes=num_classes,
                             patch_nums=vae.patch_nums)
    return vae, load_official_var(var_path, cfg)


# ---- the project's own checkpoints ------------------------------------------------------------------------
def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    return path, path.with_suffix(".json")


# The hyperparameters travel inside the weights file (safetensors metadata), so the two are written as one unit by
# one atomic rename; model.json beside it is a readable copy that may be missing (a disk that filled up in between).
INFO_KEY = "var_mclr.model_info"


def save_model(model: VQVAE | VAR, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Weights as safetensors with the hyperparameters (and any extra provenance) embedded, plus a JSON copy."""
    weights, meta = _paths(path)
    kind = "vqvae" if isinstance(model, VQVAE) else "var"
    info = {"kind": kind, "config": model.cfg.to_dict(), **(extra or {})}
    text = json.dumps(info, indent=2, default=str)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={INFO_KEY: text}))
    atomic_write(meta, lambda tmp: Path(tmp).write_text(text))
    return weights


def embedded_info(weights: Path) -> dict | None:
    """The hyperparameters saved inside a weights file; None for a file written before they were embedded."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(INFO_KEY)
    except Exception as e:  # safetensors' errors (a truncated header, say) do not name the file
        raise CheckpointError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: its embedded hyperparameters are not valid JSON ({e})") from e


def read_model_info(path: str | os.PathLike) -> dict:
    """The hyperparameters of a model saved by save_model: those embedded in the weights file (written with it, so
    never out of step), else, for files written before they were embedded, the JSON file beside it."""
    weights, meta = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint not found: {weights}")
    info = embedded_info(weights)
    if info is not None:
        return info
    if not meta.is_file():
        raise CheckpointError(f"{weights} has no hyperparameter file {meta.name} beside it")
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta} is not valid JSON ({e})") from e


def is_complete_result(path: str | os.PathLike) -> bool:
    """Whether a saved model can be loaded: its weights and its hyperparameters are both there."""
    try:
        read_model_info(path)
        return True
    except CheckpointError:
        return False


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors' errors (a truncated file, say) do not name the file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def load_model(path: str | os.PathLike) -> VQVAE | VAR:
    """Rebuild a model saved by save_model."""
    weights, _ = _paths(path)
    info = read_model_info(path)
    if info.get("kind") == "vqvae":
        model = VQVAE(VQVAEConfig(**info["config"]))
    elif info.get("kind") == "var":
        model = VAR(VARConfig(**info["config"]))
    else:
        raise CheckpointError(f"{weights}: unknown model kind {info.get('kind')!r}")
    state = read_safetensors(weights)
    check_state_dict(model, state, str(weights))
    require_finite(parameters_in(model, state), str(weights))
    model.load_state_dict(state, strict=True)
    return model
