"""Build the tokenizer and the VAR of a run from its config: official .pth, our safetensors, or fresh weights."""
from __future__ import annotations

import logging
from pathlib import Path

from tokenizer.model import VQVAE, VQVAEConfig
from var_mclr.checkpoints import load_model, load_official_vae, load_official_var
from var_mclr.config import Config
from var_mclr.model import VAR, VARConfig

log = logging.getLogger(__name__)


def tokenizer_config(cfg: Config) -> VQVAEConfig:
    t = cfg.tokenizer
    return VQVAEConfig(vocab_size=t.vocab_size, z_channels=t.z_channels, ch=t.ch, ch_mult=tuple(t.ch_mult),
                       num_res_blocks=t.num_res_blocks, share_quant_resi=t.share_quant_resi, using_sa=t.using_sa,
                       using_mid_sa=t.using_mid_sa, v_patch_nums=tuple(t.v_patch_nums))


def is_official(path: str) -> bool:
    return Path(path).suffix in (".pth", ".pt", ".bin")


def build_tokenizer(cfg: Config) -> VQVAE:
    """The frozen tokenizer a VAR run needs (tokenizer.checkpoint must be set)."""
    path = cfg.tokenizer.checkpoint
    if path is None:
        raise ValueError("tokenizer.checkpoint is not set: point it at vae_ch160v4096z32.pth or a tokenizer "
                         "trained with `python -m tokenizer.train`")
    vae = load_official_vae(path, tokenizer_config(cfg)) if is_official(path) else load_model(path)
    if not isinstance(vae, VQVAE):
        raise ValueError(f"tokenizer.checkpoint {path} holds a {type(vae).__name__}, not a tokenizer")
    if vae.resolution != cfg.data.resolution:
        raise ValueError(f"the tokenizer works at {vae.resolution}px but data.resolution is {cfg.data.resolution}")
    return vae.eval().requires_grad_(False)


def build_var(cfg: Config, vae: VQVAE) -> VAR:
    """VAR from model.init (official .pth or our safetensors) or freshly initialised from the model section."""
    m, path = cfg.model, cfg.model.init
    if path is None:
        var = VAR(VARConfig(vocab_size=vae.V, Cvae=vae.Cvae, num_classes=cfg.data.num_classes, depth=m.depth,
                            embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                            shared_aln=m.shared_aln, attn_l2_norm=m.attn_l2_norm, patch_nums=vae.patch_nums),
                  vae_local=vae)
        var.init_weights()
        return var
    if is_official(path):
        return load_official_var(path, m.depth, vae, num_classes=cfg.data.num_classes,
                                 shared_aln=m.shared_aln, attn_l2_norm=m.attn_l2_norm)
    var = load_model(path, vae=vae)
    if not isinstance(var, VAR):
        raise ValueError(f"model.init {path} holds a {type(var).__name__}, not a VAR")
    if var.num_classes != cfg.data.num_classes or var.patch_nums != vae.patch_nums:
        raise ValueError(f"model.init {path} has {var.num_classes} classes and patch_nums {var.patch_nums}; the run "
                         f"has {cfg.data.num_classes} classes and the tokenizer {vae.patch_nums}")
    return var


def frozen_copy(var: VAR) -> VAR:
    ref = VAR(var.cfg, vae_local=var.vae_proxy[0])
    ref.load_state_dict(var.state_dict())
    return ref.eval().requires_grad_(False)
