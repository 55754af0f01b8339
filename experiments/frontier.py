"""Strength frontiers on the embedded MNIST: every method's strength knob swept, FID and precision against recall.

    python -m experiments.frontier --seeds 0 1 2 --num-samples 5000
    python -m experiments.frontier --from-summary runs/folder-NAME/summary-HASH/summary.json   # a folder's pipeline

Each method keeps its tuned settings (configs/mnist/*.yaml, chosen by experiments/sweep.py) and varies one knob over
values fixed here before any run (KNOBS): CFG's scale w on the base; MCLR's lam at its tuned cap, CCA's lam at its
tuned beta, CC-DPO's beta and DDO's beta, one fine-tuning per value; GFT's beta and the MCLR dial's lambda, each one
fine-tuning sampled at every value. Every point is a sample of a fine-tuned model without guidance (CFG: of the
base, guided), scored in the shipped classifier's features with the same seed and sample count.

Decision rule, stated before running: at matched recall, lower FID wins. The comparison interpolates each method's
mean FID linearly in recall over the recall range both methods cover, and reports the mean FID gap there and the
recalls where the frontiers cross (PAIRS), and which method is lowest at each recall. Writes frontier.md /
frontier.json under ROOT/frontier-n{N}-s{seeds} and the plot to docs/frontier.png (--plot). --from-summary makes
the same report from the rows an image folder's pipeline run already scored (experiments/pipeline.py, --methods),
written beside that summary.json; it trains and samples nothing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from experiments.common import (Scoring, cached_row, experiment_parser, finetune_stage, trained_finetune,  # noqa: E402
                                write_table)
from eval.tables import markdown_table, mean_std, summarise  # noqa: E402
from experiments.pipeline import reference_samples, reference_samples_dir  # noqa: E402
from var_mclr.files import atomic_write, write_text_atomic  # noqa: E402

log = logging.getLogger("experiments.frontier")


@dataclasses.dataclass(frozen=True)
class Knob:
    """One method's strength knob: a config key with one fine-tuning per value, or (at_sampling) a sampling setting
    of one model: CFG's scale on the base, the strength input of one GFT or MCLR-dial fine-tuning."""
    name: str
    values: tuple[float, ...]
    at_sampling: bool = False
    overrides: tuple[str, ...] = ()  # the one fine-tuning's settings beside its config (at_sampling methods)


# Fixed before running (docs/frontier.md, "Protocol"). Budget rule, the same for every training-time method: three
# fine-tunings, the tuned value (configs/mnist/*.yaml) with one weaker and one stronger; a dial method gets one
# fine-tuning sampled over the same range; CFG none. GFT's betas are 1 / (1 + w) at CFG's w.
MCLR_LAMS = (3.0, 10.0, 30.0)
CFG_SCALES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
KNOBS = {
    "cfg": Knob("cfg_scale", CFG_SCALES, at_sampling=True),
    "mclr": Knob("loss.mclr.lam", MCLR_LAMS),
    "mclr_dial": Knob("strength", (3.0, 5.0, 10.0, 20.0, 30.0), at_sampling=True,
                      overrides=(f"loss.mclr.lam_range=[{MCLR_LAMS[0]}, {MCLR_LAMS[-1]}]",)),
    "gft": Knob("strength", tuple(round(1 / (1 + w), 4) for w in CFG_SCALES), at_sampling=True),
    "cca": Knob("loss.cca.lam", (10.0, 50.0, 100.0)),
    "cc_dpo": Knob("loss.cc_dpo.beta", (0.1, 0.2, 0.5)),
    "ddo": Knob("loss.ddo.beta", (0.05, 0.15, 0.5)),
}
METRICS = ("fid", "precision", "recall", "class_accuracy")
MNIST_DATA = {"name": "mnist", "resolution": 16, "num_classes": 10}


