"""One summary over seeds whose comparisons ran apart (on other machines, in other sessions), as the pipeline's
`--seeds 0 1 2` writes it for seeds run together:

    python -m experiments.combine_seeds --out DIR ROOT/compare-s0-*/results.json ROOT/compare-s1-*/results.json
    python -m experiments.frontier --from-summary DIR/summary.json

Each input is one seed's results.json (eval/compare.py, under the pipeline's compare-s<seed>-... directory). The
seeds must have compared the same rows, in the same order, on one tokenizer and one feature network, each with its
own base: a file given twice, or two comparisons of one base, would count one seed twice. Writes
DIR/summary.{md,json} and DIR/best.md (the pipeline's own formats, experiments/pipeline.py) into a directory that
holds no summary yet.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from experiments.pipeline import best_settings, write_summary
from var_mclr.errors import UserError, add_debug_flag, reporting_user_errors
from var_mclr.files import write_text_atomic

log = logging.getLogger("experiments.combine_seeds")


class CombineError(UserError, ValueError):
    """Inputs that cannot be one summary; the message names the file."""


def read_results(path: Path) -> list[dict]:
    """One seed's rows, each a dict with a "name" and a "ckpt"."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CombineError(f"{path}: not a readable results.json ({type(err).__name__})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "name" in r and "ckpt" in r
                                                         for r in rows):
        raise CombineError(f"{path}: not a comparison's results.json (a list of rows with name and ckpt)")
    return rows


# What one FID scale rests on, by results.json key: a mean over seeds is one only where every seed shares them (the
# same stage trained on another CPU type gives another tokenizer and evaluator: docs/unseen_folders.md). The
# description stands in for the evaluator's digest only in older files without one: it names the classifier's cache
# file, whose key holds the image files' modification times, so a rebuilt folder renames the same weights.
SHARED = {"tokenizer_weights_sha256": "tokenizer", "feature_network_sha256": "feature network"}


def _differs(row: dict, first: dict) -> tuple[str, str] | None:
    """The first record the two rows hold and disagree on (its key, what it names)."""
    keys = dict(SHARED)
    if not ("feature_network_sha256" in row and "feature_network_sha256" in first):
        keys["feature_network"] = "feature network"  # an older file: the description stands in for the digest
    for key, what in keys.items():
        if key in row and key in first and row[key] != first[key]:
            return key, what
    return None


def check_seeds(per_seed: list[list[dict]], paths: list[Path]) -> None:
    """The same rows in every seed, one tokenizer and one feature network (where the files record them), and a
    distinct base per seed."""
    names = [r["name"] for r in per_seed[0]]
    bases: dict[str, Path] = {}
    for rows, path in zip(per_seed, paths):
        if [r["name"] for r in rows] != names:
            raise CombineError(f"{path}: its rows are not those of {paths[0]} (the seeds must compare the same "
                               "models and strengths)")
        differs = _differs(rows[0], per_seed[0][0])
        if differs:
            key, what = differs
            raise CombineError(f"{path}: its {what} ({key}) is not that of {paths[0]}: FIDs on different "
                               f"{what}s are not one scale, so these seeds cannot be pooled")
        base = rows[0]["ckpt"]
        if base in bases:
            raise CombineError(f"{path}: compares the base {base}, as {bases[base]} does: one seed counted twice")
        bases[base] = path


def combine(paths: list[Path], out: Path) -> str:
    """Validate every input, then write the summary; returns its table."""
    if len(paths) < 2:
        raise CombineError("give two or more results.json files (one per seed)")
    if (out / "summary.json").exists():
        raise CombineError(f"--out {out}: already holds a summary.json; choose a new directory")
    per_seed = [read_results(path) for path in paths]
    check_seeds(per_seed, paths)
    table = write_summary(per_seed, out)
    write_text_atomic(out / "best.md", best_settings(json.loads((out / "summary.json").read_text())))
    write_text_atomic(out / "sources.json", json.dumps([str(p) for p in paths], indent=2))
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="one results.json per seed")
    p.add_argument("--out", type=Path, required=True, help="a new directory for summary.{md,json} and best.md")
    add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reporting_user_errors(args.debug):
        table = combine(args.results, args.out)
        log.info("%d seeds combined into %s:\n\n%s", len(args.results), args.out / "summary.md", table)


if __name__ == "__main__":
    main()
