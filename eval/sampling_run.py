"""Loading a model to evaluate and sampling a class-balanced, seeded set of images from it.

Shared by eval/fid.py and eval/compare.py. Every batch has its own generator, seeded from (seed, batch start), so the
images do not depend on how batches are spread over processes, and two models sampled with the same seed and batch
size see the same classes and the same random streams (a fair side-by-side grid).
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from eval.settings import EvalSettings, SettingsError
from tokenizer.model import VQVAE, VQVAEConfig
from var_mclr.checkpoints import (CheckpointError, is_official_checkpoint, load_model, load_official_var,
                                  load_tokenizer, read_model_info, weights_sha256)
from var_mclr.hub import local_path
from var_mclr.files import file_sha256
from var_mclr.model import VAR
from var_mclr.objectives import OBJECTIVES
from var_mclr.sampling import SamplingConfig, sample_tokens

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_for_eval(ckpt: str, tokenizer: str | None = None, official_vae: str | None = None,
                  depth: int | None = None, num_classes: int | None = None,
                  allow_other_tokenizer: bool = False, tokenizer_arch: dict | None = None
                  ) -> tuple[VQVAE, VAR, dict]:
    """The tokenizer and VAR to evaluate, checked to belong together before any sampling.

    ckpt: our VAR .safetensors (tokenizer: --tokenizer, else the one its training recorded, an official .pth or
    ours), or an official var_d*.pth (tokenizer: --tokenizer or --official-vae; architecture read off the file). A
    tokenizer other than the one the VAR was trained with (by weight hash) is refused unless allow_other_tokenizer,
    and then recorded; one that does not fit the VAR (vocabulary, latent width, patch schedule) is always refused.
    tokenizer_arch: VQVAEConfig fields of an official-layout tokenizer file (--set tokenizer.KEY=VALUE)."""
    if is_official_checkpoint(ckpt):
        vae_path = tokenizer or official_vae
        if vae_path is None:
            raise SettingsError(f"{ckpt} is an official VAR: name its tokenizer with --tokenizer (e.g. "
                                "vae_ch160v4096z32.pth or hf://FoundationVision/var/vae_ch160v4096z32.pth)")
        vae = load_tokenizer(vae_path, _declared_tokenizer({}, tokenizer_arch))
        var = load_official_var(ckpt, vae=vae)
        _check_asked(ckpt, var, depth, num_classes)
        recorded = None
    else:
        var = load_model(ckpt)
        if not isinstance(var, VAR):
            raise CheckpointError(f"{ckpt} holds a {type(var).__name__}, not a VAR")
        recorded = _recorded_tokenizer(ckpt)
        vae_path = tokenizer or official_vae or recorded.get("checkpoint")
        if vae_path is None:
            raise SettingsError(f"{ckpt} records no tokenizer; pass --tokenizer")
        official = is_official_checkpoint(vae_path)
        vae = load_tokenizer(vae_path, _declared_tokenizer(recorded, tokenizer_arch) if official else None)
    check_tokenizer_fits(vae, var, vae_path, ckpt)
    provenance = {"var": ckpt, "var_sha256": file_sha256(local_path(ckpt)), "vae": vae_path,
                  "vae_weights_sha256": weights_sha256(vae)}
    if recorded is not None:
        provenance.update(_tokenizer_identity(vae, vae_path, recorded, ckpt, allow_other_tokenizer))
    return vae.eval(), var.eval(), provenance


def load_models(args: EvalSettings, ckpt: str | None = None) -> tuple[VQVAE, VAR, dict]:
    """load_for_eval with an evaluation's settings (ckpt: another model than args.ckpt, e.g. a compare row)."""
    return load_for_eval(ckpt or args.ckpt, args.tokenizer, args.official_vae, args.depth if ckpt is None else None,
                         args.num_classes, args.allow_other_tokenizer, args.tokenizer_arch)


