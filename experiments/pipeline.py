"""One pipeline for any class-labelled data: the embedded MNIST digits, or an image folder of your own.

    tokenizer -> base VAR (nll, 10% class dropout) -> fine-tune: nll control | MCLR | CCA | CC-DPO -> compare
    (a folder: MCLR, CCA and CC-DPO each at four strengths, STRENGTH_GRID, as CFG at four scales; --methods adds
    GFT and the MCLR dial, one fine-tuning each sampled at four strengths, and DDO, after a stage that draws the
    base's own samples)

    python -m experiments.pipeline                                     # the embedded MNIST demo (experiments.demo)
    python -m experiments.pipeline --data imagefolder --root DIR [--seeds 0 1 2] [--num-samples 5000] [--set K=V]
                                   [--strengths tuned|sweep] [--methods nll mclr ... ddo] [--skip-checks]

DIR holds train/<class>/<images> and, if you have one, a held-out val/<class>/<images> (without it, the last 10% of
every training class is held out: data.heldout_share in configs/folder/tokenizer.yaml). The stage configs are
configs/mnist/*.yaml or configs/folder/*.yaml; for a folder, data.root and data.num_classes are filled in from DIR,
so each folder gets its own stage directories (under --out, default runs/folder-<name of DIR>). A folder's base
trains for at most 30 epochs and is the weights of its lowest held-out nll, so a small folder is not memorised
(docs/method.md, "Training length").

Each stage's output directory is named by a hash of its resolved config, so a rerun repeats only the stages whose
config changed and nothing finished is ever overwritten. Training seeds repeat the base pretraining and every
fine-tuning (the tokenizer is shared); the comparison is sampled with the same seeds and sample count everywhere, and
scored in the features of a classifier of the run's own data (MNIST: the shipped MNIST network; a folder: a small CNN
trained once on its training split, whose held-out accuracy every metrics file records) against that training split.
Ends with the comparison table (mean and spread over seeds) and the paths of the plot and the grid.

A folder's stages are checked as they finish (docs/method.md, "Checks between stages"; eval/stage_checks.py): the
tokenizer's held-out reconstructions must keep the classes for the own-data classifier, or the pipeline stops before
any VAR trains; the base must separate the held-out classes above chance, or it stops before fine-tuning; an
own-data classifier below 0.9 held-out accuracy is flagged in every table and metrics.json. Each stop is one line
saying what to change (--skip-checks goes on); the measurements end the summary (summary.md, checks.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

from eval.compare import COLUMNS, compare
from eval.settings import EvalSettings
from eval.tables import markdown_table, mean_std, summarise
from experiments.checks import check_base, check_tokenizer, report_checks
from experiments.stages import MNIST_CONFIGS, STAGE_CONFIGS, PipelineError, run_stage, stage
from var_mclr.config import load_config
from var_mclr.data import build_dataset, check_split_classes, class_dirs, dataset_args
from var_mclr.errors import add_debug_flag, reporting_user_errors
from var_mclr.files import file_sha256, write_text_atomic
from var_mclr.reference_samples import make_reference_samples
from var_mclr.train import train
from var_mclr.train_tokenizer import train_tokenizer

log = logging.getLogger("experiments.pipeline")
FINETUNES = ("nll", "mclr", "cca", "cc_dpo")  # the default comparison (--methods)
# Every fine-tuning method the pipeline runs: GFT and the MCLR dial are one strength-conditioned fine-tuning each,
# sampled at several strengths; DDO trains against the base's own samples, drawn by a stage of their own.
METHODS = (*FINETUNES, "gft", "mclr_dial", "ddo")
# The feature network of each dataset's comparison: MNIST keeps the demo's (the shipped network, same numbers).
DEFAULT_FEATURES = {"mnist": "mnist", "imagefolder": "classifier"}
# --strengths sweep: each fine-tuned method at its MNIST-tuned strength and about 3x, 10x and 30x weaker. The best
# guidance strength is a property of the data (CFG's best scale is 2 on MNIST and 0.5 on sklearn's digits), so on
# data nobody tuned on every method gets four tries, as CFG gets its four --cfg-scales. The MNIST-tuned values were
# the strongest useful ones there, and on the digits every method's weakest try of a 3-point grid was its best, so
# the grid reaches down to 30x weaker (README, "Your own data"). DDO: the paper's VAR beta and 3x to 30x weaker (a
# larger beta saturates the discriminator sooner: a weaker push; docs/method.md, "DDO").
STRENGTH_GRID = {"mclr": ("loss.mclr.lam", (10.0, 3.0, 1.0, 0.3)), "cca": ("loss.cca.lam", (50.0, 15.0, 5.0, 1.5)),
                 "cc_dpo": ("loss.cc_dpo.beta", (0.2, 0.6, 2.0, 6.0)),
                 "ddo": ("loss.ddo.beta", (0.02, 0.06, 0.2, 0.6))}
DEFAULT_STRENGTHS = {"mnist": "tuned", "imagefolder": "sweep"}


@dataclasses.dataclass(frozen=True)
class Finetune:
    """One row of the comparison: a fine-tuning stage (configs/<data>/<config>.yaml + overrides) and, for a
    strength-conditioned model, the strength it is sampled at (GFT's beta, the MCLR dial's lambda)."""
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    strength: float | None = None


def dial_rows(method: str, cfg_scales: list[float]) -> list[Finetune]:
    """The rows of one dial fine-tuning: GFT at beta = 1 / (1 + w) for each CFG scale w (GFT's sampling is CFG at w
    = 1/beta - 1: docs/method.md, "GFT"), the MCLR dial at each of MCLR's STRENGTH_GRID lambdas (its lam_range)."""
    if method == "gft":
        return [Finetune(f"gft-beta{1 / (1 + w):.3g}", "gft", (), round(1 / (1 + w), 4)) for w in cfg_scales]
    return [Finetune(f"mclr_dial-lam{v:g}", "mclr_dial", (), v) for v in STRENGTH_GRID["mclr"][1]]


