"""Sharded training on the CPU: FSDP2 over gloo runs in this torch, so two processes train the same VAR with DDP and
with FSDP2 (each block a unit, the head in the root unit, as configs/accelerate/fsdp.yaml wraps it) and must agree.
This drives torch's FSDP2 directly (tests/fsdp_worker.py); tests/test_fsdp_accelerate.py and test_fsdp_train.py run it
through accelerate, which shards only on GPUs unless tests/accelerate_fsdp_on_cpu.py admits CPU processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_ddp_and_gathers_the_full_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29571", str(REPO / "tests" / "fsdp_worker.py")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["head_local"][0] * 2 == out["head_full"][0]  # the head weight really was sharded
    assert out["fsdp"] == pytest.approx(out["ddp"], rel=1e-6)  # the fused head reads the gathered weight
    assert out["same_keys"] and out["max_state_diff"] < 1e-6  # the gathered state is the full model DDP holds
