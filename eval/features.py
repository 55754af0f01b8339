"""Feature networks behind the metrics, and the real-image references they are compared with.

- mnist: the small CNN of eval/classifier.py, trained once on the embedded training digits and cached. FID in its
  penultimate features is "FID (classifier features)", not comparable to Inception FID; the output says so.
- inception: Inception-v3 pool3 from a local weights file (the standard FID network); reference from an ADM
  reference batch (.npz with arr_0 images, and/or mu/sigma).
- dinov2: a local DINOv2 ViT (FD_DINOv2, the MCLR paper's headline metric); reference from real images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.classifier import file_sha256, in_batches, load_dinov2, load_inception, load_or_train_mnist_classifier
from eval.metrics import feature_statistics, load_samples_npz, load_statistics
from var_mclr.data import build_dataset


@dataclass
class FeatureNet:
    name: str
    description: str
    net: torch.nn.Module
    weights_sha256: str
    has_classes: bool  # logits over the same classes as the generator (class accuracy is meaningful)

    @torch.no_grad()
    def features_and_probs(self, images_N3HW: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hasattr(self.net, "pool3_and_logits"):
            outs = [self.net.pool3_and_logits(x.to(device)) for x in images_N3HW.split(100)]
            return torch.cat([f.cpu() for f, _ in outs]), torch.cat([F.softmax(z, -1).cpu() for _, z in outs])
        feats = in_batches(self.net.features, images_N3HW, 500, device)
        probs = in_batches(lambda x: F.softmax(self.net.logits(x), -1), images_N3HW, 500, device) \
            if hasattr(self.net, "logits") else None
        return feats, probs


def mnist_net(cache_dir: Path, resolution: int) -> tuple[FeatureNet, float]:
    path = cache_dir / f"mnist_classifier_{resolution}px.safetensors"
    net, heldout_acc = load_or_train_mnist_classifier(str(path), seed=0, resolution=resolution)
    desc = (f"small MNIST CNN trained on the embedded training digits at {resolution}px (held-out accuracy "
            f"{heldout_acc:.4f}); FID here is in its 128-d penultimate features, NOT Inception FID")
    return FeatureNet("mnist-cnn", desc, net, file_sha256(path), has_classes=True), heldout_acc


def inception_net(weights: str | None, device) -> FeatureNet:
    net = load_inception(weights, device)
    return FeatureNet("inception-v3-pool3", f"Inception-v3 pool3 (2048-d) from {weights or 'the torch hub cache'}",
                      net, "n/a" if weights is None else file_sha256(weights), has_classes=True)


def dinov2_net(path: str, device) -> FeatureNet:
    net = load_dinov2(path, device=device)
    sha = file_sha256(path) if Path(path).is_file() else "directory"
    return FeatureNet("dinov2", f"DINOv2 CLS features from {path} (FD_DINOv2)", net, sha, has_classes=False)


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
    feat_dim = int(getattr(net.net, "feat_dim", 0)) or None
    if not has_images:
        mu, sigma = load_statistics(path, expected_dim=feat_dim)
        return Reference(mu, sigma, None, f"{path} (statistics only: no precision/recall)")
    images = load_samples_npz(path)
    if images.shape[1:3] != (resolution, resolution):
        raise ValueError(f"reference batch {path} holds {images.shape[1]}x{images.shape[2]} images but the samples "
                         f"are {resolution}x{resolution}; use a reference batch at the sampling resolution")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    feats, _ = net.features_and_probs(x, device)
    mu, sigma = feature_statistics(feats)
    return Reference(mu, sigma, feats, f"{path} ({len(images)} images)")
