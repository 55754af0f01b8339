"""Directories of earlier runs, from before the library's to_dict wrote every key: the demo's stages keep their names
(experiments/stages.py), so every finished stage is found again and none retrains, and a run that recorded a
config without the later keys still resumes."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.stages import MNIST_CONFIGS, stage, stage_hash

# Computed with the code before the change (config.OMITTED_AT_DEFAULT): names, not results.
GOLDEN = {"tokenizer": "f1724ac7", "pretrain": "89944193", "nll": "31633a08", "mclr": "afc0d221", "cca": "d764582b",
          "cc_dpo": "809b2671", "gft": "9f444382", "mclr_dial": "479cea2a", "ddo": "2063e180",
          "finetune": "31633a08"}


def _demo_stages(root: Path) -> dict[str, Path]:
    """Every configs/mnist stage as the pipeline builds it for seed 0 (each fine-tuning from the base)."""
    _, tok = stage("tokenizer", "tokenizer.yaml", root, [], MNIST_CONFIGS)
    common = [f"tokenizer.checkpoint={tok}", "run.seed=0"]
    _, pre = stage("pretrain-s0", "pretrain.yaml", root, common, MNIST_CONFIGS)
    dirs = {"tokenizer": tok.parent, "pretrain": pre.parent}
    for name in GOLDEN.keys() - dirs.keys():
        dirs[name] = stage(f"{name}-s0", f"{name}.yaml", root, [*common, f"model.init={pre}"], MNIST_CONFIGS)[1].parent
    return dirs


def test_the_demo_stage_directories_keep_their_names():
    dirs = _demo_stages(Path("runs/mnist"))
    assert {name: d.name.rsplit("-", 1)[1] for name, d in dirs.items()} == GOLDEN


def test_a_key_added_later_changes_the_name_once_it_leaves_its_default():
    from var_mclr.config import load_config
    cfg = load_config(MNIST_CONFIGS / "mclr.yaml", check_files=False)
    named = stage_hash(cfg)
    for key, value in (("train.keep", "best_heldout"), ("model.strength_cond", True), ("loss.gft.beta", 0.5)):
        assert stage_hash(load_config(MNIST_CONFIGS / "mclr.yaml", [f"{key}={value}"], check_files=False)) != named
    # a key that was always written counts whatever its value
    assert stage_hash(load_config(MNIST_CONFIGS / "mclr.yaml", ["train.lr=2e-4"], check_files=False)) != named


def test_a_run_recorded_without_the_later_keys_resumes_and_another_objective_is_refused(tmp_path):
    import yaml
    from var_mclr.config import load_config
    from var_mclr.run_dir import RunDirError, claim_run_dir, record_changes
    cfg = load_config(MNIST_CONFIGS / "mclr.yaml", check_files=False)
    old = cfg.to_dict()
    for section, key in (("data", "heldout_share"), ("model", "strength_cond"), ("train", "keep")):
        del old[section][key]  # as an earlier version wrote them: left out at their defaults
    del old["loss"]["gft"]
    (tmp_path / "checkpoints" / "step_0000010").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    claim_run_dir(tmp_path, cfg, fresh=False)
    assert record_changes(old, cfg.to_dict(), 10, []) == []
    cfg.model.strength_cond = True
    with pytest.raises(RunDirError, match="model.strength_cond: False -> True"):
        claim_run_dir(tmp_path, cfg, fresh=False)