def finetune_overrides(method: str, value: float, seed: int, root: Path, base: Path) -> list[str]:
    """The overrides of the fine-tuning a point samples: one per value, or the dial method's one for all values."""
    knob = KNOBS[method]
    overrides = list(knob.overrides) if knob.at_sampling else [f"{knob.name}={value}"]
    if method == "ddo":
        overrides.append(f"loss.ddo.samples={reference_samples_dir(root, seed, base)}")
    return overrides


def point_run(method: str, value: float, seed: int, root: Path, scoring: Scoring) -> tuple[Path, dict]:
    """Where a point's samples and row go, and how it is sampled (its fine-tuning named, not trained)."""
    points = root / f"frontier-points-n{scoring.common.num_samples}"
    if method == "cfg":
        return points / f"{scoring.base.parent.name}-cfg{value:g}", {"guidance": "cfg", "cfg_scale": value}
    _, ckpt = finetune_stage(method, seed, root, scoring.base, finetune_overrides(method, value, seed, root,
                                                                                    scoring.base))
    run = {"ckpt": str(ckpt), "guidance": "none", "cfg_scale": 0.0}
    if KNOBS[method].at_sampling:
        return points / f"{ckpt.parent.name}-strength{value:g}", {**run, "strength": value}
    return points / ckpt.parent.name, run


def point_metrics(method: str, value: float, seed: int, root: Path, scoring: Scoring) -> dict:
    """Metrics of one (method, knob value, seed) point; trained and scored once, then read back."""
    out, run = point_run(method, value, seed, root, scoring)

    def score():
        if method != "cfg":
            if method == "ddo":
                reference_samples(root, seed, scoring.base, MNIST_DATA)
            trained_finetune(method, seed, root, scoring.base,
                             finetune_overrides(method, value, seed, root, scoring.base))
        metrics = scoring.metrics(out, seed=seed, **run)
        return {k: metrics.get(k) for k in METRICS}

    return cached_row(out / "point.json", score)


def summarise_points(points: dict) -> dict:
    """method -> list of {value, metric: {mean, std, values}} in knob order."""
    summary = {method: [{"value": value, "seeds": len(rows), **summarise(rows, METRICS)}
                        for value, rows in by_value.items() if rows]
               for method, by_value in points.items()}
    return {method: entries for method, entries in summary.items() if entries}


