"""KV-cached sampling agrees with teacher forcing; guidance mixes logits exactly as specified."""
import copy

import pytest
import torch

from var_mclr.model import _FFN_CHUNK_ELEMS, FFN, KVCache
from var_mclr.sampling import SamplingConfig, autoregressive_infer_cfg, sample_images, sample_tokens


def teacher_forced(var, vae, label_B, idx_Bl):
    x = vae.quantize.idxBl_to_var_input(idx_Bl)
    return var(label_B, x)


def per_scale(var, logits_BLV):
    return [logits_BLV[:, b:e] for b, e in var.begin_ends]


@pytest.mark.parametrize("guidance", ["none", "cfg"])
def test_kv_cached_logits_equal_teacher_forced_logits(vae, var, guidance):
    label = torch.tensor([0, 3, 4])
    cfg = SamplingConfig(guidance=guidance, cfg_scale=2.0)
    res = sample_tokens(var, vae.quantize, label, cfg, torch.Generator().manual_seed(0), keep_logits=True)
    for got, want in zip(res.logits_cond_BlV, per_scale(var, teacher_forced(var, vae, label, res.idx_Bl))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if guidance == "cfg":
        null = torch.full_like(label, var.num_classes)
        for got, want in zip(res.logits_null_BlV, per_scale(var, teacher_forced(var, vae, null, res.idx_Bl))):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_guidance_free_never_runs_the_null_class(vae, var, monkeypatch):
    seen = []
    original = var.class_condition

    def spy(label_B, *args):
        seen.append(label_B.clone())
        return original(label_B, *args)

    monkeypatch.setattr(var, "class_condition", spy)
    res = sample_tokens(var, vae.quantize, torch.tensor([1, 2]), SamplingConfig(guidance="none"))
    assert res.transformer_rows == 2
    assert all(int(s.max()) < var.num_classes for s in seen)
    res = sample_tokens(var, vae.quantize, torch.tensor([1, 2]), SamplingConfig(guidance="cfg"))
    assert res.transformer_rows == 4 and int(seen[-1].max()) == var.num_classes


def test_cfg_scale_zero_equals_guidance_free(vae, var):
    label = torch.tensor([0, 1, 2, 3])
    a = sample_tokens(var, vae.quantize, label, SamplingConfig(guidance="none", top_k=20, top_p=0.9),
                      torch.Generator().manual_seed(5))
    b = sample_tokens(var, vae.quantize, label, SamplingConfig(guidance="cfg", cfg_scale=0.0, top_k=20, top_p=0.9),
                      torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.idx_Bl, b.idx_Bl))


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_cfg_samples_the_mixed_logits(vae, var, schedule):
    # With top_k = 1 the sampler is the argmax of what it samples from, which must be (1+t) z_c - t z_u.
    label = torch.tensor([0, 2, 4])
    cfg = SamplingConfig(guidance="cfg", cfg_scale=3.0, cfg_schedule=schedule, top_k=1)
    res = sample_tokens(var, vae.quantize, label, cfg, keep_logits=True)
    S = len(var.patch_nums)
    for si, (zc, zu, idx) in enumerate(zip(res.logits_cond_BlV, res.logits_null_BlV, res.idx_Bl)):
        t = 3.0 * si / (S - 1) if schedule == "linear" else 3.0
        assert cfg.guidance_at(si, S) == pytest.approx(t)
        assert torch.equal(idx, ((1 + t) * zc - t * zu).argmax(-1))
    # And the guidance changed something: plain argmax of z_c differs somewhere.
    assert any(not torch.equal(idx, zc.argmax(-1)) for zc, idx in zip(res.logits_cond_BlV, res.idx_Bl))


