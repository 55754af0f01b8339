"""No silent failure (issue 14): settings that would train wrong, malformed files, poisoned checkpoints, stale caches
and concurrent runs each end in a one-line error naming the key, flag or file, or the run recovers correctly."""
import math
from pathlib import Path

import pytest

from var_mclr.config import ConfigError, load_config

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
    ("run.ckpt_every=0", "run.ckpt_every"), ("run.log_every=0", "run.log_every"), ("run.keep_ckpts=0", "run.keep_ckpts"),
    ("tokenizer_train.steps=0", "tokenizer_train.steps"), ("tokenizer_train.batch_size=0", "tokenizer_train.batch_size"),
])
def test_values_that_would_train_wrong_are_refused_by_key_and_range(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(MNIST / "mclr.yaml", [override], check_files=False)
    msg = str(err.value)
    assert "\n" not in msg and f"{key} = " in msg and "must be" in msg, msg


def test_allowed_edges_are_accepted():
    cfg = load_config(MNIST / "mclr.yaml", ["train.grad_clip=.inf", "train.min_lr_ratio=0", "train.weight_decay=0",
                                            "loss.mclr.tau=0", "loss.mclr.tau=null", "loss.mclr.lam=0"],
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
