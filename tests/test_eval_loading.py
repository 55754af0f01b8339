"""Evaluating whatever training produced: which tokenizer decodes, official pairs, sample shards, one output unit.

Tiny random models with the MNIST features (numbers meaningless, plumbing real)."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from conftest import tiny_vae, tiny_var
from eval.compare import check_row_names
from eval.features import mnist_net
from eval.fid import evaluate, read_outputs
from eval.sampling_run import load_for_eval
from eval.settings import EvalSettings, SettingsError, tokenizer_overrides
from eval.shards import shard_path
from var_mclr.checkpoints import save_model, weights_sha256
from var_mclr.hub import HubError, local_path, parse_hub_name
from var_mclr.run_dir import RunDirError, run_dir_lock


def trained_pair(tmp_path, official_tokenizer=False):
    """A tokenizer and a VAR whose model.json records it as training does (path and weight hash)."""
    vae = tiny_vae()
    if official_tokenizer:
        tok = tmp_path / "vae_official.pth"
        torch.save(vae.state_dict(), tok)
    else:
        tok = save_model(vae, tmp_path / "tok")
    record = {"checkpoint": str(tok), "weights_sha256": weights_sha256(vae), "config": vae.cfg.to_dict()}
    var = save_model(tiny_var(vae, num_classes=4), tmp_path / "var", extra={"tokenizer": record})
    return str(tok), str(var)


def settings(tmp_path, var, eval_cache, **kw):
    return EvalSettings(**{"ckpt": var, "num_samples": 8, "batch_size": 4, "cache_dir": str(eval_cache),
                           "out_dir": str(tmp_path / "out"), **kw})


def test_a_recorded_official_pth_tokenizer_loads_with_no_flag(tmp_path):
    tok, var = trained_pair(tmp_path, official_tokenizer=True)
    vae, model, prov = load_for_eval(var)
    assert prov["vae"] == tok and prov["tokenizer_check"] == "same as in training"
    assert vae.cfg.v_patch_nums == model.patch_nums  # the recorded architecture, not the released one


def test_another_tokenizer_is_refused_unless_asked_for_and_then_recorded(tmp_path):
    _, var = trained_pair(tmp_path)
    other = str(save_model(tiny_vae(seed=1), tmp_path / "other"))  # same architecture, other weights
    with pytest.raises(SettingsError, match="is not the one .* was trained with .*--allow-other-tokenizer"):
        load_for_eval(var, other)
    _, _, prov = load_for_eval(var, other, allow_other_tokenizer=True)
    assert prov["tokenizer_check"].startswith("OTHER") and prov["trained_with_vae_weights_sha256"]


def test_a_tokenizer_that_does_not_fit_is_one_line_naming_both(tmp_path):
    _, var = trained_pair(tmp_path)
    other = str(save_model(tiny_vae(vocab_size=32), tmp_path / "v32"))
    with pytest.raises(SettingsError) as err:
        load_for_eval(var, other, allow_other_tokenizer=True)
    msg = str(err.value)
    assert "\n" not in msg and "v32.safetensors does not fit the VAR" in msg and "vocabulary 32 vs 64" in msg
    sched = str(save_model(tiny_vae(patch_nums=(1, 2, 4)), tmp_path / "sched"))
    with pytest.raises(SettingsError, match=r"patch_nums \(1, 2, 4\) vs \(1, 2, 3, 4\)"):
        load_for_eval(var, sched, allow_other_tokenizer=True)


def test_an_official_var_pth_is_read_with_its_own_architecture(tmp_path):
    vae = tiny_vae()
    tok = save_model(vae, tmp_path / "tok")
    var = tiny_var(vae, num_classes=7, depth=3, width=48, heads=3)
    torch.save(var.state_dict(), tmp_path / "var_d3.pth")
    _, loaded, prov = load_for_eval(str(tmp_path / "var_d3.pth"), str(tok))
    assert (loaded.cfg.depth, loaded.cfg.embed_dim, loaded.cfg.num_heads, loaded.num_classes) == (3, 48, 3, 7)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), var.state_dict().values()))
    with pytest.raises(SettingsError, match="--depth 16: .* holds a VAR with 3"):
        load_for_eval(str(tmp_path / "var_d3.pth"), str(tok), depth=16)
    with pytest.raises(SettingsError, match="name its tokenizer with --tokenizer"):
        load_for_eval(str(tmp_path / "var_d3.pth"))


def test_tokenizer_architecture_overrides_name_bad_keys():
    assert tokenizer_overrides(["tokenizer.ch_mult=[1,1]", "tokenizer.vocab_size=64"]) == {
        "ch_mult": [1, 1], "vocab_size": 64}
    with pytest.raises(SettingsError, match="tokenizer.chanels=3"):
        tokenizer_overrides(["tokenizer.chanels=3"])


def test_metrics_json_is_truthful(tmp_path, eval_cache):
    _, var = trained_pair(tmp_path)
    record = evaluate(settings(tmp_path, var, eval_cache))
    assert record["settings"]["num_classes"] == 4 and "cfg_scale" not in record["settings"]
    assert "cfg_scale" not in record["settings"]["sampling"] and record["settings"]["top_k"] == 0
    guided = evaluate(settings(tmp_path, var, eval_cache, guidance="cfg", cfg_scale=2.0,
                               out_dir=str(tmp_path / "cfg")))
    assert guided["settings"]["cfg_scale"] == 2.0 and guided["settings"]["sampling"]["cfg_scale"] == 2.0
    assert read_outputs(tmp_path / "out")["metrics"] == record["metrics"]
    with open(tmp_path / "out" / "samples.npz", "ab") as f:  # a samples.npz that is not the one described
        f.write(b"x")
    with pytest.raises(SettingsError, match="samples.npz is not the file"):
        read_outputs(tmp_path / "out")


def test_a_killed_evaluation_continues_from_its_shards(tmp_path, eval_cache, monkeypatch):
    _, var = trained_pair(tmp_path)
    whole = evaluate(settings(tmp_path, var, eval_cache, out_dir=str(tmp_path / "whole")))
    args = settings(tmp_path, var, eval_cache, keep_shards=True)
    import eval.fid as fid

    real, calls = fid.new_shard, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fid, "new_shard", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(args)
    first = shard_path(tmp_path / "out", 0)
    assert first.exists() and not (tmp_path / "out" / "metrics.json").exists()
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(fid, "new_shard", real)
    again = evaluate(args)
    assert first.stat().st_mtime_ns == stamp  # read back, not resampled
    assert again["metrics"]["fid"] == whole["metrics"]["fid"]
    assert np.array_equal(np.load(tmp_path / "out" / "samples.npz")["arr_0"],
                          np.load(tmp_path / "whole" / "samples.npz")["arr_0"])
    with pytest.raises(SettingsError, match="was made with other settings"):
        evaluate(dataclasses.replace(args, seed=1))


def test_an_evaluation_never_leaves_old_metrics_beside_new_samples(tmp_path, eval_cache, monkeypatch):
    _, var = trained_pair(tmp_path)
    args = settings(tmp_path, var, eval_cache)
    evaluate(args)
    import eval.fid as fid

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fid, "save_png", disk_full)
    with pytest.raises(OSError):
        evaluate(dataclasses.replace(args, seed=3))
    assert not (tmp_path / "out" / "metrics.json").exists()
    with pytest.raises(SettingsError, match="no finished evaluation"):
        read_outputs(tmp_path / "out")


def test_two_evaluations_cannot_share_an_out_dir(tmp_path, eval_cache):
    _, var = trained_pair(tmp_path)
    with run_dir_lock(tmp_path / "out"):
        with pytest.raises(RunDirError, match="in use by another run"):
            evaluate(settings(tmp_path, var, eval_cache))


@pytest.mark.parametrize("name", ["base", "base+cfg1", "../x", ".hidden", "a/b", ""])
def test_compare_row_names_cannot_overwrite_rows_or_escape(name):
    with pytest.raises(SettingsError, match="a row name is"):
        check_row_names([(name, "x.safetensors")])


def test_compare_row_names_may_say_their_setting():
    check_row_names([("mclr lam=10", "a.safetensors"), ("cca_beta0.02", "b.safetensors")])


def test_compare_row_names_are_unique():
    with pytest.raises(SettingsError, match="more than once"):
        check_row_names([("mclr", "a.safetensors"), ("mclr", "b.safetensors")])


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("case, match", [
    ("missing", "file not found"), ("not_zip", "not an .npz archive"), ("float_images", "must be uint8"),
    ("wrong_size", "32x32 images but the samples are 16x16"), ("no_keys", "expected arr_0 images"),
    ("nan_stats", "NaN or inf"), ("npy", "not an .npz archive"),
])
def test_bad_reference_files_are_one_line_before_sampling(tmp_path, eval_cache, monkeypatch, case, match):
    import eval.fid as fid

    monkeypatch.setattr(fid, "sample_shards", lambda *a, **k: pytest.fail("sampled before checking the reference"))
    monkeypatch.setattr(fid, "inception_net", lambda *a, **k: mnist_net(eval_cache, 16)[0])
    ref = tmp_path / "ref.npz"
    images16 = np.zeros((6, 16, 16, 3), np.uint8)
    {"missing": lambda: None, "not_zip": lambda: ref.write_text("not a zip"),
     "float_images": lambda: write_npz(ref, arr_0=images16.astype(np.float32)),
     "wrong_size": lambda: write_npz(ref, arr_0=np.zeros((6, 32, 32, 3), np.uint8)),
     "no_keys": lambda: write_npz(ref, other=images16), "npy": lambda: np.save(open(ref, "wb"), images16),
     "nan_stats": lambda: write_npz(ref, mu=np.full(128, np.nan), sigma=np.eye(128))}[case]()
    _, var = trained_pair(tmp_path)
    with pytest.raises(SettingsError, match=match) as err:
        evaluate(settings(tmp_path, var, eval_cache, features="inception", reference=str(ref),
                          inception_weights="unused.pth"))
    assert "\n" not in str(err.value) and "--reference" in str(err.value)


def test_missing_inception_weights_are_named(tmp_path, eval_cache):
    _, var = trained_pair(tmp_path)
    write_npz(tmp_path / "ref.npz", arr_0=np.zeros((6, 16, 16, 3), np.uint8))
    with pytest.raises(SettingsError, match="--inception-weights nope.pth: .*not found"):
        evaluate(settings(tmp_path, var, eval_cache, features="inception", reference=str(tmp_path / "ref.npz"),
                          inception_weights="nope.pth"))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_too_few_samples_are_refused_before_sampling(tmp_path, eval_cache, n):
    with pytest.raises(SettingsError, match="--num-samples"):
        settings(tmp_path, "x.safetensors", eval_cache, num_samples=n).check()


def test_hub_names_resolve_from_a_filled_cache_offline(tmp_path, monkeypatch):
    commit = "1" * 40
    snap = tmp_path / "models--FoundationVision--var" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "var_d16.pth").write_bytes(b"weights")
    (tmp_path / "models--FoundationVision--var" / "refs").mkdir()
    (tmp_path / "models--FoundationVision--var" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    assert open(local_path("hf://FoundationVision/var/var_d16.pth"), "rb").read() == b"weights"
    with pytest.raises(HubError, match="not in the local hub cache"):
        local_path("hf://FoundationVision/var/var_d20.pth")
    assert local_path("plain/path.pth") == "plain/path.pth"
    assert parse_hub_name("hf://a/b@v1/x/y.pth") == ("a/b", "x/y.pth", "v1")
    with pytest.raises(HubError, match="hf://OWNER/REPO/FILE"):
        parse_hub_name("hf://a/b")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_compare_table_says_first_when_its_feature_network_is_too_weak(tmp_path):
    from eval.compare import write_tables

    row = {"name": "base", "guidance": "none", "cfg_scale": 0.0, "fid": 1.0,
           "feature_network": "small CNN ... WARNING: held-out accuracy 0.5150 < 0.9: too weak."}
    table = write_tables([row], tmp_path, "title")
    assert table.startswith("**WARNING: held-out accuracy 0.5150 < 0.9: too weak.**")
    assert not write_tables([{**row, "feature_network": "strong"}], tmp_path, "title").startswith("**WARNING")
