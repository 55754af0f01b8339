"""Feature networks for evaluation.

- MnistCNN: a small CNN trained once (seeded, train split only) on the embedded MNIST subset and cached as
  safetensors. Its penultimate layer is the feature space of the embedded dataset's FID / precision / recall, its
  logits give class accuracy and the classifier score. It knows nothing of ImageNet: numbers are not comparable.
- Inception-v3 (torchvision's definition) with weights from a local file only: pool3 (2048-d) and logits, for
  ImageNet FID / IS. With pytorch-fid's port of the TF FID weights (1008 classes) the TF graph's pooling quirks are
  reproduced; with torchvision's ImageNet weights (1000 classes) numbers run ~1-2 FID off published ones.
- DINOv2 from a local directory (transformers) or file (timm) for FD_DINOv2, when one of them is installed.

Every network here takes images (N, 3, H, W) in [-1, 1], the project's convention, and does its own resizing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.models.inception as tvi
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from var_mclr.checkpoints import atomic_write
from var_mclr.data import mnist_dataset

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Small CNN for the embedded MNIST dataset
# ----------------------------------------------------------------------------------------------------------------

CNN_FORMAT = "var-mclr/mnist-cnn/v1"  # bump when the architecture or recipe changes, so stale caches retrain
CNN_RES = 32  # the network's input size; images of other sizes are resized to it


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


def _shift_augment(x_N3HW: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    # Random translation by up to max_shift pixels (pad with background, crop): the cheapest augmentation that
    # buys the last percent of held-out accuracy with only 4,500 training digits.
    n, _, h, w = x_N3HW.shape
    padded = F.pad(x_N3HW, (max_shift,) * 4, value=-1.0)
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

    Runs single-threaded: these small convolutions gain little from a second thread, and OpenMP's spin-waiting makes
    multi-threaded training ~10x slower when the cores are shared (measured on a busy 2-core machine: 2 epochs took
    4 s of CPU with 1 thread, 40 s with 2). Seeded, deterministic for a given torch build.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_mnist_classifier(seed, resolution, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(prev_threads)


def _train_mnist_classifier(seed: int, resolution: int, epochs: int, batch_size: int, lr: float
                            ) -> tuple[MnistCNN, float]:
    train, heldout = mnist_dataset("train", resolution), mnist_dataset("val", resolution)
    x_N3HW, y_N = train.tensors
    max_shift = max(1, round(2 * resolution / 32))  # +-2 px at 32 px, scaled with the resolution
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = MnistCNN(num_classes=train.num_classes)
    steps_per_epoch = (len(y_N) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y_N), generator=g)
        for s in range(0, len(y_N), batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(model.logits(_shift_augment(x_N3HW[idx], g, max_shift)), y_N[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("mnist classifier epoch %d/%d: last batch loss %.4f (%.1fs)", epoch + 1, epochs, loss.item(),
                 time.perf_counter() - t0)
    model.eval()
    acc = evaluate_accuracy(model, *heldout.tensors)
    log.info("mnist classifier trained in %.1fs, held-out accuracy %.4f", time.perf_counter() - t0, acc)
    return model, acc


def load_or_train_mnist_classifier(cache_path: str, seed: int = 0, resolution: int = 32) -> tuple[MnistCNN, float]:
    """The eval classifier for the embedded dataset at `resolution`: loaded from `cache_path` or trained once there.

    Returns (model in eval mode, held-out accuracy at that resolution). The cache records the format version, seed
    and resolution; a mismatch or an unreadable file means retraining (logged), never silently using another network.
    """
    want = {"format": CNN_FORMAT, "seed": str(seed), "resolution": str(resolution)}
    if os.path.isfile(cache_path):
        try:
            with safe_open(cache_path, framework="pt") as f:
                meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in want.items()):
                model = MnistCNN(num_classes=int(meta["num_classes"]))
                model.load_state_dict(load_file(cache_path))
                model.eval()
                return model, float(meta["heldout_acc"])
            log.warning("classifier cache %s is for %s, not %s: retraining", cache_path,
                        {k: meta.get(k) for k in want}, want)
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("classifier cache %s unreadable (%s): retraining", cache_path, e)
    model, acc = train_mnist_classifier(seed=seed, resolution=resolution)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**want, "num_classes": str(model.num_classes), "heldout_acc": repr(acc)}
    atomic_write(Path(cache_path), lambda tmp: save_file(state, tmp, metadata=meta))
    return model, acc


def file_sha256(path: str) -> str:
    """Hash of a weights file, for provenance records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def in_batches(fn, x_N3HW: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None
               ) -> torch.Tensor:
    """Apply `fn` (e.g. model.features) to `x` in batches on `device`; results concatenated on the CPU."""
    outs = []
    for s in range(0, x_N3HW.shape[0], batch_size):
        xb = x_N3HW[s:s + batch_size]
        outs.append(fn(xb.to(device) if device is not None else xb).float().cpu())
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------------------------
# Inception-v3 for ImageNet FID / IS (local weights only)
# ----------------------------------------------------------------------------------------------------------------

