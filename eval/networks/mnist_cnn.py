"""A small CNN for the embedded MNIST digits: the feature space of the embedded dataset's FID / precision / recall;
its logits give class accuracy and the classifier score. It knows nothing of ImageNet: its numbers are not comparable
with Inception FID.

The network at the demo's 16 px ships with the package (SHIPPED: trained once with train_mnist_classifier, seed 0,
and pinned by the hash of its tensors), so every machine scores in the same feature space: retraining, even from
the same seed, gives different weights on another CPU or torch build. Other resolutions are trained on first use
and cached; their records say so.
"""
from __future__ import annotations

import argparse
import importlib.resources
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from var_mclr.data import mnist_dataset
from var_mclr.files import atomic_write, tensors_sha256

log = logging.getLogger(__name__)

CNN_FORMAT = "var-mclr/mnist-cnn/v1"  # bump when the architecture or recipe changes, so stale caches retrain
CNN_RES = 32  # the network's input size; images of other sizes are resized to it
# resolution -> (file in this package, sha256 of its tensors: var_mclr.files.tensors_sha256)
SHIPPED = {16: ("mnist_cnn_16px_v1.safetensors", "4424d21734dbcf543decba4b6fd5f9b126698ddae1a1418be30ec749b807286e")}


class MnistCNN(nn.Module):
    """3 x (conv-BN-ReLU, 2x2 max-pool) on 32 x 32, FC to a `feat_dim` embedding, then ReLU + FC to the logits.

    The embedding is taken before its ReLU: post-ReLU units that are dead on some inputs make the feature covariance
    singular, which the Frechet distance handles badly."""

    def __init__(self, num_classes: int = 10, width: int = 16, feat_dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.Flatten(), nn.Linear(4 * width * 16, feat_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feat_dim, num_classes))
        self.feat_dim = feat_dim
        self.num_classes = num_classes

    @staticmethod
    def _prep(x_N3HW: torch.Tensor) -> torch.Tensor:
        if x_N3HW.ndim != 4 or x_N3HW.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got shape {tuple(x_N3HW.shape)}")
        if x_N3HW.shape[1] == 1:
            x_N3HW = x_N3HW.expand(-1, 3, -1, -1)
        if x_N3HW.shape[-2:] != (CNN_RES, CNN_RES):
            # Lets a demo at another resolution use the same classifier; the images are resized, not the network.
            x_N3HW = F.interpolate(x_N3HW.float(), size=(CNN_RES, CNN_RES), mode="bilinear", align_corners=False,
                                   antialias=True)
        return x_N3HW.float()

    def features(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (N, feat_dim): the FID feature space of the embedded dataset."""
        return self.body(self._prep(x_N3HW))

    def logits(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_N3HW))

    forward = logits


def _shift_augment(x_N3HW: torch.Tensor, g: torch.Generator, max_shift: int = 2,
                   pad_value: float | None = -1.0) -> torch.Tensor:
    # Random translation by up to max_shift pixels (pad, crop): the cheapest augmentation that buys the last percent
    # of held-out accuracy with only 4,500 training digits. Padding: MNIST's background value, or (None) the edge
    # pixels repeated, for images without a uniform background.
    n, _, h, w = x_N3HW.shape
    padded = (F.pad(x_N3HW, (max_shift,) * 4, value=pad_value) if pad_value is not None
              else F.pad(x_N3HW, (max_shift,) * 4, mode="replicate"))
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 3, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x_N3HW: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    correct = sum((model.logits(x_N3HW[s:s + batch_size]).argmax(1) == labels_N[s:s + batch_size]).sum().item()
                  for s in range(0, len(labels_N), batch_size))
    model.train(was_training)
    return correct / len(labels_N)


def train_mnist_classifier(seed: int = 0, resolution: int = 32, epochs: int = 8, batch_size: int = 64,
                           lr: float = 3e-3) -> tuple[MnistCNN, float]:
    """Train on the embedded MNIST train split only; return the model (eval mode) and its held-out accuracy.

    `resolution` is the data resolution (the demo's): the digits are loaded at it and resized to the network's
    32 x 32 input, so the classifier sees the same resampling blur as generated images at that resolution
    (a 32-px-trained classifier drops from 98 % to 93 % on real 16-px digits).
    """
    train, heldout = mnist_dataset("train", resolution), mnist_dataset("val", resolution)
    return train_classifier(*train.tensors, *heldout.tensors, train.num_classes, seed=seed, epochs=epochs,
                            batch_size=batch_size, lr=lr, max_shift=max(1, round(2 * resolution / 32)),
                            pad_value=-1.0)  # +-2 px at 32 px, scaled with the resolution; MNIST's background


def train_classifier(x_N3HW: torch.Tensor, y_N: torch.Tensor, x_heldout: torch.Tensor, y_heldout: torch.Tensor,
                     num_classes: int, seed: int = 0, epochs: int = 8, batch_size: int = 64, lr: float = 3e-3,
                     max_shift: int = 2, pad_value: float | None = -1.0, hflip: bool = False
                     ) -> tuple[MnistCNN, float]:
    """The recipe of any dataset's eval classifier: train on (x_N3HW, y_N) in [-1, 1], with random shifts (and
    mirror images when hflip); return the model (eval mode) and its accuracy on the held-out pair.

    Runs single-threaded: these small convolutions gain little from a second thread, and OpenMP's spin-waiting makes
    multi-threaded training ~10x slower when the cores are shared (measured on a busy 2-core machine: 2 epochs took
    4 s of CPU with 1 thread, 40 s with 2). Seeded, deterministic for a given torch build.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(x_N3HW, y_N, x_heldout, y_heldout, num_classes, seed, epochs, batch_size, lr,
                                 max_shift, pad_value, hflip)
    finally:
        torch.set_num_threads(prev_threads)


def _train_classifier(x_N3HW: torch.Tensor, y_N: torch.Tensor, x_heldout: torch.Tensor, y_heldout: torch.Tensor,
                      num_classes: int, seed: int, epochs: int, batch_size: int, lr: float, max_shift: int,
                      pad_value: float | None, hflip: bool) -> tuple[MnistCNN, float]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = MnistCNN(num_classes=num_classes)
    steps_per_epoch = (len(y_N) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        loss = _train_epoch(model, opt, x_N3HW, y_N, g, batch_size, max_shift, pad_value, hflip, sched.step)
        log.info("eval classifier epoch %d/%d: last batch loss %.4f (%.1fs)", epoch + 1, epochs, loss.item(),
                 time.perf_counter() - t0)
    model.eval()
    acc = evaluate_accuracy(model, x_heldout, y_heldout)
    log.info("eval classifier trained in %.1fs, held-out accuracy %.4f", time.perf_counter() - t0, acc)
    return model, acc


def train_classifier_until_plateau(x_N3HW: torch.Tensor, y_N: torch.Tensor, x_stop: torch.Tensor,
                                   y_stop: torch.Tensor, num_classes: int, seed: int = 0, max_epochs: int = 60,
                                   patience: int = 5, min_steps: int = 200, batch_size: int = 64, lr: float = 3e-3,
                                   max_shift: int = 2, hflip: bool = False, width: int = 32) -> MnistCNN:
    """An own-data classifier trained until its accuracy on (x_stop, y_stop), images it never trains on, stops
    improving: `patience` epochs without a better stop-set accuracy (ties: a lower stop-set loss), at most
    max_epochs, at least min_steps updates. Returns the best epoch's weights in eval mode (docs/method.md, "Checks
    between stages"). Single-threaded for train_classifier's reason."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_until_plateau(x_N3HW, y_N, x_stop, y_stop, num_classes, seed, max_epochs, patience, min_steps,
                                    batch_size, lr, max_shift, hflip, width)
    finally:
        torch.set_num_threads(prev_threads)


def _train_epoch(model: MnistCNN, opt, x_N3HW: torch.Tensor, y_N: torch.Tensor, g: torch.Generator, batch_size: int,
                 max_shift: int, pad_value: float | None, hflip: bool, after_step=None) -> torch.Tensor:
    """One pass in a random order from g, each batch shifted (and mirrored with hflip); returns the last loss."""
    perm = torch.randperm(len(y_N), generator=g)
    for s in range(0, len(y_N), batch_size):
        idx = perm[s:s + batch_size]
        x = _shift_augment(x_N3HW[idx], g, max_shift, pad_value)
        if hflip:
            x = torch.where((torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        loss = F.cross_entropy(model.logits(x), y_N[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return loss


@torch.no_grad()
def _stop_score(model: MnistCNN, x_N3HW: torch.Tensor, y_N: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -mean cross-entropy) on the stop set: larger is better, compared as a tuple."""
    model.eval()
    logits = torch.cat([model.logits(x_N3HW[s:s + 500]) for s in range(0, len(y_N), 500)])
    model.train()
    return float((logits.argmax(1) == y_N).float().mean()), -float(F.cross_entropy(logits, y_N))


def _train_until_plateau(x_N3HW, y_N, x_stop, y_stop, num_classes, seed, max_epochs, patience, min_steps,
                         batch_size, lr, max_shift, hflip, width) -> MnistCNN:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MnistCNN(num_classes=num_classes, width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # A plateau first lowers the rate (a constant rate stalls above the optimum), then ends training.
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=max(1, patience // 2))
    min_epochs = math.ceil(min_steps / math.ceil(len(y_N) / batch_size))
    best, best_state, since, t0 = None, None, 0, time.perf_counter()
    model.train()
    for epoch in range(max_epochs):
        # pad_value None: edge pixels repeated, no uniform background
        _train_epoch(model, opt, x_N3HW, y_N, g, batch_size, max_shift, None, hflip)
        score = _stop_score(model, x_stop, y_stop)
        sched.step(score[0])
        if best is None or score > best:
            best, since = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
        log.info("eval classifier epoch %d: stop-set accuracy %.4f, loss %.4f (%.1fs)", epoch + 1, score[0],
                 -score[1], time.perf_counter() - t0)
        if since >= patience and epoch + 1 >= min_epochs:
            break
    model.load_state_dict(best_state)
    log.info("eval classifier: best stop-set accuracy %.4f after %d epochs (%.1fs)", best[0], epoch + 1,
             time.perf_counter() - t0)
    return model.eval()


def _load(path, meta: dict) -> MnistCNN:
    model = MnistCNN(num_classes=int(meta["num_classes"]), width=int(meta.get("width", 16)))
    model.load_state_dict(load_file(path))
    return model.eval()


def load_shipped_mnist_classifier(resolution: int) -> tuple[MnistCNN, float]:
    """The packaged eval classifier at `resolution` (a key of SHIPPED) and its recorded held-out accuracy; refuses
    weights whose tensor hash is not the pinned one."""
    name, sha = SHIPPED[resolution]
    path = importlib.resources.files("eval.networks") / name
    with importlib.resources.as_file(path) as local:
        with safe_open(local, framework="pt") as f:
            meta = f.metadata() or {}
        model = _load(local, meta)
    got = tensors_sha256(model.state_dict())
    if got != sha:
        raise RuntimeError(f"{name}: tensor hash {got} is not the pinned {sha}; reinstall the package")
    return model, float(meta["heldout_acc"])


def load_or_train_mnist_classifier(cache_path: str, seed: int = 0, resolution: int = 32) -> tuple[MnistCNN, float]:
    """The eval classifier for the embedded dataset at `resolution`: loaded from `cache_path` or trained once there.

    Returns (model in eval mode, held-out accuracy at that resolution)."""
    want = {"format": CNN_FORMAT, "seed": str(seed), "resolution": str(resolution)}
    return load_or_train_classifier(cache_path, want, lambda: train_mnist_classifier(seed=seed, resolution=resolution))


def load_or_train_classifier(cache_path: str, want: dict[str, str], train: Callable[[], tuple[MnistCNN, float]]
                             ) -> tuple[MnistCNN, float]:
    """An eval classifier loaded from `cache_path`, or trained by train() and cached there.

    The cache records `want` (format version, seed, resolution, data hash, ...); a mismatch or an unreadable file
    means retraining (logged), never silently using another network."""
    if os.path.isfile(cache_path):
        try:
            with safe_open(cache_path, framework="pt") as f:
                meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in want.items()):
                return _load(cache_path, meta), float(meta["heldout_acc"])
            log.warning("classifier cache %s is for %s, not %s: retraining", cache_path,
                        {k: meta.get(k) for k in want}, want)
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("classifier cache %s unreadable (%s): retraining", cache_path, e)
    model, acc = train()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**want, "num_classes": str(model.num_classes), "heldout_acc": repr(acc),
            "width": str(model.body[0][0].out_channels)}
    atomic_write(Path(cache_path), lambda tmp: save_file(state, tmp, metadata=meta))
    return model, acc


def main(argv: list[str] | None = None) -> None:
    """Train the eval classifier at a resolution and print the tensor hash to pin in SHIPPED (maintainers only)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--out", required=True, help="where to write the .safetensors")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, _ = load_or_train_mnist_classifier(args.out, seed=0, resolution=args.resolution)
    log.info("tensor sha256 %s", tensors_sha256(model.state_dict()))


if __name__ == "__main__":
    main()