def finetune_runs(strengths: str, methods: tuple[str, ...] = FINETUNES,
                  cfg_scales: tuple[float, ...] = ()) -> list[Finetune]:
    """Every row of the comparison: "tuned" runs each objective as configured, "sweep" each at every STRENGTH_GRID
    value; the nll control once, a dial method as one fine-tuning at several sampling strengths (dial_rows)."""
    runs = []
    for method in methods:
        if method in ("gft", "mclr_dial"):
            runs += dial_rows(method, list(cfg_scales))
        elif strengths == "tuned" or method not in STRENGTH_GRID:
            runs.append(Finetune(method, method))
        else:
            knob, values = STRENGTH_GRID[method]
            # "mclr-lam10": a row name is a plain directory name (eval/compare.py, check_row_names)
            runs += [Finetune(f"{method}-{knob.rsplit('.', 1)[1]}{v:g}", method, (f"{knob}={v:g}",)) for v in values]
    return runs


def reference_samples_dir(root: Path, seed: int, base: Path) -> Path:
    return root / f"ddo-samples-s{seed}-{file_sha256(base)[:8]}"


def reference_samples(root: Path, seed: int, base: Path, data: dict) -> Path:
    """DDO's reference set of one base: as many of its own guidance-free samples as the training split has images,
    spread evenly over the classes, drawn once (a stage named by the base's weights) for every DDO row of that base."""
    out = reference_samples_dir(root, seed, base)
    if not out.exists():
        log.info("running stage -> %s", out)
        train_set = build_dataset(dataset_args(data), "train")
        per_class = math.ceil(len(train_set) / train_set.num_classes)
        make_reference_samples(str(base), per_class, out, seed=seed)
    return out


