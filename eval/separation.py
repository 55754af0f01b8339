"""Inter-class separation of a VAR on real images, from exact log-likelihoods under every class.

    python eval/separation.py --ckpt runs/mnist/mclr/model.safetensors [--max-images 2000] [--class-chunk 16]
    python eval/separation.py --ckpt runs/mnist/gft/model.safetensors --strength 0.5   # a strength-conditioned model

Reported on the training split (where MCLR's cap acts: docs/method.md, "The cap") beside the held-out split, both
read from the data the checkpoint was trained on (or --data/--root); an image folder without val/ falls back to a
slice of its training split, and the output says so. Images are scored under the classes a chunk at a time, so
1000 classes never build batch x 1000 teacher-forced rows at once (at most --batch-size x --class-chunk).

implicit-classifier accuracy: argmax_c l(x, c) (uniform prior), the share of images a VAR assigns to their class;
mean log-ratio: l(x, c) - mean_{c' != c} l(x, c'), per token, the quantity MCLR maximises (capped);
held-out nll: -l(x, c) / L, which must not be bought away for separation.
--strength (a strength-conditioned model: GFT's beta, the MCLR dial's lambda, as eval/fid.py --strength) scores the
likelihoods l(x, c) at that strength input, i.e. the separation of the distribution sampled at it; without it, the
model's neutral input. The output then records the strength, what it means and the input it gave.
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from eval.run_data import recorded_data, split_images
from eval.sampling_run import load_for_eval, strength_input_of, strength_objective
from eval.settings import EvalSettings, SettingsError, tokenizer_overrides
from var_mclr.errors import add_debug_flag, reporting_user_errors
from var_mclr.likelihood import implicit_classifier_logprobs, loglik_all_classes, loglik_under_classes

log = logging.getLogger("eval.separation")


@torch.no_grad()
def separation(var, vae, images_N3HW: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 250,
               class_chunk: int = 16, split: str = "heldout", strength_input: float | None = None) -> dict:
    """Separation statistics of images under every class; one pass scores batch_size images x class_chunk classes.
    split names the nll key ({split}_nll_per_token). strength_input: a strength-conditioned model's input for every
    row (None: its neutral input)."""
    if batch_size <= 0 or class_chunk <= 0:
        raise SettingsError(f"--batch-size = {batch_size} and --class-chunk = {class_chunk} must be integers > 0")
    device = next(var.parameters()).device
    l_parts = []
    for start in range(0, len(images_N3HW), batch_size):
        idx = vae.img_to_idxBl(images_N3HW[start:start + batch_size].to(device))
        x, idx_BL = vae.quantize.idxBl_to_var_input(idx), torch.cat(idx, 1)
        if var.num_classes <= class_chunk and strength_input is None:  # one pass, as before chunking existed
            l_parts.append(loglik_all_classes(var, x, idx_BL).cpu())
            continue
        chunks = []
        for c0 in range(0, var.num_classes, class_chunk):
            classes = torch.arange(c0, min(c0 + class_chunk, var.num_classes), device=device)
            classes_BK = classes.expand(len(idx_BL), -1)
            strength_BK = None if strength_input is None else torch.full_like(classes_BK, strength_input,
                                                                                  dtype=torch.float)
            chunks.append(loglik_under_classes(var, classes_BK, x, idx_BL, strength_BK=strength_BK).cpu())
        l_parts.append(torch.cat(chunks, dim=1))
    l_NC = torch.cat(l_parts).double()
    labels_N = labels_N.long()
    C = l_NC.shape[1]
    l_true = l_NC.gather(1, labels_N.view(-1, 1)).squeeze(1)
    l_others = (l_NC.sum(1) - l_true) / (C - 1)
    log_p = implicit_classifier_logprobs(l_NC)
    return {
        "implicit_classifier_accuracy": float((l_NC.argmax(1) == labels_N).double().mean()),
        "mean_log_ratio_per_token": float((l_true - l_others).mean() / var.L),
        f"{split}_nll_per_token": float(-l_true.mean() / var.L),
        "mean_log_p_true_class": float(log_p.gather(1, labels_N.view(-1, 1)).mean()),
        "num_images": len(labels_N),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tokenizer", help="default: the one the VAR was trained with; needed for an official var_d*.pth")
    p.add_argument("--allow-other-tokenizer", action="store_true", help="score with a --tokenizer other than the "
                   "one the VAR was trained with")
    p.add_argument("--set", dest="tokenizer_set", action="append", default=[], metavar="tokenizer.KEY=VALUE",
                   help="architecture of an official-layout tokenizer .pth")
    p.add_argument("--data", choices=("mnist", "synthetic", "imagefolder"),
                   help="default: the data the checkpoint was trained on (its model.json)")
    p.add_argument("--root", help="--data imagefolder: the directory holding train/<class>/ (and val/<class>/)")
    p.add_argument("--max-images", type=int, default=None, help="per split, spread over the classes")
    p.add_argument("--batch-size", type=int, default=250, help="images per pass")
    p.add_argument("--class-chunk", type=int, default=16, help="classes per pass (rows = batch x chunk)")
    p.add_argument("--strength", type=float, help="score a strength-conditioned model at this strength (GFT's beta, "
                   "the MCLR dial's lambda; default: its neutral input); refused for other models")
    args = add_debug_flag(p).parse_args(argv)
    with reporting_user_errors(args.debug):
        settings = EvalSettings(ckpt=args.ckpt, strength=args.strength)
        settings.check()  # --strength: a finite number
        models = load_for_eval(args.ckpt, args.tokenizer, allow_other_tokenizer=args.allow_other_tokenizer,
                               tokenizer_arch=tokenizer_overrides(args.tokenizer_set))
        strength_input = strength_input_of(settings, models[1])
        out = separation_of_checkpoint(args.ckpt, args.tokenizer, args.data, args.root, args.max_images,
                                       args.batch_size, args.class_chunk, models, strength_input)
        if args.strength is not None:  # recorded as eval/fid.py records it
            out.update(strength=args.strength, strength_of=strength_objective(args.ckpt), strength_input=strength_input)
        print(json.dumps(out, indent=2))


def separation_of_checkpoint(ckpt: str, tokenizer: str | None, data: str | None, root: str | None,
                             max_images: int | None, batch_size: int = 250, class_chunk: int = 16,
                             models: tuple | None = None, strength_input: float | None = None) -> dict:
    """The separation of a checkpoint on up to max_images images of each split: {"train": ..., "heldout": ...}.
    models: (vae, var, provenance) already loaded (default: load_for_eval(ckpt, tokenizer)). strength_input: the
    model's input (eval/sampling_run.py, strength_input_of; None: its neutral input)."""
    if max_images is not None and max_images <= 0:
        raise SettingsError(f"--max-images = {max_images} is out of range: must be an integer > 0")
    vae, var, _ = models or load_for_eval(ckpt, tokenizer)
    if data is None:
        spec = recorded_data(ckpt)
        if spec is None:
            raise SettingsError(f"{ckpt} records no training data; name it with --data (and --root)")
    else:
        spec = {"name": data, "resolution": vae.resolution, "num_classes": var.num_classes}
        if data == "imagefolder":
            if not root:
                raise SettingsError("--data imagefolder needs --root (the directory holding train/<class>/)")
            spec["root"] = root
    out = {}
    for split, name in (("train", "train"), ("val", "heldout")):
        images, labels, source = split_images(spec, split, max_images)
        stats = separation(var, vae, images, labels, batch_size, class_chunk, split=name, strength_input=strength_input)
        out[name] = {**stats, "images": source}
    return out


if __name__ == "__main__":
    main()
