"""No silent failure (issue 14): settings that would train wrong, malformed files, poisoned checkpoints, stale caches
and concurrent runs each end in a one-line error naming the key, flag or file, or the run recovers correctly."""
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from test_train import metrics, tiny_run_tree, write_cfg
from var_mclr.config import ConfigError, load_config
from var_mclr.train import train

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "configs" / "mnist"


# ---- settings checked before anything is written ---------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.grad_clip=-1", "train.grad_clip"), ("train.grad_clip=0", "train.grad_clip"),
    ("train.min_lr_ratio=-2", "train.min_lr_ratio"), ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.weight_decay=-1", "train.weight_decay"), ("train.warmup_steps=-3", "train.warmup_steps"),
    ("train.lr=0", "train.lr"), ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.betas=[0.9, 1.0]", "train.betas"), ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row"),
    ("loss.mclr.tau=-1", "loss.mclr.tau"), ("loss.mclr.lam=-1", "loss.mclr.lam"), ("loss.cca.lam=-1", "loss.cca.lam"),
    ("loss.cca.beta=0", "loss.cca.beta"), ("loss.cca.uncond_ratio=1", "loss.cca.uncond_ratio"),
    ("loss.cc_dpo.beta=-0.1", "loss.cc_dpo.beta"), ("loss.unlearning.lam=-1", "loss.unlearning.lam"),
    ("run.ckpt_every=0", "run.ckpt_every"), ("run.log_every=0", "run.log_every"),
    ("run.keep_ckpts=0", "run.keep_ckpts"), ("tokenizer_train.steps=0", "tokenizer_train.steps"),
    ("tokenizer_train.batch_size=0", "tokenizer_train.batch_size"),
])
def test_values_that_would_train_wrong_are_refused_by_key_and_range(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(MNIST / "mclr.yaml", [override], check_files=False)
    msg = str(err.value)
    assert "\n" not in msg and f"{key} = " in msg and "must be" in msg, msg


def test_allowed_edges_are_accepted():
    cfg = load_config(MNIST / "mclr.yaml", ["train.grad_clip=.inf", "train.min_lr_ratio=0", "train.weight_decay=0",
                                            "loss.mclr.tau=1e-3", "loss.mclr.tau=null", "loss.mclr.lam=0"],
                      check_files=False)
    assert math.isinf(cfg.train.grad_clip) and cfg.loss.mclr.tau is None


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-4\n  steps: [1, 2\nrun:\n  seed: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}:") and "malformed YAML" in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match=r"override 'train.betas=\[0.9'.*malformed YAML"):
        load_config(MNIST / "mclr.yaml", ["train.betas=[0.9"], check_files=False)


# ---- non-finite weights are never written, called good, resumed from or scored ----------------------------------
def _run(tmp_path, name, fresh=False, **train_overrides):
    cfg = load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, name, **train_overrides), name))
    return train(cfg, fresh=True) if fresh else train(cfg)


def test_a_learning_rate_that_blows_up_the_weights_saves_nothing_and_says_so(tmp_path):
    from var_mclr.train import NonFiniteLossError

    # lr 1e3: after two updates the weights are finite but enormous and every loss is NaN.
    with pytest.raises(NonFiniteLossError, match="final weights were not saved. No good checkpoint"):
        _run(tmp_path, "hot", steps=8, lr=1e3)
    assert not (tmp_path / "hot" / "model.safetensors").exists()
    assert not list((tmp_path / "hot").glob("checkpoints/step_*"))


