"""The pipeline's newer methods (experiments/pipeline.py --methods): GFT and the MCLR dial as one fine-tuning each,
sampled at several strengths, and DDO after a stage that draws the base's own samples; every row in one table."""
import json

import pytest
import yaml

from experiments.pipeline import FINETUNES, METHODS, Finetune, finetune_runs, main
from test_own_data import make_folder

TINY = ["tokenizer_train.steps=3", "tokenizer_train.batch_size=8", "train.epochs=null", "train.steps=2",
        "train.batch_size=8", "train.warmup_steps=1", "run.log_every=1", "run.eval_every=1", "model.depth=1",
        "model.embed_dim=32", "model.num_heads=2", "loss.mclr.tau=1.0"]


def test_dial_methods_are_one_stage_at_several_strengths_and_ddo_follows_the_grid():
    runs = finetune_runs("sweep", ("gft", "mclr_dial", "ddo"), (0.5, 1.0, 3.0))
    gft = [r for r in runs if r.config == "gft"]
    # GFT's beta = 1 / (1 + w) at each CFG scale: its sampling is CFG at w = 1/beta - 1 (docs/method.md, "GFT")
    assert [r.strength for r in gft] == [0.6667, 0.5, 0.25] and all(r.overrides == () for r in gft)
    assert [r.name for r in gft] == ["gft-beta0.667", "gft-beta0.5", "gft-beta0.25"]
    dial = [r for r in runs if r.config == "mclr_dial"]
    assert [r.strength for r in dial] == [10.0, 3.0, 1.0, 0.3]  # MCLR's own separately trained lambdas
    ddo = [r for r in runs if r.config == "ddo"]
    assert [r.overrides for r in ddo] == [(f"loss.ddo.beta={b}",) for b in ("0.02", "0.06", "0.2", "0.6")]
    assert all(r.strength is None for r in ddo)
    # the default comparison is unchanged: the demo's four rows, each as configured
    assert finetune_runs("tuned") == [Finetune(m, m) for m in FINETUNES] and set(FINETUNES) < set(METHODS)


@pytest.mark.slow
def test_pipeline_runs_gft_the_dial_and_ddo_on_a_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "folder", val=True)
    runs = tmp_path / "runs"
    argv = ["--data", "imagefolder", "--root", str(root), "--out", str(runs), "--num-samples", "6",
            "--cfg-scales", "1", "3", "--skip-checks", "--methods", "gft", "mclr_dial", "ddo"]
    main([*argv, *(a for kv in TINY for a in ("--set", kv))])
    (results_file,) = runs.glob("compare-*/results.json")
    rows = {r["name"]: r for r in json.loads(results_file.read_text())}
    assert {"gft-beta0.5", "gft-beta0.25", "mclr_dial-lam10", "mclr_dial-lam0.3", "ddo-beta0.02",
            "ddo-beta0.6"} <= set(rows)
    # one GFT and one dial fine-tuning serve all their rows, each row sampled at its own strength
    assert len(list(runs.glob("gft-s0-*/model.safetensors"))) == 1
    assert len(list(runs.glob("mclr_dial-s0-*/model.safetensors"))) == 1
    assert rows["gft-beta0.5"]["ckpt"] == rows["gft-beta0.25"]["ckpt"]
    assert rows["gft-beta0.5"]["strength"] == 0.5 and rows["mclr_dial-lam0.3"]["strength"] == 0.3
    metrics = json.loads((results_file.parent / "gft-beta0.25" / "metrics.json").read_text())
    assert metrics["settings"]["strength"] == 0.25
    # DDO: the base's own samples drawn once, from the base's weights, and every DDO row trained against them
    (samples,) = runs.glob("ddo-samples-s0-*/settings.json")
    settings = json.loads(samples.read_text())
    (base,) = runs.glob("pretrain-s0-*/model.safetensors")
    assert settings["source"]["checkpoint"] == str(base) and settings["sampling"]["guidance"] == "none"
    assert settings["n_per_class"] == 12  # as many as the training split's images: 12 a class
    ddo_runs = [yaml.safe_load((p.parent / "config.yaml").read_text()) for p in runs.glob("ddo-s0-*/model.safetensors")]
    assert sorted(c["loss"]["ddo"]["beta"] for c in ddo_runs) == [0.02, 0.06, 0.2, 0.6]
    assert all(c["loss"]["ddo"]["samples"] == str(samples.parent) for c in ddo_runs)
    assert "gft-beta0.25" in capsys.readouterr().out
