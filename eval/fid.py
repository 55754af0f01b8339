"""Sample from a VAR checkpoint and score the samples.

    python eval/fid.py --guidance none     # after `make demo`: the demo's MCLR model, guidance-free
    python eval/fid.py --ckpt runs/mnist/pretrain-s0-<hash>/model.safetensors --guidance cfg --cfg-scale 1.5
    accelerate launch eval/fid.py --ckpt var_d16.pth --official-vae vae_ch160v4096z32.pth --depth 16 \
        --features inception --inception-weights pt_inception-2015-12-05-6726825d.pth \
        --reference VIRTUAL_imagenet256_labeled.npz --num-samples 50000 --top-k 900 --top-p 0.96

Writes to --out-dir: samples.npz (ADM evaluator layout: arr_0 uint8 N x H x W x 3, arr_1 labels), grid.png and
metrics.json, which records every setting, seed, hash and the code version behind the numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torchvision.utils import save_image

from eval.features import (OWN_DATA_NETWORKS, FeatureNet, Reference, dinov2_net, embedded_reference, file_reference,
                           inception_net)
from eval.run_data import DataSpecError, own_classifier_net, recorded_data
from eval.metrics import (class_accuracy, feature_statistics, frechet_distance, from_uint8_nhwc, inception_score,
                          precision_recall, save_samples_npz, to_uint8_nhwc)
from eval.sampling_run import SampleSet, balanced_labels, code_version, load_for_eval, sample_set
from eval.settings import EvalSettings, SettingsError, add_eval_arguments, settings_from_args
from var_mclr.errors import reporting_user_errors
from var_mclr.files import atomic_write, write_text_atomic

log = logging.getLogger("eval.fid")


def score(samples: SampleSet, net: FeatureNet, ref: Reference, device, num_classes: int) -> dict:
    """ADM's metrics: FID against ref's statistics, precision/recall (k=3) against ref's features, IS (10 splits)."""
    o = net.outputs(samples.images_N3HW, device)
    mu, sigma = feature_statistics(o.features_ND)
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), "precision": None, "recall": None,
           "inception_score": None, "class_accuracy": None}
    if ref.features_ND is not None:
        out["precision"], out["recall"] = precision_recall(ref.features_ND, o.features_ND, k=3, device=device)
    if o.score_probs_NK is not None:
        out["inception_score"] = inception_score(o.score_probs_NK, splits=min(10, len(o.score_probs_NK)))[0]
    if net.class_accuracy_basis(num_classes)[0] and o.predicted_N is not None:
        out["class_accuracy"] = class_accuracy(o.predicted_N, samples.labels_N)
    return out


def save_outputs(out_dir: Path, samples: SampleSet, record: dict, num_classes: int, grid_per_class: int = 8) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_samples_npz(str(out_dir / "samples.npz"), to_uint8_nhwc(samples.images_N3HW), samples.labels_N.numpy())
    # Grid: one row per class (first classes only for large label sets), same positions for every model.
    rows = []
    for c in range(min(num_classes, 16)):
        rows.append(samples.images_N3HW[samples.labels_N == c][:grid_per_class])
    grid = torch.cat(rows).add(1).div(2)
    atomic_write(out_dir / "grid.png", lambda tmp: save_image(grid, tmp, nrow=grid_per_class, padding=1, format="png"))
    write_text_atomic(out_dir / "metrics.json", json.dumps(record, indent=2))


