"""Build the tokenizer and the VAR of a run from its config: official .pth, our safetensors, or fresh weights.

A loaded checkpoint must have the architecture the config declares; every disagreeing key is named.
"""
from __future__ import annotations

import dataclasses
import logging

from tokenizer.model import VQVAE
from var_mclr.checkpoints import (CheckpointError, is_official_checkpoint, load_model, load_official_var,
                                  load_tokenizer, weights_sha256, with_strength_conditioning)
from var_mclr.config import Config, ConfigError, var_config, vqvae_config
from var_mclr.model import VAR

log = logging.getLogger(__name__)


def _check_same_arch(declared, loaded, source: str, section: str) -> None:
    a, b = dataclasses.asdict(declared), dataclasses.asdict(loaded)
    diffs = [f"{section}.{k}: config {a[k]!r}, checkpoint {b[k]!r}" for k in a
             if k in b and (list(a[k]) if isinstance(a[k], tuple) else a[k])
             != (list(b[k]) if isinstance(b[k], tuple) else b[k])]
    if diffs:
        raise CheckpointError(f"{source} does not have the architecture the config declares: " + "; ".join(diffs))


def build_tokenizer(cfg: Config) -> VQVAE:
    """The frozen tokenizer a VAR run needs (tokenizer.checkpoint must be set)."""
    path = cfg.tokenizer.checkpoint
    if path is None:
        raise ConfigError("tokenizer.checkpoint is not set: point it at vae_ch160v4096z32.pth or a tokenizer "
                         "trained with `python -m var_mclr.train_tokenizer`")
    declared = vqvae_config(cfg.tokenizer)
    try:
        vae = load_tokenizer(path, declared)
    except CheckpointError as e:
        raise CheckpointError(f"tokenizer.checkpoint: {e}") from e
    _check_same_arch(declared, vae.cfg, f"tokenizer.checkpoint {path}", "tokenizer")
    if vae.resolution != cfg.data.resolution:
        raise ConfigError(f"the tokenizer works at {vae.resolution}px but data.resolution is {cfg.data.resolution}")
    return vae.eval().requires_grad_(False)


def tokenizer_record(checkpoint: str, vae: VQVAE) -> dict:
    """What a VAR's model.json says of its tokenizer: the file it was trained with and a hash of its weights, so an
    evaluation can prove it decodes with the same one (eval/sampling_run.py)."""
    return {"checkpoint": str(checkpoint), "weights_sha256": weights_sha256(vae), "config": vae.cfg.to_dict()}


def build_var(cfg: Config, vae: VQVAE) -> VAR:
    """VAR from model.init (official .pth or our safetensors) or freshly initialised from the model section."""
    declared = var_config(cfg.model, vae.V, vae.Cvae, cfg.data.num_classes, vae.patch_nums)
    path = cfg.model.init
    if path is None:
        var = VAR(declared, logprob_impl=cfg.train.kernels)
        var.init_weights()
    else:
        official = is_official_checkpoint(path)  # never holds the strength module: the official architecture is loaded
        var = load_official_var(path, dataclasses.replace(declared, strength_cond=False)) if official \
            else load_model(path)
        if not isinstance(var, VAR):
            raise CheckpointError(f"model.init {path} holds a {type(var).__name__}, not a VAR")
        if declared.strength_cond and not var.cfg.strength_cond:  # zero-initialised: the same logits at step 0
            var = with_strength_conditioning(var)
        _check_same_arch(declared, var.cfg, f"model.init {path}", "model")
        var.logprob_impl = cfg.train.kernels
    var.set_drop_path_rate(cfg.model.drop_path_rate)
    return var


def frozen_copy(var: VAR) -> VAR:
    """A frozen reference with the same weights and the same stochastic depth: CCA's trainer runs its reference in
    training mode, so with drop-path on the reference drops paths too (docs/method.md, "Baselines")."""
    ref = VAR(var.cfg, logprob_impl=var.logprob_impl)
    ref.load_state_dict(var.state_dict())
    ref.set_drop_path_rate(var.drop_path_rate)
    return ref.eval().requires_grad_(False)
