"""Tune each fine-tuning objective with the same budget: a small grid per method, scored guidance-free.

    python -m experiments.sweep --seed 0 --num-samples 2000

Uses the embedded demo's tokenizer and base (trained first if missing), fine-tunes one run per grid point with the
demo's steps, batch and learning rate, samples guidance-free and writes runs/mnist/sweep-s{seed}/sweep.md. The
selection rule is the lowest FID (classifier features); precision, recall, class accuracy and held-out nll are
reported beside it so that a choice bought with lost diversity is visible.
"""
from __future__ import annotations

import logging
from pathlib import Path

from eval.tables import fmt
from eval.sampling_run import load_for_eval
from eval.separation import separation
from eval.tables import markdown_table
from experiments.common import Scoring, cached_row, experiment_parser, trained_finetune, write_table
from var_mclr.data import build_dataset

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
    p = experiment_parser(__doc__, num_samples=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(GRID))
    args = p.parse_args(argv)
    root = Path(args.root)
    scoring = Scoring.of_seed(root, args.seed, args.num_samples)
    heldout = build_dataset({"name": "mnist", "resolution": scoring.resolution}, "val").tensors
    out = root / f"sweep-s{args.seed}"
    rows = []
    for method in args.methods:
        for point in GRID[method]:
            path = trained_finetune(method, args.seed, root, scoring.base, point)
            row_file = out / path.parent.name / "sweep_row.json"  # a point trained and scored by an earlier sweep

            def score():
                metrics = scoring.metrics(row_file.parent, ckpt=str(path))
                vae_m, var_m, _ = load_for_eval(str(path))
                return {**metrics, **separation(var_m, vae_m, *heldout)}

            metrics = cached_row(row_file, score)
            rows.append([method, " ".join(point), *(fmt(metrics.get(k)) for k in COLUMNS)])
            log.info("%s %s: %s", method, point, {k: metrics.get(k) for k in COLUMNS})
    write_table(out / "sweep.md", markdown_table(["method", "settings", *COLUMNS], rows))


if __name__ == "__main__":
    main()
