"""The tokenizer's training length follows the data (var_mclr/tokenizer_heldout.py): with run.eval_every its steps
are a ceiling, it stops once the held-out reconstruction stops improving, returns the weights of the best held-out
evaluation, and a rerun after the stop neither trains on nor changes the result."""
import json
from pathlib import Path

import pytest
import torch

from test_own_data import make_folder
from var_mclr.checkpoints import load_model
from var_mclr.config import load_config
from var_mclr.files import tensors_sha256
from var_mclr.tokenizer_heldout import PATIENCE
from var_mclr.train_tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def sets(root: Path, out: Path, lr: float) -> list[str]:
    return [f"data.root={root}", "data.num_classes=3", "tokenizer_train.steps=200", "tokenizer_train.batch_size=8",
            "tokenizer_train.warmup_steps=1", f"tokenizer_train.lr={lr}", "run.eval_every=2", "run.eval_images=12",
            "run.ckpt_every=100", f"run.out_dir={out}"]


def test_a_tokenizer_that_stops_improving_stops_early_and_keeps_its_best(tmp_path):
    root = make_folder(tmp_path / "d", val=True)
    # a vanishing learning rate: nothing improves by 1%, so it stops PATIENCE evaluations after the first
    out = train_tokenizer(load_config(REPO / "configs/folder/tokenizer.yaml", sets(root, tmp_path / "a", 1e-12)))
    info = json.loads((tmp_path / "a" / "model.json").read_text())
    assert info["steps_run"] == 2 * (PATIENCE + 1) and info["steps"] == 200
    assert info["machine"]["torch_threads"] == torch.get_num_threads() and info["machine"]["cpu"]
    assert info["selected"]["step"] in range(2, 2 * (PATIENCE + 2), 2) and info["selected"]["heldout_mse"] > 0
    assert tensors_sha256(load_model(out).state_dict()) == \
        tensors_sha256(load_model(tmp_path / "a" / "best.safetensors").state_dict())
    # killed after the stop but before the result was written: the rerun trains no further and gives the same weights
    first = tensors_sha256(load_model(out).state_dict())
    for name in ("model.safetensors", "model.json"):
        (tmp_path / "a" / name).unlink()
    again = train_tokenizer(load_config(REPO / "configs/folder/tokenizer.yaml", sets(root, tmp_path / "a", 1e-12)))
    assert json.loads((tmp_path / "a" / "model.json").read_text())["steps_run"] == 2 * (PATIENCE + 1)
    assert tensors_sha256(load_model(again).state_dict()) == first


def test_a_tokenizer_that_keeps_improving_runs_on(tmp_path):
    root = make_folder(tmp_path / "d", val=True)
    train_tokenizer(load_config(REPO / "configs/folder/tokenizer.yaml",
                                [*sets(root, tmp_path / "b", 3e-3), "tokenizer_train.steps=12"]))
    info = json.loads((tmp_path / "b" / "model.json").read_text())
    assert info["steps_run"] == 12 and info["selected"]["step"] > 2  # a later evaluation beat the first
