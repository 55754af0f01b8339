"""Sample from a VAR checkpoint and score the samples.

    python eval/fid.py --guidance none     # after `make demo`: the demo's MCLR model, guidance-free
    python eval/fid.py --ckpt runs/mnist/pretrain-s0-<hash>/model.safetensors --guidance cfg --cfg-scale 1.5
    accelerate launch eval/fid.py --ckpt hf://FoundationVision/var/var_d16.pth \
        --tokenizer hf://FoundationVision/var/vae_ch160v4096z32.pth --guidance cfg --cfg-scale 1.5 \
        --features inception --inception-weights pt_inception-2015-12-05-6726825d.pth \
        --reference VIRTUAL_imagenet256_labeled.npz --num-samples 50000

--ckpt is our VAR (decoded with the tokenizer its training recorded, checked by weight hash) or an official
var_d*.pth (with --tokenizer; its architecture is read off the file). Each process writes its batches as uint8 shards
with their features to OUT/shards/ (eval/shards.py), so host memory does not grow with the images and a rerun
continues where a killed one stopped. At the end OUT holds samples.npz (ADM evaluator layout: arr_0 uint8
N x H x W x 3, arr_1 labels), grid.png (a labelled row per class) and metrics.json, written last, which records every
setting, seed, hash and the code version behind the numbers and the hashes of the other two files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from eval.features import (OWN_DATA_NETWORKS, FeatureNet, NetOutputs, Reference, dinov2_net, embedded_reference,
                           file_reference, inception_net)
from eval.grid import class_names, labelled_grid, save_png
from eval.metrics import (class_accuracy, feature_statistics, frechet_distance, frechet_distance_few_samples,
                          inception_score, precision_recall, to_uint8_nhwc)
from eval.run_data import DataSpecError, own_classifier_net, recorded_data
from eval.sampling_run import (balanced_labels, code_version, load_models, sample_set, strength_input_of,
                               strength_objective)
from eval.settings import EvalSettings, SettingsError, add_eval_arguments, settings_from_args
from eval.shards import (Shard, fingerprint, images_of_classes, read_shard, shard_dir, shard_path,
                         stream_samples_npz, write_shard)
from var_mclr.errors import UserError, reporting_user_errors
from var_mclr.files import file_sha256, write_text_atomic
from var_mclr.hub import local_path
from var_mclr.machine import machine_record
from var_mclr.run_dir import run_dir_lock

log = logging.getLogger("eval.fid")


def score(o: NetOutputs, labels_N: torch.Tensor, net: FeatureNet, ref: Reference, device, num_classes: int) -> dict:
    """ADM's metrics: FID against ref's statistics, precision/recall (k=3) against ref's features, IS (10 splits)."""
    if len(o.features_ND) <= o.features_ND.shape[1]:  # fewer samples than dimensions: the exact low-rank form
        fid = frechet_distance_few_samples(o.features_ND, ref.mu, ref.sigma)
    else:
        fid = frechet_distance(*feature_statistics(o.features_ND), ref.mu, ref.sigma)
    out = {"fid": fid, "precision": None, "recall": None,
           "inception_score": None, "class_accuracy": None}
    if ref.features_ND is not None:
        out["precision"], out["recall"] = precision_recall(ref.features_ND, o.features_ND, k=3, device=device)
    if o.score_probs_NK is not None:
        out["inception_score"] = inception_score(o.score_probs_NK, splits=min(10, len(o.score_probs_NK)))[0]
    if net.class_accuracy_basis(num_classes)[0] and o.predicted_N is not None:
        out["class_accuracy"] = class_accuracy(o.predicted_N, labels_N)
    return out


def sample_shards(args: EvalSettings, models: tuple, sampling, net: FeatureNet, fps: tuple[str, str],
                  accelerator: Accelerator) -> list[Path]:
    """Every batch of the evaluation as a shard on disk (eval/shards.py): this process's share is sampled, or read
    back when a shard from these settings is already there. Returns the shard paths of all processes, in order."""
    vae, var = models
    out_dir, device = Path(args.out_dir), accelerator.device
    labels_N = balanced_labels(args.num_samples, var.num_classes)
    starts = list(range(0, args.num_samples, args.batch_size))
    with accelerator.split_between_processes(starts) as mine:
        for start in tqdm(mine, desc=f"sampling ({sampling.guidance}, {accelerator.num_processes} process(es))",
                          disable=not accelerator.is_main_process, unit="batch"):
            label_B = labels_N[start:start + args.batch_size]
            path = shard_path(out_dir, start)
            if path.exists():
                shard, same_features = read_shard(path, fps[0], fps[1], len(label_B))
                if same_features:
                    continue
                shard = with_features(shard, net, device)  # another feature network: features from its images
            else:
                shard = new_shard(var, vae, sampling, label_B, args.seed * 1_000_003 + start, net, device)
            write_shard(path, shard, {"sampling": fps[0], "features": fps[1], "start": start})
    accelerator.wait_for_everyone()
    return [shard_path(out_dir, start) for start in starts]


