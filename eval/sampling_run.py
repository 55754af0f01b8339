"""Loading a model to evaluate and sampling a class-balanced, seeded set of images from it.

Shared by eval/fid.py and eval/compare.py. Every batch has its own generator, seeded from (seed, batch start), so the
images do not depend on how batches are spread over processes, and two models sampled with the same seed and batch
size see the same classes and the same random streams (a fair side-by-side grid).
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from eval.settings import SettingsError
from tokenizer.model import VQVAE
from var_mclr.checkpoints import CheckpointError, is_official_checkpoint, load_model, load_official, read_model_info
from var_mclr.files import file_sha256
from var_mclr.model import VAR
from var_mclr.sampling import SamplingConfig, sample_tokens

REPO = Path(__file__).resolve().parents[1]


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_for_eval(ckpt: str, tokenizer: str | None = None, official_vae: str | None = None,
                  depth: int | None = None, num_classes: int = 1000) -> tuple[VQVAE, VAR, dict]:
    """Our safetensors VAR (tokenizer from --tokenizer or the one its training run recorded), or an official pair."""
    if is_official_checkpoint(ckpt):
        if official_vae is None or depth is None:
            raise SettingsError("an official var_d*.pth needs --official-vae and --depth")
        vae, var = load_official(official_vae, ckpt, depth, num_classes=num_classes)
        provenance = {"var": ckpt, "var_sha256": file_sha256(ckpt), "vae": official_vae,
                      "vae_sha256": file_sha256(official_vae)}
        return vae, var.eval(), provenance
    if tokenizer is None:
        recorded = read_model_info(ckpt).get("source_config", {}).get("tokenizer", {}).get("checkpoint")
        if recorded is None:
            raise SettingsError(f"{ckpt} records no tokenizer; pass --tokenizer")
        tokenizer = recorded
    vae = load_model(tokenizer)
    var = load_model(ckpt)
    if not isinstance(vae, VQVAE) or not isinstance(var, VAR):
        raise CheckpointError(f"expected a tokenizer and a VAR, got {type(vae).__name__} and {type(var).__name__}")
    provenance = {"var": ckpt, "var_sha256": file_sha256(ckpt), "vae": tokenizer, "vae_sha256": file_sha256(tokenizer)}
    return vae.eval(), var.eval(), provenance


@dataclass
class SampleSet:
    images_N3HW: torch.Tensor  # float in [-1, 1], on the CPU
    labels_N: torch.Tensor
    seconds: float  # sampling + decoding wall time
    transformer_rows_per_image: int  # 1 guidance-free, 2 with CFG: passes per image per scale
    token_seconds: float = 0.0  # the token sampling alone (transformer + sampler), without the tokenizer's decoder


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_samples) % num_classes


@torch.no_grad()
def sample_set(var: VAR, vae: VQVAE, sampling: SamplingConfig, labels_N: torch.Tensor, batch_size: int, seed: int,
               device: torch.device, show_progress: bool = True) -> SampleSet:
    images, rows, token_seconds = [], 1, 0.0
    tic = time.perf_counter()
    starts = range(0, len(labels_N), batch_size)
    for b, start in enumerate(tqdm(starts, desc=f"sampling ({sampling.guidance})", disable=not show_progress)):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        label_B = labels_N[start:start + batch_size].to(device)
        tok = time.perf_counter()
        result = sample_tokens(var, vae.quantize, label_B, sampling, gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        token_seconds += time.perf_counter() - tok
        images.append(vae.fhat_to_img(result.f_hat).cpu())
        rows = result.transformer_rows // len(label_B)
    return SampleSet(torch.cat(images), labels_N.clone(), time.perf_counter() - tic, rows, token_seconds)