def strength_input_of(args: EvalSettings, var: VAR) -> float | None:
    """The model's strength input for --strength (docs/method.md, "GFT" and "A strength dial for MCLR"): GFT's beta as
    it is, the MCLR dial's lambda as 1 / (1 + lambda), by the objective the checkpoint records. A model without
    strength conditioning refuses it."""
    if args.strength is None:
        return None
    if var.strength_emb is None:
        raise SettingsError(f"--strength {args.strength}: {args.ckpt} has no strength conditioning (it was trained "
                            "without model.strength_cond); sample it without --strength")
    to_input = getattr(OBJECTIVES.get(strength_objective(args.ckpt)), "strength_input", None)
    try:
        return args.strength if to_input is None else to_input(args.strength)
    except ValueError as e:
        raise SettingsError(f"--strength {args.strength}: {e}") from e


def strength_objective(ckpt: str) -> str | None:
    """The objective a strength-conditioned checkpoint (always ours) was trained with: it says what --strength means."""
    return None if is_official_checkpoint(ckpt) else read_model_info(ckpt).get("objective")


def _check_asked(ckpt: str, var: VAR, depth: int | None, num_classes: int | None) -> None:
    for flag, asked, found in (("--depth", depth, var.cfg.depth), ("--num-classes", num_classes, var.num_classes)):
        if asked is not None and asked != found:
            raise SettingsError(f"{flag} {asked}: {ckpt} holds a VAR with {found}")


def _recorded_tokenizer(ckpt: str) -> dict:
    """The tokenizer record of our VAR's model.json (older runs: the path in their config, with no hash)."""
    info = read_model_info(ckpt)
    if "tokenizer" in info:
        return info["tokenizer"]
    section = info.get("source_config", {}).get("tokenizer", {})
    return {"checkpoint": section.get("checkpoint"), "config": section}


def _declared_tokenizer(recorded: dict, overrides: dict | None) -> VQVAEConfig:
    """The architecture of an official-layout tokenizer file (which holds no hyperparameters): the released one,
    updated by what the VAR's training recorded, then by --set tokenizer.KEY=VALUE."""
    known = {f.name for f in dataclasses.fields(VQVAEConfig)}
    section = {k: v for k, v in (recorded.get("config") or {}).items() if k in known}
    return VQVAEConfig(**{**dataclasses.asdict(VQVAEConfig()), **section, **(overrides or {})})


def check_tokenizer_fits(vae: VQVAE, var: VAR, vae_path: str, ckpt: str) -> None:
    """One line naming both files when the tokenizer cannot decode the VAR's tokens."""
    wants = {"vocabulary": var.cfg.vocab_size, "latent channels (Cvae)": var.cfg.Cvae,
             "patch_nums": tuple(var.patch_nums)}
    has = {"vocabulary": vae.V, "latent channels (Cvae)": vae.Cvae, "patch_nums": tuple(vae.patch_nums)}
    diffs = [f"{k} {has[k]} vs {wants[k]}" for k in wants if has[k] != wants[k]]
    if diffs:
        raise SettingsError(f"tokenizer {vae_path} does not fit the VAR {ckpt}: " + "; ".join(diffs))


def _tokenizer_identity(vae: VQVAE, vae_path: str, recorded: dict, ckpt: str, allow_other: bool) -> dict:
    """Whether vae is the tokenizer the VAR was trained with, by weight hash; a different one only when allowed."""
    want, got = recorded.get("weights_sha256"), weights_sha256(vae)
    if want is None:
        log.warning("%s records no tokenizer hash (trained before they were recorded): cannot check that %s is "
                    "the tokenizer it was trained with", ckpt, vae_path)
        return {"tokenizer_check": "unrecorded"}
    if want == got:
        return {"tokenizer_check": "same as in training"}
    if not allow_other:
        raise SettingsError(f"tokenizer {vae_path} (weights {got[:12]}) is not the one {ckpt} was trained with "
                            f"({recorded.get('checkpoint')}, weights {want[:12]}); pass --allow-other-tokenizer "
                            "to decode with it anyway")
    log.warning("decoding with %s, not the tokenizer %s was trained with (--allow-other-tokenizer)", vae_path, ckpt)
    return {"tokenizer_check": "OTHER than in training (--allow-other-tokenizer)",
            "trained_with_vae": recorded.get("checkpoint"), "trained_with_vae_weights_sha256": want}


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
