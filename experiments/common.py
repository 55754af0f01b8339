"""What the MNIST experiment scripts share (experiments/sweep.py, ablations.py, frontier.py), so that each of them
only declares what it runs: the demo's base and its tokenizer, fine-tuned stages named as the sweep names them (a
point one script trained is reused by the others), one scoring setup per base, cached evaluation rows and the
written table; mean and spread over seeds and markdown tables come from eval/tables.py (the pipeline's and
eval/compare.py's too). Stage lookup is experiments/stages.py's, the demo's stages experiments/pipeline.py's."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from eval.fid import evaluate, feature_backend
from eval.sampling_run import load_for_eval
from eval.settings import EvalSettings
from experiments.pipeline import pipeline
from experiments.stages import run_stage, stage
from var_mclr.checkpoints import read_model_info
from var_mclr.config import Config
from var_mclr.files import write_text_atomic
from var_mclr.train import train

log = logging.getLogger("experiments")


def experiment_parser(doc: str, num_samples: int) -> argparse.ArgumentParser:
    """--root (where the demo's stages live) and --num-samples; logging set up as every script logs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/mnist")
    p.add_argument("--num-samples", type=int, default=num_samples)
    return p


def tokenizer_of(var_ckpt: Path) -> str:
    """The tokenizer checkpoint a VAR result was trained with (its model.json)."""
    return read_model_info(var_ckpt)["source_config"]["tokenizer"]["checkpoint"]


def finetune_stage(method: str, seed: int, root: Path, base: Path, overrides: list[str]) -> tuple[Config, Path]:
    """The fine-tuning of `base` with configs/mnist/<method>.yaml plus overrides, under the sweep's stage name, so a
    point whose settings any script already trained is reused, not retrained."""
    return stage(f"sweep-{method}-s{seed}", f"{method}.yaml", root,
                 [f"tokenizer.checkpoint={tokenizer_of(base)}", f"run.seed={seed}", f"model.init={base}", *overrides])


def train_stage(cfg: Config, ckpt: Path) -> Path:
    return run_stage(cfg, ckpt, train)


def trained_finetune(method: str, seed: int, root: Path, base: Path, overrides: list[str]) -> Path:
    """The checkpoint of finetune_stage, trained first where it is missing."""
    return train_stage(*finetune_stage(method, seed, root, base, overrides))


@dataclasses.dataclass
class Scoring:
    """The demo's base of one seed and what scores samples of it and of its fine-tunings: the feature network and
    reference of its resolution, on one accelerator."""
    base: Path
    common: EvalSettings  # the settings every evaluation starts from (ckpt = the base)
    net: object
    ref: object
    accelerator: Accelerator
    resolution: int  # the base's image side

    @classmethod
    def of_seed(cls, root: Path, seed: int, num_samples: int, accelerator: Accelerator | None = None,
                **settings) -> "Scoring":
        """Trains the demo's tokenizer and base first where they are missing."""
        base = pipeline(root, seed, [], finetunes=())["base"]
        accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        common = EvalSettings(ckpt=str(base), num_samples=num_samples, cache_dir=str(root / "cache"), **settings)
        vae, _, _ = load_for_eval(str(base))
        net, ref = feature_backend(common, vae.resolution, accelerator.device)
        return cls(base, common, net, ref, accelerator, vae.resolution)

    def metrics(self, out_dir: Path, **settings) -> dict:
        """Sample and score with the common settings changed by `settings`, into out_dir."""
        run = dataclasses.replace(self.common, out_dir=str(out_dir), **settings)
        return evaluate(run, self.net, self.ref, self.accelerator)["metrics"]


def write_table(path: Path, table: str) -> None:
    """A script's result table: written to path and logged."""
    write_text_atomic(path, table)
    log.info("%s:\n%s", path.stem, table)


def cached_row(path: Path, compute: Callable[[], dict]) -> dict:
    """The row saved at path by an earlier run, else compute() saved there: each point is scored once."""
    if path.is_file():
        return json.loads(path.read_text())
    row = compute()
    write_text_atomic(path, json.dumps(row))
    return row
