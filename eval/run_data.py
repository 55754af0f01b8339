"""The data a run was trained on, read back for its evaluation: every metric of a run is computed on its own data.

A checkpoint of ours records its training config (model.json, source_config); its data section names the dataset
(mnist, synthetic, or an image folder with its root, resolution and crop policy). Images are read in the deterministic
view (centre crop, no flip), the view a token cache holds: the training split as the generator saw it.

- split_images: the held-out split ("val": MNIST's, an image folder's val/ or its data.heldout_share slice), or for
  a folder with neither a class-stratified slice of the training split (said so in the returned description);
  "train" for the statistics on training pairs.
- own_classifier_net: the feature network for any labelled data, a small CNN (eval/networks/mnist_cnn.py) trained
  once on the run's own training split until its accuracy on a slice of that split stops improving, with random
  shifts (and flips where data.hflip says they keep the class), cached by a hash of the data and the recipe, with
  its accuracy on the held-out split. Below EVALUATOR_MIN_ACCURACY its description, which every metrics.json
  records, says it is too weak to judge. On MNIST it is the shipped, pinned MNIST network, so the demo's numbers do
  not move.
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
from eval.networks.mnist_cnn import (evaluate_accuracy, load_or_train_classifier,
                                     train_classifier_until_plateau)
from var_mclr.checkpoints import is_official_checkpoint, read_model_info
from var_mclr.data import build_dataset, dataset_args, dataset_tensors, spread_indices
from var_mclr.errors import UserError
from var_mclr.files import tensors_sha256
from var_mclr.tokens import dataset_fingerprint

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "var-mclr/own-data-cnn/v2"  # bump when the recipe changes, so cached networks retrain
# Below this held-out accuracy every description of the own-data network (metrics.json, tables) says it is too weak
# to judge (docs/method.md, "Checks between stages").
EVALUATOR_MIN_ACCURACY = 0.9
STOP_SHARE = 0.1  # of every training class: the images that decide when the classifier stops
FALLBACK_HELDOUT_SHARE = 0.1  # of every class, when an image folder has no val/ split
CLASSIFIER_MIN_STEPS = 200  # a tiny folder still gets enough optimiser steps before early stopping may end it


class DataSpecError(UserError, ValueError):
    pass


def recorded_data(ckpt: str) -> dict | None:
    """The data a checkpoint of ours was trained on (build_dataset's arguments); None when it records none (an
    official checkpoint, or weights saved outside training)."""
    if is_official_checkpoint(ckpt):
        return None
    section = read_model_info(ckpt).get("source_config", {}).get("data")
    return data_of_section(section) if section else None


def data_of_section(section: dict) -> dict:
    """build_dataset's arguments for a config's data section, as the evaluation reads them."""
    # data.hflip (mirror images keep the class) tells the own-data classifier which augmentations it may use;
    # named only when set, so a run without flips keeps its classifier's cache key.
    return {**dataset_args(section), **({"hflip": True} if section.get("hflip") else {})}


def _has_heldout(data: dict) -> bool:
    """Whether the data has images the generator never trained on: MNIST's and the synthetic set's val split, an
    image folder's val/, or its data.heldout_share slice."""
    return (data["name"] != "imagefolder" or os.path.isdir(os.path.join(data["root"], "val"))
            or data.get("heldout_share", 0) > 0)


def _with_fallback_slice(data: dict) -> dict:
    # a folder with no held-out data: the slice data.heldout_share would hold out (the generator trained on it)
    return {**data, "heldout_share": FALLBACK_HELDOUT_SHARE}


