"""Three class-labelled image folders the project was never tuned on, written from data that ships inside installed
packages (nothing is downloaded), for checking the folder pipeline's defaults (docs/unseen_folders.md):

- digits: scikit-learn's 8 x 8 handwritten digits (1,797 images, 10 classes), grey PNGs in train/<digit>/.
- patches: 2,000 colour patches cut from scikit-learn's two sample photographs (china, flower) and matplotlib's
  grace_hopper.jpg; a class is one region of one photograph (2 x 2 regions of each sample photo, 2 of the portrait:
  10 classes), a patch is a random 32-64 px square of it resized to 32 x 32.
- letters: 2,000 printed capitals A-J (10 classes), each drawn in one of matplotlib's bundled fonts (DejaVu Sans,
  Sans Mono, Serif and STIX in four weights/slants each, Computer Modern roman and sans) at a random size,
  rotation and offset, white on black, 32 x 32 grey PNGs.

    python -m experiments.unseen_folders --out DIR       # then: python -m experiments.pipeline --data imagefolder
                                                          #         --root DIR/digits  (or patches, letters)
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
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


LETTER_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
                "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
                "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBol",
                "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10")


def write_letters(root: Path, per_class: int = 200, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for letter in "ABCDEFGHIJ":
        path = root / "train" / letter
        path.mkdir(parents=True)
        for i in range(per_class):
            font = ImageFont.truetype(str(font_dir / f"{LETTER_FONTS[rng.integers(len(LETTER_FONTS))]}.ttf"),
                                      size=int(rng.integers(18, 27)))
            canvas = Image.new("L", (48, 48))
            ImageDraw.Draw(canvas).text((24 + rng.integers(-3, 4), 24 + rng.integers(-3, 4)), letter, fill=255,
                                        font=font, anchor="mm")
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
            canvas.crop((8, 8, 40, 40)).save(path / f"{i:03d}.png")
    return per_class * 10


FOLDERS = {"digits": write_digits, "patches": write_patches, "letters": write_letters}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="writes OUT/<folder> for each folder (none may exist yet)")
    p.add_argument("--folders", nargs="*", choices=tuple(FOLDERS), default=list(FOLDERS))
    args = p.parse_args(argv)
    out = Path(args.out)
    for name in args.folders:
        if (out / name).exists():
            p.error(f"--out {out}: {out / name} already exists; choose another directory")
    for name in args.folders:
        write = FOLDERS[name]
        log.info("%s: %d images in %s", name, write(out / name), out / name)


if __name__ == "__main__":
    main()
