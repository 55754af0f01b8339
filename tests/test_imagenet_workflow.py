"""The README's "ImageNet, step by step" commands, run as written on random weights in the official layouts.

The commands are read out of README.md (between the imagenet-commands markers), so the README cannot drift from what
is tested. Only paths and sizes change:
- the official files come from a Hugging Face cache the test fills (HF_HUB_OFFLINE=1: nothing reaches the network):
  "vae_ch160v4096z32.pth" and "var_d16.pth" there are the golden fixture's tiny official-layout tokenizer and VAR;
- /data/imagenet is a 10-class ImageNet-style folder (train/<wnid>/*.JPEG and val/<wnid>/*.JPEG) of 12 px images;
- the Inception weights are random, in the TF-FID layout; the ADM reference batch is written in ADM's layout;
- sizes are appended as --set / flags (argparse and --set take the last value given).
One training command and one evaluation run on two CPU processes (accelerate launch --multi_gpu --num_processes 2,
gloo): the evaluation's processes write their own shards, the main one scores them all.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tf_inception_layout_net

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official_golden"
COMMIT = "0" * 40
WNIDS = [f"n0{1440764 + 17 * i}" for i in range(10)]
TOKENIZER_SIZES = ["tokenizer.vocab_size=64", "tokenizer.z_channels=8", "tokenizer.ch=32", "tokenizer.ch_mult=[1,1]",
                   "tokenizer.num_res_blocks=0", "tokenizer.v_patch_nums=[1,2,3,4,6]"]
TRAIN_SIZES = TOKENIZER_SIZES + [
    "model.depth=2", "model.embed_dim=32", "model.num_heads=4", "model.drop_path_rate=0.0",
    "data.resolution=12", "data.num_classes=10", "data.num_workers=0", "train.steps=2", "train.global_batch=4",
    "train.micro_batch=2", "train.warmup_steps=1", "train.mixed_precision=no", "run.eval_every=1",
    "run.eval_images=10", "run.log_every=1"]
EVAL_SIZES = ["--num-samples", "8", "--batch-size", "4"]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- imagenet-commands:begin -->")[1].split("<!-- imagenet-commands:end -->")[0]
    body = block.strip().removeprefix("```bash").removesuffix("```")
    return [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]


def fill_hub_cache(cache: Path) -> None:
    """The layout huggingface_hub reads offline: refs/main names a snapshot holding the files."""
    repo = cache / "models--FoundationVision--var"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snap / "vae_ch160v4096z32.pth").write_bytes((FIXTURE / "vae_tiny.pth").read_bytes())
    (snap / "var_d16.pth").write_bytes((FIXTURE / "var_tiny.pth").read_bytes())


def write_imagenet_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, wnid in enumerate(WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):  # each class its own colour, with noise: a JPEG like ImageNet's
                img = np.clip(rng.normal(25 * c, 30, (14, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)


def write_eval_files(work: Path) -> None:
    torch.save(tf_inception_layout_net().state_dict(), work / "pt_inception-2015-12-05-6726825d.pth")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    # ADM's reference batches hold images beside whole-dataset Inception statistics.
    np.savez(work / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=np.zeros(2048),
             sigma=np.eye(2048) * 1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localise(command: str, work: Path, data_root: Path, two_processes: bool) -> list[str]:
    """The README command with paths pointed at the test's files and sizes appended."""
    argv = shlex.split(command.replace("/data/imagenet", str(data_root)))
    bin_dir = Path(sys.executable).parent
    if argv[:2] == ["accelerate", "launch"]:
        launch = [str(bin_dir / "accelerate"), "launch", "--main_process_port", str(free_port())]
        launch += ["--multi_gpu", "--num_processes", "2"] if two_processes else ["--num_processes", "1"]
        argv = launch + argv[2:]
    elif argv[0] == "python":
        argv = [sys.executable] + argv[1:]
    argv = [str(REPO / a) if (a.endswith(".py") or a.startswith("configs/")) else a for a in argv]
    if "var_mclr/train.py" in command:
        return argv + [x for s in TRAIN_SIZES for x in ("--set", s)]
    if "eval/sample.py" in command:
        return argv + ["--classes", "2", "7", "--n", "2"]
    sizes = [x for s in TOKENIZER_SIZES for x in ("--set", s)] if "--tokenizer" in command else []
    if "eval/separation.py" in command:
        return argv + ["--max-images", "10", "--batch-size", "5"]
    return argv + EVAL_SIZES + sizes


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """Every README command, in order, in one working directory; returns it and the commands' outputs."""
    work = tmp_path_factory.mktemp("imagenet_workflow")
    fill_hub_cache(work / "hub")
    write_imagenet_folder(work / "imagenet")
    write_eval_files(work)
    env = {**os.environ, "HF_HUB_CACHE": str(work / "hub"), "HF_HOME": str(work / "hf_home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    outputs = []
    for command in readme_commands():
        two = "objective=cca" in command or ("fid.py" in command and "--guidance cfg" in command)
        argv = localise(command, work, work / "imagenet", two_processes=two)
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append((command, done.stdout, done.stderr))
    return work, outputs


def test_the_readme_lists_the_whole_workflow():
    commands = readme_commands()
    scripts = [next(a for a in shlex.split(c) if a.endswith(".py")) for c in commands]
    assert scripts.count("var_mclr/train.py") == 3 and {"eval/fid.py", "eval/separation.py", "eval/compare.py",
                                                         "eval/sample.py"} <= set(scripts)
    assert any("--guidance none" in c for c in commands if "fid.py" in c)
    assert any("--guidance cfg" in c for c in commands if "fid.py" in c)


def test_fine_tunes_of_the_official_weights_train_on_one_and_two_processes(workflow):
    work, outputs = workflow
    for run in ("var_d16_mclr", "var_d16_cca", "var_d16_cc_dpo"):
        info = json.loads((work / "runs" / run / "model.json").read_text())
        assert info["steps"] == 2 and info["tokenizer"]["checkpoint"].startswith("hf://FoundationVision/var/")
    cca_log = next(err for c, _, err in outputs if "objective=cca" in c)
    assert "world size 2" in cca_log.lower() or "2 processes" in cca_log.lower(), cca_log[-2000:]


def test_a_fine_tune_of_the_official_pth_is_evaluated_with_no_extra_flag(workflow):
    work, _ = workflow
    record = json.loads((work / "runs/var_d16_mclr/fid/metrics.json").read_text())
    assert record["checkpoint"]["tokenizer_check"] == "same as in training"
    assert record["checkpoint"]["vae"] == "hf://FoundationVision/var/vae_ch160v4096z32.pth"
    assert record["settings"]["num_classes"] == 10 and "cfg_scale" not in record["settings"]
    assert record["feature_network"]["name"] == "inception-v3-pool3" and np.isfinite(record["metrics"]["fid"])
    z = np.load(work / "runs/var_d16_mclr/fid/samples.npz")
    assert z["arr_0"].shape == (8, 12, 12, 3) and z["arr_0"].dtype == np.uint8 and len(z["arr_1"]) == 8
    assert not (work / "runs/var_d16_mclr/fid/shards").exists()  # samples.npz holds them now


def test_the_official_pair_is_evaluated_with_cfg_and_compared(workflow):
    work, outputs = workflow
    record = json.loads((work / "runs/var_d16_cfg1.5/fid/metrics.json").read_text())
    cfg_log = next(err for c, _, err in outputs if "fid.py" in c and "--guidance cfg" in c)
    assert "2 process(es)" in cfg_log and record["num_samples"] == 8
    assert record["settings"]["cfg_scale"] == 1.5 and record["settings"]["sampling"]["guidance"] == "cfg"
    assert record["metrics"]["transformer_passes_per_image"] == 2 * 5
    table = (work / "runs/var_d16_compare/table.md").read_text()
    for row in ("| base |", "| base+cfg1.5 |", "| mclr |", "| cca |", "| cc_dpo |"):
        assert row in table
    separation = json.loads(next(stdout for c, stdout, _ in outputs if "separation.py" in c))
    assert {"train", "heldout"} <= set(separation) and separation["heldout"]["num_images"] == 10


def test_samples_of_chosen_classes_are_written_with_a_labelled_grid(workflow):
    work, _ = workflow
    out = work / "runs/var_d16_mclr/samples-none-s0-2-7"
    assert sorted(p.name for p in out.glob("*.png")) == ["2_0.png", "2_1.png", "7_0.png", "7_1.png", "grid.png"]
    meta = json.loads((out / "sample.json").read_text())
    assert meta["class_names"] == {"2": WNIDS[2], "7": WNIDS[7]}
