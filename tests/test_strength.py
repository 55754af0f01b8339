"""The optional strength conditioning of VAR (model.strength_cond; docs/method.md, "GFT"): an official-layout file
still loads strictly, the module starts at zero output (identical logits), our checkpoints carry it, the null class
always gets the neutral strength, and the sampler feeds the strength it is given."""
import json

import pytest
import torch

from conftest import tiny_vae, tiny_var
from test_checkpoints import tiny_official
from var_mclr.builders import build_var
from var_mclr.checkpoints import load_model, load_official_var, read_state_dict, save_model, with_strength_conditioning
from var_mclr.config import Config, load_config
from var_mclr.model import NEUTRAL_STRENGTH, STRENGTH_FREQ_DIM, VAR, StrengthEmbedding
from var_mclr.sampling import SamplingConfig, sample_tokens


def teacher_input(vae, n=3, seed=0):
    torch.manual_seed(seed)
    idx = vae.img_to_idxBl(torch.rand(n, 3, 16, 16) * 2 - 1)
    return vae.quantize.idxBl_to_var_input(idx), torch.cat(idx, 1)


def moved(var: VAR, seed=3) -> VAR:
    """The strength module's last layer moved off zero, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        var.strength_emb.mlp[2].weight.normal_(0, 0.5)
        var.strength_emb.mlp[2].bias.normal_(0, 0.5)
    return var


def test_official_file_loads_strictly_then_gains_the_module_with_identical_logits(tmp_path):
    vae, var, _, var_path = tiny_official(tmp_path)
    plain = load_official_var(var_path, vae=vae).eval()
    with pytest.raises(Exception, match="missing"):  # the file has no strength module: it cannot fill one
        load_official_var(var_path, cfg=VAR(plain.cfg, strength_cond=True).cfg)
    cond = with_strength_conditioning(load_official_var(var_path, vae=vae)).eval()
    assert cond.cfg.strength_cond and set(cond.state_dict()) - set(read_state_dict(var_path)) == {
        f"strength_emb.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    x, _ = teacher_input(vae)
    label = torch.tensor([0, 4, 5])
    for s in (0.1, 0.66, 1.0):  # zero-initialised last layer: bit-identical logits at any strength
        assert torch.equal(cond(label, x, strength_B=torch.full((3,), s)), plain(label, x))
    assert torch.equal(cond(label, x), plain(label, x))


def test_moved_module_conditions_on_strength_but_never_the_null_class(vae):
    var = moved(tiny_var(vae, strength_cond=True))
    x, _ = teacher_input(vae, n=2)
    label = torch.tensor([2, var.num_classes])
    a = var(label, x, strength_B=torch.tensor([0.2, 0.2]))
    b = var(label, x, strength_B=torch.tensor([0.9, 0.9]))
    assert (a[0] - b[0]).abs().max() > 1e-3  # a class row sees its strength
    assert torch.equal(a[1], b[1])  # the null row is embedded at the neutral strength whatever it is given
    neutral = var(label, x, strength_B=torch.full((2,), NEUTRAL_STRENGTH))
    assert torch.equal(var(label, x), neutral)  # no strength given: the neutral one


def test_strength_embedding_is_a_sinusoid_of_1000_s_through_the_mlp():
    emb = StrengthEmbedding(8)
    with torch.no_grad():
        emb.mlp[2].weight.copy_(torch.eye(8))
    s = torch.tensor([0.25])
    f = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(STRENGTH_FREQ_DIM // 2) / (STRENGTH_FREQ_DIM // 2))
    sinusoid = torch.cat((torch.cos(250.0 * f), torch.sin(250.0 * f))).unsqueeze(0)
    want = torch.nn.functional.silu(emb.mlp[0](sinusoid))
    torch.testing.assert_close(emb(s), want)
    fresh = StrengthEmbedding(8)
    assert not fresh.mlp[2].weight.any() and not fresh.mlp[2].bias.any() and fresh.mlp[0].weight.std() > 0


def test_a_model_without_conditioning_refuses_a_strength(vae, var):
    x, _ = teacher_input(vae, n=1)
    with pytest.raises(ValueError, match="strength_cond"):
        var(torch.tensor([1]), x, strength_B=torch.tensor([0.5]))


def test_our_checkpoints_carry_the_module_and_plain_ones_stay_as_they_were(tmp_path, vae):
    cond = moved(tiny_var(vae, strength_cond=True))
    save_model(cond, tmp_path / "c.safetensors")
    assert json.loads((tmp_path / "c.json").read_text())["config"]["strength_cond"] is True
    back = load_model(tmp_path / "c.safetensors").eval()
    x, _ = teacher_input(vae, n=2)
    s = torch.tensor([0.3, 0.7])
    assert torch.equal(back(torch.tensor([1, 2]), x, strength_B=s), cond(torch.tensor([1, 2]), x, strength_B=s))
    save_model(tiny_var(vae), tmp_path / "p.safetensors")  # off: the key is not written (earlier files unchanged)
    assert "strength_cond" not in json.loads((tmp_path / "p.json").read_text())["config"]


def test_config_key_adds_the_module_to_an_official_init(tmp_path):
    vae, var, _, var_path = tiny_official(tmp_path)
    cfg = Config()
    cfg.data.num_classes, cfg.model.init = 5, str(var_path)
    for k in ("depth", "embed_dim", "num_heads"):
        setattr(cfg.model, k, getattr(var.cfg, k))
    assert cfg.to_dict()["model"]["strength_cond"] is False  # stage names stay: tests/test_stage_names.py
    cfg.model.strength_cond = True
    built = build_var(cfg, vae).eval()
    assert built.cfg.strength_cond and cfg.to_dict()["model"]["strength_cond"] is True
    x, _ = teacher_input(vae, n=2)
    assert torch.equal(built(torch.tensor([0, 3]), x, strength_B=torch.tensor([0.4, 0.8])),
                       var.eval()(torch.tensor([0, 3]), x))


def test_config_file_key_is_model_strength_cond(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  strength_cond: true\n")
    assert load_config(path, check_files=False).model.strength_cond is True


@pytest.mark.parametrize("guidance", ["none", "cfg"])
def test_sampler_feeds_its_strength_to_the_class_rows(guidance):
    vae = tiny_vae()
    var = moved(tiny_var(vae, strength_cond=True))
    label = torch.tensor([0, 3])
    cfg = SamplingConfig(guidance=guidance, cfg_scale=1.0, strength=0.3)
    res = sample_tokens(var, vae.quantize, label, cfg, torch.Generator().manual_seed(0), keep_logits=True)
    x, _ = teacher_input(vae, n=2)  # the first scale depends on the start token alone
    want = var(label, x, strength_B=torch.full((2,), 0.3))[:, :1]
    torch.testing.assert_close(res.logits_cond_BlV[0], want, rtol=1e-5, atol=1e-5)
    other = var(label, x, strength_B=torch.full((2,), 0.9))[:, :1]
    assert (res.logits_cond_BlV[0] - other).abs().max() > 1e-3
    if guidance == "cfg":  # the null rows: neutral strength
        null = var(torch.full((2,), var.num_classes), x)[:, :1]
        torch.testing.assert_close(res.logits_null_BlV[0], null, rtol=1e-5, atol=1e-5)


def test_sampling_config_checks_the_strength():
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength"):
            SamplingConfig(strength=bad)
