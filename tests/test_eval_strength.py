"""eval/fid.py and eval/sample.py take the strength of a strength-conditioned model (--strength: GFT's beta, the MCLR
dial's lambda), give the model its input, record both, and refuse the flag for a model without conditioning."""
import argparse
import json

import pytest
import torch

from conftest import tiny_vae, tiny_var
from eval.fid import build_parser, evaluate
from eval.sample import sample_classes
from eval.settings import EvalSettings, SettingsError, add_eval_arguments
from var_mclr.checkpoints import save_model, weights_sha256


def saved(tmp_path, objective, conditioned=True, num_classes=4):
    """A tokenizer and a VAR saved as training saves them, recording `objective`."""
    vae = tiny_vae()
    tok = save_model(vae, tmp_path / "tok")
    record = {"checkpoint": str(tok), "weights_sha256": weights_sha256(vae), "config": vae.cfg.to_dict()}
    var = tiny_var(vae, num_classes=num_classes, strength_cond=conditioned)
    if conditioned:
        torch.manual_seed(2)
        with torch.no_grad():
            var.strength_emb.mlp[2].weight.normal_(0, 1.0)
    return str(save_model(var, tmp_path / objective, extra={"objective": objective, "tokenizer": record}))


def settings(tmp_path, ckpt, eval_cache, name, **kw):
    return EvalSettings(**{"ckpt": ckpt, "num_samples": 8, "batch_size": 4, "cache_dir": str(eval_cache),
                           "out_dir": str(tmp_path / name), **kw})


def test_fid_records_the_strength_and_what_it_gave_the_model(tmp_path, eval_cache):
    ckpt = saved(tmp_path, "gft")
    record = evaluate(settings(tmp_path, ckpt, eval_cache, "b05", strength=0.5))
    on_disk = json.loads((tmp_path / "b05" / "metrics.json").read_text())
    assert on_disk["settings"]["strength"] == 0.5 and on_disk["settings"]["strength_of"] == "gft"
    assert on_disk["settings"]["sampling"]["strength"] == 0.5 and record["metrics"] == on_disk["metrics"]
    plain = evaluate(settings(tmp_path, ckpt, eval_cache, "none"))  # no flag: as every earlier record
    assert "strength" not in plain["settings"] and "strength" not in plain["settings"]["sampling"]
    assert plain["metrics"]["fid"] != record["metrics"]["fid"]  # the strength reached the sampler


def test_the_dial_takes_lambda_and_gives_the_model_one_over_one_plus_lambda(tmp_path, eval_cache):
    ckpt = saved(tmp_path, "mclr")
    record = evaluate(settings(tmp_path, ckpt, eval_cache, "lam3", strength=3.0))
    assert record["settings"]["strength"] == 3.0 and record["settings"]["strength_of"] == "mclr"
    assert record["settings"]["sampling"]["strength"] == 0.25
    with pytest.raises(SettingsError, match="--strength -1.0: .*lambda >= 0"):
        evaluate(settings(tmp_path, ckpt, eval_cache, "bad", strength=-1.0))


def test_a_model_without_conditioning_refuses_the_flag_in_one_line(tmp_path, eval_cache):
    ckpt = saved(tmp_path, "nll", conditioned=False)
    for run in (lambda: evaluate(settings(tmp_path, ckpt, eval_cache, "f", strength=0.5)),
                lambda: sample_classes(settings(tmp_path, ckpt, eval_cache, "s", strength=0.5), [1], 2)):
        with pytest.raises(SettingsError) as err:
            run()
        assert "--strength 0.5" in str(err.value) and "model.strength_cond" in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(SettingsError, match=r"--strength 1.5: .*beta in \(0, 1\]"):
        evaluate(settings(tmp_path, saved(tmp_path, "gft"), eval_cache, "g", strength=1.5))


def test_sample_json_records_the_strength(tmp_path, eval_cache):
    ckpt = saved(tmp_path, "gft")
    out = sample_classes(settings(tmp_path, ckpt, eval_cache, "png", strength=0.66, num_samples=4), [0, 2], 2)
    record = json.loads((out / "sample.json").read_text())
    assert record["strength"] == 0.66 and record["strength_of"] == "gft" and record["sampling"]["strength"] == 0.66
    plain = sample_classes(settings(tmp_path, ckpt, eval_cache, "png0", num_samples=4), [0], 1)
    assert "strength" not in json.loads((plain / "sample.json").read_text())["sampling"]


def test_the_flag_is_on_the_single_model_commands_only():
    assert build_parser().parse_args(["--strength", "0.7"]).strength == 0.7
    compare_like = add_eval_arguments(argparse.ArgumentParser(), with_ckpt=False)
    assert "strength" not in vars(compare_like.parse_args([]))