def evaluate(args: EvalSettings, net: FeatureNet | None = None, ref: Reference | None = None,
             accelerator: Accelerator | None = None) -> dict:
    """Sample args.num_samples class-balanced images, score them, write samples.npz, grid.png, metrics.json."""
    args.check()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    vae, var, provenance = load_for_eval(args.ckpt, args.tokenizer, args.official_vae, args.depth, args.num_classes)
    vae, var = vae.to(device), var.to(device)
    sampling = args.sampling()
    if net is None or ref is None:
        net, ref = feature_backend(args, vae.resolution, device, recorded_data(args.ckpt))

    labels_N = balanced_labels(args.num_samples, var.num_classes)
    batches = list(range(0, args.num_samples, args.batch_size))
    with accelerator.split_between_processes(batches) as mine:
        parts = []
        for start in mine:
            part = sample_set(var, vae, sampling, labels_N[start:start + args.batch_size], args.batch_size,
                              seed=args.seed * 1_000_003 + start, device=device, show_progress=False)
            parts.append((start, part))
    parts = sorted(gather_object(parts), key=lambda p: p[0])
    # Quantised to the uint8 levels samples.npz holds before any scoring: ADM's evaluator scores those images, and
    # the numbers here must be the numbers of the saved file.
    samples = SampleSet(torch.cat([from_uint8_nhwc(to_uint8_nhwc(p.images_N3HW)) for _, p in parts]), labels_N,
                        sum(p.seconds for _, p in parts) / accelerator.num_processes,
                        parts[0][1].transformer_rows_per_image,
                        sum(p.token_seconds for _, p in parts) / accelerator.num_processes)
    record = {
        "settings": {**args.to_dict(), "sampling": sampling.__dict__},
        "num_samples": args.num_samples,
        "seed": args.seed,
        "checkpoint": provenance,
        "feature_network": {"name": net.name, "description": net.description, "weights_sha256": net.weights_sha256,
                            "heldout_accuracy": net.heldout_accuracy,
                            "class_accuracy": net.class_accuracy_basis(var.num_classes)[1]},
        "reference": ref.record(),
        "code_version": code_version(),
        "metrics": {},
    }
    if accelerator.is_main_process:
        metrics = score(samples, net, ref, device, var.num_classes)
        metrics["images_per_s"] = args.num_samples / samples.seconds
        metrics["token_images_per_s"] = args.num_samples / samples.token_seconds  # without the decoder
        metrics["transformer_passes_per_image"] = samples.transformer_rows_per_image * len(var.patch_nums)
        record["metrics"] = metrics
        save_outputs(Path(args.out_dir), samples, record, var.num_classes)
        log.info("%s", json.dumps(metrics))
        log.info("feature space: %s", net.description)
    return record


def feature_backend(args: EvalSettings, resolution: int, device, data: dict | None = None
                    ) -> tuple[FeatureNet, Reference]:
    """The feature network and its reference. data: what the generator was trained on (eval/run_data.py,
    recorded_data; None when unknown): the mnist and classifier features compare with its training split."""
    if args.features in OWN_DATA_NETWORKS:
        if args.features == "mnist" and data is not None and data["name"] != "mnist":
            raise DataSpecError(f"--features mnist scores against the MNIST digits but {args.ckpt} was trained on "
                                f"{data.get('root', data['name'])}; use --features classifier (a CNN of its own data)")
        if args.features == "classifier" and data is None:
            raise DataSpecError(f"--features classifier trains on the model's own data but {args.ckpt} records none; "
                                "use --features mnist, inception or dinov2")
        data = {**(data or {"name": "mnist", "num_classes": 10}), "resolution": resolution}
        net, _ = own_classifier_net(data, Path(args.cache_dir))
        return net, embedded_reference(net, data, device)
    args.check()  # a reference only with the features that read one
    net = inception_net(args.inception_weights, device, args.class_map) if args.features == "inception" \
        else dinov2_net(args.dinov2_path, device)
    return net, file_reference(net, args.reference, resolution, device)


# Where `make demo` (experiments.demo) writes its stages; without --ckpt, fid.py scores the newest MCLR model there.
DEMO_ROOT = Path("runs/mnist")


def default_checkpoint(root: Path = DEMO_ROOT) -> str:
    found = sorted(root.glob("mclr-s*/model.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SettingsError(f"--ckpt is required: no demo MCLR model under {root}/ (run `make demo` first, or pass "
                            "--ckpt PATH to a VAR .safetensors or an official var_d*.pth)")
    log.info("no --ckpt: scoring the embedded demo's newest MCLR model, %s", found[-1])
    return str(found[-1])


def build_parser() -> argparse.ArgumentParser:
    return add_eval_arguments(argparse.ArgumentParser(description=__doc__,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    with reporting_user_errors(args.debug):
        if args.ckpt is None:
            args.ckpt = default_checkpoint()
        evaluate(settings_from_args(args))


if __name__ == "__main__":
    main()
