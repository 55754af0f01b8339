"""Feature networks behind the metrics, behind one small interface, and the real-image references they compare with.

- mnist: the small CNN of eval/networks/mnist_cnn.py, trained once on the embedded training digits and cached. FID
  in its penultimate features is "FID (classifier features)", not comparable to Inception FID; the output says so.
- inception: Inception-v3 pool3 from a local weights file (eval/networks/inception.py), the standard FID network;
  reference from an ADM reference batch (.npz with arr_0 images, and/or mu/sigma).
- dinov2: a local DINOv2 ViT (eval/networks/dinov2.py) for FD_DINOv2; reference from real images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from eval.metrics import feature_statistics, load_samples_npz, load_statistics
from eval.networks.dinov2 import load_dinov2
from eval.networks.inception import load_inception
from eval.networks.mnist_cnn import SHIPPED, load_or_train_mnist_classifier, load_shipped_mnist_classifier
from var_mclr.data import build_dataset
from var_mclr.files import file_sha256, tensors_sha256

FEATURE_NETWORKS = ("mnist", "inception", "dinov2")


@dataclass
class FeatureNet:
    """What every feature network gives the metrics: features and, when it classifies, logits, per image batch."""
    name: str
    description: str
    weights_sha256: str
    feat_dim: int
    embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # [-1, 1] images -> (feats, logits)
    has_classes: bool  # logits over the same classes as the generator (class accuracy is meaningful)
    batch_size: int = 500

    @torch.no_grad()
    def features_and_probs(self, images_N3HW: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats, probs = [], []
        for x in images_N3HW.split(self.batch_size):
            f, logits = self.embed(x.to(device))
            feats.append(f.float().cpu())
            if logits is not None:
                probs.append(F.softmax(logits, -1).float().cpu())
        return torch.cat(feats), (torch.cat(probs) if probs else None)


def mnist_net(cache_dir: Path, resolution: int) -> tuple[FeatureNet, float]:
    """The packaged classifier at a shipped resolution (the demo's 16 px); elsewhere one trained here and cached."""
    if resolution in SHIPPED:
        net, heldout_acc = load_shipped_mnist_classifier(resolution)
        origin = f"shipped {SHIPPED[resolution][0]}"
    else:
        path = cache_dir / f"mnist_classifier_{resolution}px.safetensors"
        net, heldout_acc = load_or_train_mnist_classifier(str(path), seed=0, resolution=resolution)
        origin = f"trained on this machine (no shipped network at {resolution}px: not comparable across machines)"
    desc = (f"small MNIST CNN at {resolution}px, {origin}, held-out accuracy {heldout_acc:.4f}; FID here is in its "
            f"128-d penultimate features, NOT Inception FID")

    def embed(x):
        f = net.features(x)
        return f, net.head(f)

    return FeatureNet("mnist-cnn", desc, tensors_sha256(net.state_dict()), net.feat_dim, embed,
                      has_classes=True), heldout_acc


def inception_net(weights: str | None, device) -> FeatureNet:
    net = load_inception(weights, device)
    return FeatureNet("inception-v3-pool3", f"Inception-v3 pool3 (2048-d) from {weights or 'the torch hub cache'}",
                      "n/a" if weights is None else file_sha256(weights), net.feat_dim, net.pool3_and_logits,
                      has_classes=True, batch_size=100)


def dinov2_net(path: str, device) -> FeatureNet:
    net = load_dinov2(path, device=device)
    sha = file_sha256(path) if Path(path).is_file() else "directory"
    return FeatureNet("dinov2", f"DINOv2 CLS features from {path} (FD_DINOv2)", sha, 0,
                      lambda x: (net.features(x), None),
                      has_classes=False)


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    features_ND: torch.Tensor | None  # for precision/recall; None when only statistics are available
    source: str


def embedded_reference(net: FeatureNet, data_cfg: dict, device) -> Reference:
    images, _ = build_dataset(data_cfg, "train").tensors
    feats, _ = net.features_and_probs(images, device)
    mu, sigma = feature_statistics(feats)
    return Reference(mu, sigma, feats, f"{data_cfg['name']} training split ({len(images)} images)")


def file_reference(net: FeatureNet, path: str, resolution: int, device) -> Reference:
    """An ADM-style .npz: arr_0 images (features computed here) and/or precomputed mu, sigma."""
    with np.load(path) as z:
        has_images = "arr_0" in z.files
    if not has_images:
        mu, sigma = load_statistics(path, expected_dim=net.feat_dim or None)
        return Reference(mu, sigma, None, f"{path} (statistics only: no precision/recall)")
    images = load_samples_npz(path)
    if images.shape[1:3] != (resolution, resolution):
        raise ValueError(f"reference batch {path} holds {images.shape[1]}x{images.shape[2]} images but the samples "
                         f"are {resolution}x{resolution}; use a reference batch at the sampling resolution")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    feats, _ = net.features_and_probs(x, device)
    mu, sigma = feature_statistics(feats)
    return Reference(mu, sigma, feats, f"{path} ({len(images)} images)")
