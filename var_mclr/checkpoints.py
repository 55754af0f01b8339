"""Checkpoint I/O: the official VAR releases (.pth) in, the project's own safetensors in and out.

Official files are plain state dicts saved with torch.save; they are read with weights_only=True and checked key by
key, so a wrong file fails with a message naming every missing, unexpected or mis-shaped entry. The project's own
checkpoints are a ``name.safetensors`` file holding the hyperparameters in its metadata (one atomic write), plus a
readable copy of them in ``name.json``.
"""
from __future__ import annotations

import dataclasses
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
from var_mclr.files import atomic_write, tensors_sha256
from var_mclr.hub import is_hub_name, local_path
from var_mclr.model import VAR, StrengthEmbedding, VARConfig

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
    """A plain {name: tensor} state dict from a torch.save'd file (or hub name), refusing arbitrary pickles."""
    path = Path(local_path(path))
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


def _summary(title: str, items: list[str], shown: int = 3) -> str:
    more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    return f"{len(items)} {title} ({', '.join(items[:shown])}{more})"


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     ignore_shape: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError counting the missing, unexpected and mis-shaped keys, naming the first few of each (a
    wrong file can disagree on hundreds of keys; the message stays one line)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected))
                 if state[k].shape != expected[k].shape and k not in ignore_shape]
    problems = [_summary(title, items) for title, items in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    if problems:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))


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


def official_var_config(state: dict[str, torch.Tensor], vae: VQVAE) -> VARConfig:
    """The architecture an official-layout VAR state dict holds, read off its tensors' shapes: width and class count
    from class_emb, depth from the block keys, heads from attn_l2_norm's per-head scale, MLP ratio from fc1; the
    vocabulary, latent width and patch schedule are the tokenizer's."""
    emb = state.get("class_emb.weight")
    if emb is None or emb.ndim != 2:
        raise CheckpointError("the state dict has no class_emb.weight: not an official-layout VAR")
    C, depth = emb.shape[1], checkpoint_depth(state)
    scale = state.get("blocks.0.attn.scale_mul_1H11")
    heads = scale.shape[1] if scale is not None else max(1, C // 64)  # VAR's rule without l2-norm: 64-wide heads
    fc1 = state.get("blocks.0.ffn.fc1.weight")
    return VARConfig(vocab_size=vae.V, Cvae=vae.Cvae, num_classes=emb.shape[0] - 1, depth=depth, embed_dim=C,
                     num_heads=heads, mlp_ratio=(fc1.shape[0] / C) if fc1 is not None else 4.0,
                     shared_aln=any(k.startswith("shared_ada_lin.") for k in state),
                     attn_l2_norm=scale is not None, patch_nums=vae.patch_nums)


def load_official_var(var_path: str | os.PathLike, cfg: VARConfig | None = None,
                      vae: VQVAE | None = None) -> VAR:
    """A VAR from an official-layout state dict: of architecture cfg when given (every disagreement is named), else
    of the architecture the file holds (official_var_config, with vae's vocabulary and schedule)."""
    state = read_state_dict(var_path)
    if cfg is None:
        if vae is None:
            raise ValueError("load_official_var needs cfg or the tokenizer vae")
        cfg = official_var_config(state, vae)
    found = checkpoint_depth(state)
    if found != cfg.depth:
        raise CheckpointError(f"{var_path} holds a VAR of depth {found} ({found} blocks) "
                              f"but depth={cfg.depth} was asked for")
    var = VAR(cfg)
    check_state_dict(var, state, str(var_path))
    require_finite(parameters_in(var, state), str(var_path))
    var.load_state_dict(state, strict=True)
    return var


def with_strength_conditioning(var: VAR) -> VAR:
    """var, in place, with the strength module added (model.strength_cond; docs/method.md, "GFT"): every loaded
    weight is kept, and the module starts at zero output, so the logits stay var's until training moves it."""
    if not var.cfg.strength_cond:
        var.cfg = dataclasses.replace(var.cfg, strength_cond=True)
        var.strength_emb = StrengthEmbedding(var.D).to(var.class_emb.weight.device)
    return var


def load_official(vae_path: str | os.PathLike, var_path: str | os.PathLike, depth: int | None = None,
                  vae_cfg: VQVAEConfig | None = None, num_classes: int | None = None) -> tuple[VQVAE, VAR]:
    """The released tokenizer and VAR-d{depth} (official layout: torch.save'd state dicts). The VAR's architecture
    is read off its file; depth and num_classes, when given, must agree with it."""
    if depth is not None and depth not in OFFICIAL_DEPTHS:
        log.warning("depth %d is not one of the released depths %s", depth, OFFICIAL_DEPTHS)
    vae = load_official_vae(vae_path, vae_cfg)
    var = load_official_var(var_path, vae=vae)
    for name, asked, found in (("depth", depth, var.cfg.depth), ("num_classes", num_classes, var.num_classes)):
        if asked is not None and asked != found:
            raise CheckpointError(f"{var_path} holds a VAR with {name}={found} but {name}={asked} was asked for")
    return vae, var


def load_tokenizer(path: str | os.PathLike, declared: VQVAEConfig | None = None) -> VQVAE:
    """A tokenizer from an official-layout .pth (of architecture declared, default the released one) or our
    safetensors (its own recorded architecture), frozen."""
    vae = load_official_vae(path, declared) if is_official_checkpoint(path) else load_model(path)
    if not isinstance(vae, VQVAE):
        raise CheckpointError(f"{path} holds a {type(vae).__name__}, not a tokenizer")
    return vae.eval().requires_grad_(False)


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's parameters: the same weights hash the same from a .pth or a .safetensors, and training
    statistics held in buffers (the codebook-hit EMA) do not change it."""
    return tensors_sha256(dict(model.named_parameters()))


# ---- the project's own checkpoints ------------------------------------------------------------------------
def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    return path, path.with_suffix(".json")


def _local_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """_paths of a local checkpoint; for a hub name, the cached weights file (its hyperparameters are embedded)."""
    if not is_hub_name(path):
        return _paths(path)
    name = str(path)
    weights = Path(local_path(name if name.endswith(".safetensors") else name + ".safetensors"))
    return weights, weights.with_suffix(".json")


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
    weights, meta = _local_paths(path)
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
    weights, _ = _local_paths(path)
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
