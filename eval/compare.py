"""Base vs base + CFG (a sweep of scales) vs guidance-free fine-tuned models, side by side.

    python eval/compare.py --base runs/mnist/pretrain/model.safetensors \
        --finetuned nll=runs/mnist/nll/model.safetensors mclr=runs/mnist/mclr/model.safetensors \
                    cca=runs/mnist/cca/model.safetensors --cfg-scales 0.5 1 2 3 --out-dir runs/mnist/compare
    python eval/compare.py --base B --finetuned gft-b0.5=P gft-b0.8=P --strength gft-b0.5=0.5 --strength gft-b0.8=0.8

Every row is sampled with the same seed, classes and sample count and scored by the same feature network. Writes
table.md, table.csv, results.json, fid_vs_cfg.png and grid.png (the same seeds and classes for every row).
--strength NAME=VALUE samples the strength-conditioned --finetuned row NAME at that strength (GFT's beta, the MCLR
dial's lambda: eval/fid.py --strength); other rows get the model's neutral input.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from eval.fid import evaluate, feature_backend, read_outputs  # noqa: E402
from eval.sampling_run import load_models, strength_input_of  # noqa: E402
from eval.separation import separation  # noqa: E402
from eval.settings import EvalSettings, SettingsError, add_eval_arguments, settings_from_args  # noqa: E402
from eval.run_data import DataSpecError, recorded_data, split_images  # noqa: E402
from eval.tables import fmt, markdown_table  # noqa: E402
from var_mclr.errors import reporting_user_errors  # noqa: E402
from var_mclr.files import atomic_write, write_text_atomic  # noqa: E402

log = logging.getLogger("eval.compare")
COLUMNS = ("fid", "precision", "recall", "inception_score", "class_accuracy", "implicit_classifier_accuracy",
           "mean_log_ratio_per_token", "heldout_nll_per_token", "images_per_s", "token_images_per_s",
           "transformer_passes_per_image")


NAME_PATTERN = re.compile(r"[^./\\\x00][^/\\\x00]*")  # one path component, not hidden, '.' or '..'


def check_row_names(finetuned: list[tuple[str, str]]) -> None:
    """Each fine-tuned row gets the directory OUT/NAME: a name must be a plain file name, unique, and not one of the
    base rows' (base, base+cfg...), so no row overwrites another or writes outside --out-dir."""
    names = [name for name, _ in finetuned]
    for name in names:
        if not NAME_PATTERN.fullmatch(name) or name == "base" or name.startswith("base+"):
            raise SettingsError(f"--finetuned {name!r}: a row name is one directory name under --out-dir (no '/', "
                                "not starting with '.'), and not 'base' or 'base+...' (the base rows)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SettingsError(f"--finetuned names {dup} appear more than once")


def check_strengths(strengths: dict[str, float], finetuned: list[tuple[str, str]]) -> None:
    """Each --strength NAME=VALUE names a --finetuned row and a finite number."""
    names = {name for name, _ in finetuned}
    for name, value in strengths.items():
        if name not in names:
            raise SettingsError(f"--strength {name}={value}: {name!r} is not a --finetuned row name "
                                f"(rows: {sorted(names)})")
        try:
            finite = math.isfinite(value)
        except TypeError:
            finite = False
        if not finite:
            raise SettingsError(f"--strength {name}={value}: VALUE must be a finite number")


def parse_strengths(items: list[str]) -> dict[str, float]:
    """{NAME: VALUE} of --strength NAME=VALUE items (split at the last '=', so a row name may hold one)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise SettingsError(f"--strength {item}: expected NAME=VALUE, NAME a --finetuned row")
        if name in out:
            raise SettingsError(f"--strength {item}: row {name!r} is given a strength more than once")
        try:
            out[name] = float(value)
        except ValueError:
            raise SettingsError(f"--strength {item}: VALUE must be a finite number") from None
    return out


def plan_rows(base: str, finetuned: list[tuple[str, str]], cfg_scales: list[float],
              strengths: dict[str, float] | None = None) -> list[dict]:
    """The rows to sample; a fine-tuned row named in strengths carries "strength" (no such key otherwise)."""
    strengths = strengths or {}
    rows = [{"name": "base", "ckpt": base, "guidance": "none", "cfg_scale": 0.0}]
    rows += [{"name": f"base+cfg{s:g}", "ckpt": base, "guidance": "cfg", "cfg_scale": s} for s in cfg_scales]
    rows += [{"name": name, "ckpt": path, "guidance": "none", "cfg_scale": 0.0,
              **({"strength": strengths[name]} if name in strengths else {})} for name, path in finetuned]
    return rows


def check_row_strengths(rows: list[dict], common: EvalSettings) -> None:
    """Before any row is sampled: each strength fits its model (strength-conditioned, in the objective's range)."""
    by_ckpt: dict[str, list[float]] = {}
    for row in rows:
        if row.get("strength") is not None:
            by_ckpt.setdefault(row["ckpt"], []).append(row["strength"])
    for ckpt, strengths in by_ckpt.items():  # each checkpoint loaded once
        _, var, _ = _load(ckpt, common)
        for strength in strengths:
            strength_input_of(dataclasses.replace(common, ckpt=ckpt, strength=strength), var)


def run_rows(rows: list[dict], common: EvalSettings, out_dir: Path, data_name: str | None,
             root: str | None = None) -> list[dict]:
    check_row_strengths(rows, common)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    vae0, var0, _ = _load(rows[0]["ckpt"], common)
    # Every metric on the run's own data: the base's recorded training data unless a dataset is named.
    data = recorded_data(rows[0]["ckpt"]) if data_name is None else \
        {"name": data_name, "resolution": vae0.resolution, "num_classes": var0.num_classes}
    if data is None:
        raise DataSpecError(f"{rows[0]['ckpt']} records no training data; name it with --data (and --root)")
    if data["name"] == "imagefolder" and data_name is not None:
        if not root:
            raise SettingsError("--data imagefolder needs --root (the directory holding train/<class>/ and val/)")
        data["root"] = root
    net, ref = feature_backend(common, vae0.resolution, device, data)
    *heldout, heldout_source = split_images(data, "val")
    log.info("separation on %s", heldout_source)
    separations: dict[str, dict] = {}
    results = []
    for row in rows:
        args = dataclasses.replace(common, ckpt=row["ckpt"], guidance=row["guidance"], cfg_scale=row["cfg_scale"],
                                   out_dir=str(out_dir / row["name"]), strength=row.get("strength"))
        record = evaluate(args, net, ref, accelerator)
        # Once per checkpoint, at the model's neutral strength input: rows of one checkpoint at several strengths
        # share it (eval/separation.py --strength measures it at a strength).
        if row["ckpt"] not in separations:
            vae, var, _ = _load(row["ckpt"], common)
            separations[row["ckpt"]] = separation(var.to(device), vae.to(device), *heldout)
        # the digests let seeds compared apart be pooled only on one tokenizer and evaluator (combine_seeds)
        results.append({**row, **record["metrics"], **separations[row["ckpt"]],
                        "feature_network": record["feature_network"]["description"],
                        "feature_network_sha256": record["feature_network"]["weights_sha256"],
                        "tokenizer_weights_sha256": record["checkpoint"]["vae_weights_sha256"]})
        log.info("%s: %s", row["name"], {k: results[-1].get(k) for k in COLUMNS})
    return results


def _load(ckpt: str, common: EvalSettings):
    """A row's models: the official base with the shared --tokenizer; our fine-tunes with the tokenizer they record
    (checked by hash against --tokenizer when one is given)."""
    return load_models(common, ckpt)


def write_tables(results: list[dict], out_dir: Path, title: str) -> str:
    header = ["model", "guidance", *COLUMNS]
    heading = [f"### {title}", ""]
    # A too-weak own-data feature network says so in its description (eval/run_data.py): the table says it first.
    weak = next((r["feature_network"].split("WARNING: ", 1)[1] for r in results
                 if "WARNING: " in r.get("feature_network", "")), None)
    if weak:
        heading = [f"**WARNING: {weak.rstrip('.')}.**", "", *heading]
    rows = [[r["name"], guidance_cell(r, "none", f"cfg {r['cfg_scale']:g}"), *(fmt(r.get(k)) for k in COLUMNS)]
            for r in results]
    table = "\n".join(heading) + "\n" + markdown_table(header, rows)
    write_text_atomic(out_dir / "table.md", table)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in results:
                w.writerow([r["name"], guidance_cell(r, r["guidance"], f"cfg{r['cfg_scale']:g}")]
                           + [r.get(k) for k in COLUMNS])

    atomic_write(out_dir / "table.csv", write_csv)
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    return table


def guidance_cell(r: dict, unguided: str, guided: str) -> str:
    """A row's guidance column: unguided (with its strength, when sampled at one) or guided."""
    if r["guidance"] != "none":
        return guided
    return unguided if r.get("strength") is None else f"{unguided}, strength {r['strength']:g}"


def plot(results: list[dict], out_dir: Path) -> Path:
    """FID and class accuracy against the CFG scale of the base; guidance-free fine-tuned models as lines."""
    base = sorted([r for r in results if r["name"] == "base" or r["name"].startswith("base+cfg")],
                  key=lambda r: r["cfg_scale"])
    others = [r for r in results if r not in base]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "fid", "FID (lower is better)"), (axes[1], "class_accuracy", "class accuracy")):
        if any(r.get(key) is None for r in results):
            continue
        ax.plot([r["cfg_scale"] for r in base], [r[key] for r in base], "o-", color="k", label="base + CFG")
        for i, r in enumerate(others):
            label_i = f"{r['name']} ({guidance_cell(r, 'guidance-free', '')})"
            ax.axhline(r[key], color=f"C{i}", linestyle="--", label=label_i)
        ax.set_xlabel("CFG scale w of the base (0 = guidance-free)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "fid_vs_cfg.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def side_by_side_grid(results: list[dict], out_dir: Path, per_class: int = 2) -> Path:
    """One row per evaluated model, the same (class, seed) samples in the same columns."""
    rows = []
    for r in results:
        read_outputs(out_dir / r["name"])  # the samples are the ones its metrics describe
        z = np.load(out_dir / r["name"] / "samples.npz")
        images, labels = torch.from_numpy(z["arr_0"]), torch.from_numpy(z["arr_1"])
        picks = [images[labels == c][:per_class] for c in range(int(labels.max()) + 1)]
        rows.append(torch.cat(picks).permute(0, 3, 1, 2).float().div(255))
    grid_path = out_dir / "grid.png"
    atomic_write(grid_path, lambda tmp: save_image(torch.cat(rows), tmp, nrow=len(rows[0]), padding=1, format="png"))
    return grid_path


def compare(base: str, finetuned: list[tuple[str, str]], cfg_scales: list[float], common: EvalSettings,
            out_dir: Path, data_name: str | None = None, root: str | None = None,
            strengths: dict[str, float] | None = None) -> list[dict]:
    """data_name (and root for an image folder): the dataset of the held-out images and the own-data features
    (default: what the base was trained on, from its checkpoint). strengths: {fine-tuned row name: its sampling
    strength} (rows not named: the model's neutral input)."""
    common.check()  # before any row is sampled
    check_row_names(finetuned)
    check_strengths(strengths or {}, finetuned)
    if not all(math.isfinite(s) for s in cfg_scales):
        raise SettingsError(f"--cfg-scales = {cfg_scales} is out of range: must be finite numbers")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_rows(plan_rows(base, finetuned, cfg_scales, strengths), common, out_dir, data_name, root)
    write_tables(results, out_dir, f"{common.num_samples} samples, sampling seed {common.seed}")
    plot(results, out_dir)
    side_by_side_grid(results, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", nargs="*", default=[], metavar="NAME=CKPT")
    p.add_argument("--cfg-scales", nargs="*", type=float, default=[0.5, 1.0, 2.0, 3.0])
    p.add_argument("--data", choices=("mnist", "synthetic", "imagefolder"),
                   help="held-out images for separation and own-data features (default: the data the base model "
                        "was trained on; needed for an official base)")
    p.add_argument("--root", help="--data imagefolder: the directory holding train/<class>/ and val/<class>/")
    p.add_argument("--strength", dest="row_strengths", action="append", default=[], metavar="NAME=VALUE",
                   help="sample the strength-conditioned --finetuned row NAME at this strength (GFT's beta, the MCLR "
                        "dial's lambda); repeatable; the same checkpoint may be several rows at several strengths")
    args = add_eval_arguments(p, with_ckpt=False).parse_args(argv)
    finetuned = []
    for item in args.finetuned:
        if "=" not in item:
            p.error(f"--finetuned expects NAME=CKPT, got {item!r}")
        finetuned.append(tuple(item.split("=", 1)))
    with reporting_user_errors(args.debug):
        compare(args.base, finetuned, args.cfg_scales, settings_from_args(args), Path(args.out_dir), args.data,
                args.root, parse_strengths(args.row_strengths))
    print((Path(args.out_dir) / "table.md").read_text())


if __name__ == "__main__":
    main()
