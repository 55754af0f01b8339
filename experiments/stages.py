"""Where each stage of the pipeline lives, and whether it is done: the stage configs (configs/mnist, configs/folder),
each stage's directory <stage>-<hash of its resolved config> under the run root, and its result.

A key added to the config after the first stages were named is left out of the hash while it holds its default, so
every stage trained before it existed keeps its name (and is found again, not retrained); set to anything else, it
names a new stage. The library's config writes every key: keeping old names is the experiments' concern alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from var_mclr.checkpoints import is_complete_result
from var_mclr.config import Config, load_config
from var_mclr.errors import UserError
from var_mclr.files import CONFIG_DIR

log = logging.getLogger("experiments.stages")
STAGE_CONFIGS = {"mnist": CONFIG_DIR / "mnist", "imagefolder": CONFIG_DIR / "folder"}  # by --data
MNIST_CONFIGS = STAGE_CONFIGS["mnist"]


class PipelineError(UserError, ValueError):
    """A pipeline setting, or what a stage found, that the later stages cannot use; the message says what to change."""


# Dotted config keys (a whole section too) added after stage directories were first named, in the order they came.
ADDED_AFTER_NAMING = (
    "run.eval_every", "run.eval_images", "run.log_with",
    "data.verify", "data.crop", "data.heldout_share",
    "train.epochs", "train.keep", "train.global_batch", "train.micro_batch", "train.activation_checkpointing",
    "train.compile",
    "loss.mclr.tau_multiple", "loss.mclr.lam_range", "loss.mclr.lam_draw",
    "model.strength_cond",
    "loss.ddo", "loss.gft",
)


def _without_added_at_default(tree: dict, defaults: dict) -> dict:
    for dotted in ADDED_AFTER_NAMING:
        *parents, leaf = dotted.split(".")
        node, default = tree, defaults
        for part in parents:
            node, default = node[part], default[part]
        if leaf in node and node[leaf] == default[leaf]:
            node.pop(leaf)
    return tree


def stage_hash(cfg: Config) -> str:
    """8 hex digits of the config without its run.out_dir (the directory it names) and the keys added later while
    at their defaults."""
    tree = _without_added_at_default(cfg.to_dict(), Config().to_dict())
    tree["run"].pop("out_dir")
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def stage(name: str, yaml_name: str, root: Path, overrides: list[str],
          configs: Path = MNIST_CONFIGS) -> tuple[Config, Path]:
    """The stage's config (configs/<yaml_name>) with its output directory, named by its hash."""
    cfg = load_config(configs / yaml_name, overrides, check_files=False)
    out_dir = root / f"{name}-{stage_hash(cfg)}"
    cfg.run.out_dir = str(out_dir)
    return cfg, out_dir / "model.safetensors"


def run_stage(cfg: Config, result: Path, fn: Callable[[Config], Path]) -> Path:
    """The stage's result: the one already there, else fn(cfg) trains it."""
    if result.exists() and is_complete_result(result):  # weights without hyperparameters: the stage rebuilds them
        log.info("cached: %s", result)
        return result
    log.info("running stage -> %s", result.parent)
    return fn(cfg)
