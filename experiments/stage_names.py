"""The names of the pipeline's stage directories: <stage>-<hash of the resolved config>.

A key added to the config after the first stages were named is left out of the hash while it holds its default, so
every stage trained before it existed keeps its name (and is found again, not retrained); set to anything else, it
names a new stage. The library's config writes every key: keeping old names is the experiments' concern alone.
"""
from __future__ import annotations

import hashlib
import json

from var_mclr.config import Config

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