def test_nonfinite_parameters_stop_the_run_naming_the_last_finite_checkpoint(tmp_path, monkeypatch):
    import var_mclr.train as train_module
    from var_mclr.train import NonFiniteLossError

    real = train_module.make_optimizer

    def poisoning(cfg, var):  # the 6th update leaves a NaN weight behind
        opt, calls = real(cfg, var), {"n": 0}

        def poison(*_):
            calls["n"] += 1
            if calls["n"] == 6:
                with torch.no_grad():
                    next(var.parameters()).view(-1)[0] = float("nan")

        opt.register_step_post_hook(poison)
        return opt

    monkeypatch.setattr(train_module, "make_optimizer", poisoning)
    with pytest.raises(NonFiniteLossError) as err:
        _run(tmp_path, "nan", steps=12)
    msg = str(err.value)
    assert "parameters hold" in msg and "last good checkpoint is" in msg and msg.endswith(
        "lower train.lr or check the objective's settings") and "step_0000004" in msg, msg
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").glob("step_*")] == ["step_0000004"]
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("damage", ["truncated", "nonfinite"])
def test_resume_falls_back_past_an_unusable_newest_checkpoint(tmp_path, caplog, damage):
    full = _run(tmp_path, "full", steps=12)
    _run(tmp_path, "a", steps=8)
    newest = tmp_path / "a" / "checkpoints" / "step_0000008" / "model.safetensors"
    if damage == "truncated":  # a disk that filled up, not a kill: the file is there but cut short
        newest.write_bytes(newest.read_bytes()[:1000])
    else:  # written by a version that saved whatever the weights held
        weights = load_file(newest)
        weights["head.weight"][0, 0] = float("inf")
        save_file(weights, newest)
    with caplog.at_level(logging.WARNING, logger="var_mclr.train_state"):
        _run(tmp_path, "a", steps=12)
    assert any("step_0000008" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert _same_weights(tmp_path / "a" / "model.safetensors", full)
    assert [r["step"] for r in metrics(tmp_path / "a")] == list(range(12))


def test_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    from var_mclr.checkpoints import CheckpointError

    _run(tmp_path, "a", steps=8)
    for ckpt in (tmp_path / "a" / "checkpoints").glob("step_*"):
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_0000008: .*step_0000004: .*--fresh"):
        _run(tmp_path, "a", steps=12)


def test_eval_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, eval_cache):
    from conftest import tiny_vae, tiny_var
    from eval.fid import evaluate
    from eval.settings import EvalSettings
    from var_mclr.checkpoints import CheckpointError, save_model

    vae = tiny_vae()
    save_model(vae, tmp_path / "tok")
    var = tiny_var(vae, num_classes=4)
    with torch.no_grad():
        var.head.weight[0, 0] = float("nan")
    path = save_model(var, tmp_path / "nan")
    with pytest.raises(CheckpointError) as err:
        evaluate(EvalSettings(ckpt=str(path), tokenizer=str(tmp_path / "tok.safetensors"), num_samples=16,
                              batch_size=16, cache_dir=str(eval_cache), out_dir=str(tmp_path / "out")))
    assert str(err.value).startswith(f"{path} holds non-finite weights") and "head.weight" in str(err.value)
    assert not (tmp_path / "out").exists()


# ---- metrics.jsonl: no duplicated or torn lines stop or spoil a resume ------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_does_not_duplicate_metrics(tmp_path):
    _run(tmp_path, "a", steps=3)
    (tmp_path / "a" / "model.safetensors").unlink()
    shutil.rmtree(tmp_path / "a" / "checkpoints")  # as if killed at step 3 of a run checkpointing every 4
    _run(tmp_path, "a", steps=3)
    assert [r["step"] for r in metrics(tmp_path / "a")] == [0, 1, 2]


def test_a_torn_last_metrics_line_does_not_stop_the_resume(tmp_path):
    _run(tmp_path, "a", steps=6)
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step_0000006")
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1')  # killed mid-write
    _run(tmp_path, "a", steps=8)
    assert [r["step"] for r in metrics(tmp_path / "a")] == list(range(8))


# ---- one run per directory; a directory keeps its objective and architecture ------------------------------------
def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(tmp_path):
    from var_mclr.run_dir import RunDirError, run_dir_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from var_mclr.run_dir import run_dir_lock\n"
                               "with run_dir_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(300)",
                               str(tmp_path / "a")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"{tmp_path / 'a'} is in use by another run \(PID {holder.pid} "):
            _run(tmp_path, "a", steps=2)
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    _run(tmp_path, "a", steps=2)  # the holder died without releasing: its lock is taken over
    assert not (tmp_path / "a" / ".lock").exists()  # released at the end
    with run_dir_lock(tmp_path / "a"), pytest.raises(RunDirError, match=f"PID {os.getpid()} "):
        _run(tmp_path, "a", steps=2)