def test_same_seed_same_images_and_official_entry_point(vae, var):
    label = torch.tensor([1, 1, 3])
    img1, idx1 = sample_images(var, vae, label, SamplingConfig(top_k=10), torch.Generator().manual_seed(3))
    img2, idx2 = sample_images(var, vae, label, SamplingConfig(top_k=10), torch.Generator().manual_seed(3))
    assert img1.shape == (3, 3, 16, 16) and torch.equal(img1, img2)
    assert [tuple(i.shape) for i in idx1] == [(3, p * p) for p in var.patch_nums]
    out = autoregressive_infer_cfg(var, vae, B=3, label_B=label, g_seed=3, cfg=0, top_k=10)
    torch.testing.assert_close(out, img1.add(1).mul(0.5))
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    out = autoregressive_infer_cfg(var, vae, B=2, label_B=None, g_seed=0, cfg=1.5, top_k=10, top_p=0.9)
    assert out.shape == (2, 3, 16, 16)


def test_bad_sampling_settings_are_rejected(vae, var):
    with pytest.raises(ValueError, match="guidance must be"):
        SamplingConfig(guidance="both")
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplingConfig(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="top_k >= 0"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="class ids"):
        sample_tokens(var, vae.quantize, torch.tensor([9]), SamplingConfig())


def test_kv_cache_is_written_in_place_and_bounded():
    cache = KVCache(max_len=5)
    k1, v1 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k2, v2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    cache.extend(k1, v1)
    k, v = cache.extend(k2, v2)
    assert torch.equal(k, torch.cat((k1, k2), 2)) and torch.equal(v, torch.cat((v1, v2), 2))
    with pytest.raises(ValueError, match="holds 5 tokens"):
        cache.extend(k1, v1)


def test_cpu_inference_ffn_in_row_chunks_equals_one_pass():
    ffn = FFN(64, 256)
    x = torch.randn(3, 3000, 64)  # above the chunking threshold: several chunks, the last one partial
    assert x.numel() > _FFN_CHUNK_ELEMS and (3 * 3000) % (_FFN_CHUNK_ELEMS // 64)
    with torch.no_grad():
        chunked = ffn(x)
        whole = ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x), approximate="tanh"))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a few torch.compile (Inductor) compilations: tens of seconds on the CPU
def test_compiled_blocks_give_the_eager_logits_and_tokens(vae, var):
    label = torch.tensor([0, 3, 4])
    for guidance in ("none", "cfg"):
        cfg = SamplingConfig(guidance=guidance, cfg_scale=2.0, top_k=1)  # greedy: tokens are a function of logits
        eager = sample_tokens(var, vae.quantize, label, cfg, keep_logits=True)
        cfg.compile = True
        compiled = sample_tokens(var, vae.quantize, label, cfg, keep_logits=True)
        for a, b in zip(eager.logits_cond_BlV + eager.logits_null_BlV,
                        compiled.logits_cond_BlV + compiled.logits_null_BlV):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(eager.idx_Bl, compiled.idx_Bl))
    # Training path: blocks compiled in place; same teacher-forced logits and gradients, same state dict keys.
    x = vae.quantize.idxBl_to_var_input(eager.idx_Bl).detach()
    eager_var = copy.deepcopy(var).train()
    var.train().compile_blocks()
    assert list(var.state_dict()) == list(eager_var.state_dict())
    for model in (eager_var, var):
        model(label, x).square().mean().backward()
    torch.testing.assert_close(var(label, x), eager_var(label, x), rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(var.named_parameters(), eager_var.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_sampling_keeps_float32_logits_close_to_full_precision(vae, var):
    label_B = torch.tensor([0, 1, 2, 3])
    cfgs = [SamplingConfig(guidance="cfg", cfg_scale=1.0, mixed_precision=m) for m in ("no", "bf16")]
    full, half = (sample_tokens(var, vae.quantize, label_B, c, torch.Generator().manual_seed(0), keep_logits=True)
                  for c in cfgs)
    first_full, first_half = full.logits_cond_BlV[0], half.logits_cond_BlV[0]  # same inputs at the first scale
    assert first_half.dtype == torch.float32
    assert 0 < (first_half - first_full).abs().max() < 0.1 * first_full.abs().max()  # bf16 ran, and stayed close
    assert all(int(i.min()) >= 0 and int(i.max()) < vae.V for i in half.idx_Bl)
    with pytest.raises(ValueError, match="mixed_precision"):
        SamplingConfig(mixed_precision="fp8")
