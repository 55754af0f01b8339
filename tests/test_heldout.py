"""Training length and held-out tracking (docs/method.md, "Training length"): train.epochs, run.eval_every,
train.keep = best_heldout and an image folder's data.heldout_share split."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_train import metrics, tiny_run_tree, write_cfg
from var_mclr.checkpoints import CheckpointError, read_model_info
from var_mclr.config import ConfigError, load_config
from var_mclr.data import build_dataset
from var_mclr.machine import cpu_model, machine_record
from var_mclr.train import steps_for_epochs, train

TRACKED = {"heldout_nll", "heldout_log_ratio", "train_nll", "train_log_ratio"}


def weights(path) -> dict:
    return load_file(path)


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def eval_rows(out_dir) -> list[dict]:
    return [r for r in metrics(out_dir) if "heldout_nll" in r]


def test_tracking_leaves_the_training_trajectory_unchanged(tmp_path):
    plain = train(load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, "plain", steps=8), "plain")))
    tree = tiny_run_tree(tmp_path, "tracked", steps=8)
    tree["run"].update(eval_every=3, eval_images=32)
    tracked = train(load_config(write_cfg(tmp_path, tree, "tracked")))
    assert same_weights(plain, tracked)
    rows = eval_rows(tmp_path / "tracked")
    assert [r["step"] for r in rows] == [2, 5, 7]  # after steps 3 and 6, and the last
    assert all(set(r) == {"step"} | TRACKED for r in rows)
    # training lowers the nll of the images it trains on
    assert rows[-1]["train_nll"] < rows[0]["train_nll"]


def test_keep_best_heldout_returns_the_lowest_heldout_nll_and_survives_a_resume(tmp_path):
    def tree(name, steps):
        t = tiny_run_tree(tmp_path, name, steps=steps, lr=3e-2, keep="best_heldout")  # a rate that overshoots
        t["run"].update(eval_every=2, eval_images=32)
        return t

    full = train(load_config(write_cfg(tmp_path, tree("full", 12), "full")))
    rows = eval_rows(tmp_path / "full")
    best = min(rows, key=lambda r: r["heldout_nll"])
    selected = read_model_info(full)["selected"]
    assert selected == {"step": best["step"] + 1, "heldout_nll": best["heldout_nll"]}
    # weights are bit-identical only on one CPU type and thread count, so the result names both
    assert read_model_info(full)["machine"] == machine_record() and machine_record()["cpu"] == cpu_model() != ""
    assert same_weights(full, tmp_path / "full" / "best.safetensors")
    if selected["step"] != 12:  # then the result is not simply the last weights
        assert not same_weights(full, tmp_path / "full" / "checkpoints" / "step_0000012" / "model.safetensors")

    # stop at step 8 (constant rate, so the first 8 steps are those of the 12-step run), then resume to 12
    train(load_config(write_cfg(tmp_path, tree("resumed", 8), "resumed8")))
    resumed = train(load_config(write_cfg(tmp_path, tree("resumed", 12), "resumed12")))
    assert read_model_info(resumed)["selected"] == selected
    assert same_weights(resumed, full)


def test_keep_best_heldout_without_tracking_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.keep = best_heldout needs run.eval_every"):
        load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, "x", keep="best_heldout"), "x"))


def test_epochs_set_the_number_of_steps(tmp_path):
    n = len(build_dataset({"name": "synthetic", "resolution": 16, "num_classes": 4}, "train"))
    tree = tiny_run_tree(tmp_path, "ep", epochs=0.5)
    cfg = load_config(write_cfg(tmp_path, tree, "ep"))
    given = cfg.to_dict()
    train(cfg)
    steps = math.ceil(0.5 * n / 16)
    assert steps_for_epochs(0.5, n, 16) == steps
    # the resolved step count lives in the run's copy and its saved config, never in the caller's config
    assert cfg.to_dict() == given and cfg.train.steps != steps
    assert load_config(tmp_path / "ep" / "config.yaml", check_files=False).train.steps == steps
    assert [r["step"] for r in metrics(tmp_path / "ep")] == list(range(steps))
    assert read_model_info(tmp_path / "ep" / "model.safetensors")["steps"] == steps


def _folder(root, per_class=(10, 3)):
    rng = np.random.default_rng(0)
    for c, n in enumerate(per_class):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / f"c{c}" / f"{i}.png")
    return root


def test_heldout_share_holds_out_the_last_images_of_every_class(tmp_path):
    root = _folder(tmp_path / "f")
    spec = {"name": "imagefolder", "root": str(root), "resolution": 8, "num_classes": 2, "heldout_share": 0.1}
    train_ds, val_ds = build_dataset(spec, "train"), build_dataset(spec, "val")
    train_files = {p for p, _ in train_ds.samples}
    val_files = {p for p, _ in val_ds.samples}
    assert not train_files & val_files and len(train_files | val_files) == 13
    # ceil(0.1 * 10) = 1 and ceil(0.1 * 3) = 1 held out; the last file of each class (sorted names)
    assert sorted(val_files) == sorted([str(root / "train" / "c0" / "9.png"), str(root / "train" / "c1" / "2.png")])
    assert [label for _, label in val_ds.samples] == [0, 1]
    with pytest.raises(ValueError, match="data.heldout_share"):
        build_dataset({**spec, "heldout_share": 0.0}, "val")


def test_tracking_a_folder_without_heldout_data_is_refused_before_training(tmp_path):
    root = _folder(tmp_path / "f")
    tree = tiny_run_tree(tmp_path, "fold")
    tree["data"] = {"name": "imagefolder", "root": str(root), "resolution": 16, "num_classes": 2}
    tree["run"]["eval_every"] = 2
    with pytest.raises(ConfigError, match="data.heldout_share"):
        load_config(write_cfg(tmp_path, tree, "fold"))
    tree["data"]["heldout_share"] = 0.1
    load_config(write_cfg(tmp_path, tree, "fold"))
    assert not (tmp_path / "fold").exists()


def test_a_best_file_from_another_evaluation_is_refused(tmp_path):
    tree = tiny_run_tree(tmp_path, "b", steps=4, keep="best_heldout")
    tree["run"].update(eval_every=2, eval_images=16)
    cfg_path = write_cfg(tmp_path, tree, "b")
    train(load_config(cfg_path))
    from safetensors.torch import load_file, save_file
    from var_mclr.checkpoints import INFO_KEY, read_model_info

    best = tmp_path / "b" / "best.safetensors"  # its hyperparameters travel inside it (checkpoints.save_model)
    info = read_model_info(best)
    info["selected"]["step"] = 99  # e.g. left by an earlier, different run
    save_file(load_file(best), best, metadata={INFO_KEY: json.dumps(info)})
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="best.safetensors holds the weights of"):
        train(load_config(cfg_path))
    assert not (tmp_path / "b" / "model.safetensors").exists()
