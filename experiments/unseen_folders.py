"""Two class-labelled image folders the project was never tuned on, written from data that ships inside installed
packages (nothing is downloaded), for checking the folder pipeline's defaults (README, "Your own data"):

- digits: scikit-learn's 8 x 8 handwritten digits (1,797 images, 10 classes), grey PNGs in train/<digit>/.
- patches: 2,000 colour patches cut from scikit-learn's two sample photographs (china, flower) and matplotlib's
  grace_hopper.jpg; a class is one region of one photograph (2 x 2 regions of each sample photo, 2 of the portrait:
  10 classes), a patch is a random 32-64 px square of it resized to 32 x 32.

    python -m experiments.unseen_folders --out DIR       # then: python -m experiments.pipeline --data imagefolder
                                                          #         --root DIR/digits  (or DIR/patches)
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

log = logging.getLogger("experiments.unseen_folders")


def write_digits(root: Path) -> int:
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        path = root / "train" / str(label)
        path.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(path / f"{i:04d}.png")
    return len(digits.target)


def photo_regions() -> list[np.ndarray]:
    photos = list(load_sample_images().images)
    portrait = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos.append(np.asarray(Image.open(portrait).convert("RGB")))
    regions = []
    for k, photo in enumerate(photos):
        rows, cols = (2, 2) if k < 2 else (1, 2)
        H, W = photo.shape[:2]
        regions += [photo[r * H // rows:(r + 1) * H // rows, c * W // cols:(c + 1) * W // cols]
                    for r in range(rows) for c in range(cols)]
    return regions


def write_patches(root: Path, per_class: int = 200, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    for label, region in enumerate(photo_regions()):
        path = root / "train" / f"r{label}"
        path.mkdir(parents=True, exist_ok=True)
        h, w = region.shape[:2]
        for i in range(per_class):
            size = int(rng.integers(32, 65))
            y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
            patch = Image.fromarray(region[y:y + size, x:x + size]).resize((32, 32), Image.LANCZOS)
            patch.save(path / f"{i:03d}.png")
    return per_class * len(photo_regions())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="writes OUT/digits and OUT/patches (each must not exist yet)")
    out = Path(p.parse_args(argv).out)
    for name, write in (("digits", write_digits), ("patches", write_patches)):
        if (out / name).exists():
            p.error(f"--out {out}: {out / name} already exists; choose another directory")
    for name, write in (("digits", write_digits), ("patches", write_patches)):
        log.info("%s: %d images in %s", name, write(out / name), out / name)


if __name__ == "__main__":
    main()
