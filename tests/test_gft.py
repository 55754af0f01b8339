"""GFT (docs/method.md, "GFT"; thu-ml/GFT, LlamaGen/autoregressive/train/GFT_c2i.py): the loss by hand, the
stop-gradient on the unconditional logits, the two passes (unconditional: evaluation mode, no gradient, null class, beta = 1;
conditional: training mode, label, beta), the planner's betas and the config's rules."""
import math

import pytest
import torch

from conftest import tiny_vae, tiny_var
from var_mclr.config import ConfigError, load_config
from var_mclr.losses import gft_loss
from var_mclr.objectives import OBJECTIVES, LossConfig, objective_loss

GFT = OBJECTIVES["gft"]


def test_loss_by_hand():
    # Row 0: beta 0.5, z = 0.5 [1, 0] + 0.5 [0, 2] = [0.5, 1], target 0: log(e^0.5 + e^1) - 0.5 = log(1 + e^0.5).
    # Row 1: beta 0.25, z = 0.25 [2, 0] + 0.75 [0, 0] = [0.5, 0], target 0: log(e^0.5 + 1) - 0.5.
    z_cond = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]], requires_grad=True)
    z_uncond = torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]]], requires_grad=True)
    beta = torch.tensor([0.5, 0.25])
    loss, stats = gft_loss(z_cond, z_uncond, beta, torch.tensor([[0], [0]]))
    want = (math.log(1 + math.exp(0.5)) + math.log(math.exp(0.5) + 1) - 0.5) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["beta"].item() == pytest.approx(0.375)
    # nll: the conditional logits alone; row 0 [1, 0] -> log(e + 1) - 1, row 1 [2, 0] -> log(e^2 + 1) - 2.
    want_nll = (math.log(math.e + 1) - 1 + math.log(math.exp(2) + 1) - 2) / 2
    assert stats["nll"].item() == pytest.approx(want_nll, rel=1e-6)
    loss.backward()
    assert z_uncond.grad is None  # the stop-gradient: nothing reaches the unconditional logits
    # d loss / d z_cond[b] = beta_b (softmax(z_b) - onehot) / (B L)
    p0 = torch.softmax(torch.tensor([0.5, 1.0]), 0)
    p1 = torch.softmax(torch.tensor([0.5, 0.0]), 0)
    want_grad = torch.stack((0.5 * (p0 - torch.tensor([1.0, 0.0])), 0.25 * (p1 - torch.tensor([1.0, 0.0])))) / 2
    torch.testing.assert_close(z_cond.grad[:, 0], want_grad)


def test_beta_one_is_the_conditional_cross_entropy_and_beta_zero_trains_nothing():
    torch.manual_seed(0)
    z_c, z_u = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 3, 5)
    idx = torch.randint(0, 5, (2, 3))
    loss, _ = gft_loss(z_c, z_u, torch.ones(2), idx)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(z_c.reshape(6, 5), idx.reshape(6)))
    loss, _ = gft_loss(z_c, z_u, torch.zeros(2), idx)
    loss.backward()
    assert not z_c.grad.any()


def gft_cfg(beta="random"):
    cfg = LossConfig()
    cfg.gft.beta = beta
    return cfg


def test_planner_draws_one_uniform_beta_per_image_or_the_fixed_one():
    labels = torch.arange(400) % 4
    plan = GFT.plan(gft_cfg(), labels, 4, 0.1, torch.Generator().manual_seed(0))
    beta = plan.strength_B
    assert beta.shape == (400,) and 0 <= float(beta.min()) and float(beta.max()) < 1
    assert abs(float(beta.mean()) - 0.5) < 0.05 and len(beta.unique()) == 400
    dropped = plan.classes_BK[:, 0] == 4
    assert 20 < int(dropped.sum()) < 65  # 10% class dropout (GFT's class_dropout_prob)
    again = GFT.plan(gft_cfg(), labels, 4, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again.strength_B, beta) and torch.equal(again.classes_BK, plan.classes_BK)
    fixed = GFT.plan(gft_cfg(0.3), labels, 4, 0.0, torch.Generator().manual_seed(0))
    assert bool((fixed.strength_B == 0.3).all()) and torch.equal(fixed.classes_BK[:, 0], labels)