@pytest.mark.parametrize("change", [{"objective": "cca"}, {"depth": 3}])
def test_a_run_directory_refuses_another_objective_or_architecture_unless_fresh(tmp_path, change):
    from var_mclr.run_dir import RunDirError

    _run(tmp_path, "a", steps=2)
    tree = tiny_run_tree(tmp_path, "a", steps=2, **{k: v for k, v in change.items() if k == "objective"})
    tree["model"].update({k: v for k, v in change.items() if k == "depth"})
    cfg = load_config(write_cfg(tmp_path, tree, "changed"))
    key = "train.objective" if "objective" in change else "model.depth"
    with pytest.raises(RunDirError, match=rf"holds a run of another objective or architecture \({key}: .*--fresh"):
        train(cfg)
    train(cfg, fresh=True)
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    info = json.loads((tmp_path / "a" / "model.json").read_text())
    assert saved == info["source_config"] == cfg.to_dict()
    assert [r["step"] for r in metrics(tmp_path / "a")] == [0, 1]


def test_model_init_of_another_depth_is_an_error_naming_the_key(tmp_path):
    from var_mclr.checkpoints import CheckpointError

    depth2 = _run(tmp_path, "d2", steps=1)
    tree = tiny_run_tree(tmp_path, "d4", steps=1)
    tree["model"].update(depth=4, init=str(depth2))
    with pytest.raises(CheckpointError, match="model.depth: config 4, checkpoint 2"):
        train(load_config(write_cfg(tmp_path, tree, "d4")))


# ---- the token cache is keyed by what determines the tokens; bad images keep their labels ------------------------
def _image_folder(root: Path, seed: int, per_class: int = 3) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in range(4):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(18, 18, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "train" / f"c{c}" / f"{i}.png")
    return root


def test_two_image_folders_of_the_same_size_do_not_share_a_token_cache(tmp_path, caplog):
    from var_mclr.data import build_dataset
    from var_mclr.tokens import TokenStore
    from conftest import tiny_vae

    vae = tiny_vae()
    cache = tmp_path / "runs" / "token_cache"
    stores = []
    with caplog.at_level(logging.INFO, logger="var_mclr.tokens"):
        for seed, name in enumerate(("a", "b", "a")):
            ds = build_dataset({"name": "imagefolder", "root": str(_image_folder(tmp_path / name, seed)
                                                                  if seed < 2 else tmp_path / name),
                                "resolution": 16, "num_classes": 4}, "train")
            caplog.clear()
            stores.append(TokenStore(ds, vae, torch.device("cpu"), str(cache), "imagefolder-16-train", False))
            hit = any("token cache hit" in r.getMessage() for r in caplog.records)
            assert hit == (name == "a" and len(stores) == 3), name
    assert len(list(cache.glob("tokens-*.safetensors"))) == 2
    assert not torch.equal(stores[0].idx_NL, stores[1].idx_NL) and torch.equal(stores[0].idx_NL, stores[2].idx_NL)


def test_a_truncated_image_is_replaced_within_its_class(tmp_path):
    from var_mclr.data import ImageFolderDataset
    from var_mclr.tokens import dataset_labels

    from PIL import Image

    root = _image_folder(tmp_path / "data", 0)
    pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "train" / "c1" / "z.jpg")
    jpeg = (root / "train" / "c1" / "z.jpg").read_bytes()
    (root / "train" / "c1" / "z.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # passes the header check, fails to decode
    ds = ImageFolderDataset(str(root / "train"), resolution=16, train=False)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("z.jpg")][0]
    assert bad + 1 < len(ds) and ds.samples[bad + 1][1] != ds.samples[bad][1]  # the next image is another class's
    x, label = ds[bad]
    assert label == dataset_labels(ds)[bad] == 1 and ds.num_skipped == 1
    assert any(torch.equal(x, ds[i][0]) for i in range(len(ds)) if ds.samples[i][1] == 1 and i != bad)


# ---- files keep the user's umask ------------------------------------------------------------------------------
def test_run_outputs_keep_the_users_umask(tmp_path):
    old = os.umask(0o002)  # group-writable, world-readable: a shared results directory
    try:
        _run(tmp_path, "a", steps=4)
    finally:
        os.umask(old)
    wrong = [f"{p.relative_to(tmp_path)} {oct(p.stat().st_mode & 0o777)}" for p in (tmp_path / "a").rglob("*")
             if p.stat().st_mode & 0o777 != (0o775 if p.is_dir() else 0o664)]
    assert not wrong, wrong


