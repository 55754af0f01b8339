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
    path.write_text("train:\n  ? [a, b]\n  : 1\n")  # a key the duplicate check cannot hash: PyYAML's own error
    with pytest.raises(ConfigError, match=r":2:5: malformed YAML: found unhashable key"):
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
    from var_mclr.data import DataError

    with pytest.raises(DataError, match="holding part of it out needs at least 2"):
        _tokenizer_run(tmp_path, root, "tok")
    assert not (tmp_path / "tok").exists()  # not even an empty run directory is left


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


def _tokenizer_run(tmp_path, root: Path, name: str, *sets: str):
    from var_mclr.train_tokenizer import train_tokenizer

    base = [f"data.root={root}", "data.num_classes=3", "tokenizer_train.steps=4", "tokenizer_train.batch_size=4",
            "tokenizer_train.warmup_steps=1", "run.ckpt_every=2", f"run.out_dir={tmp_path / name}"]
    return train_tokenizer(load_config(REPO / "configs/folder/tokenizer.yaml", [*base, *sets]))


def test_an_incomplete_tokenizer_result_is_rebuilt_from_its_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    from experiments.pipeline import run_stage
    from var_mclr.checkpoints import is_complete_result, read_model_info
    from var_mclr.files import tensors_sha256

    root = _folder(tmp_path / "d", per_class=3)
    out = _tokenizer_run(tmp_path, root, "tok")
    weights = load_file(out)
    # As an older version left it on a full disk: the weights without metadata, and no model.json beside them.
    save_file(weights, out)
    out.with_suffix(".json").unlink()
    assert not is_complete_result(out)
    rebuilt = []
    run_stage(None, out, lambda cfg: rebuilt.append(cfg) or out)  # the pipeline does not call it cached
    assert rebuilt == [None]
    _tokenizer_run(tmp_path, root, "tok")  # the rerun rebuilds it from the step-4 checkpoint instead of refusing
    assert read_model_info(out)["steps"] == 4 and out.with_suffix(".json").is_file()
    assert tensors_sha256(load_file(out)) == tensors_sha256(weights)


# ---- a finished result is never retrained or relabelled; a resume never continues another run --------------------
def test_a_finished_run_whose_checkpoints_were_deleted_is_not_retrained(tmp_path):
    _run(tmp_path, "a", steps=3)
    before = {n: (tmp_path / "a" / n).read_bytes() for n in ("model.safetensors", "model.json", "metrics.jsonl")}
    shutil.rmtree(tmp_path / "a" / "checkpoints")  # to save disk
    from var_mclr.run_dir import RunDirError

    with pytest.raises(RunDirError, match=r"model.safetensors is a finished result and .*checkpoints is gone.*"
                                          r"nothing was overwritten.*--fresh"):
        _run(tmp_path, "a", steps=5, lr=1e-3)
    assert before == {n: (tmp_path / "a" / n).read_bytes() for n in before}
    _run(tmp_path, "a", fresh=True, steps=2)  # --fresh still replaces it, on request
    assert json.loads((tmp_path / "a" / "model.json").read_text())["steps"] == 2


def test_a_resume_past_the_steps_asked_for_is_refused(tmp_path):
    from var_mclr.run_dir import RunDirError

    _run(tmp_path, "a", steps=6)
    with pytest.raises(RunDirError, match=r"step_0000006 is at step 6, past the 3 steps asked for"):
        _run(tmp_path, "a", steps=3)
    assert json.loads((tmp_path / "a" / "model.json").read_text())["steps"] == 6


@pytest.mark.parametrize("swap", ["another file", "same path, other weights"])
def test_a_resume_from_another_tokenizer_is_refused(tmp_path, swap):
    from var_mclr.checkpoints import save_model
    from var_mclr.run_dir import RunDirError

    _run(tmp_path, "a", steps=4)
    other = tmp_path / ("tok2.safetensors" if swap == "another file" else "tok.safetensors")
    save_model(tiny_vae(seed=1), other)  # the same architecture, other codes
    with pytest.raises(RunDirError, match=r"step_0000004 was trained from tokenizer.checkpoint .* resuming would "
                                          r"continue it from other files"):
        _run(tmp_path, "a", steps=8, tree_update={"tokenizer": {"checkpoint": str(other)}})
    assert json.loads((tmp_path / "a" / "model.json").read_text())["steps"] == 4