def new_shard(var, vae, sampling, label_B: torch.Tensor, seed: int, net: FeatureNet, device) -> Shard:
    part = sample_set(var, vae, sampling, label_B, len(label_B), seed=seed, device=device, show_progress=False)
    # Scored as the uint8 levels the shard (and samples.npz) holds: ADM's evaluator scores those images.
    shard = Shard(to_uint8_nhwc(part.images_N3HW), label_B.numpy(), None, None, None, part.seconds,
                  part.token_seconds, part.transformer_rows_per_image)
    return with_features(shard, net, device)


def with_features(shard: Shard, net: FeatureNet, device) -> Shard:
    o = net.outputs(torch.from_numpy(shard.images_NHW3), device)
    shard.features_ND = o.features_ND.numpy()
    shard.score_probs_NK = None if o.score_probs_NK is None else o.score_probs_NK.numpy()
    shard.predicted_N = None if o.predicted_N is None else o.predicted_N.numpy()
    return shard


def gather_outputs(paths: list[Path], fps: tuple[str, str], args: EvalSettings) -> tuple[NetOutputs, dict]:
    """The feature network's outputs of every shard (no images) and the timings they record."""
    shards = [read_shard(p, *fps, count=min(args.batch_size, args.num_samples - i * args.batch_size))[0]
              for i, p in enumerate(paths)]
    cat = (lambda xs: None if xs[0] is None else torch.from_numpy(np.concatenate(xs)))
    o = NetOutputs(cat([s.features_ND for s in shards]), cat([s.score_probs_NK for s in shards]),
                   cat([s.predicted_N for s in shards]))
    timing = {"seconds": sum(s.seconds for s in shards), "token_seconds": sum(s.token_seconds for s in shards),
              "rows": shards[0].transformer_rows_per_image}
    return o, timing


def evaluate(args: EvalSettings, net: FeatureNet | None = None, ref: Reference | None = None,
             accelerator: Accelerator | None = None) -> dict:
    """Sample args.num_samples class-balanced images into shards, score them, write samples.npz, grid.png and
    metrics.json (written last: it lists the other two with their hashes, see write_outputs)."""
    args.check()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device, out_dir = accelerator.device, Path(args.out_dir)
    vae, var, provenance = load_models(args)
    vae, var = vae.to(device), var.to(device)
    sampling = args.sampling(var.num_classes, strength_input_of(args, var))
    data = recorded_data(args.ckpt)
    if net is None or ref is None:  # the reference is the main process's alone: the others only embed shards
        net, ref = feature_backend(args, vae.resolution, device, data, accelerator.is_main_process)
    fps = (fingerprint({"checkpoint": provenance, "sampling": sampling.record(), "seed": args.seed,
                        "batch_size": args.batch_size}),
           fingerprint({"network": net.name, "weights": net.weights_sha256}))
    with contextlib.ExitStack() as held:
        if accelerator.is_main_process:
            held.enter_context(run_dir_lock(out_dir))
            (out_dir / "metrics.json").unlink(missing_ok=True)  # outputs in progress: never beside old metrics
        accelerator.wait_for_everyone()
        paths = sample_shards(args, (vae, var), sampling, net, fps, accelerator)
        record = eval_record(args, sampling, var, provenance, net, ref)
        if accelerator.is_main_process:
            o, timing = gather_outputs(paths, fps, args)
            labels_N = balanced_labels(args.num_samples, var.num_classes)
            metrics = score(o, labels_N, net, ref, device, var.num_classes)
            metrics["images_per_s"] = args.num_samples * accelerator.num_processes / timing["seconds"]
            metrics["token_images_per_s"] = args.num_samples * accelerator.num_processes / timing["token_seconds"]
            metrics["transformer_passes_per_image"] = timing["rows"] * len(var.patch_nums)
            record["metrics"] = metrics
            write_outputs(out_dir, paths, labels_N.numpy(), record, class_names(data, var.num_classes))
            if not args.keep_shards:  # samples.npz holds them now; keeping both would double the disk used
                shutil.rmtree(shard_dir(out_dir))
            log.info("%s", json.dumps(metrics))
            log.info("feature space: %s", net.description)
        accelerator.wait_for_everyone()
    return record