def split_images(data: dict, split: str, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images_N3HW, labels_N, description) of up to max_images images of the split, in the deterministic view.

    split "val" of an image folder with no held-out data (no val/, data.heldout_share 0): the last
    FALLBACK_HELDOUT_SHARE of every training class, and the description says the generator trained on them."""
    seen = split == "val" and not _has_heldout(data)
    ds = build_dataset(_with_fallback_slice(data) if seen else data, split, deterministic=True)
    images, labels = dataset_tensors(ds, None if max_images is None else spread_indices(len(ds), max_images))
    where = data.get("root", data["name"])
    if seen:
        return images, labels, (f"{len(labels)} training images of {where} (no held-out data: the last "
                                f"{FALLBACK_HELDOUT_SHARE:.0%} of every class; the generator saw them)")
    return images, labels, f"{len(labels)} {'held-out' if split == 'val' else 'training'} images of {where}"


def _classifier_data(data: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str, str]:
    """Train and held-out tensors of the classifier, the held-out source and a hash of both. With no held-out data,
    the classifier still must not be scored on images it trained on: it trains on all but the fallback slice."""
    source = "its held-out split"
    if not _has_heldout(data):
        data = _with_fallback_slice(data)
        source = f"the last {FALLBACK_HELDOUT_SHARE:.0%} of every training class (no held-out data), held out from it"
    train, held = (build_dataset(data, split, deterministic=True) for split in ("train", "val"))
    h = hashlib.sha256(dataset_fingerprint(train).encode())
    h.update(dataset_fingerprint(held).encode())
    x, y = dataset_tensors(train)
    xh, yh = dataset_tensors(held)
    return x, y, xh, yh, source, h.hexdigest()[:16]


def _stop_split(y_N: torch.Tensor, share: float = STOP_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, stop indices): the last `share` of every class (at least one image) decides when the
    classifier stops, so the held-out split that its accuracy is reported on never chose anything."""
    stop = []
    for c in y_N.unique():
        members = (y_N == c).nonzero().flatten()
        take = min(len(members) - 1, max(1, math.ceil(share * len(members))))  # a 1-image class trains on it
        stop.append(members[len(members) - take:])
    stop_N = torch.cat(stop)
    keep = torch.ones(len(y_N), dtype=torch.bool)
    keep[stop_N] = False
    return keep.nonzero().flatten(), stop_N


def _train_own_classifier(x, y, xh, yh, num_classes: int, resolution: int, hflip: bool, seed: int):
    fit, stop = _stop_split(y)
    # shifts of up to 1/8 of the image (2 px at 16 px); mirror images only where the data says they keep the class
    net = train_classifier_until_plateau(x[fit], y[fit], x[stop], y[stop], num_classes, seed=seed,
                                         min_steps=CLASSIFIER_MIN_STEPS, max_shift=max(1, resolution // 8),
                                         hflip=hflip)
    return net, evaluate_accuracy(net, xh, yh)


def weakness_note(acc: float) -> str:
    """The warning every description of a too-weak own-data network carries ("" when it is strong enough)."""
    if acc >= EVALUATOR_MIN_ACCURACY:
        return ""
    return (f" WARNING: held-out accuracy {acc:.4f} < {EVALUATOR_MIN_ACCURACY:g}: the feature network is too weak for "
            "its FID and class accuracy to mean much (docs/method.md, \"Checks between stages\").")


def own_classifier_net(data: dict, cache_dir: Path, seed: int = 0) -> tuple[FeatureNet, float]:
    """The eval classifier of the run's own data (see the module docstring) and its held-out accuracy."""
    if data["name"] == "mnist":
        return mnist_net(cache_dir, int(data["resolution"]))
    x, y, xh, yh, source, data_hash = _classifier_data(data)
    num_classes = int(data["num_classes"])
    if int(y.max()) >= num_classes:
        raise DataSpecError(f"the data holds labels up to {int(y.max())} but data.num_classes is {num_classes}")
    resolution = int(data["resolution"])
    want = {"format": CLASSIFIER_FORMAT, "seed": str(seed), "resolution": str(resolution), "data": data_hash,
            "spec": json.dumps(data, sort_keys=True)}
    name = data["name"] if data["name"] != "imagefolder" else Path(data["root"]).name or "folder"
    path = Path(cache_dir) / f"classifier-{name}-{resolution}px-{data_hash}.safetensors"
    net, acc = load_or_train_classifier(str(path), want, lambda: _train_own_classifier(
        x, y, xh, yh, num_classes, resolution, bool(data.get("hflip", False)), seed))
    log.info("own-data classifier %s: held-out accuracy %.4f on %d images (%s)", path, acc, len(yh), source)
    weak = weakness_note(acc)
    if weak:
        log.warning("own-data classifier:%s", weak)
    desc = (f"small CNN trained on this run's own training split ({data.get('root', data['name'])}, {len(y)} images "
            f"at {resolution}px, cached {path.name}), held-out accuracy {acc:.4f} on {source}; FID here is in its "
            f"{net.feat_dim}-d penultimate features, NOT Inception FID.{weak}")

    def embed(x_N3HW):
        f = net.features(x_N3HW)
        logits = net.head(f)
        return f, logits, logits

    return FeatureNet("own-data-cnn", desc, tensors_sha256(net.state_dict()), net.feat_dim, embed,
                      class_map=torch.arange(num_classes), class_count=num_classes,
                      class_note="the classifier's outputs are this run's own class labels" + weak,
                      heldout_accuracy=acc), acc
