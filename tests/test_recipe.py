"""The official VAR training recipe, as fine-tuning needs it (docs/method.md, "Training schedule"): the lin0
learning-rate schedule, stochastic depth rising over the blocks, and official VAR's weight-decay groups. The
expected values are computed by hand from FoundationVision/VAR's utils/lr_control.py and train.py."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

import var_mclr.train as train_mod
from conftest import tiny_vae
from test_train import tiny_run_tree
from var_mclr.builders import build_var, frozen_copy
from var_mclr.config import load_config
from var_mclr.model import VAR, VARConfig
from var_mclr.optim import lr_lambda, make_optimizer
from var_mclr.train import train


def _cfg(tmp_path, **train_overrides):
    tree = tiny_run_tree(tmp_path, "run", **train_overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path)


def test_lin0_schedule_matches_var(tmp_path):
    cfg = _cfg(tmp_path, steps=101, warmup_steps=10, lr_schedule="lin0", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.005)  # warm-up starts at 0.005x, not at 1/warmup
    assert f(5) == pytest.approx(0.005 + 0.995 * 5 / 10)
    assert f(10) == 1.0 and f(14) == 1.0  # held at the peak for the first 5% of the 90 remaining steps
    assert f(15) == pytest.approx(0.1 + 0.9 * (1 - 5 / 90) / 0.95)
    assert f(55) == pytest.approx(0.1 + 0.9 * (1 - 45 / 90) / 0.95)
    assert f(100) == pytest.approx(0.1)  # the last step is exactly at the floor
    values = [f(s) for s in range(15, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # linear decay, strictly down


def _tiny_var(depth=4) -> VAR:
    return VAR(VARConfig(vocab_size=32, Cvae=8, num_classes=4, depth=depth, embed_dim=32, num_heads=2,
                         patch_nums=(1, 2, 3)))


def test_drop_path_rates_rise_linearly_over_blocks_and_drop_whole_samples():
    var = _tiny_var(depth=5)
    var.set_drop_path_rate(0.2)
    assert [b.drop_path_rate for b in var.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    block = var.blocks[-1].train()
    torch.manual_seed(0)
    out = block.drop_path(torch.ones(400, 3, 2))
    per_sample = out[:, 0, 0]
    assert bool((out == per_sample.view(-1, 1, 1)).all())  # one decision per sample, for all its tokens
    assert sorted(per_sample.unique().tolist()) == pytest.approx([0.0, 1 / 0.8])  # kept branches rescaled by 1/(1-p)
    assert 0.1 < float((per_sample == 0).float().mean()) < 0.3
    assert torch.equal(block.eval().drop_path(torch.ones(4, 3, 2)), torch.ones(4, 3, 2))  # off at evaluation
    with pytest.raises(ValueError, match="drop_path_rate"):
        var.set_drop_path_rate(1.0)


def test_drop_path_changes_training_forward_only_and_the_reference_copies_it():
    var = _tiny_var()
    label_B = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, var.L - var.first_l, var.Cvae)
    base_eval = var.eval()(label_B, x)
    var.set_drop_path_rate(0.5)
    torch.testing.assert_close(var.eval()(label_B, x), base_eval, rtol=0, atol=0)
    torch.manual_seed(1)
    assert not torch.allclose(var.train()(label_B, x), base_eval)
    ref = frozen_copy(var)
    assert [b.drop_path_rate for b in ref.blocks] == [b.drop_path_rate for b in var.blocks]


def test_weight_decay_groups_follow_official_var():
    var = _tiny_var()
    opt = make_optimizer(load_config(None, check_files=False), var)
    names = {id(p): n for n, p in var.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    not_decayed = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"word_embed.weight", "class_emb.weight", "head.weight", "blocks.0.ada_lin.1.weight",
            "blocks.0.attn.mat_qkv.weight"} <= decayed
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias",
            "head.bias"} <= not_decayed
    assert decayed.isdisjoint(not_decayed) and len(decayed | not_decayed) == len(names)


def test_build_var_applies_model_drop_path_rate(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.model.drop_path_rate = 0.3
    var = build_var(cfg, tiny_vae())
    assert var.drop_path_rate == 0.3 and var.blocks[-1].drop_path_rate == pytest.approx(0.3)


class _Crash(RuntimeError):
    pass


def test_training_with_drop_path_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Drop-path draws from torch's RNG; the trainer reseeds it per micro-batch, so a crash after the step-4
    checkpoint and a resume give the weights of an uninterrupted run (CCA: the reference drops paths too)."""
    cfg_full = _cfg(tmp_path, objective="cca", steps=8)
    cfg_full.model.drop_path_rate = 0.3
    cfg_full.run.out_dir = str(tmp_path / "full")
    full = load_file(train(cfg_full))

    cfg = _cfg(tmp_path, objective="cca", steps=8)
    cfg.model.drop_path_rate = 0.3
    cfg.run.out_dir = str(tmp_path / "crashed")
    save = train_mod.save_training_state

    def save_then_crash(*args, **kwargs):
        path = save(*args, **kwargs)
        raise _Crash(path)

    monkeypatch.setattr(train_mod, "save_training_state", save_then_crash)
    torch.manual_seed(12345)  # the global RNG state at the crash must not matter
    with pytest.raises(_Crash):
        train(cfg)
    monkeypatch.setattr(train_mod, "save_training_state", save)
    resumed = load_file(train(cfg))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("depth, dpr, floor, cca_lam", [(16, 0.0, 0.1, 50.0), (20, 0.0833, 0.1, 50.0),
                                                         (24, 0.1, 0.01, 100.0), (30, 0.125, 0.01, 1000.0)])
def test_imagenet_configs_carry_ccas_recipe(depth, dpr, floor, cca_lam):
    """CCA's VAR commands: one epoch at 256 images per step (8 GPUs), lr 2e-5, lin0 with its floor. A depth's
    config departs from var_d16.yaml only where CCA's command for that depth does (plus the backbone, the
    micro-batch that fits it and the run directory)."""
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / f"var_d{depth}.yaml", [], check_files=False)
    d16 = load_config(configs / "var_d16.yaml", [], check_files=False)
    per_depth = {"run.out_dir", "model.init", "model.depth", "model.embed_dim", "model.num_heads",
                 "model.drop_path_rate", "train.micro_batch", "train.min_lr_ratio", "loss.cca.lam"}
    differ = {k for k, v in _flat(cfg.to_dict()).items() if _flat(d16.to_dict()).get(k) != v}
    assert differ <= per_depth, differ - per_depth
    t = cfg.train
    assert (t.lr_schedule, t.lr, t.steps, t.warmup_steps, t.min_lr_ratio) == ("lin0", 2e-5, 5005, 100, floor)
    assert t.global_batch == 256  # on any number of GPUs: micro-batch and accumulation are derived (var_mclr.plan)
    assert cfg.model.drop_path_rate == pytest.approx(dpr, abs=1e-4) and cfg.model.depth == depth
    assert (cfg.loss.cca.beta, cfg.loss.cca.lam, cfg.loss.cca.uncond_ratio) == (0.02, cca_lam, 0.1)
