"""train.flush_denormal (var_mclr/train.py): subnormal floats are zero while a run trains and torch's default comes
back after it; every image-folder stage turns it on, the MNIST demo's stages keep it off (docs/performance.md,
"Subnormal floats")."""
import pytest
import torch

from var_mclr.config import load_config
from var_mclr.files import CONFIG_DIR
from var_mclr.train import flushing_denormals

NORMAL = 1e-30  # times 1e-10 is 1e-40, below float32's smallest normal number (1.18e-38)


def _product() -> float:
    return (torch.tensor([NORMAL]) * 1e-10).item()


def test_subnormals_are_zero_inside_a_flushing_run_only():
    flushes = torch.set_flush_denormal(False)  # True on x86 (SSE3) and here; a CPU without the mode flushes nothing
    assert _product() > 0.0
    with flushing_denormals(True):
        assert (_product() == 0.0) is flushes
    assert _product() > 0.0  # restored
    with flushing_denormals(False):
        assert _product() > 0.0


@pytest.mark.parametrize("name", ["pretrain", "nll", "mclr", "cca", "cc_dpo", "gft", "mclr_dial", "ddo"])
def test_folder_stages_flush_and_the_demo_does_not(name):
    assert load_config(CONFIG_DIR / "folder" / f"{name}.yaml", check_files=False).train.flush_denormal is True
    demo = CONFIG_DIR / "mnist" / f"{name}.yaml"
    if demo.exists():
        assert load_config(demo, check_files=False).train.flush_denormal is False
