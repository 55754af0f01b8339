"""DINOv2 for FD_DINOv2 (the MCLR paper's headline metric), from local files only, through timm or transformers.

The protocol is dgm-eval's (Stein et al., NeurIPS 2023), the FD_DINOv2 of EDM2 and the papers after it:
- network: DINOv2 ViT-L/14 without registers (torch.hub `dinov2_vitl14`); feature: the CLS token after the final
  LayerNorm (1024-d), which is what that model's forward returns;
- preprocessing (`preprocess`): the uint8 image resized to 224 x 224 with antialiased bicubic interpolation, scaled to
  [0, 1], normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). This is EDM2's
  "torch" resize; dgm-eval resizes with PIL, which also rounds the resized image to uint8 (below 1/255 apart).
- position embeddings: the released weights carry a 37 x 37 grid (518 px). At 224 px DINOv2 interpolates them to
  16 x 16 on every forward, bicubic without antialiasing, with scale factor (16 + 0.1) / 37. timm (antialiased resample
  at load) and transformers (output size 16, no offset) each compute slightly different embeddings, so the grid is
  resampled here once, with DINOv2's own formula, and both backends get the same 16 x 16 grid.

Weights come from a transformers directory (config.json + weights, `Dinov2Model.save_pretrained` layout) or a
single weights file in timm's layout or the original DINOv2 layout (`dinov2_vitl14_pretrain.pth`: timm's names plus
`mask_token`). Images come in [-1, 1] (N, 3, H, W) quantised to uint8 levels, the project's convention for scoring.
"""
from __future__ import annotations

import json
import logging
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
HEAD_DIM = 64  # every released DINOv2 (S, B, L, g) has 64-d attention heads; a weights file does not record heads
_INTERPOLATE_OFFSET = 0.1  # DINOv2's interpolate_offset (kept upstream for backward compatibility)


def preprocess(x_N3HW: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> DINOv2 input: 0..255 levels, antialiased bicubic to 224 x 224, / 255, ImageNet mean/std."""
    # Rounding recovers the exact uint8 levels of quantised samples (and of reference images).
    x = x_N3HW.float().add(1).mul(127.5).round().clamp(0, 255)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def resample_pos_embed(pos_1TD: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Position embeddings (1, prefix + M*M, D) at a grid x grid patch grid, as DINOv2's interpolate_pos_encoding
    computes them: bicubic, no antialiasing, scale factor (grid + 0.1) / M, in float32."""
    prefix, patches = pos_1TD[:, :num_prefix_tokens], pos_1TD[:, num_prefix_tokens:]
    m = int(round(patches.shape[1] ** 0.5))
    if m * m != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if m == grid:
        return pos_1TD.clone()
    scale = (grid + _INTERPOLATE_OFFSET) / m
    p = patches.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    p = F.interpolate(p, scale_factor=(scale, scale), mode="bicubic", align_corners=False, antialias=False)
    if p.shape[-2:] != (grid, grid):
        raise ValueError(f"resampling a {m}x{m} grid gave {tuple(p.shape[-2:])}, expected {grid}x{grid}")
    p = p.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_1TD.dtype)
    return torch.cat([prefix, p], dim=1)


class DinoV2Features(nn.Module):
    """Final-LayerNorm CLS token of a DINOv2 ViT for images in [-1, 1] (see `preprocess`)."""

    def __init__(self, net: nn.Module, backend: str, feat_dim: int):
        super().__init__()
        self.net, self.backend, self.feat_dim = net, backend, feat_dim

    def features(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        x = preprocess(x_N3HW)
        if self.backend == "transformers":
            return self.net(pixel_values=x).pooler_output  # layernorm(last hidden state)[:, 0]
        return self.net(x)  # timm, num_classes=0, token pooling, no fc_norm: norm(x)[:, 0]

    forward = features


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd


def _timm_dinov2(path: str, num_heads: int | None) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as e:
        raise ImportError("loading DINOv2 from a weights file needs 'timm' (pip install -e '.[test]')") from e
    sd = _read_state_dict(path)
    if "cls_token" not in sd or "pos_embed" not in sd:
        raise ValueError(f"{path} is not a DINOv2 ViT in timm's or DINOv2's layout (no cls_token / pos_embed)")
    if "register_tokens" in sd or "reg_token" in sd or any(".mlp.w12." in k for k in sd):
        raise ValueError(f"{path} is DINOv2 with registers or ViT-g (SwiGLU); FD_DINOv2 uses dinov2_vitl14")
    sd.pop("mask_token", None)  # the original layout's masked-modelling token; unused at inference
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    heads = num_heads or dim // HEAD_DIM
    grid = INPUT_SIZE // patch
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid)
    net = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=INPUT_SIZE,
                            patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                            mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                            init_values=1.0 if "blocks.0.ls1.gamma" in sd else None)
    result = net.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not match a DINOv2 ViT (dim {dim}, depth {depth}, patch {patch}): missing "
                         f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
    return net, dim


def _transformers_dinov2(path: str) -> tuple[nn.Module, int]:
    try:
        from transformers import Dinov2Model
    except ImportError as e:
        raise ImportError("loading DINOv2 from a directory needs 'transformers' (pip install -e '.[test]')") from e
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model directory")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "dinov2":
        raise ValueError(f"{path} holds a {model_type!r} model; FD_DINOv2 needs 'dinov2' (no registers)")
    net = Dinov2Model.from_pretrained(path, local_files_only=True)
    emb = net.embeddings
    patch = net.config.patch_size if isinstance(net.config.patch_size, int) else net.config.patch_size[0]
    # With as many positions as patches, transformers uses the embeddings as they are (no interpolation of its own).
    emb.position_embeddings = nn.Parameter(resample_pos_embed(emb.position_embeddings.data, INPUT_SIZE // patch))
    return net, net.config.hidden_size


def load_dinov2(path: str, device: str | torch.device = "cpu", num_heads: int | None = None) -> DinoV2Features:
    """DINOv2 from a local transformers directory (via transformers) or a local weights file (via timm); never
    downloads. `num_heads` only matters for a weights file (default: hidden size / 64, as in every released DINOv2)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"DINOv2 weights not found: {path} (this project never downloads weights)")
    if os.path.isdir(path):
        net, dim = _transformers_dinov2(path)
        backend = "transformers"
    else:
        net, dim = _timm_dinov2(path, num_heads)
        backend = "timm"
    log.info("loaded DINOv2 (%d-d) from %s through %s", dim, path, backend)
    return DinoV2Features(net.float(), backend, dim).eval().requires_grad_(False).to(device)
