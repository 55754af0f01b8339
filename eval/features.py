"""Feature networks behind the metrics, behind one small interface, and the real-image references they compare with.

- mnist: the small CNN of eval/networks/mnist_cnn.py, trained once on the embedded training digits and cached. FID
  in its penultimate features is "FID (classifier features)", not comparable to Inception FID; the output says so.
- classifier: the same small CNN for any labelled data, trained once on the run's own training split and cached
  (eval/run_data.py; on MNIST it is the mnist network); its held-out accuracy is recorded with every score.
- inception: Inception-v3 pool3 from a local weights file (eval/networks/inception.py), the standard FID network;
  reference from an ADM reference batch (.npz with arr_0 images, and/or mu/sigma). The Inception Score comes from
  the unbiased logits (pool3 @ W), as in ADM's evaluator. Class accuracy needs outputs in the generator's label
  order: torchvision's 1000-class weights have ImageNet's folder order; the TF FID weights (1008 outputs) do not,
  and need an explicit class map (load_class_map).
- dinov2: a local DINOv2 ViT (eval/networks/dinov2.py) for FD_DINOv2; reference from real images.

References (file_reference) follow ADM's evaluator: FID against the stored mu/sigma when the .npz holds them,
precision/recall against the features of its images.
"""
from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from eval.metrics import feature_statistics, from_uint8_nhwc, iter_samples_npz, load_statistics
from eval.networks.dinov2 import load_dinov2
from eval.networks.inception import load_inception
from eval.networks.mnist_cnn import SHIPPED, load_or_train_mnist_classifier, load_shipped_mnist_classifier
from var_mclr.data import build_dataset, dataset_tensors
from var_mclr.files import file_sha256, tensors_sha256

log = logging.getLogger(__name__)

FEATURE_NETWORKS = ("mnist", "classifier", "inception", "dinov2")
OWN_DATA_NETWORKS = ("mnist", "classifier")  # compared with the training split itself, never with a reference file
# Per image: (features, logits the Inception Score uses, logits over the network's own classes for class accuracy).
Embedding = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


@dataclass
class NetOutputs:
    features_ND: torch.Tensor
    score_probs_NK: torch.Tensor | None  # softmax of the Inception Score's logits
    predicted_N: torch.Tensor | None  # generator label each image is classified as (-1: an output without one)


@dataclass
class FeatureNet:
    """What every feature network gives the metrics: features and, when it classifies, logits, per image batch."""
    name: str
    description: str
    weights_sha256: str
    feat_dim: int
    embed: Callable[[torch.Tensor], Embedding]  # [-1, 1] images (N, 3, H, W) -> Embedding
    class_map: torch.Tensor | None  # network output -> generator label (-1: none); None: no class accuracy
    class_note: str  # why class accuracy is or is not reported (recorded in metrics.json)
    class_count: int | None = None  # the generator class count class_map holds for (None: any)
    batch_size: int = 500
    heldout_accuracy: float | None = None  # a classifier's accuracy on held-out real images (recorded with scores)

    def class_accuracy_basis(self, num_classes: int) -> tuple[bool, str]:
        """Whether class accuracy means something for a generator with num_classes labels, and why."""
        if self.class_map is None:
            return False, self.class_note
        if self.class_count is not None and self.class_count != num_classes:
            return False, (f"null: {self.class_note}, but the generator has {num_classes} classes, not "
                           f"{self.class_count}; pass --class-map to map the outputs to its labels")
        return True, self.class_note

    @torch.no_grad()
    def outputs(self, images, device) -> NetOutputs:
        """Features, IS probabilities and class predictions of images: float [-1, 1] (N, 3, H, W), or uint8
        (N, H, W, 3) as an .npz holds them (converted a batch at a time, so a 50k batch never exists in float)."""
        uint8 = torch.as_tensor(images).dtype == torch.uint8
        feats, probs, preds = [], [], []
        for x in torch.as_tensor(images).split(self.batch_size):
            f, score_logits, class_logits = self.embed((from_uint8_nhwc(x) if uint8 else x).to(device))
            feats.append(f.float().cpu())
            if score_logits is not None:
                probs.append(F.softmax(score_logits.float(), -1).cpu())
            if class_logits is not None and self.class_map is not None:
                preds.append(self.class_map[class_logits.argmax(1).cpu()])
        return NetOutputs(torch.cat(feats), torch.cat(probs) if probs else None,
                          torch.cat(preds) if preds else None)