def batch(vae, n):
    torch.manual_seed(1)
    idx = vae.img_to_idxBl(torch.rand(n, 3, 16, 16) * 2 - 1)
    return torch.cat(idx, 1), vae.quantize.idxBl_to_var_input(idx)


def spy_on(var):
    calls, forward = [], var.forward

    def spy(label_B, x, target_BL=None, strength_B=None):
        out = forward(label_B, x, target_BL, strength_B)
        calls.append({"training": var.training, "grad": torch.is_grad_enabled(), "label": label_B.clone(),
                      "strength": None if strength_B is None else strength_B.clone(), "out_grad": out.requires_grad})
        return out
    var.forward = spy
    return calls


def test_score_runs_the_unconditional_pass_in_eval_mode_without_gradient_then_the_conditional_one():
    vae = tiny_vae()
    var = tiny_var(vae, num_classes=4, strength_cond=True).train()
    var.set_drop_path_rate(0.5)  # training mode would drop paths: only evaluation mode gives the target below
    with torch.no_grad():
        var.strength_emb.mlp[2].weight.normal_(0, 0.3)
    idx_BL, x = batch(vae, 4)
    plan = GFT.plan(gft_cfg(), torch.tensor([0, 1, 2, 3]), 4, 0.0, torch.Generator().manual_seed(0))
    plan.classes_BK[3, 0] = 4  # a dropped label: null class at strength 1, mixed at its drawn beta
    calls = spy_on(var)
    torch.manual_seed(5)
    loss, stats = objective_loss(GFT, gft_cfg(), var, None, plan, idx_BL, x)
    assert var.training  # restored for the rest of the step
    uncond, cond = calls
    assert not uncond["training"] and not uncond["grad"] and not uncond["out_grad"]
    assert bool((uncond["label"] == 4).all()) and bool((uncond["strength"] == 1).all())
    assert cond["training"] and cond["grad"] and torch.equal(cond["label"], plan.classes_BK[:, 0])
    assert torch.equal(cond["strength"], plan.strength_B)
    var.forward = type(var).forward.__get__(var)
    torch.manual_seed(5)
    z_c = var.train()(plan.classes_BK[:, 0], x, strength_B=plan.strength_B)
    with torch.no_grad():
        z_u = var.eval()(torch.full((4,), 4), x, strength_B=torch.ones(4))
    want, _ = gft_loss(z_c, z_u, plan.strength_B, idx_BL)
    assert loss.item() == want.item()
    loss.backward()
    assert var.strength_emb.mlp[2].weight.grad.abs().sum() > 0  # beta reaches the loss through the model


def test_fixed_beta_needs_no_strength_input():
    vae = tiny_vae()
    var = tiny_var(vae, num_classes=4).train()
    idx_BL, x = batch(vae, 2)
    plan = GFT.plan(gft_cfg(0.5), torch.tensor([0, 1]), 4, 0.0, torch.Generator().manual_seed(0))
    calls = spy_on(var)
    loss, _ = objective_loss(GFT, gft_cfg(0.5), var, None, plan, idx_BL, x)
    assert torch.isfinite(loss) and all(c["strength"] is None for c in calls)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("train: {objective: gft}\n", "model.strength_cond"),
    ("train: {objective: gft}\nloss: {gft: {beta: 0.0}}\n", "loss.gft.beta"),
    ("train: {objective: gft}\nloss: {gft: {beta: 1.5}}\n", "loss.gft.beta"),
    ("loss: {gft: {beta: often}}\n", "loss.gft.beta"),
])
def test_config_rules_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), check_files=False)


