"""Tokenizer and VAR: shapes, consistency of the multi-scale maps, official layouts, clear errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_PATCH_NUMS, tiny_var
from tokenizer import VQVAE, VQVAEConfig
from var_mclr.model import VAR, VARConfig


def images(vae, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, vae.resolution, vae.resolution, generator=g) * 2 - 1


def test_encode_gives_one_token_map_per_scale(vae):
    idx = vae.img_to_idxBl(images(vae))
    assert [tuple(i.shape) for i in idx] == [(3, pn * pn) for pn in TINY_PATCH_NUMS]
    assert all(i.dtype == torch.long and 0 <= int(i.min()) and int(i.max()) < vae.V for i in idx)


def test_decode_of_encoded_tokens_matches_the_quantised_latent(vae):
    img = images(vae)
    f = vae.quant_conv(vae.encoder(img))
    f_hats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
    idx = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)
    rebuilt = vae.quantize.embed_to_fhat(vae.quantize.idxBl_to_h(idx))
    for a, b in zip(f_hats, rebuilt):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(vae.decode(idx), vae.fhat_to_img(f_hats[-1]))
    # Encoding the decoded latent's tokens again is a fixed point of the residual quantiser.
    assert all(torch.equal(a, b) for a, b in zip(idx, vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)))


def test_residual_quantisation_reduces_the_error_scale_by_scale(vae):
    torch.manual_seed(0)
    # Codebook drawn from the latent itself so nearest-neighbour steps actually shrink the residual.
    f = vae.quant_conv(vae.encoder(images(vae, B=8)))
    codes = f.permute(0, 2, 3, 1).reshape(-1, vae.Cvae)
    vae.quantize.embedding.weight.data.copy_(codes[torch.randperm(codes.shape[0])[:vae.V]])
    for phi in vae.quantize.quant_resi.qresi_ls:  # phi = identity so the error is the plain residual
        phi.resi_ratio = 0.0
    errors = [F.mse_loss(fh, f).item() for fh in vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)]
    assert errors[-1] < errors[0]


def test_teacher_forcing_input_is_the_downsampled_running_reconstruction(vae):
    idx = vae.img_to_idxBl(images(vae))
    x = vae.quantize.idxBl_to_var_input(idx)
    assert x.shape == (3, sum(p * p for p in TINY_PATCH_NUMS) - 1, vae.Cvae)
    prefixes = vae.quantize.embed_to_fhat(vae.quantize.idxBl_to_h(idx))
    start = 0
    for si, pn in enumerate(TINY_PATCH_NUMS[1:]):
        expected = F.interpolate(prefixes[si], size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
        torch.testing.assert_close(x[:, start:start + pn * pn], expected)
        start += pn * pn


def test_var_teacher_forcing_shapes_and_block_causality(vae, var):
    idx = vae.img_to_idxBl(images(vae))
    x = vae.quantize.idxBl_to_var_input(idx)
    label = torch.tensor([0, 2, var.num_classes])
    logits = var(label, x)
    assert logits.shape == (3, var.L, vae.V) and logits.dtype == torch.float32
    # The fused log-prob path (forward with targets) scores the same tokens as log_softmax of these logits.
    idx_BL = torch.cat(idx, 1)
    want = logits.log_softmax(-1).gather(-1, idx_BL.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(var(label, x, target_BL=idx_BL), want, rtol=1e-5, atol=1e-5)
    # Changing the input of the last scale leaves the logits of all earlier scales untouched.
    last_begin = var.begin_ends[-1][0]
    x2 = x.clone()
    x2[:, last_begin - var.first_l:] += 1.0
    logits2 = var(label, x2)
    torch.testing.assert_close(logits2[:, :last_begin], logits[:, :last_begin])
    assert not torch.allclose(logits2[:, last_begin:], logits[:, last_begin:])


def test_class_changes_logits_and_null_class_is_valid(vae, var):
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(images(vae, B=1)))
    a, b = var(torch.tensor([0]), x), var(torch.tensor([var.num_classes]), x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [[-1], [6], [0, 99]])
def test_class_out_of_range_is_rejected(vae, var, bad):
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(images(vae, B=len(bad))))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\]"):
        var(torch.tensor(bad), x)


def test_wrong_image_size_names_the_patch_schedule(vae):
    with pytest.raises(ValueError, match=r"patch schedule .* needs 16x16"):
        vae.img_to_idxBl(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.img_to_idxBl(torch.zeros(1, 1, 16, 16))


def test_wrong_teacher_forcing_shape_is_rejected(var):
    with pytest.raises(ValueError, match="teacher-forcing input has shape"):
        var(torch.tensor([0]), torch.zeros(1, var.L, var.Cvae))


def test_bad_token_maps_are_rejected(vae):
    idx = vae.img_to_idxBl(images(vae, B=2))
    with pytest.raises(ValueError, match="expected 4 token maps"):
        vae.decode(idx[:-1])
    with pytest.raises(ValueError, match=r"token map 1 has shape"):
        vae.decode([idx[0], idx[2], idx[2], idx[3]])


def test_bad_patch_schedule_is_rejected():
    with pytest.raises(ValueError, match="strictly increasing"):
        VQVAE(VQVAEConfig(ch=32, v_patch_nums=(1, 3, 2)))


@pytest.mark.parametrize("depth,millions", [(16, 310), (20, 600), (24, 1000), (30, 2000)])
def test_official_sizes(depth, millions):
    # Parameter counts of the released VAR-d{16,20,24,30} (VAR paper, Table 1), counted on the meta device.
    with torch.device("meta"):
        var = VAR(VARConfig.official(depth))
    n = sum(p.numel() for p in var.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.06, n


def test_shared_adaln_variant_runs(vae):
    var = tiny_var(vae, shared_aln=True)
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(images(vae, B=2)))
    assert var(torch.tensor([0, 1]), x).shape == (2, var.L, vae.V)
    assert "shared_ada_lin.1.weight" in var.state_dict() and "blocks.0.ada_gss" in var.state_dict()
