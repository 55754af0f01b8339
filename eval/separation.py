"""Inter-class separation of a VAR on held-out real images, from exact log-likelihoods under every class.

    python eval/separation.py --ckpt runs/mnist/mclr/model.safetensors

implicit-classifier accuracy: argmax_c l(x, c) (uniform prior), the share of images a VAR assigns to their class;
mean log-ratio: l(x, c) - mean_{c' != c} l(x, c'), per token, the quantity MCLR maximises (capped);
held-out nll: -l(x, c) / L, which must not be bought away for separation.
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from eval.sampling_run import load_for_eval
from eval.settings import SettingsError
from var_mclr.data import build_dataset
from var_mclr.errors import add_debug_flag, reporting_user_errors
from var_mclr.likelihood import implicit_classifier_logprobs, loglik_all_classes

log = logging.getLogger("eval.separation")


@torch.no_grad()
def separation(var, vae, images_N3HW: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 250) -> dict:
    device = next(var.parameters()).device
    l_parts = []
    for start in range(0, len(images_N3HW), batch_size):
        idx = vae.img_to_idxBl(images_N3HW[start:start + batch_size].to(device))
        x = vae.quantize.idxBl_to_var_input(idx)
        l_parts.append(loglik_all_classes(var, x, torch.cat(idx, 1)).cpu())
    l_NC = torch.cat(l_parts).double()
    labels_N = labels_N.long()
    C = l_NC.shape[1]
    l_true = l_NC.gather(1, labels_N.view(-1, 1)).squeeze(1)
    l_others = (l_NC.sum(1) - l_true) / (C - 1)
    log_p = implicit_classifier_logprobs(l_NC)
    return {
        "implicit_classifier_accuracy": float((l_NC.argmax(1) == labels_N).double().mean()),
        "mean_log_ratio_per_token": float((l_true - l_others).mean() / var.L),
        "heldout_nll_per_token": float(-l_true.mean() / var.L),
        "mean_log_p_true_class": float(log_p.gather(1, labels_N.view(-1, 1)).mean()),
        "num_images": len(labels_N),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--data", default="mnist", choices=("mnist", "synthetic", "imagefolder"))
    p.add_argument("--root", help="imagefolder: directory holding val/<class>/")
    p.add_argument("--max-images", type=int, default=None)
    args = add_debug_flag(p).parse_args(argv)
    with reporting_user_errors(args.debug):
        print(json.dumps(separation_of_checkpoint(args.ckpt, args.tokenizer, args.data, args.root, args.max_images), indent=2))


def separation_of_checkpoint(ckpt: str, tokenizer: str | None, data: str, root: str | None, max_images: int | None) -> dict:
    """The separation of a checkpoint on up to max_images held-out images of the named dataset."""
    if max_images is not None and max_images <= 0:
        raise SettingsError(f"--max-images = {max_images} is out of range: must be an integer > 0")
    vae, var, _ = load_for_eval(ckpt, tokenizer)
    cfg = {"name": data, "resolution": vae.resolution, "num_classes": var.num_classes}
    if root:
        cfg["root"] = root
    ds = build_dataset(cfg, "val")
    n = min(len(ds), max_images or len(ds))
    if hasattr(ds, "tensors"):
        images, labels = ds.tensors[0][:n], ds.tensors[1][:n]
    else:
        items = [ds[i] for i in torch.linspace(0, len(ds) - 1, n).long().tolist()]  # spread over classes
        images, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    return separation(var, vae, images, labels)


if __name__ == "__main__":
    main()