def test_config_accepts_both_modes(tmp_path):
    cfg = load_config(write(tmp_path, "train: {objective: gft}\nmodel: {strength_cond: true}\n"), check_files=False)
    assert cfg.loss.gft.beta == "random"
    cfg = load_config(write(tmp_path, "train: {objective: gft}\nloss: {gft: {beta: 0.1}}\n"), check_files=False)
    assert cfg.loss.gft.beta == 0.1


def test_sampling_strength_is_beta_itself():
    assert GFT.strength_input(0.66) == 0.66
    for bad in (0.0, 1.2, -1.0):
        with pytest.raises(ValueError, match="beta"):
            GFT.strength_input(bad)


def test_a_short_gft_run_trains_the_strength_module_and_saves_it(tmp_path):
    from test_train import metrics, tiny_run_tree, write_cfg
    from var_mclr.checkpoints import load_model
    from var_mclr.train import train

    base = train(load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, "pre", steps=2), "pre")))
    tree = tiny_run_tree(tmp_path, "gft", objective="gft", steps=3, lr=1e-3, class_dropout=0.1)
    tree["model"].update(init=str(base), strength_cond=True)
    result = load_model(train(load_config(write_cfg(tmp_path, tree, "gft"))))
    rows = metrics(tmp_path / "gft")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and 0 < r["beta"] < 1 for r in rows)
    assert result.cfg.strength_cond and result.strength_emb.mlp[2].weight.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.25, 0.66, 1.0])
def test_the_optimum_at_beta_is_cfg_at_w_one_over_beta_minus_one_on_every_scale(beta):
    # One context, free conditional logits, a fixed unconditional model, tokens in the proportions of p_c: the loss's
    # minimiser z* makes the mixture p_c, so softmax(z*) = p_c^(1+w) p_u^(-w) / Z with w = 1/beta - 1: the sampler's
    # constant-schedule CFG step on (log p_c, z_u), drawn in one pass at beta (docs/method.md, "GFT").
    from var_mclr.sampling import SamplingConfig
    p_c = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    z_u = torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)
    idx = torch.tensor([[0] * 5 + [1] * 3 + [2] * 2])
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss, _ = gft_loss(z.expand(1, 10, 3), z_u.expand(1, 10, 3), torch.tensor([beta]), idx)
        loss.backward()
        return loss
    opt.step(closure)
    w = SamplingConfig(guidance="cfg", cfg_schedule="constant", cfg_scale=1 / beta - 1).guidance_at(0, 10)
    cfg_logits = (1 + w) * torch.log(p_c) - w * z_u
    torch.testing.assert_close(torch.softmax(z.detach(), 0), torch.softmax(cfg_logits, 0), rtol=1e-6, atol=1e-8)
    if beta < 1:  # and not the conditional alone
        assert (torch.softmax(z.detach(), 0) - p_c).abs().max() > 1e-3


def test_a_resumed_gft_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, caplog):
    # beta, class dropout and drop-path are drawn from (seed, step): a run resumed at step 2 is the 4-step run.
    from safetensors.torch import load_file
    from test_train import tiny_run_tree, write_cfg
    from var_mclr.train import train

    base = train(load_config(write_cfg(tmp_path, tiny_run_tree(tmp_path, "pre", steps=2), "pre")))
    caplog.set_level("INFO", logger="var_mclr.train")
    results = {}
    for name, schedule in (("once", (4,)), ("resumed", (2, 4))):
        for steps in schedule:
            tree = tiny_run_tree(tmp_path, name, objective="gft", steps=steps, lr=1e-3, class_dropout=0.2)
            tree["run"]["ckpt_every"] = 2
            tree["model"].update(init=str(base), strength_cond=True, drop_path_rate=0.1)
            results[name] = load_file(train(load_config(write_cfg(tmp_path, tree, f"{name}{steps}"))))
    assert "at step 2" in " ".join(r.getMessage() for r in caplog.records if "resumed from" in r.getMessage())
    assert results["once"].keys() == results["resumed"].keys()
    assert all(torch.equal(results["once"][k], results["resumed"][k]) for k in results["once"])