def pipeline(root: Path, seed: int, extra: list[str], finetunes: list[Finetune] | None = None,
             configs: Path = MNIST_CONFIGS, checks: str = "off", reports: dict | None = None) -> dict[str, Path]:
    """Tokenizer, base and the fine-tuning stages (finetune_runs; default: each objective as configured), trained
    where not cached; their checkpoints by row name. A stage directory is named by its config's hash, so the same
    settings reached from two rows train once. checks: "off", "report" (measure the tokenizer after its stage and
    the base after its own, into tokenizer_report.json and base_report.json beside them) or "enforce" (also stop
    with PipelineStop when one fails: docs/method.md, "Checks between stages"); the reports go into `reports`."""
    reports = {} if reports is None else reports
    tok_cfg, tok = stage("tokenizer", "tokenizer.yaml", root, extra, configs)
    run_stage(tok_cfg, tok, train_tokenizer)
    if checks != "off":
        reports["tokenizer"] = check_tokenizer(tok_cfg, tok, root, checks == "enforce")
    common = [f"tokenizer.checkpoint={tok}", f"run.seed={seed}", *extra]
    pre_cfg, pre = stage(f"pretrain-s{seed}", "pretrain.yaml", root, common, configs)
    run_stage(pre_cfg, pre, train)
    if checks != "off":
        reports[f"base s{seed}"] = check_base(pre_cfg, pre, checks == "enforce")
    paths = {"base": pre}
    for run in finetune_runs("tuned") if finetunes is None else finetunes:
        overrides = [*common, f"model.init={pre}", *run.overrides]
        if run.config == "ddo":
            samples = reference_samples(root, seed, pre, dataclasses.asdict(pre_cfg.data))
            overrides.append(f"loss.ddo.samples={samples}")
        cfg, path = stage(f"{run.config}-s{seed}", f"{run.config}.yaml", root, overrides, configs)
        paths[run.name] = run_stage(cfg, path, train)
    return paths


def folder_overrides(data_root: Path) -> list[str]:
    """data.root and data.num_classes of an image folder, read from its train/<class>/ directories."""
    train_dir = data_root / "train"
    if not train_dir.is_dir():
        raise PipelineError(f"--root {data_root}: no train/ directory (expected {data_root}/train/<class>/<images>)")
    classes = class_dirs(str(train_dir))  # a symbolic link loop is named, not an OSError
    check_split_classes(str(data_root))  # val/ must name the classes of train/, before the tokenizer trains
    if len(classes) < 2:
        raise PipelineError(f"--root {data_root}: train/ holds {len(classes)} class directories; a class-conditional "
                            "model needs at least 2")
    # JSON is YAML: the path is read back exactly, whatever characters it holds.
    return [f"data.root={json.dumps(str(data_root.resolve()))}", f"data.num_classes={len(classes)}"]


