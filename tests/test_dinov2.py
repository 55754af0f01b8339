"""FD_DINOv2 end to end on tiny random DINOv2 models written in transformers', timm's and DINOv2's own layouts:
the same weights give the same features through both libraries, nothing is downloaded, and the preprocessing is
dgm-eval's (224 px bicubic, ImageNet mean/std)."""
import json
import socket

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import tiny_vae, tiny_var
from eval.fid import evaluate
from eval.metrics import from_uint8_nhwc
from eval.networks.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2, preprocess, resample_pos_embed
from eval.settings import EvalSettings
from var_mclr.checkpoints import save_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

HIDDEN, LAYERS, HEADS = 128, 2, 2  # 64-d heads, as in every released DINOv2 (a weights file does not record heads)


pytestmark = pytest.mark.usefixtures("one_thread")


def transformers_to_timm(sd: dict) -> dict:
    """transformers' Dinov2Model names -> timm's (= DINOv2's own, less mask_token); q, k, v fused into one qkv.
    transformers 5 names the attention projections q_proj ... o_proj; 4.x: attention.attention.query ... dense."""
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
    for i in layers:
        a, b = f"encoder.layer.{i}.", f"blocks.{i}."
        v5 = a + "attention.q_proj.weight" in sd
        qkv = [f"attention.{x}_proj." for x in "qkv"] if v5 else [f"attention.attention.{x}." for x in
                                                                  ("query", "key", "value")]
        proj = "attention.o_proj." if v5 else "attention.output.dense."
        for s in ("weight", "bias"):
            out[b + "attn.qkv." + s] = torch.cat([sd[a + x + s] for x in qkv])
            out[b + "attn.proj." + s] = sd[a + proj + s]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[b + name + "." + s] = sd[a + name + "." + s]
        out[b + "ls1.gamma"] = sd[a + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = sd[a + "layer_scale2.lambda1"]
    return {k: v.contiguous().clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """One random DINOv2 (4 x 4 position grid, like the released 37 x 37 one: resampled to 16 x 16 at 224 px) saved
    as transformers directories (current and hub names), a timm .safetensors file and an original-layout .pth
    (timm's names + mask_token)."""
    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    patch_size=14, image_size=56)
    model = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():  # every parameter random (layer scales and norms too), so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root / "hf")
    # The layout of the hub's facebook/dinov2-* directories (transformers 4.x names), which transformers 5 renames.
    legacy = root / "hf_legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((root / "hf" / "config.json").read_text())
    old_names = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
                 "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}
    renamed = {}
    for k, v in model.state_dict().items():
        for new, old in old_names.items():
            k = k.replace(new, old)
        renamed[k] = v.contiguous().clone()
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    timm_sd = transformers_to_timm(model.state_dict())
    save_file(timm_sd, root / "timm.safetensors")
    torch.save({**timm_sd, "mask_token": torch.zeros(1, HIDDEN)}, root / "dinov2_original.pth")
    return root, model, timm_sd


def images(n=5, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_same_features_from_transformers_directory_and_timm_file_without_network(tiny_dinov2, monkeypatch):
    root, _, timm_sd = tiny_dinov2

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)  # recorded as well as refused: a library may swallow the error and go on offline
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    x = from_uint8_nhwc(images())
    nets = {p: load_dinov2(str(root / p)) for p in ("hf", "hf_legacy", "timm.safetensors", "dinov2_original.pth")}
    assert [n.backend for n in nets.values()] == ["transformers", "transformers", "timm", "timm"]
    feats = {p: n.features(x) for p, n in nets.items()}
    assert feats["hf"].shape == (5, HIDDEN) and nets["hf"].feat_dim == HIDDEN
    assert torch.allclose(feats["hf"], feats["timm.safetensors"], atol=1e-5)
    assert torch.equal(feats["timm.safetensors"], feats["dinov2_original.pth"])
    assert torch.equal(feats["hf"], feats["hf_legacy"])
    assert feats["hf"].std(0).mean() > 0.1  # features differ between images: the check is not vacuous
    assert attempts == []

    # A slip in the mapping (q and k exchanged in one block) is caught by the comparison above.
    wrong = dict(timm_sd)
    q, k, v = wrong["blocks.1.attn.qkv.weight"].chunk(3)
    wrong["blocks.1.attn.qkv.weight"] = torch.cat([k, q, v])
    save_file(wrong, root / "wrong.safetensors")
    assert not torch.allclose(load_dinov2(str(root / "wrong.safetensors")).features(x), feats["hf"], atol=1e-3)


def test_features_are_dinov2s_at_224_px(tiny_dinov2):
    # Our loaders against the model as DINOv2 runs it: the input preprocessed by hand, the position grid interpolated
    # as DINOv2's interpolate_pos_encoding does (bicubic, scale (16 + 0.1) / 4, no antialias).
    root, model, _ = tiny_dinov2
    u8 = images()
    x = F.interpolate(u8.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic", antialias=True)
    x = (x / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pos = model.embeddings.position_embeddings.detach()
    grid = F.interpolate(pos[:, 1:].reshape(1, 4, 4, HIDDEN).permute(0, 3, 1, 2), scale_factor=16.1 / 4,
                         mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, HIDDEN)
    ref = transformers.Dinov2Model(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ref.embeddings.position_embeddings = torch.nn.Parameter(torch.cat([pos[:, :1], grid], 1))
    with torch.no_grad():
        expected = ref(pixel_values=x).pooler_output
    for path in ("hf", "timm.safetensors"):
        assert torch.allclose(load_dinov2(str(root / path)).features(from_uint8_nhwc(u8)), expected, atol=1e-5)


def test_preprocessing_is_224_bicubic_with_imagenet_normalisation():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    g = torch.Generator().manual_seed(0)
    for size in (256, 16):  # VAR's 256 px samples (downscaled: antialiasing matters) and the 16 px digits
        # Smooth images, like real ones: PIL clips between its two passes, which only bites on pixel noise.
        low = torch.rand(3, 3, 8, 8, generator=g) * 200 + 28
        u8 = F.interpolate(low, size=(size, size), mode="bilinear").round().to(torch.uint8).permute(0, 2, 3, 1)
        x = preprocess(from_uint8_nhwc(u8))
        assert x.shape == (3, 3, 224, 224)
        levels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        # dgm-eval: PIL bicubic to 224 x 224 on the uint8 image, ToTensor, Normalize(ImageNet mean, std).
        pil = np.stack([np.asarray(PIL.Image.fromarray(im.numpy()).resize((224, 224), PIL.Image.Resampling.BICUBIC))
                        for im in u8])
        diff = (levels * 255 - torch.from_numpy(pil).permute(0, 3, 1, 2).float()).abs()
        assert diff.max() < 1.5 and diff.mean() < 0.5, (size, diff.max(), diff.mean())  # PIL rounds to uint8


def test_position_grid_resampling():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert torch.equal(resample_pos_embed(pos, 37), pos)
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, :1], pos[:, :1])
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(torch.randn(1, 1 + 10, 8), 4)


def test_fd_dinov2_end_to_end_through_both_layouts(tiny_dinov2, tmp_path):
    root, _, _ = tiny_dinov2
    vae = tiny_vae()
    save_model(vae, tmp_path / "tok")
    var = str(save_model(tiny_var(vae, num_classes=4), tmp_path / "var"))
    np.savez(tmp_path / "ref.npz", arr_0=images(30, seed=1).numpy())
    records = {}
    for path in ("hf", "timm.safetensors"):
        args = EvalSettings(ckpt=var, tokenizer=str(tmp_path / "tok.safetensors"), num_samples=24, batch_size=12,
                            features="dinov2", dinov2_path=str(root / path), reference=str(tmp_path / "ref.npz"),
                            out_dir=str(tmp_path / path))
        records[path] = evaluate(args)
        saved = json.loads((tmp_path / path / "metrics.json").read_text())
        assert saved["metrics"] == records[path]["metrics"]
    a, b = records["hf"], records["timm.safetensors"]
    assert a["metrics"]["fid"] > 0 and a["metrics"]["fid"] == pytest.approx(b["metrics"]["fid"], rel=1e-4)
    assert a["metrics"]["precision"] == b["metrics"]["precision"] and a["metrics"]["recall"] == b["metrics"]["recall"]
    assert a["metrics"]["class_accuracy"] is None and a["metrics"]["inception_score"] is None
    assert a["feature_network"]["class_accuracy"] == "null: DINOv2 has no classifier head"
    assert "FD_DINOv2" in a["feature_network"]["description"] and "through transformers" in \
        a["feature_network"]["description"]
    assert a["reference"]["fid_statistics"] == "computed" and a["reference"]["precision_recall_images"] == 30


def test_unsupported_dinov2_files_are_refused(tiny_dinov2, tmp_path):
    root, _, timm_sd = tiny_dinov2
    torch.save({**timm_sd, "register_tokens": torch.zeros(1, 4, HIDDEN)}, tmp_path / "reg.pth")
    with pytest.raises(ValueError, match="registers"):
        load_dinov2(str(tmp_path / "reg.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINOv2 ViT"):
        load_dinov2(str(tmp_path / "other.pth"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="'clip' model"):
        load_dinov2(str(tmp_path / "clip"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_dinov2(str(tmp_path))
