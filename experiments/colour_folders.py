"""Generated colour image folders for choosing and checking the folder pipeline's tokenizer defaults (docs/folders.md):
10 classes of coloured objects on textured colour backgrounds, where colour alone does not tell the class.

- shapes: class = one of 10 shapes (disc, square, triangle, cross, ring, bars, diamond, L, frame, X); every image
  draws its object's colour and its background (noise, stripes or a gradient, in random colours) independently of
  the class, so only the shape says which class it is.
- pairs: class = (one of 5 shapes) x (warm or cool colour); each half of the palette is shared by 5 classes, so the
  colour narrows a class to 5 and the shape decides.

Each folder is written at 32 x 32 px with train/ and val/ splits; a seed gives another folder of the same family
(object sizes, positions, colours and textures all redrawn), so defaults chosen on some seeds are checked on a seed
never looked at.

    python -m experiments.colour_folders --out DIR [--kind shapes|pairs] [--seed 0] [--train 240] [--val 40]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("experiments.colour_folders")
SIZE = 32
SHAPES = ("disc", "square", "triangle", "cross", "ring", "hbar", "diamond", "ell", "frame", "ex")
WARM = ((230, 40, 40), (250, 140, 20), (240, 220, 30), (230, 60, 160))
COOL = ((40, 90, 240), (30, 200, 210), (60, 200, 70), (140, 70, 230))


def _background(rng: np.random.Generator) -> Image.Image:
    """Noise, stripes or a gradient between two random colours: texture the tokenizer must not confuse with objects."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    if kind == 0:
        t = rng.random((SIZE, SIZE))
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * SIZE * 2 * np.pi / period) + 1) / 2
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    # Darkened and desaturated towards grey, so an object of any palette colour stands out from its background.
    img = 0.55 * img + 0.45 * 90
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    w = max(2.0, r / 2.5)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=int(round(w)))
    elif shape == "hbar":
        draw.rectangle((cx - r, cy - w * 0.75, cx + r, cy + w * 0.75), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "ell":
        draw.rectangle((cx - r, cy - r, cx - r + w * 1.2, cy + r), fill=colour)
        draw.rectangle((cx - r, cy + r - w * 1.2, cx + r, cy + r), fill=colour)
    elif shape == "frame":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), outline=colour,
                       width=int(round(w)))
    else:  # ex
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=colour, width=int(round(w)))
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=colour, width=int(round(w)))


def _image(rng: np.random.Generator, shape: str, palette: tuple) -> Image.Image:
    img = _background(rng)
    r = rng.uniform(8, 12)
    cx, cy = (SIZE / 2 + rng.uniform(-3, 3) for _ in range(2))
    colour = tuple(int(c) for c in np.clip(np.array(palette[rng.integers(len(palette))]) + rng.integers(-20, 21, 3),
                                           0, 255))
    _draw(ImageDraw.Draw(img), shape, cx, cy, r, colour)
    return img


def classes(kind: str) -> list[tuple[str, str, tuple]]:
    """(class directory name, shape, palette) of the 10 classes of a kind."""
    if kind == "shapes":
        return [(f"{i}_{s}", s, WARM + COOL) for i, s in enumerate(SHAPES)]
    return [(f"{i}_{s}_{tone}", s, pal) for i, (s, (tone, pal)) in
            enumerate((s, t) for t in (("warm", WARM), ("cool", COOL)) for s in SHAPES[:5])]


def write_folder(root: Path, kind: str = "shapes", seed: int = 0, train: int = 240, val: int = 40) -> int:
    """root/train/<class>/ and root/val/<class>/ of a kind (32 x 32 PNGs); returns the number of images."""
    if kind not in ("shapes", "pairs"):
        raise ValueError(f"kind {kind!r}: expected shapes or pairs")
    rng = np.random.default_rng([seed, 0 if kind == "shapes" else 1])
    for name, shape, palette in classes(kind):
        for split, n in (("train", train), ("val", val)):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, shape, palette).save(d / f"{i:04d}.png")
    return 10 * (train + val)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--kind", choices=("shapes", "pairs"), default="shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=240, help="training images per class")
    p.add_argument("--val", type=int, default=40, help="held-out images per class")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        p.error(f"--out {out} already exists; choose another directory")
    log.info("%s (seed %d): %d images in %s", args.kind, args.seed,
             write_folder(out, args.kind, args.seed, args.train, args.val), out)


if __name__ == "__main__":
    main()