def eval_record(args: EvalSettings, sampling, var, provenance: dict, net: FeatureNet, ref: Reference) -> dict:
    """What metrics.json says of a run: the settings as they were used (the model's own class count; the CFG
    scale only when sampling was guided; --strength, what it means and the model input it gave, only when given),
    hashes and the code version."""
    settings = {**args.to_dict(), "num_classes": var.num_classes, "top_k": sampling.top_k, "top_p": sampling.top_p}
    if args.strength is None:
        settings.pop("strength")
    else:
        settings["strength_of"] = strength_objective(args.ckpt)  # gft: beta; mclr: the dial's lambda
    used = sampling.record()
    if sampling.guidance == "none":
        for key in ("cfg_scale", "cfg_schedule"):
            settings.pop(key)
            used.pop(key)
    return {
        "settings": {**settings, "sampling": used},
        "num_samples": args.num_samples,
        "seed": args.seed,
        "checkpoint": provenance,
        "feature_network": {"name": net.name, "description": net.description, "weights_sha256": net.weights_sha256,
                            "heldout_accuracy": net.heldout_accuracy,
                            "class_accuracy": net.class_accuracy_basis(var.num_classes)[1]},
        "reference": ref.record() if ref is not None else None,  # None: a process other than the main one
        "code_version": code_version(),
        "machine": machine_record(),
        "metrics": {},
    }


def write_outputs(out_dir: Path, paths: list[Path], labels_N: np.ndarray, record: dict, names: list[str],
                  grid_classes: int = 16, per_class: int = 8) -> None:
    """samples.npz and grid.png, then metrics.json naming both with their sizes and hashes: the manifest is
    written last, so a run that dies half-way leaves no metrics.json describing other files (read_outputs)."""
    stream_samples_npz(out_dir / "samples.npz", paths, labels_N)
    classes = list(range(min(grid_classes, len(names))))
    picks = images_of_classes(paths, classes, per_class)
    save_png(labelled_grid([picks[c] for c in classes], [names[c] for c in classes]), out_dir / "grid.png")
    record["files"] = {name: {"bytes": (out_dir / name).stat().st_size, "sha256": file_sha256(out_dir / name)}
                       for name in ("samples.npz", "grid.png")}
    write_text_atomic(out_dir / "metrics.json", json.dumps(record, indent=2))


def read_outputs(out_dir: Path) -> dict:
    """metrics.json of a finished evaluation, checked against the files it lists (a missing or changed
    samples.npz or grid.png is an error naming it)."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        raise SettingsError(f"{out_dir} holds no finished evaluation (no metrics.json)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SettingsError(f"{path} is not valid JSON ({e})") from e
    for name, want in record.get("files", {}).items():
        f = out_dir / name
        if not f.is_file() or f.stat().st_size != want["bytes"] or file_sha256(f) != want["sha256"]:
            raise SettingsError(f"{f} is not the file {path} describes (missing or changed since); rerun the "
                                "evaluation")
    return record


def feature_backend(args: EvalSettings, resolution: int, device, data: dict | None = None,
                    with_reference: bool = True) -> tuple[FeatureNet, Reference | None]:
    """The feature network and its reference. data: what the generator was trained on (eval/run_data.py,
    recorded_data; None when unknown): the mnist and classifier features compare with its training split.
    with_reference False (processes other than the main one, which only embed their shards): no reference."""
    if args.features in OWN_DATA_NETWORKS:
        if args.features == "mnist" and data is not None and data["name"] != "mnist":
            raise DataSpecError(f"--features mnist scores against the MNIST digits but {args.ckpt} was trained on "
                                f"{data.get('root', data['name'])}; use --features classifier (a CNN of its own data)")
        if args.features == "classifier" and data is None:
            raise DataSpecError(f"--features classifier trains on the model's own data but {args.ckpt} records none; "
                                "use --features mnist, inception or dinov2")
        data = {**(data or {"name": "mnist", "num_classes": 10}), "resolution": resolution}
        net, _ = own_classifier_net(data, Path(args.cache_dir))
        return net, embedded_reference(net, data, device) if with_reference else None
    args.check()  # a reference only with the features that read one
    flag = "--inception-weights" if args.features == "inception" else "--dinov2-path"
    with named_file_errors(flag, args.inception_weights if args.features == "inception" else args.dinov2_path):
        net = inception_net(local_file(args.inception_weights), device, args.class_map) \
            if args.features == "inception" else dinov2_net(local_file(args.dinov2_path), device)
    with named_file_errors("--reference", args.reference):
        return net, file_reference(net, local_path(args.reference), resolution, device) if with_reference else None


def local_file(path: str | None) -> str | None:
    return None if path is None else local_path(path)


@contextlib.contextmanager
def named_file_errors(flag: str, path: str | None):
    """A file that cannot be read as what flag expects: one line naming the flag and the file, before sampling."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SettingsError(f"{flag} {path}: {first}") from e


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
