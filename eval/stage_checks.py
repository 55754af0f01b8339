"""Checks between the folder pipeline's stages (docs/method.md, "Checks between stages"): does the tokenizer keep the
classes, is the own-data evaluator strong enough to judge, and does the base separate the classes?

- tokenizer_report: on up to max_images held-out images, reconstruction MSE in [-1, 1] (the images VAR's tokens
  decode to: encode to the multi-scale indices, decode from them), the own-data classifier's accuracy on the
  reconstructions and on the originals, the Frechet distance between the two in its features, and codebook usage
  (share of the V codes used, perplexity of their histogram) over every scale's tokens.
- base_report: implicit-classifier accuracy and mean per-token log-ratio of a VAR on the held-out images
  (eval/separation.py).
- tokenizer_problem / evaluator_problem / base_problem: None when the stage passes, else one line saying what is
  wrong and what to change; the thresholds are the constants below.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from eval.metrics import frechet_distance_of_features
from eval.run_data import EVALUATOR_MIN_ACCURACY, own_classifier_net, split_images
from eval.separation import separation
from tokenizer.model import VQVAE

log = logging.getLogger("eval.stage_checks")

# A tokenizer keeps the classes when the classifier recognises its reconstructions at least this share as well as
# the originals (docs/method.md, "Checks between stages").
RECON_ACCURACY_RATIO = 0.8
# A base separates the classes when its implicit classifier is at least this far from chance towards perfect:
# (accuracy - 1/C) / (1 - 1/C) >= BASE_MIN_SKILL, i.e. 0.325 for 10 classes, 0.625 for 2.
BASE_MIN_SKILL = 0.25


@torch.no_grad()
def reconstruct(vae: VQVAE, images_N3HW: torch.Tensor, batch_size: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions from the multi-scale token indices, code histogram over every scale's tokens)."""
    vae.eval()
    recs, counts_V = [], torch.zeros(vae.V, dtype=torch.float64)
    for s in range(0, len(images_N3HW), batch_size):
        idx = vae.img_to_idxBl(images_N3HW[s:s + batch_size])
        counts_V += torch.bincount(torch.cat(idx, 1).flatten(), minlength=vae.V).double()
        recs.append(vae.idxBl_to_img(idx, same_shape=True, last_one=True))
    return torch.cat(recs), counts_V


def tokenizer_report(vae: VQVAE, data: dict, cache_dir: Path, max_images: int = 1000) -> dict:
    """What the tokenizer keeps of held-out images (module docstring); data: build_dataset's arguments."""
    images, labels, source = split_images(data, "val", max_images)
    rec, counts_V = reconstruct(vae, images)
    net, net_acc = own_classifier_net({**data, "resolution": vae.resolution}, cache_dir)
    orig, recon = net.outputs(images, "cpu"), net.outputs(rec, "cpu")
    p_V = counts_V / counts_V.sum()
    entropy = float(-(p_V[p_V > 0] * p_V[p_V > 0].log()).sum())
    return {
        "images": source,
        "recon_mse": float((rec - images).pow(2).mean()),
        "original_accuracy": float((orig.predicted_N == labels).double().mean()),
        "recon_accuracy": float((recon.predicted_N == labels).double().mean()),
        "recon_fid": frechet_distance_of_features(recon.features_ND, orig.features_ND),
        "codebook_usage": float((counts_V > 0).double().mean()),
        "codebook_perplexity": math.exp(entropy),
        "vocab_size": vae.V,
        "patch_nums": list(vae.patch_nums),
        "resolution": vae.resolution,
        "evaluator_heldout_accuracy": net_acc,
    }


