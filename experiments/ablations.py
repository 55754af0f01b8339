"""MCLR ablations on the embedded MNIST, one line each, against the tuned MCLR (configs/mnist/mclr.yaml):

    python -m experiments.ablations --seed 0 --num-samples 5000

- K = 1, 3, 9 negatives per image (9 = every mismatched class: the exact expectation) at equal steps, and K = 3, 9
  at equal compute: steps scaled by the rows scored per image (K + 1), the cost that dominates a step;
- negatives uniform vs mixed (a share of null-class negatives);
- hard vs smooth cap;
- MCLR + CFG: the MCLR model sampled with guidance, fine-tuned without and with 10% class dropout (does guidance on
  top still help, and does the null class need training during fine-tuning?).
Every line is scored like the demo (shipped classifier features, same seed and sample count). Writes
ROOT/ablations-s{seed}-n{N}/ablations.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from eval.tables import fmt, markdown_table
from experiments.common import Scoring, cached_row, experiment_parser, finetune_stage, train_stage, write_table
from experiments.stages import MNIST_CONFIGS
from var_mclr.config import load_config
from var_mclr.files import write_text_atomic

log = logging.getLogger("experiments.ablations")
COLUMNS = ("fid", "precision", "recall", "class_accuracy", "train_seconds")


def ablations(steps: int) -> list[tuple[str, list[str], float]]:
    """(name, overrides, CFG scale at sampling: 0 = guidance-free)."""
    return [
        ("K=1 (tuned)", [], 0.0),
        ("K=3, equal steps", ["loss.mclr.K=3"], 0.0),
        ("K=9 (exact), equal steps", ["loss.mclr.K=9", "loss.mclr.negatives=all"], 0.0),
        ("K=3, equal compute", ["loss.mclr.K=3", f"train.steps={steps * 2 // 4}"], 0.0),
        ("K=9 (exact), equal compute", ["loss.mclr.K=9", "loss.mclr.negatives=all", f"train.steps={steps * 2 // 10}"],
         0.0),
        ("negatives mixed", ["loss.mclr.negatives=mixed"], 0.0),
        ("smooth cap", ["loss.mclr.smooth_cap=true"], 0.0),
        ("MCLR + CFG 1", [], 1.0),
        ("MCLR (class dropout 0.1) + CFG 1", ["train.class_dropout=0.1"], 1.0),
    ]


def main(argv: list[str] | None = None) -> None:
    p = experiment_parser(__doc__, num_samples=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.root)
    scoring = Scoring.of_seed(root, args.seed, args.num_samples, seed=args.seed)
    out = root / f"ablations-s{args.seed}-n{args.num_samples}"
    steps = load_config(MNIST_CONFIGS / "mclr.yaml", check_files=False).train.steps
    rows = []
    for name, overrides, cfg_scale in ablations(steps):
        # the sweep's stage name: the tuned K = 1 model is the sweep's, not retrained
        cfg, ckpt = finetune_stage("mclr", args.seed, root, scoring.base, overrides)
        timing = ckpt.parent / "train_seconds.json"
        if not ckpt.exists():
            train_timed(cfg, ckpt, timing)

        def score():
            metrics = scoring.metrics(out / f"{ckpt.parent.name}-cfg{cfg_scale:g}", ckpt=str(ckpt),
                                      guidance="cfg" if cfg_scale else "none", cfg_scale=cfg_scale)
            row = {k: metrics.get(k) for k in COLUMNS}
            row["train_seconds"] = json.loads(timing.read_text()) if timing.is_file() else None
            return row

        row = cached_row(out / f"{ckpt.parent.name}-cfg{cfg_scale:g}.json", score)
        rows.append([name, *(fmt(row.get(k)) for k in COLUMNS)])
        log.info("%s: %s", name, row)
    write_table(out / "ablations.md", markdown_table(["ablation", *COLUMNS], rows))


def train_timed(cfg, ckpt: Path, timing: Path) -> None:
    """Train the stage and record its wall time, unless it resumed (the time would cover only the steps after the
    checkpoint)."""
    resumed = (ckpt.parent / "checkpoints").is_dir()
    tic = time.perf_counter()
    train_stage(cfg, ckpt)
    if resumed:
        log.warning("%s resumed from a checkpoint: its training time is not recorded", ckpt.parent)
    else:
        write_text_atomic(timing, json.dumps(time.perf_counter() - tic))


if __name__ == "__main__":
    main()
