"""The checks between the pipeline's stages (docs/method.md, "Checks between stages"; eval/stage_checks.py): each
stage's report, measured once and kept beside it, the stop when a check fails, and the block that ends the summary."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from eval.run_data import data_of_section
from eval.sampling_run import load_for_eval
from eval.stage_checks import (base_problem, base_report, checks_block, evaluator_problem, tokenizer_problem,
                               tokenizer_report)
from experiments.stages import PipelineError
from var_mclr.checkpoints import load_model
from var_mclr.config import Config
from var_mclr.files import write_text_atomic
from var_mclr.train_state import checkpoint_dirs, step_of

log = logging.getLogger("experiments.checks")


class PipelineStop(PipelineError):
    """A check between stages failed (docs/method.md, "Checks between stages"): the later stages would measure
    nothing, so none of them runs; the message says what to change."""


REPORT_VERSION = 1  # of the check reports cached in the stage directories; bump when what they hold changes


def cached_report(path: Path, compute) -> dict:
    """A stage's check report: read back from path, or computed and written there (the stage is cached, and so is
    what was measured of it)."""
    if path.is_file():
        report = json.loads(path.read_text())
        if report.get("version") == REPORT_VERSION:
            return report
    report = {**compute(), "version": REPORT_VERSION}
    write_text_atomic(path, json.dumps(report, indent=2))
    return report


def check(problem: str | None, enforce: bool) -> None:
    if problem is None:
        return
    if enforce:
        raise PipelineStop(problem)
    log.warning("check failed, going on (--skip-checks): %s", problem)


def check_tokenizer(cfg: Config, tok: Path, root: Path, enforce: bool) -> dict:
    """The tokenizer's report (eval/stage_checks.py), written beside it; stops when its reconstructions lose the
    classes."""
    report = cached_report(tok.parent / "tokenizer_report.json", lambda: tokenizer_report(
        load_model(tok), data_of_section(dataclasses.asdict(cfg.data)), root / "cache"))
    saved = [step_of(d) for d in checkpoint_dirs(tok.parent)]  # the newest is where it stopped (or its ceiling)
    if saved:
        report = {**report, "steps_run": max(saved), "steps_ceiling": cfg.tokenizer_train.steps}
    log.info("tokenizer check: %s", json.dumps({k: v for k, v in report.items() if k != "version"}))
    weak = evaluator_problem(report["evaluator_heldout_accuracy"])
    if weak:
        log.warning("%s", weak)
    check(tokenizer_problem(report), enforce)
    return report


def check_base(cfg: Config, pre: Path, enforce: bool) -> dict:
    """The base's separation of held-out images, written beside it; stops when it is near chance."""
    def compute():
        vae, var, _ = load_for_eval(str(pre))
        return base_report(var, vae, data_of_section(dataclasses.asdict(cfg.data)))

    report = cached_report(pre.parent / "base_report.json", compute)
    log.info("base check: implicit-classifier accuracy %.4f (chance %.4f), mean log-ratio %.4f nats/token",
             report["implicit_classifier_accuracy"], report["chance"], report["mean_log_ratio_per_token"])
    check(base_problem(report), enforce)
    return report


def report_checks(reports: dict, summary_dir: Path, compare_dirs: list[Path]) -> str:
    """The checks' block, appended to summary.md and written as checks.json; with a too-weak feature network, a
    warning heads summary.md, best.md and every seed's table.md (docs/method.md, "Checks between stages")."""
    acc = reports["tokenizer"]["evaluator_heldout_accuracy"] if "tokenizer" in reports else None
    block = checks_block(reports.get("tokenizer"), {k: r for k, r in reports.items() if k.startswith("base s")}, acc)
    write_text_atomic(summary_dir / "checks.json", json.dumps(reports, indent=2))
    weak = evaluator_problem(acc)
    tables = [summary_dir / "summary.md", summary_dir / "best.md", *(d / "table.md" for d in compare_dirs)]
    for i, path in enumerate(t for t in tables if t.is_file()):
        text = path.read_text()
        if weak and not text.startswith("**WARNING"):
            text = f"**WARNING: {weak}.**\n\n{text}"
        write_text_atomic(path, text + (f"\n{block}" if i == 0 else ""))
    return (f"WARNING: {weak}.\n\n" if weak else "") + block
