"""The MCLR strength dial (loss.mclr.lam_range; docs/method.md, "A strength dial for MCLR"): a per-image lambda equal to
a constant is the one-lambda loss, the draw is the documented one and leaves every other draw alone, each row reaches
the model at 1 / (1 + lambda), and off it changes nothing."""
import pytest
import torch

from conftest import tiny_vae, tiny_var
from var_mclr.config import ConfigError, load_config
from var_mclr.losses import mclr_loss
from var_mclr.objectives import OBJECTIVES, LossConfig, objective_loss
from var_mclr.objectives.dial import draw_lambda, lam_input
from var_mclr.objectives.passes import score_rows

MCLR = OBJECTIVES["mclr"]


def dial_cfg(lam_range=None, draw="log", tau=0.5):
    cfg = LossConfig()
    cfg.mclr.tau, cfg.mclr.lam_range, cfg.mclr.lam_draw = tau, lam_range, draw
    return cfg


def case(B=6, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    l_pos = (-50 + 5 * torch.randn(B, generator=g, dtype=torch.float64)).requires_grad_()
    l_neg = (-55 + 5 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_()
    exclude = torch.zeros(B, K, dtype=torch.bool)
    exclude[1, 0] = True
    return l_pos, l_neg, exclude


@pytest.mark.parametrize("lam", [0.0, 0.75, 3.0, 10.0])
def test_constant_per_image_lambda_is_the_one_lambda_loss_value_and_gradient(lam):
    l_pos, l_neg, exclude = case()
    one, _ = mclr_loss(l_pos, l_neg, 7, lam=lam, tau=0.4, exclude_BK=exclude)
    g_one = torch.autograd.grad(one, (l_pos, l_neg))
    each, _ = mclr_loss(l_pos, l_neg, 7, lam=torch.full((6,), lam, dtype=torch.float64), tau=0.4, exclude_BK=exclude)
    g_each = torch.autograd.grad(each, (l_pos, l_neg))
    torch.testing.assert_close(each, one, rtol=1e-14, atol=0)
    for a, b in zip(g_each, g_one):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


def test_per_image_lambda_weights_each_image_by_hand():
    l_pos = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    l_neg = torch.tensor([[-12.0], [-21.0]], dtype=torch.float64)  # ratios 2 and 1, uncapped
    loss, _ = mclr_loss(l_pos, l_neg, 5, lam=torch.tensor([1.0, 4.0], dtype=torch.float64), tau=None)
    assert loss.item() == pytest.approx((15.0 - (1.0 * 2 + 4.0 * 1) / 2) / 5, rel=1e-12)


def test_planner_draws_lambda_last_log_uniformly_in_the_range():
    labels = torch.arange(500) % 5
    off = MCLR.plan(dial_cfg(), labels, 5, 0.1, torch.Generator().manual_seed(3))
    on = MCLR.plan(dial_cfg([0.3, 10.0]), labels, 5, 0.1, torch.Generator().manual_seed(3))
    assert off.strength_B is None
    assert torch.equal(on.classes_BK, off.classes_BK) and torch.equal(on.mask_BK, off.mask_BK)  # other draws unchanged
    lam = on.strength_B
    assert 0.3 <= float(lam.min()) and float(lam.max()) <= 10.0
    u = torch.log(lam / 0.3) / torch.log(torch.tensor(10.0 / 0.3))  # log-uniform: uniform in log lambda
    assert abs(float(u.mean()) - 0.5) < 0.05 and abs(float((u < 0.25).float().mean()) - 0.25) < 0.05
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(draw_lambda([1.0, 3.0], "uniform", 4, g),
                               1.0 + 2.0 * torch.rand(4, generator=torch.Generator().manual_seed(0)))


def test_lambda_maps_to_one_over_one_plus_lambda():
    assert lam_input(0.0) == 1.0 and lam_input(1.0) == 0.5 and lam_input(3.0) == 0.25
    assert MCLR.strength_input(1.0) == 0.5
    with pytest.raises(ValueError, match="lambda"):
        MCLR.strength_input(-1.0)


def tokens(vae, n):
    torch.manual_seed(1)
    idx = vae.img_to_idxBl(torch.rand(n, 3, 16, 16) * 2 - 1)
    return torch.cat(idx, 1), vae.quantize.idxBl_to_var_input(idx)


def test_dial_score_gives_every_row_its_images_input_and_trains_at_its_lambda():
    vae = tiny_vae()
    var = tiny_var(vae, num_classes=4, strength_cond=True)
    with torch.no_grad():
        var.strength_emb.mlp[2].weight.normal_(0, 0.3)
    idx_BL, x = tokens(vae, 3)
    cfg = dial_cfg([0.5, 8.0])
    plan = MCLR.plan(cfg, torch.tensor([0, 1, 2]), 4, 0.0, torch.Generator().manual_seed(0))
    loss, _ = objective_loss(MCLR, cfg, var, None, plan, idx_BL, x)
    s_BK = (1 / (1 + plan.strength_B)).unsqueeze(1).expand(3, 2)
    l_BK, _, mask_BK = score_rows(var, None, plan, idx_BL, x, False, strength_BK=s_BK)
    want, _ = mclr_loss(l_BK[:, 0], l_BK[:, 1:], var.L, lam=plan.strength_B, tau=0.5, exclude_BK=mask_BK[:, 1:])
    assert loss.item() == want.item()
    plain, _, _ = score_rows(var, None, plan, idx_BL, x, False)  # the strength reaches the model
    assert (plain - l_BK).abs().max() > 1e-4


def test_without_the_dial_score_is_the_registry_pass_bit_for_bit(vae, var):
    idx_BL, x = tokens(vae, 4)
    cfg = dial_cfg()
    plan = MCLR.plan(cfg, torch.tensor([0, 1, 2, 3]), 5, 0.0, torch.Generator().manual_seed(0))
    loss, stats = objective_loss(MCLR, cfg, var, None, plan, idx_BL, x)
    l_BK, _, mask_BK = score_rows(var, None, plan, idx_BL, x, False)
    want, want_stats = MCLR.loss(cfg, l_BK, None, mask_BK, var.L)
    assert loss.item() == want.item() and all(stats[k].item() == want_stats[k].item() for k in stats)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("train: {objective: mclr}\nloss: {mclr: {lam_range: [1.0, 10.0]}}\n", "model.strength_cond"),
    ("model: {strength_cond: true}\nloss: {mclr: {lam_range: [5.0, 1.0]}}\n", "loss.mclr.lam_range"),
    ("model: {strength_cond: true}\nloss: {mclr: {lam_range: [0.0, 1.0]}}\n", "lam_draw"),
    ("loss: {mclr: {lam_draw: cubic}}\n", "loss.mclr.lam_draw"),
])
def test_config_rules_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), check_files=False)


def test_dial_keys_are_written_and_leave_stage_names_alone_while_off(tmp_path):
    from experiments.stages import stage_hash
    off = load_config(write(tmp_path, "train: {objective: mclr}\n"), check_files=False)
    assert off.to_dict()["loss"]["mclr"]["lam_range"] is None and "gft" in off.to_dict()["loss"]
    on = load_config(write(tmp_path, "train: {objective: mclr}\nmodel: {strength_cond: true}\n"
                                     "loss: {mclr: {lam_range: [0.0, 4.0], lam_draw: uniform}}\n"), check_files=False)
    assert on.to_dict()["loss"]["mclr"]["lam_range"] == [0.0, 4.0]
    at_default = load_config(write(tmp_path, "train: {objective: mclr}\nloss: {mclr: {lam_draw: log}}\n"),
                             check_files=False)
    assert stage_hash(off) == stage_hash(at_default) != stage_hash(on)