def tokenizer_problem(report: dict) -> str | None:
    """One line when the reconstructions lose the classes (recon accuracy < RECON_ACCURACY_RATIO x the originals')."""
    orig, rec = report["original_accuracy"], report["recon_accuracy"]
    if rec >= RECON_ACCURACY_RATIO * orig:
        return None
    # The suggestion: the same downsampling at twice the resolution, one scale more (a latent twice as fine).
    scales, res = report.get("patch_nums", [8]), report.get("resolution", 16)
    finer = ",".join(str(p) for p in [*scales, 2 * scales[-1]])
    # More steps can only help a tokenizer that ran to its ceiling, not one that stopped on its held-out MSE.
    steps_run, ceiling = report.get("steps_run"), report.get("steps_ceiling")
    longer = (f" (more steps would not help: it stopped improving after step {steps_run} of at most {ceiling})"
              if steps_run is not None and ceiling is not None and steps_run < ceiling
              else " or a higher ceiling tokenizer_train.steps")
    return (f"the tokenizer loses the classes: the own-data classifier recognises {rec:.3f} of its held-out "
            f"reconstructions against {orig:.3f} of the originals (below {RECON_ACCURACY_RATIO:g}x; reconstruction "
            f"MSE {report['recon_mse']:.4f}, {report['codebook_usage']:.0%} of the codebook used), so no VAR was "
            f"trained; give the tokenizer a finer latent (e.g. --set data.resolution={2 * res} --set "
            f"\"tokenizer.v_patch_nums=[{finer}]\"){longer} (docs/folders.md)")


def evaluator_problem(heldout_accuracy: float | None) -> str | None:
    """One line when the own-data feature network is too weak for its FID and class accuracy to mean much."""
    if heldout_accuracy is None or heldout_accuracy >= EVALUATOR_MIN_ACCURACY:
        return None
    return (f"the feature network is too weak to judge: held-out accuracy {heldout_accuracy:.3f} < "
            f"{EVALUATOR_MIN_ACCURACY:g}, so its FID and class accuracy mean little (docs/method.md, \"Checks between "
            "stages\")")


@torch.no_grad()
def base_report(var, vae: VQVAE, data: dict, max_images: int = 1000) -> dict:
    """Implicit-classifier accuracy and mean log-ratio of a VAR on up to max_images held-out images."""
    images, labels, source = split_images(data, "val", max_images)
    out = separation(var.eval(), vae.eval(), images, labels)
    chance = 1 / var.num_classes
    skill = (out["implicit_classifier_accuracy"] - chance) / (1 - chance)
    return {**out, "images": source, "chance": chance, "skill": skill}


def base_problem(report: dict) -> str | None:
    """One line when the base's implicit classifier is near chance (skill < BASE_MIN_SKILL)."""
    if report["skill"] >= BASE_MIN_SKILL:
        return None
    need = report["chance"] + BASE_MIN_SKILL * (1 - report["chance"])
    return (f"the base does not separate the classes: implicit-classifier accuracy "
            f"{report['implicit_classifier_accuracy']:.3f} on held-out images (chance {report['chance']:.3f}, "
            f"needed {need:.3f}), mean log-ratio {report['mean_log_ratio_per_token']:.3f} nats/token, so no "
            "fine-tuning was run: a comparison would measure nothing; check the tokenizer report, train the base "
            "longer (train.epochs) or give it more images per class")


def checks_block(tok: dict | None, bases: dict[str, dict], evaluator_acc: float | None) -> str:
    """The checks as markdown lines for the final table; bases: the base report of each seed by name."""
    lines = ["Checks between stages (docs/method.md, \"Checks between stages\"):", ""]
    if tok is not None:
        failed = tokenizer_problem(tok)
        lines.append(f"- tokenizer, {tok['images']}: reconstruction MSE {tok['recon_mse']:.4f}, classifier accuracy "
                     f"{tok['recon_accuracy']:.3f} on reconstructions vs {tok['original_accuracy']:.3f} on originals"
                     f", FID(reconstructions, originals) {tok['recon_fid']:.4g}, codebook usage "
                     f"{tok['codebook_usage']:.0%} (perplexity {tok['codebook_perplexity']:.1f} of "
                     f"{tok['vocab_size']})" + (f". FAILED: {failed}" if failed else ""))
    for name, base in bases.items():
        failed = base_problem(base)
        lines.append(f"- {name}, {base['images']}: implicit-classifier accuracy "
                     f"{base['implicit_classifier_accuracy']:.3f} (chance {base['chance']:.3f}), mean log-ratio "
                     f"{base['mean_log_ratio_per_token']:.3f} nats/token" + (f". FAILED: {failed}" if failed else ""))
    if evaluator_acc is not None:
        weak = evaluator_problem(evaluator_acc)
        lines.append(f"- evaluator: held-out accuracy {evaluator_acc:.3f}" + (f". WARNING: {weak}" if weak else ""))
    return "\n".join(lines) + "\n"
