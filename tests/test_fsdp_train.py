"""var_mclr/train.py under FSDP2 through accelerate against DDP, two CPU processes (gloo), one tiny CCA run each.

The DDP run is `accelerate launch --multi_gpu --num_processes 2 var_mclr/train.py`; the FSDP run is `accelerate
launch --config_file configs/accelerate/fsdp.yaml --num_processes 2`, through tests/fsdp_cpu_train.py, which only
admits accelerate's FSDP on CPU processes (tests/accelerate_fsdp_on_cpu.py: accelerate shards only on GPUs). Both
accumulate two micro-batches, clip, track held-out images (keeping the best: best.safetensors, loaded back as the
result) and checkpoint; CCA brings the frozen reference model.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_imagenet_workflow import free_port
from test_train import tiny_run_tree, write_cfg

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# float32 on both: the only differences are reduction orders (all-reduce against reduce-scatter) and AdamW's, so
# per-step losses agree to ~1e-6 relative; 1e-4 leaves room for four steps of drift and fails on any real error
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4
# A log-ratio or margin is a difference of two log-likelihoods of a few nats per token, near 0 here: float32
# reduction order and the CPU's GEMM blocking move it by up to 1.9e-6 absolute after 2 steps (an AVX-512 Xeon; 2.5e-7
# under torch 2.8 on an earlier machine). One step moves the margin by ~3e-3 here: a wrong gradient shows far above 1e-5
LOG_RATIO_ATOL = 1e-5


def _launch(kind: str, cfg: Path, cwd: Path) -> None:
    if kind == "ddp":
        argv = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
                str(REPO / "var_mclr" / "train.py")]
    else:
        argv = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
                "--num_processes", "2", "--main_process_port", str(free_port()), str(REPO / "tests" / "fsdp_cpu_train.py")]
    done = subprocess.run(argv + ["--cfg", str(cfg)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{kind}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stderr


def _tree(tmp_path: Path, name: str) -> dict:
    tree = tiny_run_tree(tmp_path, name, objective="cca", steps=4, global_batch=8, micro_batch=2, grad_clip=0.05,
                         mixed_precision="no", keep="best_heldout")
    tree["run"].update({"ckpt_every": 2, "keep_ckpts": 2, "eval_every": 2, "eval_images": 6})
    tree["loss"] = {"cca": {"beta": 0.02, "lam": 50.0}}
    return tree


def _train_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_train")
    out = {}
    for kind in ("ddp", "fsdp"):
        cfg = write_cfg(tmp, _tree(tmp, kind), kind)
        log = _launch(kind, cfg, tmp)
        out[kind] = (tmp / kind, cfg, log)
    return tmp, out


def test_fsdp_logs_that_it_shards_and_trains_like_ddp_step_by_step(runs):
    _, out = runs
    assert "world size 2 (DistributedType.FSDP)" in out["fsdp"][2]
    assert "world size 2 (DistributedType.MULTI_CPU)" in out["ddp"][2]
    ddp, fsdp = _train_rows(out["ddp"][0]), _train_rows(out["fsdp"][0])
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] and len(ddp) == 6  # 4 steps + 2 held-out
    for a, b in zip(ddp, fsdp):
        keys = set(a) - {"tokens_per_s"}
        assert keys == set(b) - {"tokens_per_s"}
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=LOSS_RTOL, abs=LOG_RATIO_ATOL), (a["step"], k)
    losses = [r["loss"] for r in ddp if "loss" in r]
    assert len(losses) == 4 and len(set(losses)) == 4  # the steps really changed the model
    assert all(r["grad_norm"] > 0.05 for r in ddp if "grad_norm" in r)  # the clip was active on every step


def test_the_saved_model_and_checkpoints_are_the_files_ddp_writes(runs):
    _, out = runs
    for name in ("model.safetensors", "best.safetensors"):
        ddp, fsdp = load_file(out["ddp"][0] / name), load_file(out["fsdp"][0] / name)
        assert set(ddp) == set(fsdp) and all(ddp[k].shape == fsdp[k].shape and ddp[k].dtype == fsdp[k].dtype
                                             for k in ddp)
        assert max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp) < WEIGHT_ATOL
    selected = [json.loads((out[k][0] / "model.json").read_text())["selected"] for k in ("ddp", "fsdp")]
    assert selected[0]["step"] == selected[1]["step"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(out["ddp"][0] / "checkpoints" / "step_0000004" / name)
        b = load_file(out["fsdp"][0] / "checkpoints" / "step_0000004" / name)
        assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a), name
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHT_ATOL, name
    state = json.loads((out["fsdp"][0] / "checkpoints" / "step_0000002" / "state.json").read_text())
    ddp_state = json.loads((out["ddp"][0] / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["optimizer"] == ddp_state["optimizer"] and state["step"] == 2


def _relaunch_fsdp_from_step_2(run_dir, cfg, tmp):
    """Delete the run's result and its step-4 checkpoint, then relaunch it under FSDP: it resumes from step 2.
    Returns (the deleted step-4 model and optimizer tensors, the step-4 checkpoint directory, the log)."""
    last = run_dir / "checkpoints" / "step_0000004"
    saved = {name: load_file(last / name) for name in ("model.safetensors", "optimizer.safetensors")}
    for name in ("model.safetensors", "model.json"):
        (run_dir / name).unlink()
    shutil.rmtree(last)
    return saved, last, _launch("fsdp", cfg, tmp)


def test_fsdp_resumes_model_and_optimizer_exactly(runs):
    tmp, out = runs
    run_dir, cfg, _ = out["fsdp"]
    first, last, log = _relaunch_fsdp_from_step_2(run_dir, cfg, tmp)
    assert "resumed from" in log and "step_0000002 at step 2" in log
    for name, tensors in first.items():  # steps 3-4 redone from step 2's full state, scattered onto the shards
        again = load_file(last / name)
        assert set(again) == set(tensors) and all(torch.equal(tensors[k], again[k]) for k in tensors), name
    assert (run_dir / "model.safetensors").is_file()


def test_a_ddp_checkpoint_resumes_under_fsdp(runs):
    """The checkpoints are one format: FSDP picks up the DDP run at step 2 and redoes steps 3-4 as DDP did."""
    tmp, out = runs
    run_dir, cfg, _ = out["ddp"]
    ddp, last, log = _relaunch_fsdp_from_step_2(run_dir, cfg, tmp)
    assert "world size 2 (DistributedType.FSDP)" in log and "step_0000002 at step 2" in log
    for name, tensors in ddp.items():
        again = load_file(last / name)
        assert set(again) == set(tensors), name
        assert max(float((tensors[k] - again[k]).abs().max()) for k in tensors) < WEIGHT_ATOL, name


def test_an_fsdp_launch_on_cpu_processes_is_refused_not_silently_run_as_ddp(tmp_path):
    """Without tests/accelerate_fsdp_on_cpu.py, accelerate drops the FSDP config on a CPU and would train DDP."""
    cfg = write_cfg(tmp_path, _tree(tmp_path, "refused"), "refused")
    done = subprocess.run([ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
                           "--num_processes", "2", "--main_process_port", str(free_port()),
                           str(REPO / "var_mclr" / "train.py"), "--cfg", str(cfg)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "runs DistributedType.MULTI_CPU here: accelerate shards only on GPUs" in done.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
