"""Configs: inheritance, dotted overrides, and every problem reported by name before any work starts."""
from pathlib import Path

import pytest

from var_mclr.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_inheritance_and_overrides():
    cfg = load_config(CONFIGS / "var_d24.yaml", ["train.lr=1e-5", "loss.mclr.tau=null", "data.hflip=false"],
                      check_files=False)
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads) == (24, 1536, 24)
    assert cfg.train.objective == "mclr" and cfg.data.resolution == 256  # inherited from var_d16.yaml
    assert cfg.train.lr == 1e-5 and cfg.loss.mclr.tau is None and cfg.data.hflip is False


def test_every_embedded_config_is_valid():
    for path in sorted((CONFIGS / "mnist").glob("*.yaml")):
        load_config(path, check_files=False)


def test_problems_are_reported_together_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIGS / "var_d16.yaml") + "\ntrain:\n  lrr: 1.0\n  steps: many\n"
                   "loss:\n  mclr:\n    negatives: everything\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, check_files=False)
    msg = str(err.value)
    assert "unknown key train.lrr" in msg and "train.steps = 'many' has the wrong type" in msg
    with pytest.raises(ConfigError, match="loss.mclr.negatives = 'everything' is not one of"):
        load_config(CONFIGS / "var_d16.yaml", ["loss.mclr.negatives=everything"], check_files=False)


def test_missing_files_are_named():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "var_d16.yaml", ["data.root=/nonexistent/imagenet", "model.init=checkpoints/var_d16.pth"])
    msg = str(err.value)
    assert "data.root: file or directory not found: /nonexistent/imagenet" in msg
    assert "model.init: file or directory not found: checkpoints/var_d16.pth" in msg
    # hub names are resolved (through the hub cache) when the run builds its models, not looked up on disk here
    assert "tokenizer.checkpoint" not in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(CONFIGS / "var_d16.yaml", ["train.lr"], check_files=False)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_inheritance_loop_is_caught(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_a_yaml_boolean_is_the_word_no_only_where_no_is_a_choice():
    # train.mixed_precision's choices hold "no": YAML 1.1 reads the unquoted word as false, and it means "no".
    assert load_config(None, ["train.mixed_precision=no"], check_files=False).train.mixed_precision == "no"
    for key in ("run.out_dir", "data.root", "train.lr_schedule"):  # a path (str, str | None), a choice without "no"
        with pytest.raises(ConfigError, match=rf"^{key} = False: .*quote the word") as err:
            load_config(None, [f"{key}=off"], check_files=False)
        assert "\n" not in str(err.value)
    assert load_config(None, ['run.out_dir="off"'], check_files=False).run.out_dir == "off"


def test_keys_the_run_derives_are_refused_by_name_and_not_read():
    for key in ("vocab_size", "Cvae", "num_classes", "patch_nums"):
        with pytest.raises(ConfigError, match=rf"^model\.{key} is not a setting: .*remove it$"):
            load_config(None, [f"model.{key}=4"], check_files=False)
        with pytest.raises(AttributeError, match=f"model.{key} is not a setting"):
            getattr(load_config(None, check_files=False).model, key)


def test_every_section_writes_every_key():
    from dataclasses import fields

    from tokenizer.model import VQVAEConfig
    from var_mclr.config import VAR_DERIVED, Config
    from var_mclr.model import VARConfig
    tree = Config().to_dict()
    assert set(tree["tokenizer"]) == {f.name for f in fields(VQVAEConfig)} | {"checkpoint"}
    assert set(tree["model"]) == {f.name for f in fields(VARConfig)} - set(VAR_DERIVED) | {"init", "drop_path_rate"}
    assert tree["data"]["crop"] == "center" and tree["train"]["keep"] == "last" and "gft" in tree["loss"]