# pytorch-fid's port of the TF FID Inception (the weights behind published FIDs), then torchvision's ImageNet weights.
INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "inception_v3_google-0cc3c7bd.pth")


def find_local_inception_weights() -> str | None:
    """First of INCEPTION_FILENAMES present in the torch hub cache ($TORCH_HOME/hub/checkpoints), else None."""
    ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in INCEPTION_FILENAMES:
        p = os.path.join(ckpt_dir, name)
        if os.path.isfile(p):
            return p
    return None


def _pool_exclude_pad(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores padded zeros; torchvision's counts them.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _TFInceptionA(tvi.InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool_exclude_pad(x))], 1)


class _TFInceptionC(tvi.InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for i in range(1, 6):
            b7d = getattr(self, f"branch7x7dbl_{i}")(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_pool_exclude_pad(x))], 1)


class _TFInceptionE(tvi.InceptionE):
    pool_fn = staticmethod(_pool_exclude_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool_fn(x))], 1)


def _max_pool3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFInceptionEMax(_TFInceptionE):
    # The TF FID graph's last block pools with max, not average (a quirk of that graph, kept for comparability).
    pool_fn = staticmethod(_max_pool3)


def _patch_tf_pooling(net: nn.Module) -> None:
    """Make torchvision's Inception3 compute what the TF FID graph computes. Same parameters, two differences:
    average-pool branches exclude padding (Mixed_5b..5d, 6b..6e, 7b) and Mixed_7c's pool branch is a max-pool.
    Swapping __class__ keeps the loaded parameters and only replaces forward()."""
    swaps = [(("Mixed_5b", "Mixed_5c", "Mixed_5d"), tvi.InceptionA, _TFInceptionA),
             (("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), tvi.InceptionC, _TFInceptionC),
             (("Mixed_7b",), tvi.InceptionE, _TFInceptionE), (("Mixed_7c",), tvi.InceptionE, _TFInceptionEMax)]
    for names, expected, patched in swaps:
        for name in names:
            m = getattr(net, name)
            if type(m) is not expected:
                raise TypeError(f"{name} is a {type(m).__name__}, expected torchvision's {expected.__name__}")
            m.__class__ = patched


class InceptionFeatures(nn.Module):
    """Inception-v3 returning pool3 features (N, 2048) and logits (N, 1000 or 1008) for images in [-1, 1].

    Images are resized to 299 x 299 (bilinear, as pytorch-fid does); both supported weight files expect [-1, 1]
    input, so no further normalisation is applied.
    """

    def __init__(self, net: nn.Module, tf_fid: bool):
        super().__init__()
        self.net = net
        self.tf_fid = tf_fid
        self.feat_dim = 2048

    def pool3_and_logits(self, x_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = F.interpolate(x_N3HW.float(), size=(299, 299), mode="bilinear", align_corners=False)
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        pool_ND = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool_ND, n.fc(pool_ND)

    def features(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        return self.pool3_and_logits(x_N3HW)[0]

    def logits(self, x_N3HW: torch.Tensor) -> torch.Tensor:
        return self.pool3_and_logits(x_N3HW)[1]

    forward = pool3_and_logits


def load_inception(weights_path: str | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """torchvision's Inception-v3 with weights from a local file; never downloads.

    `weights_path` None means: look in the torch hub cache for INCEPTION_FILENAMES. A 1008-class state dict is
    taken to be the TF FID port and gets the TF pooling patches; a 1000-class one is used as torchvision built it.
    """
    if weights_path is None:
        weights_path = find_local_inception_weights()
        if weights_path is None:
            raise FileNotFoundError(
                "no local Inception weights: pass a path, or place one of "
                f"{', '.join(INCEPTION_FILENAMES)} in {os.path.join(torch.hub.get_dir(), 'checkpoints')} "
                "(this project never downloads weights)")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights file not found: {weights_path} (this project never downloads "
                                "weights; copy the file there first)")
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    if "fc.weight" not in sd:
        raise ValueError(f"{weights_path} is not an Inception-v3 state dict (no 'fc.weight' key)")
    num_classes = sd["fc.weight"].shape[0]
    aux = any(k.startswith("AuxLogits.") for k in sd)
    net = torchvision.models.inception_v3(weights=None, num_classes=num_classes, aux_logits=aux,
                                          transform_input=False, init_weights=False)
    result = net.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{weights_path} does not match torchvision's Inception-v3: missing "
                         f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
    tf_fid = num_classes == 1008
    if tf_fid:
        _patch_tf_pooling(net)
    log.info("loaded Inception-v3 from %s (%d classes, %s pooling)", weights_path, num_classes,
             "TF-FID" if tf_fid else "torchvision")
    return InceptionFeatures(net, tf_fid).eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 (FD_DINOv2), optional
# ----------------------------------------------------------------------------------------------------------------

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