def test_a_deleted_config_yaml_does_not_let_another_objective_resume(tmp_path):
    from var_mclr.run_dir import RunDirError

    _run(tmp_path, "a", steps=4)
    (tmp_path / "a" / "config.yaml").unlink()
    (tmp_path / "a" / "model.safetensors").unlink()  # every record but the checkpoint's
    (tmp_path / "a" / "model.json").unlink()
    with pytest.raises(RunDirError, match=r"train.objective: 'nll' -> 'mclr'; recorded in state.json"):
        _run(tmp_path, "a", steps=8, objective="mclr")


def test_a_tokenizer_resume_on_other_images_is_refused_and_other_changes_are_recorded(tmp_path, caplog):
    from var_mclr.run_dir import RunDirError

    root, other = _folder(tmp_path / "d", per_class=3), _folder(tmp_path / "e", per_class=3)
    _tokenizer_run(tmp_path, root, "tok")
    for name in ("model.safetensors", "model.json"):  # killed after its step-2 checkpoint
        (tmp_path / "tok" / name).unlink()
    shutil.rmtree(tmp_path / "tok" / "checkpoints" / "step_0000004")
    with pytest.raises(RunDirError, match=r"data.root: '.*/d' -> '.*/e'"):
        _tokenizer_run(tmp_path, other, "tok")
    with caplog.at_level(logging.WARNING, logger="var_mclr.run_dir"):
        out = _tokenizer_run(tmp_path, root, "tok", "tokenizer_train.lr=0.001")
    assert any("tokenizer_train.lr: 0.0003 -> 0.001" in r.getMessage() for r in caplog.records)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["config_history"] == [{"step": 2, "changed": {"tokenizer_train.lr": [0.0003, 0.001]}}]


def test_a_fixed_cap_below_the_starting_ratios_is_refused(tmp_path, monkeypatch):
    import var_mclr.objectives.mclr as calibration
    from conftest import tiny_var
    from var_mclr.checkpoints import save_model

    base = tmp_path / "base.safetensors"
    save_model(tiny_var(tiny_vae(), num_classes=4), base)
    # A base whose training pairs all start at a log-ratio of 0.5 nats per token (a tiny base barely separates).
    monkeypatch.setattr(calibration, "log_ratios_per_token", lambda *a, **k: [torch.full((64,), 0.5)])
    tree = tiny_run_tree(tmp_path, "a", objective="mclr", steps=2)
    tree["model"]["init"] = str(base)
    tree["loss"] = {"mclr": {"tau": 0.05}}
    with pytest.raises(ConfigError) as err:
        train(load_config(write_cfg(tmp_path, tree, "a")))
    assert str(err.value) == ("loss.mclr.tau = 0.05 caps 100% of the training pairs from step 0 (the starting model's "
                              "mean log-ratio per token is 0.5), so MCLR would be the nll control; use loss.mclr.tau "
                              "= auto (2 x the mean) or a number above 0.5")
    assert not (tmp_path / "a").exists()  # refused before anything was written: not even an empty directory
    tree["loss"]["mclr"]["tau"] = 1.0  # above the starting ratios: trains
    train(load_config(write_cfg(tmp_path, tree, "a")))


# ---- run.out_dir that cannot hold a run ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_out_dir_that_cannot_hold_a_run_is_named(tmp_path, monkeypatch, case):
    import errno

    from var_mclr.run_dir import RunDirError

    (tmp_path / "f").write_text("not a directory")
    name = {"a file": "f", "under a file": "f/run", "read-only": "ro/run"}[case]
    if case == "read-only":  # as on a read-only mount (root ignores permission bits)
        real = Path.mkdir

        def read_only(self, *args, **kwargs):
            if "ro" in self.parts:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunDirError) as err:
        _run(tmp_path, "x", steps=1, tree_update={"run": {"out_dir": str(tmp_path / name)}})
    assert str(err.value).startswith(f"run.out_dir {tmp_path / name} cannot hold a run: ") and "\n" not in str(
        err.value), str(err.value)
    assert ("it is a file, not a directory" in str(err.value)) == (case == "a file")


