"""Official .pth layouts load strictly; bad files fail loudly; our safetensors round-trip atomically."""
import os
import pickle
from collections import OrderedDict

import pytest
import torch

from conftest import tiny_vae, tiny_var
from tokenizer import VQVAE, VQVAEConfig
from var_mclr.checkpoints import (CheckpointError, load_model, load_official, load_official_vae, read_model_info,
                                  save_model)
from var_mclr.model import VAR, VARConfig


def write_official(tmp_path, vae, var):
    # The official releases are plain OrderedDict state dicts written by torch.save.
    torch.save(OrderedDict(vae.state_dict()), tmp_path / "vae.pth")
    torch.save(OrderedDict(var.state_dict()), tmp_path / "var.pth")
    return tmp_path / "vae.pth", tmp_path / "var.pth"


def tiny_official(tmp_path, depth=2):
    vae = tiny_vae()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.05)
    var = VAR(VARConfig.official(depth, vocab_size=vae.V, Cvae=vae.Cvae, num_classes=5, patch_nums=vae.patch_nums))
    var.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    return vae, var, *write_official(tmp_path, vae, var)


def test_official_layout_loads_strictly_and_reproduces_outputs(tmp_path):
    vae, var, vae_path, var_path = tiny_official(tmp_path)
    vae2, var2 = load_official(vae_path, var_path, depth=2, vae_cfg=vae.cfg, num_classes=5)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = vae.img_to_idxBl(img)
    assert all(torch.equal(a, b) for a, b in zip(idx, vae2.img_to_idxBl(img)))
    x = vae.quantize.idxBl_to_var_input(idx)
    label = torch.tensor([1, 5])
    torch.testing.assert_close(var2(label, x), var.eval()(label, x), rtol=0, atol=0)


@pytest.mark.slow
def test_official_d16_shapes_load(tmp_path):
    # Random weights at the exact released shapes: VQVAE ch160 V4096 z32 and VAR-d16.
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig())
    var = VAR(VARConfig.official(16))
    vae_path, var_path = write_official(tmp_path, vae, var)
    del var
    vae2, var2 = load_official(vae_path, var_path, depth=16)
    assert var2.L == 680 and var2.C == 1024 and var2.class_emb.weight.shape == (1001, 1024)
    with torch.no_grad():
        idx = vae2.img_to_idxBl(torch.zeros(1, 3, 256, 256))
        logits = var2(torch.tensor([7]), vae2.quantize.idxBl_to_var_input(idx))
    assert logits.shape == (1, 680, 4096) and torch.isfinite(logits).all()


def test_wrong_depth_is_named(tmp_path):
    _, _, vae_path, var_path = tiny_official(tmp_path, depth=2)
    with pytest.raises(CheckpointError, match="depth=2 but depth=3 was asked for"):
        load_official(vae_path, var_path, depth=3, vae_cfg=tiny_vae().cfg, num_classes=5)


def test_missing_unexpected_and_misshaped_keys_are_all_named(tmp_path):
    vae, var, vae_path, _ = tiny_official(tmp_path)
    state = var.state_dict()
    state.pop("head.bias")
    state["mystery.weight"] = torch.zeros(1)
    state["pos_start"] = torch.zeros(1, 2, var.C)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_official(vae_path, tmp_path / "bad.pth", depth=2, vae_cfg=vae.cfg, num_classes=5)
    msg = str(err.value)
    assert "1 missing (head.bias)" in msg and "1 unexpected (mystery.weight)" in msg
    assert "pos_start: checkpoint (1, 2, 128) vs model (1, 1, 128)" in msg


def test_a_wrong_file_is_summarised_in_one_short_line(tmp_path):
    """A VAR's state dict given as the tokenizer disagrees on every key: counts and the first keys, not all."""
    vae, var, _, var_path = tiny_official(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_official_vae(var_path, vae.cfg)
    msg = str(err.value)
    n_missing = len(vae.state_dict())
    assert "\n" not in msg and len(msg) < 700, msg
    assert f"{n_missing} missing (" in msg and ", ... (" in msg and "more)" in msg


class NotAStateDict:
    def __init__(self):
        self.payload = [1, 2, 3]


def test_arbitrary_pickles_and_wrapped_dicts_are_refused(tmp_path):
    vae, var, vae_path, _ = tiny_official(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump(NotAStateDict(), f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_official(vae_path, tmp_path / "evil.pth", depth=2, vae_cfg=vae.cfg, num_classes=5)
    torch.save({"model": var.state_dict(), "step": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="not a state dict of named tensors"):
        load_official(vae_path, tmp_path / "wrapped.pth", depth=2, vae_cfg=vae.cfg, num_classes=5)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_official(tmp_path / "nope.pth", tmp_path / "wrapped.pth", depth=2)


def test_safetensors_round_trip_with_hyperparameters(tmp_path):
    vae = tiny_vae()
    var = tiny_var(vae)
    save_model(vae, tmp_path / "vae")
    path = save_model(var, tmp_path / "var.safetensors", extra={"step": 7})
    assert sorted(os.listdir(tmp_path)) == ["vae.json", "vae.safetensors", "var.json", "var.safetensors"]
    assert read_model_info(path)["step"] == 7
    vae2 = load_model(tmp_path / "vae.safetensors")
    var2 = load_model(path)
    assert isinstance(var2, VAR) and var2.cfg == var.cfg
    for k, v in var.state_dict().items():
        assert torch.equal(v, var2.state_dict()[k]), k


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    var = tiny_var(tiny_vae())
    path = save_model(var, tmp_path / "var")
    before = path.read_bytes()

    def crash_mid_write(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("var_mclr.checkpoints.save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_model(var, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["var.json", "var.safetensors"]
