"""Look at a model: PNGs and a labelled grid for chosen classes, through the same loader and checks as eval/fid.py.

    python eval/sample.py --ckpt runs/var_d16_mclr/model.safetensors --classes 207 360 388 --n 8 --guidance none
    python eval/sample.py --ckpt hf://FoundationVision/var/var_d16.pth \
        --tokenizer hf://FoundationVision/var/vae_ch160v4096z32.pth --classes 207 --n 4 --guidance cfg --cfg-scale 1.5

Writes OUT/<class>_<i>.png for each sample and OUT/grid.png, one row per class with its name (the training folder's
class names, ImageNet's for 1000-class models), and OUT/sample.json with the settings and checkpoint hashes.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from eval.grid import class_names, labelled_grid, save_png
from eval.metrics import to_uint8_nhwc
from eval.run_data import recorded_data
from eval.sampling_run import code_version, load_models, sample_set, strength_input_of, strength_objective
from eval.settings import EvalSettings, SettingsError, add_eval_arguments, settings_from_args
from var_mclr.checkpoints import is_official_checkpoint
from var_mclr.errors import reporting_user_errors
from var_mclr.hub import is_hub_name
from var_mclr.files import make_temp_dir, write_text_atomic

log = logging.getLogger("eval.sample")


def sample_classes(args: EvalSettings, classes: list[int], n: int) -> Path:
    """n samples of each class into args.out_dir, written as one unit (a directory renamed into place)."""
    if n <= 0 or not classes:
        raise SettingsError(f"--n = {n} and --classes = {classes}: need n > 0 and at least one class")
    device = Accelerator(cpu=not torch.cuda.is_available()).device
    vae, var, provenance = load_models(args)
    bad = [c for c in classes if not 0 <= c < var.num_classes]
    if bad:
        raise SettingsError(f"--classes {bad}: the model has classes 0..{var.num_classes - 1}")
    out = Path(args.out_dir)
    if out.exists():
        raise SettingsError(f"--out-dir {out} exists; choose a new directory (nothing is overwritten)")
    names = class_names(recorded_data(args.ckpt), var.num_classes)
    sampling = args.sampling(var.num_classes, strength_input_of(args, var))
    labels_N = torch.tensor(classes).repeat_interleave(n)
    result = sample_set(var.to(device), vae.to(device), sampling, labels_N, args.batch_size, args.seed, device)
    images = torch.from_numpy(to_uint8_nhwc(result.images_N3HW))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    for i, (img, c) in enumerate(zip(images, labels_N.tolist())):
        save_png(Image.fromarray(img.numpy()), tmp / f"{c}_{i % n}.png")
    rows = [images[labels_N == c] for c in classes]
    save_png(labelled_grid(rows, [f"{c}: {names[c]}" for c in classes]), tmp / "grid.png")
    record = {"classes": classes, "n": n, "sampling": sampling.record(), "seed": args.seed, "checkpoint": provenance,
              "class_names": {c: names[c] for c in classes}, "code_version": code_version()}
    if args.strength is not None:  # what was asked (beta or lambda); sampling.strength is the model input it gave
        record.update(strength=args.strength, strength_of=strength_objective(args.ckpt))
    write_text_atomic(tmp / "sample.json", json.dumps(record, indent=2))
    tmp.rename(out)
    log.info("wrote %d samples and grid.png to %s", len(labels_N), out)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", required=True, help="class labels to draw")
    p.add_argument("--n", type=int, default=8, help="samples per class")
    add_eval_arguments(p)
    p.set_defaults(out_dir=None, batch_size=64)
    args = p.parse_args(argv)
    with reporting_user_errors(args.debug):
        if args.ckpt is None:
            raise SettingsError("--ckpt is required (our VAR .safetensors or an official var_d*.pth)")
        if args.out_dir is None:
            strength = "" if args.strength is None else f"-strength{args.strength:g}"
            name = f"samples-{args.guidance}{strength}-s{args.seed}-" + "-".join(map(str, args.classes[:8]))
            local = not is_hub_name(args.ckpt) and not is_official_checkpoint(args.ckpt)
            args.out_dir = str(Path(args.ckpt).parent / name if local else Path("runs/samples") / Path(args.ckpt).stem
                               / name)
        sample_classes(settings_from_args(args), args.classes, args.n)


if __name__ == "__main__":
    main()
