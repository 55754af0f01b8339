"""DINOv2 (FD_DINOv2, the MCLR paper's headline metric) from a local transformers directory or timm weights file.
Images come in [-1, 1] (N, 3, H, W) and are resized and ImageNet-normalised here.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Features(nn.Module):
    """CLS-token embedding of a DINOv2 ViT for images in [-1, 1]: resized to 224 (bicubic), ImageNet-normalised."""

    def __init__(self, net: nn.Module, backend: str):
        super().__init__()
        self.net, self.backend = net, backend
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x_N3HW.float().add(1).div(2), size=(224, 224), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        if self.backend == "transformers":
            return self.net(pixel_values=x).pooler_output  # layer-normed CLS token
        return self.net(x)  # timm with num_classes=0 and token pooling: the normed CLS token

    forward = features


def load_dinov2(path: str, timm_name: str = "vit_large_patch14_dinov2.lvd142m",
                device: str | torch.device = "cpu") -> DinoV2Features:
    """DINOv2 from a local transformers directory (config.json + weights) or a local timm weights file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"DINOv2 weights not found: {path} (this project never downloads weights)")
    if os.path.isdir(path):
        try:
            from transformers import Dinov2Model
        except ImportError as e:
            raise ImportError("loading DINOv2 from a directory needs 'transformers' (pip install transformers)") from e
        net, backend = Dinov2Model.from_pretrained(path, local_files_only=True), "transformers"
    else:
        try:
            import timm
        except ImportError as e:
            raise ImportError("loading DINOv2 from a weights file needs 'timm' (pip install timm)") from e
        net = timm.create_model(timm_name, pretrained=True, num_classes=0, img_size=224,
                                pretrained_cfg_overlay={"file": os.path.abspath(path)})
        backend = "timm"
    return DinoV2Features(net, backend).eval().requires_grad_(False).to(device)
