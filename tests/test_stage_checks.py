"""The checks between the folder pipeline's stages (docs/method.md, "Checks between stages"): a tokenizer that loses
the classes stops the pipeline before any VAR trains, a base near chance stops it before fine-tuning, a too-weak
own-data evaluator is flagged in its description (every metrics.json) and in every table; all on tiny generated
folders."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vae, tiny_var
from eval.run_data import EVALUATOR_MIN_ACCURACY, own_classifier_net
from eval.stage_checks import base_problem, base_report, reconstruct, tokenizer_problem
from experiments.checks import PipelineStop, report_checks
from experiments.pipeline import main, pipeline
from test_own_data import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "folder"
TINY_VAR = ["train.epochs=null", "train.batch_size=8", "train.warmup_steps=1", "run.log_every=100", "model.depth=1",
            "model.embed_dim=32", "model.num_heads=2"]


def folder_sets(root: Path, classes: int = 3) -> list[str]:
    return [f"data.root={root}", f"data.num_classes={classes}", "tokenizer_train.batch_size=8",
            "tokenizer_train.warmup_steps=2"]


def test_a_tokenizer_that_loses_the_classes_stops_the_pipeline_with_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "folder", val=True)
    # three tokenizer steps: the reconstructions are noise, the classifier tells the originals apart perfectly
    with pytest.raises(SystemExit) as stop:
        main(["--data", "imagefolder", "--root", str(root), "--out", str(tmp_path / "runs"),
              "--set", "tokenizer_train.steps=3", "--set", "tokenizer_train.batch_size=8", *sum(
                  (["--set", s] for s in TINY_VAR), [])])
    assert stop.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]  # not tqdm's bars
    assert len(err) == 1 and err[0].startswith("error: the tokenizer loses the classes") and "--set" in err[0]
    runs = sorted(p.name.split("-")[0] for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert runs == ["cache", "tokenizer"]  # no VAR stage was even started
    (report,) = (tmp_path / "runs").glob("tokenizer-*/tokenizer_report.json")
    numbers = json.loads(report.read_text())
    assert numbers["original_accuracy"] == 1.0 and numbers["recon_accuracy"] < 0.8
    assert 0 < numbers["codebook_usage"] <= 1 and numbers["recon_mse"] > 0


def test_a_colour_folder_whose_stages_keep_the_classes_passes_both_checks(tmp_path):
    root = make_folder(tmp_path / "folder", val=True)
    reports = {}
    paths = pipeline(tmp_path / "runs", 0, [*folder_sets(root), "tokenizer_train.steps=100", *TINY_VAR,
                                            "train.steps=60", "train.lr=0.003", "run.eval_every=20"],
                     finetunes=(), configs=CONFIGS, checks="enforce", reports=reports)
    assert set(paths) == {"base"} and set(reports) == {"tokenizer", "base s0"}
    tok, base = reports["tokenizer"], reports["base s0"]
    assert tokenizer_problem(tok) is None and base_problem(base) is None
    assert tok["recon_accuracy"] >= 0.8 * tok["original_accuracy"] and tok["recon_mse"] < 0.2
    assert base["implicit_classifier_accuracy"] > 0.5 and base["chance"] == pytest.approx(1 / 3)
    # both reports are cached beside their stages, so a rerun measures nothing again
    assert (paths["base"].parent / "base_report.json").is_file()


def test_a_base_that_ignores_the_class_is_near_chance_and_stopped(tmp_path):
    root = make_folder(tmp_path / "folder", val=True)
    vae = tiny_vae(vocab_size=32)
    var = tiny_var(vae, num_classes=3, depth=1, width=32, heads=2)
    with torch.no_grad():  # every class (and the null class) has the same embedding: no separation at all
        var.class_emb.weight.copy_(var.class_emb.weight[:1].expand_as(var.class_emb.weight))
    data = {"name": "imagefolder", "root": str(root), "resolution": 16, "num_classes": 3}
    report = base_report(var, vae, data)
    assert report["mean_log_ratio_per_token"] == pytest.approx(0, abs=1e-6) and report["skill"] < 0.25
    assert "the base does not separate the classes" in base_problem(report)
    with pytest.raises(PipelineStop, match="no fine-tuning was run"):
        from experiments.checks import check
        check(base_problem(report), enforce=True)


def noise_folder(root: Path, classes: int = 2, per_class: int = 24) -> Path:
    """Labels that nothing in the images predicts: no classifier can be strong here."""
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("val", 10)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_a_weak_evaluator_is_flagged_in_its_description_and_every_table(tmp_path):
    data = {"name": "imagefolder", "root": str(noise_folder(tmp_path / "noise")), "resolution": 16,
            "num_classes": 2}
    net, acc = own_classifier_net(data, tmp_path / "cache")
    assert acc < EVALUATOR_MIN_ACCURACY
    assert "too weak" in net.description and "too weak" in net.class_accuracy_basis(2)[1]  # both in metrics.json
    summary, compare_dir = tmp_path / "summary", tmp_path / "compare-s0"
    for path in (summary / "summary.md", summary / "best.md", compare_dir / "table.md"):
        path.parent.mkdir(exist_ok=True)
        path.write_text("| model | fid |\n")
    tok = {"images": "x", "recon_mse": 0.01, "original_accuracy": acc, "recon_accuracy": acc, "recon_fid": 1.0,
           "codebook_usage": 0.5, "codebook_perplexity": 10.0, "vocab_size": 32, "evaluator_heldout_accuracy": acc}
    printed = report_checks({"tokenizer": tok}, summary, [compare_dir])
    assert printed.startswith("WARNING: the feature network is too weak")
    for path in (summary / "summary.md", summary / "best.md", compare_dir / "table.md"):
        assert path.read_text().startswith("**WARNING: the feature network is too weak")
    assert "Checks between stages" in (summary / "summary.md").read_text()
    assert json.loads((summary / "checks.json").read_text())["tokenizer"] == tok


def test_a_strong_evaluator_is_not_flagged(tmp_path):
    data = {"name": "imagefolder", "root": str(make_folder(tmp_path / "d", val=True)), "resolution": 16,
            "num_classes": 3}
    net, acc = own_classifier_net(data, tmp_path / "cache")
    assert acc >= EVALUATOR_MIN_ACCURACY and "WARNING" not in net.description


def test_codebook_histogram_counts_every_scale_token():
    vae = tiny_vae(vocab_size=16)
    rec, counts = reconstruct(vae, torch.rand(5, 3, 16, 16) * 2 - 1, batch_size=2)
    assert rec.shape == (5, 3, 16, 16) and counts.sum() == 5 * sum(p * p for p in vae.patch_nums)


def test_the_tokenizer_message_suggests_more_steps_only_to_a_tokenizer_that_reached_its_ceiling():
    lost = {"original_accuracy": 0.915, "recon_accuracy": 0.725, "recon_mse": 0.015, "codebook_usage": 0.95,
            "patch_nums": [1, 2, 4, 8, 16], "resolution": 32}
    stopped = tokenizer_problem({**lost, "steps_run": 1300, "steps_ceiling": 2000})
    assert "tokenizer_train.steps" not in stopped and "after step 1300 of at most 2000" in stopped
    assert '--set data.resolution=64 --set "tokenizer.v_patch_nums=[1,2,4,8,16,32]"' in stopped
    for ran_out in ({**lost, "steps_run": 2000, "steps_ceiling": 2000}, lost):  # at its ceiling, or not known
        assert "a higher ceiling tokenizer_train.steps" in tokenizer_problem(ran_out)
    assert tokenizer_problem({**lost, "recon_accuracy": 0.74}) is None  # 0.74 >= 0.8 x 0.915