def write_summary(per_seed: list[list[dict]], out: Path) -> str:
    """Mean and spread (sample std over seeds) of every column, per row; written to out/summary.{md,json}."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {row["name"]: summarise([run[i] for run in per_seed], COLUMNS) for i, row in enumerate(per_seed[0])}
    rows = [[name, *(mean_std(s.get(k), std_of_one=False) for k in COLUMNS)] for name, s in summary.items()]
    table = markdown_table(["model", *COLUMNS], rows)
    write_text_atomic(out / "summary.md", table)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return table


def best_settings(summary: dict) -> str:
    """The row of lowest mean FID of every method (base, CFG, nll and each fine-tuned method over its strengths),
    and whether it is the first or last value its method tried: there the optimum may lie beyond the grid."""
    groups: dict[str, list[str]] = {}
    for name in summary:  # in the order the strengths were run, strongest fine-tuning and weakest CFG first
        method = "CFG" if name.startswith("base+cfg") else name.split("-")[0]
        groups.setdefault(method, []).append(name)
    rows = []
    for method, names in groups.items():
        best = min(names, key=lambda n: summary[n].get("fid", {}).get("mean", math.inf))
        cells = [f"{summary[best][k]['mean']:.4g}" if k in summary[best] else "n/a"
                 for k in ("fid", "class_accuracy", "recall")]
        edge = "-" if len(names) == 1 else "yes" if best in (names[0], names[-1]) else "no"
        rows.append([method, best, *cells, edge])
    return markdown_table(["method", "best setting", "FID", "class_accuracy", "recall", "at an edge of the grid"], rows)


def run_all(root: Path, seeds: list[int], num_samples: int, cfg_scales: list[float], overrides: list[str],
            configs: Path = MNIST_CONFIGS, features: str = "mnist", title: str = "MNIST demo",
            strengths: str = "tuned", checks: str = "off", methods: tuple[str, ...] = FINETUNES) -> Path:
    """Every stage for every seed (cached ones reused), then the comparison table, plot and grid; returns the
    summary directory. checks: pipeline()'s; their reports end the summary and every table says when the feature
    network is too weak to judge."""
    runs = finetune_runs(strengths, methods, tuple(cfg_scales))
    check_arguments(seeds, num_samples, cfg_scales, overrides, configs, runs, features, root)
    per_seed, outs, reports = [], [], {}
    strength_of = {run.name: run.strength for run in runs if run.strength is not None}
    for seed in seeds:
        paths = pipeline(root, seed, overrides, runs, configs, checks, reports)
        common = EvalSettings(ckpt=str(paths["base"]), num_samples=num_samples, cache_dir=str(root / "cache"),
                              features=features)
        key = hashlib.sha256(json.dumps([sorted((k, str(v)) for k, v in paths.items()), cfg_scales])
                             .encode()).hexdigest()[:8]
        out = root / f"compare-s{seed}-n{num_samples}-{key}"  # new models or settings: a new directory
        outs.append(out.name)
        cached = _cached_results(out / "results.json")  # the same models, settings and seed were compared before
        if cached is not None:
            per_seed.append(cached)
        else:
            per_seed.append(compare(str(paths["base"]), [(r.name, str(paths[r.name])) for r in runs], cfg_scales,
                                    common, out, strengths=strength_of or None))
        log.info("seed %d: table %s, plot %s, grid %s", seed, out / "table.md", out / "fid_vs_cfg.png",
                 out / "grid.png")
    summary_dir = root / f"summary-{hashlib.sha256(' '.join(outs).encode()).hexdigest()[:8]}"
    table = write_summary(per_seed, summary_dir)
    print(f"\n{title}, seeds {seeds}, {num_samples} samples per row (mean ± std over seeds):\n")
    print(table)
    if strengths == "sweep":
        best = best_settings(json.loads((summary_dir / "summary.json").read_text()))
        write_text_atomic(summary_dir / "best.md", best)
        print(f"Lowest mean FID of each method over its strengths (STRENGTH_GRID, --cfg-scales):\n\n{best}")
    if reports:
        print(report_checks(reports, summary_dir, [root / name for name in outs]))
    print(f"plot: {out / 'fid_vs_cfg.png'}\ngrid: {out / 'grid.png'}\nsummary: {summary_dir / 'summary.md'}")
    return summary_dir


def _cached_results(path: Path) -> list[dict] | None:
    """A comparison's results.json, or None to compare again: when missing, or unreadable (a truncated file, say),
    which is said naming the file, since comparing again rebuilds it from the checkpoints."""
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())
    except ValueError as e:
        log.warning("%s is unreadable (%s); comparing again", path, e)
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        log.warning("%s does not hold a list of result rows; comparing again", path)
        return None
    return rows


def check_arguments(seeds: list[int], num_samples: int, cfg_scales: list[float], overrides: list[str],
                    configs: Path, runs: list[Finetune], features: str, root: Path) -> None:
    """Every setting the pipeline will use, checked before any stage trains: the seeds, the comparison's settings,
    and each stage's config with every override (each stage's config is otherwise read only when it is reached)."""
    if not seeds:
        raise PipelineError("--seeds needs at least one training seed (e.g. --seeds 0 1 2)")
    EvalSettings(num_samples=num_samples, cache_dir=str(root / "cache"), features=features).check()
    if not all(math.isfinite(s) for s in cfg_scales):
        raise PipelineError(f"--cfg-scales = {cfg_scales} is out of range: must be finite numbers")
    for seed in seeds:
        common = ["tokenizer.checkpoint=tokenizer.safetensors", f"run.seed={seed}", *overrides]
        stages = [("tokenizer.yaml", overrides), ("pretrain.yaml", common)]
        stages += [(f"{run.config}.yaml", [*common, "model.init=base.safetensors", *run.overrides,
                                           *(["loss.ddo.samples=reference_samples"] if run.config == "ddo" else [])])
                   for run in runs]
        for yaml_name, stage_overrides in stages:
            load_config(configs / yaml_name, stage_overrides, check_files=False)


def run_dataset(data: str, data_root: str | None, out: str | None, seeds: list[int], num_samples: int,
                cfg_scales: list[float], overrides: list[str], features: str | None = None,
                strengths: str | None = None, skip_checks: bool = False,
                methods: tuple[str, ...] = FINETUNES) -> Path:
    """The pipeline on --data mnist or --data imagefolder --root DIR, every setting checked before any work. A
    folder's stages are checked as they finish and stop when one fails (skip_checks: report, go on)."""
    features = features or DEFAULT_FEATURES[data]
    strengths = strengths or DEFAULT_STRENGTHS[data]
    if data == "mnist":
        if data_root is not None:
            raise PipelineError("--root names an image folder; use it with --data imagefolder (--out sets where the "
                                "runs go)")
        # the demo's stages, unchecked: its numbers and outputs stay as they were
        return run_all(Path(out or "runs/mnist"), seeds, num_samples, cfg_scales, overrides, MNIST_CONFIGS, features,
                       strengths=strengths, methods=methods)
    if data_root is None:
        raise PipelineError("--data imagefolder needs --root DIR (the directory holding train/<class>/<images>)")
    if features == "mnist":
        raise PipelineError(f"--features mnist scores against the MNIST digits, not {data_root}; use --features "
                            "classifier (a CNN trained on the folder's own training split)")
    root = Path(data_root)
    runs = Path(out or f"runs/folder-{root.resolve().name}")
    return run_all(runs, seeds, num_samples, cfg_scales, [*folder_overrides(root), *overrides],
                   STAGE_CONFIGS["imagefolder"], features, title=f"Image folder {root}", strengths=strengths,
                   checks="report" if skip_checks else "enforce", methods=methods)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=tuple(STAGE_CONFIGS), default="mnist")
    p.add_argument("--root", help="--data imagefolder: the directory holding train/<class>/ (and val/<class>/)")
    p.add_argument("--out", help="where every stage writes (default runs/mnist, or runs/folder-<name of --root>)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--cfg-scales", nargs="*", type=float, default=[0.5, 1.0, 2.0, 3.0])
    p.add_argument("--features", choices=("mnist", "classifier"),
                   help="the comparison's feature network (default: mnist for MNIST, classifier for a folder)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(FINETUNES),
                   help="the fine-tuning methods compared (default: %(default)s; also gft, mclr_dial, ddo)")
    p.add_argument("--strengths", choices=("tuned", "sweep"),
                   help="fine-tune each method at its configured strength (tuned: the MNIST default) or at each "
                        "STRENGTH_GRID value (sweep: a folder's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every stage")
    p.add_argument("--skip-checks", action="store_true",
                   help="a folder: go on when a check between stages fails (the tokenizer loses the classes, the "
                        "base is near chance); the failure is still reported, in the log and the summary")
    args = add_debug_flag(p).parse_args(argv)
    with reporting_user_errors(args.debug):
        run_dataset(args.data, args.root, args.out, args.seeds, args.num_samples, args.cfg_scales, args.set,
                    args.features, args.strengths, args.skip_checks, tuple(args.methods))


if __name__ == "__main__":
    main()
