"""The evidence behind the folder tokenizer's defaults (docs/folders.md): the pipeline's tokenizer stage and its
check (eval/stage_checks.py) on several folders, with any overrides, one JSON line per folder.

    python -m experiments.tokenizer_study --roots F1 F2 ... [--set KEY=VALUE ...] [--out runs/tokenizer-study]

Each tokenizer goes to OUT/<folder name>/tokenizer-<config hash>, as in the pipeline, so a setting that was measured
once is read back; every line has the reconstruction MSE, the classifier accuracy on reconstructions and on the
originals, the FID between them, codebook usage, training steps run and the CPU seconds of the stage.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from experiments.checks import check_tokenizer
from experiments.pipeline import folder_overrides
from experiments.stages import STAGE_CONFIGS, run_stage, stage
from var_mclr.checkpoints import read_model_info
from var_mclr.train_tokenizer import train_tokenizer

log = logging.getLogger("experiments.tokenizer_study")


def study(root: Path, overrides: list[str], out: Path) -> dict:
    runs = out / root.resolve().name
    cfg, tok = stage("tokenizer", "tokenizer.yaml", runs, [*folder_overrides(root), *overrides],
                     STAGE_CONFIGS["imagefolder"])
    t0 = time.process_time()
    cached = tok.exists()
    run_stage(cfg, tok, train_tokenizer)
    seconds = None if cached else time.process_time() - t0
    timing = tok.parent / "cpu_seconds.json"  # the training's CPU time, kept for reruns that read the stage back
    if seconds is not None:
        timing.write_text(json.dumps(seconds))
    report = check_tokenizer(cfg, tok, runs, enforce=False)
    info = read_model_info(tok)
    return {"folder": root.name, "overrides": overrides, "steps_run": info.get("steps_run", info.get("steps")),
            "cpu_s": json.loads(timing.read_text()) if timing.is_file() else None,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in report.items() if k not in ("images",)}}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roots", nargs="+", required=True, help="image folders (DIR/train/<class>/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/tokenizer-study")
    args = p.parse_args(argv)
    for root in args.roots:
        print(json.dumps(study(Path(root), args.set, Path(args.out))), flush=True)


if __name__ == "__main__":
    main()
