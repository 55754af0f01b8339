"""loss.mclr.tau = auto (docs/method.md, "The cap"): the cap is measured on the starting model's training pairs,
recorded in the run's config, kept on resume, and refused when the model does not separate classes."""
import pytest
import torch
import yaml

import var_mclr.objectives.mclr as calibration
from conftest import tiny_vae, tiny_var
from test_train import tiny_run_tree
from var_mclr.objectives.mclr import mean_log_ratio_per_token
from var_mclr.checkpoints import save_model
from var_mclr.config import ConfigError, load_config
from var_mclr.data import build_dataset
from var_mclr.likelihood import loglik_under_classes
from var_mclr.objectives import LossConfig
from var_mclr.tokens import TokenStore
from var_mclr.train import train


def test_mean_log_ratio_is_the_mean_over_training_pairs():
    vae = tiny_vae()
    var = tiny_var(vae, num_classes=4)
    ds = build_dataset({"name": "synthetic", "resolution": 16, "num_classes": 4}, "train")
    tokens = TokenStore(ds, vae, torch.device("cpu"), cache_dir=None, data_key="t", with_flips=False)
    cfg = LossConfig()
    cfg.mclr.negatives = "roll"  # deterministic negatives, so the expectation can be recomputed here
    n = 48
    got = mean_log_ratio_per_token(var, tokens, cfg, 4, seed=3, num_images=n, batch_size=16)

    chosen = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(3))[:n]
    ratios = []
    for part in chosen.split(16):
        labels = tokens.labels_N[part]
        idx_BL, x = tokens.batch(part)
        rolled = torch.roll(labels, -1)
        with torch.no_grad():
            l = loglik_under_classes(var, torch.stack((labels, rolled), 1), x, idx_BL)
        keep = rolled != labels
        ratios.append(((l[:, 0] - l[:, 1]) / idx_BL.shape[1])[keep])
    assert got == pytest.approx(float(torch.cat(ratios).mean()), rel=1e-5)


def _mclr_tree(tmp_path, name, base_ckpt, **loss):
    tree = tiny_run_tree(tmp_path, name, objective="mclr", steps=4)
    tree["model"]["init"] = str(base_ckpt)
    tree["loss"] = {"mclr": {"lam": 1.0, **loss}}
    tree["run"]["ckpt_every"] = 2
    return tree


def _base(tmp_path):
    path = tmp_path / "base.safetensors"
    save_model(tiny_var(tiny_vae(), num_classes=4), path)
    return path


def _load(tmp_path, tree, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path)


def test_auto_tau_is_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    measured = []

    def fake_mean(*args, **kwargs):
        measured.append(1)
        return 0.7

    monkeypatch.setattr(calibration, "mean_log_ratio_per_token", fake_mean)
    tree = _mclr_tree(tmp_path, "run", _base(tmp_path), tau="auto", tau_multiple=3.0)
    train(_load(tmp_path, tree, "a"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["loss"]["mclr"]["tau"] == pytest.approx(2.1) and measured == [1]

    # a longer rerun resumes from the step-4 checkpoint with the recorded cap, without measuring again
    tree["train"]["steps"] = 6
    train(_load(tmp_path, tree, "b"))
    assert measured == [1]


def test_auto_tau_refuses_a_model_that_does_not_separate_classes(tmp_path):
    base = tmp_path / "flat.safetensors"
    var = tiny_var(tiny_vae(), num_classes=4)
    with torch.no_grad():
        var.class_emb.weight.zero_()  # every class conditions identically: all log-ratios are exactly 0
    save_model(var, base)
    with pytest.raises(ValueError, match="loss.mclr.tau = auto"):
        train(_load(tmp_path, _mclr_tree(tmp_path, "flat", base, tau="auto"), "flat"))
    assert not (tmp_path / "flat" / "config.yaml").exists()


def test_tau_values_are_checked(tmp_path):
    tree = _mclr_tree(tmp_path, "x", _base(tmp_path), tau="autoo")
    with pytest.raises(ConfigError, match="loss.mclr.tau"):
        _load(tmp_path, tree, "x")
    tree["loss"]["mclr"].update(tau="auto", tau_multiple=0)
    with pytest.raises(ConfigError, match="tau_multiple"):
        _load(tmp_path, tree, "x")