# ---- the pipeline: every setting checked before the first stage trains ------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--seeds"], "--seeds needs at least one training seed"),
    (["--num-samples", "0"], "--num-samples = 0 is out of range"),
    (["--cfg-scales", "1", "nan"], "--cfg-scales = [1.0, nan] is out of range"),
    (["--seeds", "0", "-1"], "run.seed = -1 is out of range"),
    (["--set", "loss.mclr.negatives=all"], "loss.mclr.negatives = all scores every mismatched class"),  # mclr only
])
def test_pipeline_settings_are_checked_before_any_stage(tmp_path, capsys, argv, says):
    from experiments.pipeline import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: ") and says in err[-1], err
    assert not (tmp_path / "runs").exists()


def test_pipeline_on_a_folder_checks_its_classes_before_any_stage(tmp_path, capsys):
    from experiments.pipeline import main

    root = _folder(tmp_path / "d", splits=("train", "val"))
    (root / "val" / "b").rename(root / "val" / "d")
    with pytest.raises(SystemExit):
        main(["--data", "imagefolder", "--root", str(root), "--out", str(tmp_path / "runs")])
    assert "only in val/: ['d']" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_truncated_cached_comparison_is_named_and_compared_again(tmp_path, caplog):
    from experiments.pipeline import _cached_results

    path = tmp_path / "results.json"
    path.write_text('[{"name": "base", "fid": 3.1}, {"name": "mc')
    with caplog.at_level(logging.WARNING, logger="experiments.pipeline"):
        assert _cached_results(path) is None
    assert any(str(path) in r.getMessage() and "comparing again" in r.getMessage() for r in caplog.records)
    path.write_text('[{"name": "base", "fid": 3.1}]')
    assert _cached_results(path) == [{"name": "base", "fid": 3.1}]


def test_the_same_folder_spelled_with_a_trailing_slash_resumes(tmp_path):
    root = _folder(tmp_path / "d", per_class=3)
    _tokenizer_run(tmp_path, root, "tok")
    for name in ("model.safetensors", "model.json"):
        (tmp_path / "tok" / name).unlink()
    _tokenizer_run(tmp_path, f"{root}/", "tok")  # resumes from step 4: no refusal


def test_a_resume_from_another_model_init_is_refused(tmp_path):
    from conftest import tiny_var
    from var_mclr.checkpoints import save_model
    from var_mclr.run_dir import RunDirError

    for name, seed in (("b1", 0), ("b2", 1)):
        save_model(tiny_var(tiny_vae(), num_classes=4, seed=seed), tmp_path / f"{name}.safetensors")
    _run(tmp_path, "ft", steps=4, tree_update={"model": {"init": str(tmp_path / "b1.safetensors")}})
    with pytest.raises(RunDirError, match=r"step_0000004 was trained from model.init .*b1.safetensors and this config "
                                          r"gives .*b2.safetensors"):
        _run(tmp_path, "ft", steps=8, tree_update={"model": {"init": str(tmp_path / "b2.safetensors")}})


def test_a_truncated_token_cache_is_named_and_encoded_again(tmp_path, caplog):
    from var_mclr.data import build_dataset
    from var_mclr.tokens import TokenStore

    ds = build_dataset({"name": "synthetic", "resolution": 16, "num_classes": 4}, "train")
    first = TokenStore(ds, tiny_vae(), torch.device("cpu"), str(tmp_path), "k", with_flips=False)
    (path,) = tmp_path.glob("tokens-*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="var_mclr.tokens"):
        again = TokenStore(ds, tiny_vae(), torch.device("cpu"), str(tmp_path), "k", with_flips=False)
    assert any(str(path) in r.getMessage() and "encoding again" in r.getMessage() for r in caplog.records)
    assert torch.equal(first.idx_NL, again.idx_NL)
    TokenStore(ds, tiny_vae(), torch.device("cpu"), str(tmp_path), "k", with_flips=False)  # rewritten: a hit