def load_class_map(path: str, num_outputs: int) -> torch.Tensor:
    """A JSON list with one entry per network output: the generator label it stands for, or null (-1) for none."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list) or len(entries) != num_outputs:
        raise ValueError(f"class map {path}: expected a JSON list of {num_outputs} entries (one per network output), "
                         f"got {type(entries).__name__} of length {len(entries) if isinstance(entries, list) else 0}")
    labels = [-1 if e is None else e for e in entries]
    if not all(isinstance(e, int) and e >= -1 for e in labels):
        raise ValueError(f"class map {path}: entries must be generator labels (integers >= 0) or null")
    if len(set(e for e in labels if e >= 0)) != sum(e >= 0 for e in labels):
        raise ValueError(f"class map {path}: a generator label appears twice")
    return torch.tensor(labels, dtype=torch.long)


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
        logits = net.head(f)
        return f, logits, logits  # the "classifier score" keeps the head's bias: no published convention to match

    return FeatureNet("mnist-cnn", desc, tensors_sha256(net.state_dict()), net.feat_dim, embed,
                      class_map=torch.arange(10),
                      class_note="the MNIST classifier's outputs are the digit labels 0-9 of the embedded data",
                      heldout_accuracy=heldout_acc), heldout_acc


def inception_net(weights: str | None, device, class_map: str | None = None) -> FeatureNet:
    net = load_inception(weights, device)
    if class_map is not None:
        cmap, count = load_class_map(class_map, net.num_classes), None
        note = f"outputs mapped to the generator's labels by {class_map}"
    elif not net.tf_fid:
        cmap, count = torch.arange(net.num_classes), net.num_classes
        note = ("torchvision's ImageNet weights: outputs in ImageNet folder order (n01440764 tench = 0), the label "
                "order of VAR's checkpoints and of sorted class folders")
    else:
        cmap, count = None, None
        note = (f"null: the TF FID Inception's {net.num_classes} outputs are not in ImageNet folder order "
                "(n01440764 tench is not its class 0); pass --class-map to map them to the generator's labels")

    def embed(x):
        pool, logits = net.pool3_and_logits(x)
        return pool, net.unbiased_logits(pool), logits

    return FeatureNet("inception-v3-pool3", f"Inception-v3 pool3 (2048-d) from {weights or 'the torch hub cache'}; "
                      f"IS from pool3 @ W (no bias, as ADM)", "n/a" if weights is None else file_sha256(weights),
                      net.feat_dim, embed, class_map=cmap, class_note=note, class_count=count, batch_size=100)


def dinov2_net(path: str, device) -> FeatureNet:
    net = load_dinov2(path, device=device)
    sha = file_sha256(path) if Path(path).is_file() else _directory_sha256(Path(path))
    return FeatureNet("dinov2", f"DINOv2 final-norm CLS features ({net.feat_dim}-d) from {path} through "
                      f"{net.backend} (FD_DINOv2; 224 px bicubic, ImageNet mean/std)", sha, net.feat_dim,
                      lambda x: (net.features(x), None, None), class_map=None,
                      class_note="null: DINOv2 has no classifier head")


def _directory_sha256(path: Path) -> str:
    """One hash of a model directory: its files' names and contents."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(str(f)).encode())
    return h.hexdigest()


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    features_ND: torch.Tensor | None  # for precision/recall; None when only statistics are available
    source: str
    fid_statistics: str = "computed"  # "stored": the file's mu/sigma (ADM); "computed": from the images here

    def record(self) -> dict:
        return {"source": self.source, "fid_statistics": self.fid_statistics,
                "precision_recall_images": None if self.features_ND is None else len(self.features_ND)}


def embedded_reference(net: FeatureNet, data_cfg: dict, device) -> Reference:
    """The training split as the generator saw it: build_dataset's deterministic view (the token cache's)."""
    images, _ = dataset_tensors(build_dataset(data_cfg, "train", deterministic=True))
    # Quantised like the samples (score what an .npz would hold), so neither side has an edge from finer levels.
    feats = net.outputs(to_uint8_levels(images), device).features_ND
    mu, sigma = feature_statistics(feats)
    return Reference(mu, sigma, feats, f"{data_cfg['name']} training split ({len(images)} images)")


def to_uint8_levels(images_N3HW: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] rounded to the 256 levels a uint8 file holds (still float, [-1, 1])."""
    return images_N3HW.float().add(1).mul(127.5).round().clamp(0, 255).div(127.5).sub(1)


def file_reference(net: FeatureNet, path: str, resolution: int, device) -> Reference:
    """An ADM-style .npz, read as ADM's evaluator reads it: FID against the stored mu/sigma when present (ADM's
    reference batches hold whole-dataset statistics next to 10k images), precision/recall against its arr_0 images'
    features; FID statistics are computed from the images only when the file stores none."""
    if not Path(path).is_file():
        raise FileNotFoundError("file not found")
    if not zipfile.is_zipfile(path):  # np.load would blame pickled data for any other file
        raise ValueError("not an .npz archive (ADM's layout: arr_0 uint8 images and/or mu, sigma)")
    with np.load(path, allow_pickle=False) as z:
        has_images, has_stats = "arr_0" in z.files, {"mu", "sigma"} <= set(z.files)
    if not has_images and not has_stats:
        raise ValueError(f"reference {path}: expected arr_0 images and/or mu, sigma statistics")
    if not has_images:
        mu, sigma = load_statistics(path, expected_dim=net.feat_dim or None)
        return Reference(mu, sigma, None, f"{path} (statistics only: no precision/recall)", "stored")
    chunks = iter_samples_npz(path, chunk=net.batch_size)
    shape = next(chunks)
    if shape[1:3] != (resolution, resolution):
        raise ValueError(f"reference batch {path} holds {shape[1]}x{shape[2]} images but the samples "
                         f"are {resolution}x{resolution}; use a reference batch at the sampling resolution")
    feats = torch.cat([net.outputs(torch.from_numpy(c.copy()), device).features_ND for c in chunks])
    source = f"{path} ({shape[0]} images)"
    if has_stats:
        try:
            mu, sigma = load_statistics(path, expected_dim=feats.shape[1])
            return Reference(mu, sigma, feats, source, "stored")
        except ValueError as e:
            # ADM's batches store Inception statistics; another network (DINOv2) must use the images.
            log.warning("%s; FID statistics computed from the %d images instead", e, shape[0])
    mu, sigma = feature_statistics(feats)
    return Reference(mu, sigma, feats, source, "computed")
