"""Golden regression against the official implementation: our tokenizer and VAR reproduce its outputs.

The fixture in tests/fixtures/official_golden/ was produced once, outside this repository, by running the official
code of https://github.com/FoundationVision/VAR at commit 78b95394fc5896192e3a003e4b295f8ea743c48f (CPU, float32,
torch 2.14.1, seed 4). None of the official code is in this repository; only its outputs (tensors) and the two
state dicts it saved are.

How the fixture was made (config.json records every constructor argument, the commit and the seed):

* Tiny official VQVAE: vocab_size=64, z_channels=8, ch=32, quant_resi=0.5, share_quant_resi=4 (four partially
  shared phi convolutions for five scales: scale 2, at relative depth 0.5, lies midway between two ticks in exact
  arithmetic and the official float ticks give it the third phi by one ulp), v_patch_nums=(1, 2, 3, 4, 6). The official
  VQVAE hard-codes ch_mult=(1, 1, 2, 2, 4) and num_res_blocks=2, too large for a fixture, so its encoder and decoder
  were replaced by the official Encoder/Decoder classes built with ch_mult=(1, 1), num_res_blocks=0, using_sa and
  using_mid_sa on (2x downsampling, 12 px images; the decoder's stages and every mid block still carry a residual
  and an attention block).
* Tiny official VAR: depth=2, embed_dim=32, num_heads=4, mlp_ratio=4, num_classes=10, shared_aln=False,
  attn_l2_norm=True, no dropout or drop-path, cond_drop_rate=0 (the official forward drops labels even in eval mode),
  flash and fused kernels off.
* Weights: the official init_weights ran, then every parameter of both models was redrawn from a seeded normal
  (convolutions ~ 1/sqrt(fan_in), norms' affine around 1 and 0, VAR linears ~ 1/sqrt(fan_in), AdaLN projections
  std 0.15, class embedding std 1 including the null-class row, position and level embeddings std 0.5, biases std
  0.1, attention temperatures log(4) + 0.5 N(0, 1) with one head set to 5 > log(100) to exercise the clamp), so no
  gate is near zero and every tensor shapes the outputs. The codebook was scaled to the encoder's output after one
  probe pass. Buffers (the causal mask, the zero key bias, the codebook-hit statistic) kept their constructed values.
  The state dicts were written with torch.save(model.state_dict()) as vae_tiny.pth and var_tiny.pth.
* Inputs: three 12 px images in [-1, 1] with content at every scale (bicubic-upsampled coarse noise plus fine noise,
  clamped) and labels (3, 7, 10): the last is the null class.
* Outputs of the official code, in golden.safetensors: the encoder map quant_conv(encoder(img)) (f_BChw);
  vae.img_to_idxBl(img), concatenated over scales (idx_BL); quantize.idxBl_to_var_input(idx) (x_BLCv_wo_first_l);
  var(label_B, x_BLCv_wo_first_l) in eval mode (logits_BLV); the last f_hat of quantize.f_to_idxBl_or_fhat(f,
  to_fhat=True) (fhat_BChw); vae.idxBl_to_img(idx, same_shape=True, last_one=True) (rec_from_idx_B3HW) and
  vae.img_to_reconstructed_img(img, last_one=True) (rec_full_B3HW). The smallest gap between the nearest and
  second-nearest code's squared distance over all tokens is recorded per scale (>= 3e-4), far above float32
  rounding, so the token ids must match exactly.

Blind spot: with ch=32 every GroupNorm has one channel per group, so a per-channel constant added before a norm (the
biases of most convolutions inside the encoder, of the convolutions feeding norm2 in the decoder) cannot change any
output here; those are covered only by the strict key and shape checks of the loaders.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenizer import VQVAEConfig
from var_mclr.builders import build_tokenizer, build_var
from var_mclr.checkpoints import is_official_checkpoint, load_official_vae, load_official_var
from var_mclr.config import Config
from var_mclr.model import VARConfig

FIXTURE = Path(__file__).parent / "fixtures" / "official_golden"
OFFICIAL_COMMIT = "78b95394fc5896192e3a003e4b295f8ea743c48f"


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURE / "golden.safetensors")


def vae_cfg(meta) -> VQVAEConfig:
    off, dd = meta["official_vqvae_kwargs"], meta["official_encoder_decoder_ddconfig"]
    assert off["default_qresi_counts"] == 0 and dd["in_channels"] == 3
    return VQVAEConfig(vocab_size=off["vocab_size"], z_channels=off["z_channels"], ch=dd["ch"],
                       ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"], dropout=dd["dropout"],
                       beta=off["beta"], using_znorm=off["using_znorm"], quant_conv_ks=off["quant_conv_ks"],
                       quant_resi=off["quant_resi"], share_quant_resi=off["share_quant_resi"],
                       v_patch_nums=tuple(off["v_patch_nums"]), using_sa=dd["using_sa"],
                       using_mid_sa=dd["using_mid_sa"])


def var_cfg(meta) -> VARConfig:
    off, vae = meta["official_var_kwargs"], meta["official_vqvae_kwargs"]
    assert off["drop_rate"] == off["attn_drop_rate"] == off["drop_path_rate"] == off["cond_drop_rate"] == 0
    return VARConfig(vocab_size=vae["vocab_size"], Cvae=vae["z_channels"], num_classes=off["num_classes"],
                     depth=off["depth"], embed_dim=off["embed_dim"], num_heads=off["num_heads"],
                     mlp_ratio=off["mlp_ratio"], norm_eps=off["norm_eps"], shared_aln=off["shared_aln"],
                     attn_l2_norm=off["attn_l2_norm"], patch_nums=tuple(off["patch_nums"]))


@pytest.fixture(scope="module")
def vae(meta):
    path = FIXTURE / "vae_tiny.pth"
    assert is_official_checkpoint(path)
    return load_official_vae(path, vae_cfg(meta)).eval()


@pytest.fixture(scope="module")
def var(meta):
    path = FIXTURE / "var_tiny.pth"
    assert is_official_checkpoint(path)
    return load_official_var(path, var_cfg(meta)).eval()


def split_scales(idx_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    return list(idx_BL.split([pn * pn for pn in patch_nums], dim=1))


def assert_close(ours: torch.Tensor, official: torch.Tensor, atol: float, what: str) -> None:
    assert ours.shape == official.shape, f"{what}: shape {tuple(ours.shape)} vs official {tuple(official.shape)}"
    diff = (ours.float() - official.float()).abs().max().item()
    assert diff <= atol, f"{what}: max |ours - official| = {diff:.3g} > {atol:g}"


def test_fixture_provenance_and_size(meta, golden):
    assert meta["official_commit"] == OFFICIAL_COMMIT
    assert meta["official_repo"] == "https://github.com/FoundationVision/VAR"
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) <= 1_000_000
    assert all(t.dtype in (torch.float32, torch.int64) for t in golden.values())
    assert golden["label_B"].tolist() == meta["labels"] and meta["labels"][-1] == meta["official_var_kwargs"][
        "num_classes"]  # the null class is exercised
    # The golden tensors are informative: several codes per scale, non-trivial logits.
    assert golden["idx_BL"][:, 0].unique().numel() > 1
    assert golden["logits_BLV"].std() > 0.5


def test_encoder_map_matches_official(vae, golden):
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(golden["img_B3HW"]))
    assert_close(f, golden["f_BChw"], 1e-5, "quant_conv(encoder(img))")


def test_token_ids_match_official_exactly(vae, golden):
    idx_Bl = vae.img_to_idxBl(golden["img_B3HW"])
    assert [tuple(t.shape) for t in idx_Bl] == [(3, pn * pn) for pn in vae.patch_nums]
    ours = torch.cat(idx_Bl, dim=1)
    mismatched = (ours != golden["idx_BL"]).sum().item()
    assert mismatched == 0, f"{mismatched} of {ours.numel()} token ids differ from the official ones"


def test_fhat_matches_official(vae, golden):
    with torch.no_grad():
        f_hat = vae.quantize.f_to_idxBl_or_fhat(golden["f_BChw"], to_fhat=True)[-1]
    assert_close(f_hat, golden["fhat_BChw"], 1e-5, "f_hat after the last scale")


def test_teacher_forcing_input_matches_official(vae, golden):
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(split_scales(golden["idx_BL"], vae.patch_nums))
    assert x.dtype == torch.float32
    assert_close(x, golden["x_BLCv_wo_first_l"], 1e-5, "x_BLCv_wo_first_l")


def test_teacher_forced_logits_match_official(var, golden):
    official = golden["logits_BLV"]
    with torch.no_grad():
        logits = var(golden["label_B"], golden["x_BLCv_wo_first_l"])
    assert logits.dtype == torch.float32
    assert_close(logits, official, 1e-4 * max(1.0, official.abs().max().item()), "logits_BLV")


def test_token_logprobs_match_official_logits(var, golden):
    """The fused log-prob path (forward with targets) agrees with log_softmax of the official logits."""
    target = golden["idx_BL"]
    official = golden["logits_BLV"].log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logp = var(golden["label_B"], golden["x_BLCv_wo_first_l"], target)
    assert_close(logp, official, 1e-4, "log p(official ids)")


def test_end_to_end_chain_matches_official(vae, var, golden):
    """Image -> our ids -> our teacher-forcing input -> our logits, against the official chain."""
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(golden["img_B3HW"])
        logits = var(golden["label_B"], vae.quantize.idxBl_to_var_input(idx_Bl))
    official = golden["logits_BLV"]
    assert_close(logits, official, 1e-4 * max(1.0, official.abs().max().item()), "end-to-end logits_BLV")


def test_reconstruction_from_ids_matches_official(vae, golden):
    with torch.no_grad():
        rec = vae.idxBl_to_img(split_scales(golden["idx_BL"], vae.patch_nums), same_shape=True, last_one=True)
    assert_close(rec, golden["rec_from_idx_B3HW"], 1e-4, "idxBl_to_img(idx, last_one=True)")


def test_full_reconstruction_matches_official(vae, golden):
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(golden["img_B3HW"]))
        rec = vae.fhat_to_img(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1])
        rec_decode = vae.decode(vae.encode(golden["img_B3HW"]))
    assert_close(rec, golden["rec_full_B3HW"], 1e-4, "fhat_to_img(f_hat) (official img_to_reconstructed_img)")
    assert_close(rec_decode, golden["rec_full_B3HW"], 1e-4, "decode(encode(img))")


def test_run_builders_load_the_official_fixture(meta, golden):
    """The path a training run takes (config -> build_tokenizer / build_var) yields the official logits."""
    cfg = Config()
    vcfg, mcfg = vae_cfg(meta), var_cfg(meta)
    for name, value in vcfg.to_dict().items():
        setattr(cfg.tokenizer, name, tuple(value) if isinstance(value, list) else value)
    cfg.tokenizer.checkpoint = str(FIXTURE / "vae_tiny.pth")
    for name in ("depth", "embed_dim", "num_heads", "mlp_ratio", "norm_eps", "shared_aln", "attn_l2_norm"):
        setattr(cfg.model, name, getattr(mcfg, name))
    cfg.model.init = str(FIXTURE / "var_tiny.pth")
    cfg.data.resolution = meta["resolution"]
    cfg.data.num_classes = mcfg.num_classes
    vae = build_tokenizer(cfg)
    var = build_var(cfg, vae).eval()
    with torch.no_grad():
        ids = torch.cat(vae.img_to_idxBl(golden["img_B3HW"]), dim=1)
        logits = var(golden["label_B"], golden["x_BLCv_wo_first_l"])
    assert torch.equal(ids, golden["idx_BL"]), "token ids via build_tokenizer differ from the official ones"
    official = golden["logits_BLV"]
    assert_close(logits, official, 1e-4 * max(1.0, official.abs().max().item()), "logits_BLV via build_var")