# ---- every entry point: a user error is one line on stderr, --debug shows the traceback -------------------------
def _entry(module: str):
    import importlib

    return importlib.import_module(module).main


def _bad_commands(tmp_path, eval_cache) -> dict[str, tuple[str, list[str], str]]:
    from test_eval import models

    tok, paths = models(tmp_path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: [1e-4\n")
    fid = ["--ckpt", paths["base"], "--tokenizer", tok, "--cache-dir", str(eval_cache), "--out-dir",
           str(tmp_path / "eval"), "--num-samples", "16", "--batch-size", "16"]
    return {
        "train-yaml": ("var_mclr.train", ["--cfg", str(bad_yaml)], f"{bad_yaml}:3:1: malformed YAML"),
        "train-range": ("var_mclr.train", ["--cfg", str(write_cfg(tmp_path, tiny_run_tree(tmp_path, "r"), "r")),
                                           "--set", "train.grad_clip=-1"],
                        "train.grad_clip = -1.0 is out of range: must be > 0"),
        "tokenizer": ("var_mclr.train_tokenizer", ["--cfg", str(MNIST / "tokenizer.yaml"), "--set",
                                                   "tokenizer_train.steps=0"], "tokenizer_train.steps = 0 is out"),
        "fid-num-samples": ("eval.fid", [*fid, "--num-samples", "0"], "--num-samples = 0 is out of range"),
        "fid-batch-size": ("eval.fid", [*fid, "--batch-size", "0"], "--batch-size = 0 is out of range"),
        "fid-cfg-nan": ("eval.fid", [*fid, "--guidance", "cfg", "--cfg-scale", "nan"], "--cfg-scale = nan is out"),
        "fid-cfg-inf": ("eval.fid", [*fid, "--guidance", "cfg", "--cfg-scale", "inf"], "--cfg-scale = inf is out"),
        "fid-reference": ("eval.fid", [*fid, "--reference", str(tmp_path / "ref.npz")],
                          "--reference is used only with --features inception or dinov2"),
        "compare": ("eval.compare", ["--base", paths["base"], "--tokenizer", tok, "--cfg-scales", "1", "nan",
                                     "--out-dir", str(tmp_path / "cmp")], "--cfg-scales = [1.0, nan] is out of range"),
        "separation": ("eval.separation", ["--ckpt", str(tmp_path / "missing.safetensors")],
                       f"checkpoint not found: {tmp_path / 'missing.safetensors'}"),
        "demo": ("experiments.demo", ["--root", str(tmp_path / "demo"), "--set", "run.ckpt_every=0"],
                 "run.ckpt_every = 0 is out of range: must be an integer > 0"),
    }


CASES = ("train-yaml", "train-range", "tokenizer", "fid-num-samples", "fid-batch-size", "fid-cfg-nan", "fid-cfg-inf",
         "fid-reference", "compare", "separation", "demo")


@pytest.mark.parametrize("case", CASES)
def test_user_errors_print_one_line_from_every_entry_point(tmp_path, eval_cache, capsys, case):
    module, argv, says = _bad_commands(tmp_path, eval_cache)[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _entry(module)(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "cmp").exists()  # refused before any output


def test_debug_shows_the_traceback(tmp_path, eval_cache):
    from var_mclr.errors import UserError

    module, argv, _ = _bad_commands(tmp_path, eval_cache)["fid-num-samples"]
    with pytest.raises(UserError, match="--num-samples"):
        _entry(module)([*argv, "--debug"])


def test_a_held_run_directory_is_one_line_from_the_training_command(tmp_path, capsys):
    from var_mclr.run_dir import run_dir_lock

    cfg = write_cfg(tmp_path, tiny_run_tree(tmp_path, "a", steps=2), "a")
    with run_dir_lock(tmp_path / "a"), pytest.raises(SystemExit):
        _entry("var_mclr.train")(["--cfg", str(cfg)])
    assert f"is in use by another run (PID {os.getpid()}" in capsys.readouterr().err.strip().splitlines()[-1]
