"""The evaluation entry points end to end on tiny models (numbers meaningless, plumbing real)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import tiny_vae, tiny_var
from eval.compare import compare
from eval.features import file_reference, mnist_net
from eval.fid import evaluate
from eval.settings import EvalSettings
from var_mclr.checkpoints import load_tokenizer, save_model, weights_sha256


def models(tmp_path):
    vae = tiny_vae()
    save_model(vae, tmp_path / "tok")
    paths = {}
    for seed, name in enumerate(("base", "tuned")):
        paths[name] = str(save_model(tiny_var(vae, num_classes=4, seed=seed), tmp_path / name))
    return str(tmp_path / "tok.safetensors"), paths


def test_fid_script_writes_samples_grid_and_provenance(tmp_path, eval_cache):
    tok, paths = models(tmp_path)
    args = EvalSettings(ckpt=paths["base"], tokenizer=tok, guidance="cfg", cfg_scale=2, num_samples=40, batch_size=16,
                        cache_dir=str(eval_cache), out_dir=str(tmp_path / "out"))
    record = evaluate(args)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"] == record["metrics"] and saved["settings"]["sampling"]["guidance"] == "cfg"
    assert saved["checkpoint"]["var_sha256"] and saved["feature_network"]["weights_sha256"]
    assert saved["machine"]["cpu"] and saved["machine"]["torch"] == torch.__version__
    assert "NOT Inception FID" in saved["feature_network"]["description"]
    m = saved["metrics"]
    assert m["transformer_passes_per_image"] == 2 * 4 and m["fid"] > 0 and 0 <= m["precision"] <= 1
    assert m["token_images_per_s"] > m["images_per_s"] > 0  # token sampling alone excludes the decoder
    z = np.load(tmp_path / "out" / "samples.npz")
    assert z["arr_0"].shape == (40, 16, 16, 3) and z["arr_0"].dtype == np.uint8
    assert list(z["arr_1"][:8]) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    # Same seed, same samples: the run is reproducible.
    evaluate(dataclasses.replace(args, out_dir=str(tmp_path / "again")))
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["arr_0"], z["arr_0"])


def test_compare_builds_table_plot_and_grid(tmp_path, eval_cache):
    tok, paths = models(tmp_path)
    # Synthetic models are scored in the features of a CNN trained on the synthetic training split (never MNIST's).
    common = EvalSettings(ckpt=paths["base"], tokenizer=tok, num_samples=24, batch_size=12, cache_dir=str(eval_cache),
                          features="classifier")
    results = compare(paths["base"], [("mclr", paths["tuned"])], [1.0, 2.0], common, tmp_path / "cmp", "synthetic")
    assert "own training split" in results[0]["feature_network"] and results[0]["class_accuracy"] is not None
    assert [r["name"] for r in results] == ["base", "base+cfg1", "base+cfg2", "mclr"]
    assert [r["transformer_passes_per_image"] for r in results] == [4, 8, 8, 4]
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| base+cfg2 | cfg 2 |" in table and "implicit_classifier_accuracy" in table
    for name in ("table.csv", "results.json", "fid_vs_cfg.png", "grid.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert all(0 <= r["implicit_classifier_accuracy"] <= 1 for r in results)
    # what the rows' FIDs rest on, for experiments/combine_seeds.py: the tokenizer's weights and the evaluator's
    assert {r["tokenizer_weights_sha256"] for r in results} == {weights_sha256(load_tokenizer(tok))}
    assert len({r["feature_network_sha256"] for r in results}) == 1


def test_references_of_the_wrong_resolution_or_feature_size_are_refused(tmp_path, eval_cache):
    net, _ = mnist_net(eval_cache, 16)
    np.savez(tmp_path / "ref32.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="holds 32x32 images but the samples are 16x16"):
        file_reference(net, str(tmp_path / "ref32.npz"), 16, "cpu")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="feature size 2048, but the feature network gives 128"):
        file_reference(net, str(tmp_path / "stats.npz"), 16, "cpu")
    np.savez(tmp_path / "ref16.npz", arr_0=np.random.default_rng(0).integers(0, 255, (30, 16, 16, 3), np.uint8))
    ref = file_reference(net, str(tmp_path / "ref16.npz"), 16, "cpu")
    assert ref.features_ND.shape == (30, 128) and ref.mu.shape == (128,)


@pytest.mark.slow
def test_two_processes_sample_exactly_what_one_does(tmp_path, eval_cache):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tok, paths = models(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    common = ["--ckpt", paths["base"], "--tokenizer", tok, "--num-samples", "40", "--batch-size", "8",
              "--cache-dir", str(eval_cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", str(repo / "eval" / "fid.py"), *common, "--out-dir", str(tmp_path / "two")],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    evaluate(EvalSettings(ckpt=paths["base"], tokenizer=tok, num_samples=40, batch_size=8, cache_dir=str(eval_cache),
                          out_dir=str(tmp_path / "one")))
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_fid_without_ckpt_scores_the_demos_mclr_model_or_says_how(tmp_path, monkeypatch):
    """`python eval/fid.py --guidance none`, typed exactly as the project's mission names it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from eval.fid import default_checkpoint

    monkeypatch.chdir(tmp_path)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "eval" / "fid.py"),
                          "--guidance", "none"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--ckpt is required" in out.stderr and "make demo" in out.stderr
    older, newer = tmp_path / "runs/mnist/mclr-s0-aaaa", tmp_path / "runs/mnist/mclr-s1-bbbb"
    for d in (older, newer):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
    os.utime(older / "model.safetensors", (1, 1))
    assert default_checkpoint() == str(Path("runs/mnist/mclr-s1-bbbb/model.safetensors"))
