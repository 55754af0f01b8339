"""Labelled sample grids: one row per class (or per model), its name written at the left.

Class names come from what the model was trained on: an image folder's class directories in label order (ImageNet's
WordNet ids become their names through torchvision's bundled ImageNet category list), the digits for MNIST, and
ImageNet's names for an official 1000-class model.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from var_mclr.files import atomic_write

IMAGENET_CLASSES = 1000


def imagenet_names() -> list[str]:
    """ImageNet-1k's category names in folder (WordNet id) order, the label order of VAR's checkpoints."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(data: dict | None, num_classes: int) -> list[str]:
    """A name for each label of a model trained on data (eval/run_data.recorded_data; None: unknown)."""
    if data is not None and data.get("name") == "imagefolder":
        train = Path(data["root"]) / "train"
        names = sorted(e.name for e in os.scandir(train) if e.is_dir()) if train.is_dir() else []
        if len(names) == num_classes:
            if num_classes == IMAGENET_CLASSES and all(n.startswith("n") and n[1:].isdigit() for n in names):
                return [f"{wnid} {name}" for wnid, name in zip(names, imagenet_names())]
            return names
    if data is not None and data.get("name") == "mnist":
        return [str(i) for i in range(num_classes)]
    if num_classes == IMAGENET_CLASSES:
        return imagenet_names()
    return [f"class {i}" for i in range(num_classes)]


def labelled_grid(rows: list[torch.Tensor], labels: list[str], pad: int = 2) -> Image.Image:
    """rows: uint8 (n, H, W, 3) images per row (rows may be shorter than the longest); labels: one text per row."""
    H, W = next(r.shape[1:3] for r in rows if len(r))
    font = ImageFont.load_default(size=max(10, min(16, H // 3)))
    label_w = 8 + max(int(font.getlength(t)) for t in labels)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (W + pad) + pad, len(rows) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (row, text) in enumerate(zip(rows, labels)):
        y = pad + i * (H + pad)
        draw.text((4, y + H // 2), text, fill="black", font=font, anchor="lm")
        for j, img in enumerate(np.asarray(row)):
            grid.paste(Image.fromarray(img), (label_w + pad + j * (W + pad), y))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="png"))