def _curve(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    recall = np.array([e["recall"]["mean"] for e in entries])
    fid = np.array([e["fid"]["mean"] for e in entries])
    order = np.argsort(recall)
    return recall[order], fid[order]


def matched_recall(summary: dict, a: str, b: str, n: int = 50) -> dict:
    """Method a against b at matched recall: mean FID gap (a - b; negative = a lower) over the shared recall range,
    and the recalls where the linearly interpolated frontiers cross."""
    ra, fa = _curve(summary[a])
    rb, fb = _curve(summary[b])
    lo, hi = max(ra.min(), rb.min()), min(ra.max(), rb.max())
    if lo >= hi:
        return {"overlap": None, "mean_fid_gap": None, "crossings": []}
    grid = np.linspace(lo, hi, n)
    gap = np.interp(grid, ra, fa) - np.interp(grid, rb, fb)
    sign = np.sign(gap)
    nonzero = np.flatnonzero(sign)  # a crossing lies between two grid points of opposite, non-zero sign
    crossings = [float((grid[i] + grid[j]) / 2) for i, j in zip(nonzero, nonzero[1:]) if sign[i] != sign[j]]
    return {"overlap": [float(lo), float(hi)], "mean_fid_gap": float(gap.mean()),
            "a_lower_share": float((gap < 0).mean()), "crossings": crossings}


def one_model(method: str) -> str:
    return ", one model" if KNOBS[method].at_sampling and method != "cfg" else ""


def plot(summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (method, entries) in enumerate(summary.items()):
        r = [e["recall"]["mean"] for e in entries]
        r_err = [e["recall"]["std"] for e in entries]
        for ax, key in ((axes[0], "fid"), (axes[1], "precision")):
            y = [e[key]["mean"] for e in entries]
            y_err = [e[key]["std"] for e in entries]
            ax.errorbar(r, y, xerr=r_err, yerr=y_err, fmt="o-", color=f"C{i}", capsize=2,
                        label=f"{method} ({KNOBS[method].name.split('.')[-1]}{one_model(method)})")
            for e, xx, yy in zip(entries, r, y):
                ax.annotate(f"{e['value']:g}", (xx, yy), fontsize=6, xytext=(2, 2), textcoords="offset points")
    axes[0].set_ylabel("FID, classifier features (lower is better)")
    axes[1].set_ylabel("precision")
    for ax in axes:
        ax.set_xlabel("recall")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# A pipeline row's name: base+cfg<w>, or <method>-<knob leaf><value> (experiments/pipeline.py, finetune_runs).
PIPELINE_ROW = re.compile(r"^(?:base\+cfg|(?P<method>[a-z_]+)-[a-z_]+?)(?P<value>\d[\d.e+-]*)$")


def points_of_pipeline(summary: dict) -> dict:
    """A pipeline summary.json (row name -> metric -> spread over seeds) as the frontier's points by method, each
    in knob order; the base and the nll control have no knob and are left out."""
    points: dict[str, list[dict]] = {}
    for name, row in summary.items():
        match = PIPELINE_ROW.match(name)
        method = match and (match["method"] or "cfg")
        if method not in KNOBS or "fid" not in row or "recall" not in row:
            continue
        points.setdefault(method, []).append({"value": float(match["value"]), "seeds": len(row["fid"]["values"]),
                                              **{k: row[k] for k in METRICS if k in row}})
    return {method: sorted(entries, key=lambda e: e["value"]) for method, entries in points.items()}


def write_report(summary: dict, out: Path, extra: dict, plot_path: str | None) -> None:
    table, verdicts = report(summary)
    write_table(out / "frontier.md", table)
    write_text_atomic(out / "frontier.json", json.dumps({"summary": summary, "matched_recall": verdicts, **extra},
                                                        indent=2))
    plot(summary, out / "frontier.png")
    if plot_path:
        plot(summary, Path(plot_path))


def main(argv: list[str] | None = None) -> None:
    p = experiment_parser(__doc__, num_samples=5000)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--methods", nargs="*", default=list(KNOBS), choices=list(KNOBS))
    p.add_argument("--plot", default=None, help="also write the figure here (e.g. docs/frontier.png)")
    p.add_argument("--scored-only", action="store_true",
                   help="summarise the points already scored (each with its own number of seeds), train nothing")
    p.add_argument("--from-summary", metavar="SUMMARY_JSON",
                   help="report on a folder's pipeline run (its summary.json) instead, beside it; train nothing")
    args = p.parse_args(argv)
    if args.from_summary:
        path = Path(args.from_summary)
        if not path.is_file():
            raise SystemExit(f"--from-summary {path}: no such file (a pipeline run writes summary-*/summary.json)")
        write_report(points_of_pipeline(json.loads(path.read_text())), path.parent, {"source": str(path)}, args.plot)
        return
    root = Path(args.root)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    points: dict[str, dict[float, list[dict]]] = {m: {v: [] for v in KNOBS[m].values} for m in args.methods}
    for seed in args.seeds:
        scoring = Scoring.of_seed(root, seed, args.num_samples, accelerator)
        for method in args.methods:
            for value in KNOBS[method].values:
                if args.scored_only and not (point_run(method, value, seed, root, scoring)[0] / "point.json").is_file():
                    continue
                row = point_metrics(method, value, seed, root, scoring)
                points[method][value].append(row)
                log.info("seed %d %s %s=%g: %s", seed, method, KNOBS[method].name, value, row)
    summary = summarise_points(points)
    out = root / f"frontier-n{args.num_samples}-s{'-'.join(map(str, args.seeds))}"
    write_report(summary, out, {"seeds": args.seeds}, args.plot)


def best_by_recall(summary: dict, n: int = 200) -> list[tuple[float, float, str]]:
    """Which method has the lowest interpolated mean FID at each recall, as (from, to, method) segments over the
    recall range of all methods; at each recall only the methods whose frontier reaches it take part."""
    curves = {m: _curve(entries) for m, entries in summary.items() if len(entries) > 1}
    if not curves:  # single points: no frontier to interpolate
        return []
    lo = min(r.min() for r, _ in curves.values())
    hi = max(r.max() for r, _ in curves.values())
    segments: list[list] = []
    covered = False  # whether the previous recall had a frontier: a gap between frontiers ends a segment
    for x in np.linspace(lo, hi, n):
        fids = {m: np.interp(x, r, f) for m, (r, f) in curves.items() if r.min() <= x <= r.max()}
        if not fids:
            covered = False
            continue
        best = min(fids, key=fids.get)
        if covered and segments[-1][2] == best:
            segments[-1][1] = float(x)
        else:
            segments.append([float(x), float(x), best])
        covered = True
    return [tuple(seg) for seg in segments]


def pareto_points(summary: dict) -> list[tuple[str, float, float, float]]:
    """(method, value, recall, FID) of every point no other point beats on both (higher recall and lower FID, by the
    means), by recall: which method is best where, without interpolating a frontier whose recall zigzags."""
    points = [(m, e["value"], e["recall"]["mean"], e["fid"]["mean"]) for m, entries in summary.items()
              for e in entries]
    front = [p for p in points if not any(q[2] >= p[2] and q[3] <= p[3] and q[2:] != p[2:] for q in points)]
    return sorted(front, key=lambda p: p[2])


# The pairs the report compares at matched recall: MCLR against every other method, the dial against the separately
# trained MCLR points (does one fine-tuning match them?) and GFT against the CFG it replaces.
PAIRS = [("mclr", m) for m in KNOBS if m not in ("mclr", "mclr_dial")] + [("mclr_dial", "mclr"), ("gft", "cfg")]


def report(summary: dict) -> tuple[str, dict]:
    """The table of every point (mean +- std over seeds), the pairs at matched recall and the best method at each
    recall."""
    rows = [[method, KNOBS[method].name, f"{e['value']:g}", str(e["seeds"]),
             *(mean_std(e.get(k)) for k in METRICS)]
            for method, entries in summary.items() for e in entries]
    lines, verdicts = [markdown_table(["method", "knob", "value", "seeds", *METRICS], rows).rstrip("\n")], {}
    lines += ["", "At matched recall (mean FID gap, first minus second; negative = the first lower):", ""]
    for a, b in PAIRS:
        if a not in summary or b not in summary:
            continue
        v = verdicts[f"{a} vs {b}"] = matched_recall(summary, a, b)
        if v["overlap"] is None:
            lines.append(f"- {a} vs {b}: the recall ranges do not overlap")
        else:
            lines.append(f"- {a} vs {b}: recall {v['overlap'][0]:.3f}-{v['overlap'][1]:.3f}, mean gap "
                         f"{v['mean_fid_gap']:+.2f}, {a} lower on {100 * v['a_lower_share']:.0f}% of it, "
                         f"crossings at {', '.join(f'{c:.3f}' for c in v['crossings']) or 'none'}")
    front = verdicts["pareto"] = pareto_points(summary)
    lines += ["", "Points no other point beats on both recall and FID (means), by recall:", ""]
    lines += [f"- {m} {KNOBS[m].name} {v:g}: recall {r:.3f}, FID {f:.2f}" for m, v, r, f in front]
    segments = verdicts["best_by_recall"] = best_by_recall(summary)
    lines += ["", "Lowest mean FID at each recall (the methods whose frontier reaches it):", ""]
    lines += [f"- recall {a:.3f}-{b:.3f}: {m}" for a, b, m in segments]
    return "\n".join(lines) + "\n", verdicts


if __name__ == "__main__":
    main()
