"""The settings of one evaluation run, typed, and the command-line flags that fill them (eval/fid.py, compare.py)."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import yaml

from eval.features import FEATURE_NETWORKS, OWN_DATA_NETWORKS
from tokenizer.model import VQVAEConfig
from var_mclr.errors import UserError, add_debug_flag
from var_mclr.sampling import SCHEDULES, SamplingConfig

# VAR's FID sampling settings for ImageNet 256 (FoundationVision/VAR README: top_k=900, top_p=0.96, cfg=1.5).
VAR_FID_CLASSES, VAR_FID_TOP_K, VAR_FID_TOP_P = 1000, 900, 0.96


class SettingsError(UserError, ValueError):
    pass


@dataclass
class EvalSettings:
    ckpt: str | None = None  # our VAR .safetensors, or an official var_d*.pth
    tokenizer: str | None = None  # tokenizer .safetensors (default: the one the VAR was trained with)
    official_vae: str | None = None  # official vae_ch160v4096z32.pth (with an official ckpt)
    depth: int | None = None  # checked against an official ckpt's depth (read off the file)
    num_classes: int | None = None  # checked against an official ckpt's class count (read off the file)
    allow_other_tokenizer: bool = False  # decode with a tokenizer other than the one the VAR was trained with
    # --set tokenizer.KEY=VALUE: the architecture of an official-layout tokenizer .pth (the file holds no
    # hyperparameters; default: the released vae_ch160v4096z32's, or what the VAR's training recorded)
    tokenizer_arch: dict = dataclasses.field(default_factory=dict)
    guidance: str = "none"  # none | cfg
    cfg_scale: float = 1.5
    cfg_schedule: str = "linear"
    top_k: int | None = None  # None: VAR's FID protocol (900) for 1000-class models, off (0) otherwise
    top_p: float | None = None  # None: VAR's FID protocol (0.96) for 1000-class models, off (0) otherwise
    mixed_precision: str = "no"  # no | bf16: the transformer under bf16 autocast while sampling
    # The sampling strength of a strength-conditioned model (model.strength_cond): GFT's beta, the MCLR dial's lambda
    # (eval/sampling_run.py, strength_input_of); None: the model's neutral input. Refused for other models.
    strength: float | None = None
    num_samples: int = 5000
    batch_size: int = 500
    seed: int = 0
    features: str = "mnist"  # mnist | classifier (a CNN of the model's own data) | inception | dinov2
    inception_weights: str | None = None  # local Inception-v3 weights file (never downloaded)
    dinov2_path: str | None = None  # local DINOv2 directory (transformers) or weights file (timm)
    reference: str | None = None  # reference .npz: ADM batch (arr_0 images) and/or mu, sigma
    class_map: str | None = None  # JSON list: the generator label of each Inception output (class accuracy)
    cache_dir: str = "runs/cache"  # where the embedded eval classifier is cached
    out_dir: str = "runs/eval/latest"
    keep_shards: bool = False  # keep OUT/shards/ after samples.npz is assembled (they hold the same images)

    def sampling(self, num_classes: int, strength_input: float | None = None) -> SamplingConfig:
        """The sampler's settings for a model of num_classes classes: unset top-k / top-p follow VAR's FID protocol
        (top-k 900, top-p 0.96) for ImageNet's 1000 classes and are off otherwise (the small models here).
        strength_input: the model's input for --strength (eval/sampling_run.py, strength_input_of)."""
        imagenet = num_classes == VAR_FID_CLASSES
        top_k = self.top_k if self.top_k is not None else (VAR_FID_TOP_K if imagenet else 0)
        top_p = self.top_p if self.top_p is not None else (VAR_FID_TOP_P if imagenet else 0.0)
        return SamplingConfig(guidance=self.guidance, cfg_scale=self.cfg_scale, cfg_schedule=self.cfg_schedule,
                              top_k=top_k, top_p=top_p, mixed_precision=self.mixed_precision, strength=strength_input)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Refuse, by flag, settings that would fail deep inside torch or score meaningless samples."""
        problems = [f"{flag} = {value!r} is out of range: must be {allowed}" for flag, value, ok, allowed in (
            ("--num-samples", self.num_samples, self.num_samples >= 4,
             "an integer >= 4 (a covariance and precision/recall's 3 nearest neighbours need more than 3)"),
            ("--batch-size", self.batch_size, self.batch_size > 0, "an integer > 0"),
            ("--cfg-scale", self.cfg_scale, math.isfinite(self.cfg_scale), "a finite number"),
            ("--top-k", self.top_k, self.top_k is None or self.top_k >= 0, "an integer >= 0 (0: off)"),
            ("--top-p", self.top_p, self.top_p is None or 0 <= self.top_p <= 1, "in [0, 1] (0: off)"),
            ("--strength", self.strength, self.strength is None or math.isfinite(self.strength), "a finite number"),
        ) if not ok]
        # Only the inception and dinov2 features read a reference file; the mnist features compare with the embedded
        # training digits, so a reference given with them would be silently ignored.
        if self.reference is not None and self.features in OWN_DATA_NETWORKS:
            problems.append("--reference is used only with --features inception or dinov2 (--features mnist compares "
                            "with the embedded training digits)")
        if self.reference is None and self.features not in OWN_DATA_NETWORKS:
            problems.append(f"--features {self.features} needs --reference (an ADM-style .npz of real images or "
                            "mu/sigma)")
        if problems:
            raise SettingsError("; ".join(problems))


def add_eval_arguments(p: argparse.ArgumentParser, with_ckpt: bool = True) -> argparse.ArgumentParser:
    """The flags of EvalSettings (with --ckpt unless the caller names its models otherwise)."""
    d = EvalSettings()
    if with_ckpt:
        p.add_argument("--ckpt", help="our VAR .safetensors, or an official var_d*.pth (eval/fid.py without it: the "
                                       "embedded demo's newest MCLR model)")
    p.add_argument("--tokenizer", help="tokenizer .safetensors or official .pth, a path or hf://OWNER/REPO/FILE "
                                        "(default: the one the VAR was trained with)")
    p.add_argument("--official-vae", help="same as --tokenizer (kept for older commands)")
    p.add_argument("--allow-other-tokenizer", action="store_true",
                   help="decode with a --tokenizer whose weights differ from the one the VAR was trained with "
                        "(recorded in metrics.json)")
    p.add_argument("--set", dest="tokenizer_set", action="append", default=[], metavar="tokenizer.KEY=VALUE",
                   help="architecture of an official-layout tokenizer .pth, e.g. --set tokenizer.vocab_size=4096")
    p.add_argument("--depth", type=int, help="checked against an official --ckpt (its depth is read off the file)")
    p.add_argument("--num-classes", type=int, help="checked against an official --ckpt (read off the file)")
    p.add_argument("--guidance", choices=("none", "cfg"), default=d.guidance)
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--cfg-schedule", choices=SCHEDULES, default=d.cfg_schedule)
    p.add_argument("--top-k", type=int, help="default: 900 (VAR's FID protocol) for 1000-class models, else 0 (off)")
    p.add_argument("--top-p", type=float, help="default: 0.96 (VAR's FID protocol) for 1000-class models, else 0 (off)")
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default=d.mixed_precision,
                   help="bf16: run the transformer under bf16 autocast while sampling (GPU speed)")
    if with_ckpt:  # one model's strength (a comparison of several models has no one strength)
        p.add_argument("--strength", type=float,
                       help="sampling strength of a strength-conditioned model: beta in (0, 1] for GFT (1: no "
                            "guidance), lambda >= 0 for the MCLR dial (0: none); refused for other models")
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--features", choices=FEATURE_NETWORKS, default=d.features,
                   help="mnist: the MNIST CNN (MNIST models only); classifier: a small CNN trained once on the model's "
                        "own training split (any labelled data; cached in --cache-dir); inception, dinov2: with "
                        "--reference")
    p.add_argument("--inception-weights", help="local Inception-v3 weights file (never downloaded)")
    p.add_argument("--dinov2-path", help="local DINOv2 directory (transformers) or weights file (timm)")
    p.add_argument("--reference", help="reference .npz: ADM batch (arr_0 images) and/or mu, sigma")
    p.add_argument("--class-map", help="JSON list, one entry per Inception output: the generator label it stands for "
                   "(or null); needed for class accuracy with the 1008-class TF FID weights")
    p.add_argument("--cache-dir", default=d.cache_dir, help="where the embedded eval classifier is cached")
    p.add_argument("--out-dir", default=d.out_dir, help="samples.npz, grid.png, metrics.json; shards/ while "
                                                         "sampling (a rerun continues from them)")
    p.add_argument("--keep-shards", action="store_true", help="keep OUT/shards/ after samples.npz is written")
    return add_debug_flag(p)


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The EvalSettings fields out of parsed flags (other flags of the caller's parser are ignored)."""
    names = {f.name for f in dataclasses.fields(EvalSettings)}
    fields = {k: v for k, v in vars(args).items() if k in names}
    return EvalSettings(**fields, tokenizer_arch=tokenizer_overrides(getattr(args, "tokenizer_set", [])))


def tokenizer_overrides(items: list[str]) -> dict:
    """{key: value} of --set tokenizer.KEY=VALUE items (YAML values), each key a VQVAEConfig field."""
    known = {f.name for f in dataclasses.fields(VQVAEConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section != "tokenizer" or name not in known:
            raise SettingsError(f"--set {item}: expected tokenizer.KEY=VALUE with KEY one of {sorted(known)}")
        out[name] = yaml.safe_load(value)
    return out
