"""Tune each fine-tuning objective with the same budget: a small grid per method, scored guidance-free.

    python -m experiments.sweep --seed 0 --num-samples 2000

Uses the embedded demo's tokenizer and base (trained first if missing), fine-tunes one run per grid point with the
demo's steps, batch and learning rate, samples guidance-free and writes runs/mnist/sweep-s{seed}/sweep.md. The
selection rule is the lowest FID (classifier features); precision, recall, class accuracy and held-out nll are
reported beside it so that a choice bought with lost diversity is visible.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from eval.compare import fmt
from eval.fid import evaluate, feature_backend
from eval.sampling_run import load_for_eval
from eval.separation import separation
from eval.settings import EvalSettings
from experiments.pipeline import pipeline, run_stage, stage
from var_mclr.checkpoints import read_model_info
from var_mclr.data import build_dataset
from var_mclr.files import write_text_atomic
from var_mclr.train import train

log = logging.getLogger("experiments.sweep")

# The same number of grid points for every method, chosen before running (every method gets the same budget).
GRID = {
    "mclr": [["loss.mclr.lam=1", "loss.mclr.tau=2"], ["loss.mclr.lam=3", "loss.mclr.tau=2"],
             ["loss.mclr.lam=1", "loss.mclr.tau=5"], ["loss.mclr.lam=3", "loss.mclr.tau=5"],
             ["loss.mclr.lam=10", "loss.mclr.tau=5"], ["loss.mclr.lam=3", "loss.mclr.tau=10"]],
    "cca": [["loss.cca.beta=0.02", "loss.cca.lam=50"], ["loss.cca.beta=0.1", "loss.cca.lam=10"],
            ["loss.cca.beta=0.1", "loss.cca.lam=1"], ["loss.cca.beta=0.5", "loss.cca.lam=10"],
            ["loss.cca.beta=0.01", "loss.cca.lam=50"], ["loss.cca.beta=0.02", "loss.cca.lam=100"]],
    "cc_dpo": [["loss.cc_dpo.beta=0.005"], ["loss.cc_dpo.beta=0.01"], ["loss.cc_dpo.beta=0.02"],
               ["loss.cc_dpo.beta=0.05"], ["loss.cc_dpo.beta=0.1"], ["loss.cc_dpo.beta=0.2"]],
}
COLUMNS = ("fid", "precision", "recall", "class_accuracy", "implicit_classifier_accuracy", "heldout_nll_per_token")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--methods", nargs="*", default=list(GRID))
    args = p.parse_args(argv)
    root = Path(args.root)
    base = pipeline(root, args.seed, [], finetunes=())["base"]
    common = EvalSettings(ckpt=str(base), num_samples=args.num_samples, cache_dir=str(root / "cache"))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    vae, _, _ = load_for_eval(str(base))
    net, ref = feature_backend(common, vae.resolution, accelerator.device)
    heldout = build_dataset({"name": "mnist", "resolution": vae.resolution}, "val").tensors
    out = root / f"sweep-s{args.seed}"
    lines = [f"| method | settings | {' | '.join(COLUMNS)} |", "|---|---|" + "---|" * len(COLUMNS)]
    for method in args.methods:
        for point in GRID[method]:
            overrides = [f"tokenizer.checkpoint={vae_path(base)}", f"run.seed={args.seed}", f"model.init={base}",
                         *point]
            cfg, path = stage(f"sweep-{method}-s{args.seed}", f"{method}.yaml", root, overrides)
            run_stage(cfg, path, train)
            row_file = out / path.parent.name / "sweep_row.json"
            if row_file.is_file():  # this point was trained and scored by an earlier sweep
                metrics = json.loads(row_file.read_text())
            else:
                run = dataclasses.replace(common, ckpt=str(path), out_dir=str(row_file.parent))
                metrics = evaluate(run, net, ref, accelerator)["metrics"]
                vae_m, var_m, _ = load_for_eval(str(path))
                metrics.update(separation(var_m, vae_m, *heldout))
                write_text_atomic(row_file, json.dumps(metrics))
            lines.append(f"| {method} | {' '.join(point)} | " + " | ".join(fmt(metrics.get(k)) for k in COLUMNS) + " |")
            log.info("%s %s: %s", method, point, {k: metrics.get(k) for k in COLUMNS})
    table = "\n".join(lines) + "\n"
    write_text_atomic(out / "sweep.md", table)
    print(table)


def vae_path(var_ckpt: Path) -> str:
    return read_model_info(var_ckpt)["source_config"]["tokenizer"]["checkpoint"]


if __name__ == "__main__":
    main()
