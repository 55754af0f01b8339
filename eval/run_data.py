"""The data a run was trained on, read back for its evaluation: every metric of a run is computed on its own data.

A checkpoint of ours records its training config (model.json, source_config); its data section names the dataset
(mnist, synthetic, or an image folder with its root, resolution and crop policy). Images are read in the deterministic
view (centre crop, no flip), the view a token cache holds: the training split as the generator saw it.

- split_images: the held-out split ("val"), or for an image folder without val/ a class-stratified slice of the
  training split (said so in the returned description); "train" for the statistics on training pairs.
- own_classifier_net: the feature network for any labelled data, a small CNN (eval/networks/mnist_cnn.py's recipe)
  trained once on the run's own training split and cached by a hash of the data and the recipe, with its held-out
  accuracy. On MNIST it is the shipped, pinned MNIST network, so the demo's numbers do not move.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from eval.features import FeatureNet, mnist_net
from eval.networks.mnist_cnn import load_or_train_classifier, train_classifier
from var_mclr.checkpoints import is_official_checkpoint, read_model_info
from var_mclr.data import build_dataset, dataset_tensors
from var_mclr.errors import UserError
from var_mclr.files import tensors_sha256
from var_mclr.tokens import dataset_fingerprint, dataset_labels

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "var-mclr/own-data-cnn/v1"  # bump when the recipe changes, so cached networks retrain
FALLBACK_HELDOUT_SHARE = 0.1  # of every class, when an image folder has no val/ split
CLASSIFIER_MIN_STEPS = 200  # a tiny folder still gets enough optimiser steps (8 epochs of MNIST: 568 steps)


class DataSpecError(UserError, ValueError):
    pass


def data_spec(section: dict) -> dict:
    """build_dataset's arguments for a config's data section (as saved in config.yaml or model.json)."""
    spec = {"name": section["name"], "resolution": section["resolution"], "num_classes": section["num_classes"]}
    if section["name"] == "imagefolder":
        spec["root"], spec["crop"] = section["root"], section.get("crop", "center")
    return spec


def recorded_data(ckpt: str) -> dict | None:
    """The data a checkpoint of ours was trained on (build_dataset's arguments); None when it records none (an
    official checkpoint, or weights saved outside training)."""
    if is_official_checkpoint(ckpt):
        return None
    section = read_model_info(ckpt).get("source_config", {}).get("data")
    return data_spec(section) if section else None


def _has_split(data: dict, split: str) -> bool:
    return data["name"] != "imagefolder" or os.path.isdir(os.path.join(data["root"], split))


def _stratified_slice(labels_N: torch.Tensor, share: float) -> tuple[list[int], list[int]]:
    """(rest, slice): the last ceil(share * n_c) images of every class c form the slice (at least one, and never the
    class's only image)."""
    rest, held = [], []
    for c in labels_N.unique().tolist():
        idx = (labels_N == c).nonzero().flatten().tolist()
        k = min(max(1, math.ceil(share * len(idx))), len(idx) - 1)
        rest += idx[:len(idx) - k]
        held += idx[len(idx) - k:]
    return sorted(rest), sorted(held)


def _spread(n: int, max_images: int | None) -> list[int] | None:
    # Evenly spaced items, so a capped subset still covers every class of a class-sorted folder.
    if max_images is None or max_images >= n:
        return None
    return torch.linspace(0, n - 1, max_images).long().tolist()


def split_images(data: dict, split: str, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images_N3HW, labels_N, description) of up to max_images images of the split, in the deterministic view.

    split "val" of an image folder without val/: the fallback slice of the training split (the last
    FALLBACK_HELDOUT_SHARE of every class), and the description says it is not held out from the generator."""
    if split == "val" and not _has_split(data, "val"):
        train = build_dataset(data, "train", deterministic=True)
        _, held = _stratified_slice(dataset_labels(train), FALLBACK_HELDOUT_SHARE)
        pick = _spread(len(held), max_images)
        held = held if pick is None else [held[i] for i in pick]
        images, labels = dataset_tensors(train, held)
        return images, labels, (f"{len(held)} training images of {data['root']} (no val/ split: the last "
                                f"{FALLBACK_HELDOUT_SHARE:.0%} of every class; the generator saw them)")
    ds = build_dataset(data, split, deterministic=True)
    images, labels = dataset_tensors(ds, _spread(len(ds), max_images))
    where = data.get("root", data["name"])
    return images, labels, f"{len(labels)} {'held-out' if split == 'val' else 'training'} images of {where}"


def _classifier_data(data: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str, str]:
    """Train and held-out tensors of the classifier, the held-out source and a hash of both."""
    train = build_dataset(data, "train", deterministic=True)
    h = hashlib.sha256(dataset_fingerprint(train).encode())
    if _has_split(data, "val"):
        held_ds = build_dataset(data, "val", deterministic=True)
        h.update(dataset_fingerprint(held_ds).encode())
        x, y = dataset_tensors(train)
        xh, yh = dataset_tensors(held_ds)
        source = "its held-out split"
    else:  # the classifier must not be scored on images it trained on: it trains on the rest
        rest, held = _stratified_slice(dataset_labels(train), FALLBACK_HELDOUT_SHARE)
        h.update(f"slice {FALLBACK_HELDOUT_SHARE}".encode())
        x, y = dataset_tensors(train, rest)
        xh, yh = dataset_tensors(train, held)
        source = f"the last {FALLBACK_HELDOUT_SHARE:.0%} of every training class (no val/ split), held out from it"
    return x, y, xh, yh, source, h.hexdigest()[:16]


def own_classifier_net(data: dict, cache_dir: Path, seed: int = 0) -> tuple[FeatureNet, float]:
    """The eval classifier of the run's own data (see the module docstring) and its held-out accuracy."""
    if data["name"] == "mnist":
        return mnist_net(cache_dir, int(data["resolution"]))
    x, y, xh, yh, source, data_hash = _classifier_data(data)
    num_classes = int(data["num_classes"])
    if int(y.max()) >= num_classes:
        raise DataSpecError(f"the data holds labels up to {int(y.max())} but data.num_classes is {num_classes}")
    resolution = int(data["resolution"])
    batch_size = 64
    steps_per_epoch = math.ceil(len(y) / batch_size)
    epochs = max(8, math.ceil(CLASSIFIER_MIN_STEPS / steps_per_epoch))
    want = {"format": CLASSIFIER_FORMAT, "seed": str(seed), "resolution": str(resolution), "data": data_hash,
            "spec": json.dumps(data, sort_keys=True)}
    name = data["name"] if data["name"] != "imagefolder" else Path(data["root"]).name or "folder"
    path = Path(cache_dir) / f"classifier-{name}-{resolution}px-{data_hash}.safetensors"
    net, acc = load_or_train_classifier(str(path), want, lambda: train_classifier(
        x, y, xh, yh, num_classes, seed=seed, epochs=epochs, batch_size=batch_size,
        max_shift=max(1, round(2 * resolution / 32)), pad_value=None))
    log.info("own-data classifier %s: held-out accuracy %.4f on %d images (%s)", path, acc, len(yh), source)
    desc = (f"small CNN trained on this run's own training split ({data.get('root', data['name'])}, {len(y)} images "
            f"at {resolution}px, cached {path.name}), held-out accuracy {acc:.4f} on {source}; FID here is in its "
            f"{net.feat_dim}-d penultimate features, NOT Inception FID")

    def embed(x_N3HW):
        f = net.features(x_N3HW)
        logits = net.head(f)
        return f, logits, logits

    return FeatureNet("own-data-cnn", desc, tensors_sha256(net.state_dict()), net.feat_dim, embed,
                      class_map=torch.arange(num_classes), class_count=num_classes,
                      class_note="the classifier's outputs are this run's own class labels", heldout_accuracy=acc), acc
