"""No silent failure, round 2 (issue 24): finished results are never retrained, replaced or mislabelled; a resume
never continues another run under a new name; a user's mistake is one line naming the key, flag or file, before
anything is written. Grouped as tests/test_failures.py is."""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_vae
from test_train import metrics, tiny_run_tree, write_cfg
from var_mclr.config import ConfigError, load_config
from var_mclr.train import train

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "configs" / "mnist"


def _run(tmp_path, name, fresh=False, tree_update=None, **train_overrides):
    tree = tiny_run_tree(tmp_path, name, **train_overrides)
    for section, values in (tree_update or {}).items():
        tree.setdefault(section, {}).update(values)
    return train(load_config(write_cfg(tmp_path, tree, name)), fresh=fresh)


def _folder(root: Path, per_class: int = 2, classes=("a", "b", "c"), splits=("train",), size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


def _folder_data(root: Path, **extra) -> dict:
    return {"name": "imagefolder", "root": str(root), "resolution": 16, **extra}


# ---- settings checked before anything is written ---------------------------------------------------------------
@pytest.mark.parametrize("override, says", [
    ("run.seed=-1", "run.seed = -1 is out of range"),
    ("run.seed=4294967296", "run.seed = 4294967296 is out of range"),
    ("loss.mclr.tau=0", "loss.mclr.tau = 0 is out of range: must be a number > 0 (0 caps every pair"),
    ("loss.mclr.negatives=all", "loss.mclr.negatives = all scores every mismatched class: loss.mclr.K must be "
                                "data.num_classes - 1 = 9, got 1"),
    ("data.num_classes=1", "train.objective = mclr contrasts each image's class with another class: it needs "
                           "data.num_classes >= 2, got 1"),
])
def test_settings_that_failed_at_step_0_are_refused_by_key(override, says):
    with pytest.raises(ConfigError) as err:
        load_config(MNIST / "mclr.yaml", [override], check_files=False)
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cca_on_one_class_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.objective = cca contrasts .* data.num_classes >= 2, got 1"):
        load_config(MNIST / "cca.yaml", ["data.num_classes=1"], check_files=False)


@pytest.mark.parametrize("override", ["run.seed=-1", "loss.mclr.negatives=all", "data.num_classes=1"])
def test_a_refused_setting_writes_nothing(tmp_path, override):
    tree = tiny_run_tree(tmp_path, "a", objective="mclr", steps=2)
    tree["loss"] = {"mclr": {"tau": 1.0}}
    with pytest.raises(ConfigError):
        train(load_config(write_cfg(tmp_path, tree, "a"), [override]))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("base", ["5", "[a.yaml]", "''"])
def test_base_must_name_one_file(tmp_path, base):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 1.0e-4\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(child, check_files=False)
    assert str(err.value).startswith(f"{child}: base = ") and "must be the path of one parent config file" in str(
        err.value)


def test_a_key_given_twice_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1.0e-4\nrun:\n  seed: 1\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, check_files=False)
    assert str(err.value) == f"{path}:5:1: malformed YAML: duplicate key 'train'"
    path.write_text("train:\n  lr: 1.0e-4\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r":3:3: malformed YAML: duplicate key 'lr'"):
        load_config(path, check_files=False)


# ---- image folders: classes by name, pixels read right, problems named before any work --------------------------
def test_val_classes_must_match_train_classes_by_name(tmp_path):
    from var_mclr.data import DataError, build_dataset

    root = _folder(tmp_path / "d", splits=("train", "val"))
    build_dataset(_folder_data(root), "val")  # the same names: fine
    (root / "val" / "b").rename(root / "val" / "d")  # three classes each, one renamed
    for split in ("train", "val"):
        with pytest.raises(DataError) as err:
            build_dataset(_folder_data(root, num_classes=3), split)
        msg = str(err.value)
        assert "only in train/: ['b']" in msg and "only in val/: ['d']" in msg and "\n" not in msg, msg


def test_sixteen_bit_grey_pngs_keep_their_values(tmp_path):
    from var_mclr.data import ImageFolderDataset

    (tmp_path / "train" / "a").mkdir(parents=True)
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "train" / "a" / "g16.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "train" / "a" / "g8.png")
    ds = ImageFolderDataset(str(tmp_path / "train"), resolution=16, train=False, crop="none")
    assert Image.open(ds.samples[0][0]).mode == "I;16"
    sixteen, eight = ds[0][0], ds[1][0]
    assert sixteen.min() < -0.9 and torch.allclose(sixteen, eight, atol=2 / 255)  # not all white


def test_float_images_are_refused_naming_the_file(tmp_path):
    from var_mclr.data import DataError, ImageFolderDataset

    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.random.rand(16, 16).astype(np.float32)).save(tmp_path / "train" / "a" / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: mode F \(32-bit float pixels\) cannot be read as an RGB image"):
        ImageFolderDataset(str(tmp_path / "train"), resolution=16, train=False)


@pytest.mark.parametrize("verify", [True, False])
def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch, verify):
    from var_mclr.data import DataError, ImageFolderDataset

    root = _folder(tmp_path / "d", classes=("a",))
    # A 14,000 x 14,000 image against PIL's limit of 89M pixels, made small: a 16 x 16 image against a limit of 100.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"0\.png: Image size \(256 pixels\) exceeds limit .* Downscale or remove it"):
        ds = ImageFolderDataset(str(root / "train"), resolution=16, train=False, verify=verify)
        ds[0]


def test_a_symlink_loop_is_named(tmp_path):
    from var_mclr.data import DataError, build_dataset

    root = _folder(tmp_path / "d")
    os.symlink(root / "train" / "loop", root / "train" / "loop")
    with pytest.raises(DataError, match=r"train/loop: cannot be read as a class directory \(Too many levels"):
        build_dataset(_folder_data(root), "train")


def test_one_image_per_class_cannot_be_held_out(tmp_path):
    from var_mclr.data import DataError, build_dataset

    root = _folder(tmp_path / "d", per_class=1)
    for split in ("train", "val"):  # the tokenizer reads train: it is refused too, before it trains
        with pytest.raises(DataError, match=r"data.heldout_share = 0.1: class directory .*train/a' holds 1 readable "
                                            r"image\(s\); holding part of it out needs at least 2"):
            build_dataset(_folder_data(root, heldout_share=0.1), split)


# ---- weights and their hyperparameters are one unit ---------------------------------------------------------------
def test_a_model_whose_json_copy_failed_to_write_still_loads(tmp_path, monkeypatch):
    import var_mclr.checkpoints as ck

    real = ck.atomic_write

    def full_disk_after_weights(path, write):
        if Path(path).suffix == ".json":
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(ck, "atomic_write", full_disk_after_weights)
    with pytest.raises(OSError, match="No space left"):
        ck.save_model(tiny_vae(), tmp_path / "tok", extra={"steps": 7})
    monkeypatch.undo()
    assert not (tmp_path / "tok.json").exists()
    assert ck.read_model_info(tmp_path / "tok.safetensors")["steps"] == 7
    assert ck.is_complete_result(tmp_path / "tok.safetensors")
    assert ck.load_model(tmp_path / "tok.safetensors").cfg == tiny_vae().cfg
    # A stale JSON copy (an older save) never overrides the hyperparameters written with the weights.
    (tmp_path / "tok.json").write_text(json.dumps({"kind": "var", "config": {}}))
    assert ck.read_model_info(tmp_path / "tok.safetensors")["kind"] == "vqvae"
