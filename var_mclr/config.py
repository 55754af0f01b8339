"""Run configuration: YAML files with inheritance and dotted command-line overrides, checked before any work.

A config file may name a parent with ``base: other.yaml`` (relative to itself); the child's keys are merged over
the parent's. ``--set train.lr=1e-5`` overrides one key (the value is parsed as YAML). Unknown keys, wrong
types and missing files are reported together, by dotted name.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from var_mclr.losses import LOSSES


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_ckpts: int = 2


@dataclass
class DataConfig:
    name: str = "synthetic"  # imagefolder | mnist | synthetic
    root: str | None = None  # imagefolder: the directory holding train/ and val/, one sub-directory per class
    resolution: int = 16
    num_classes: int = 4
    hflip: bool = False
    num_workers: int = 0
    cache_tokens: bool = True  # tokenize the whole dataset once (small datasets); else tokenize each batch


@dataclass
class TokenizerConfig:
    checkpoint: str | None = None  # official vae_*.pth or our .safetensors; None only for tokenizer training
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    using_sa: bool = True
    using_mid_sa: bool = True
    v_patch_nums: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])


@dataclass
class ModelConfig:
    init: str | None = None  # official var_d*.pth or our .safetensors; None = train from scratch
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    attn_l2_norm: bool = True


@dataclass
class TrainConfig:
    objective: str = "nll"  # nll | mclr | cca | cc_dpo | unlearning
    steps: int = 1000
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    min_lr_ratio: float = 0.1
    grad_clip: float = 2.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    class_dropout: float = 0.0  # nll objective: share of labels replaced by the null class (pretraining: 0.1)
    max_nonfinite_in_row: int = 10
    kernels: str = "auto"  # auto | naive | chunked | triton: the token log-prob implementation
    # CPU only: flush subnormal floats to zero. Once a mismatched class's tokens become very unlikely (smooth or no
    # cap), subnormals appear and slowed CPU training 4-5x in a measured run; off by default so the documented
    # demo numbers reproduce bit for bit.
    flush_denormal: bool = False


@dataclass
class MCLRConfig:
    lam: float = 1.0
    K: int = 1
    tau: float | None = 0.05  # per-token cap on the log-ratio; null = uncapped (collapses: spec section 8)
    negatives: str = "uniform"  # uniform | roll | null | mixed
    smooth_cap: bool = False


@dataclass
class CCAConfig:
    beta: float = 0.02
    lam: float = 50.0
    uncond_ratio: float = 0.1


@dataclass
class DPOConfig:
    beta: float = 0.02


@dataclass
class UnlearningConfig:
    lam: float = 1.0


@dataclass
class LossConfig:
    mclr: MCLRConfig = field(default_factory=MCLRConfig)
    cca: CCAConfig = field(default_factory=CCAConfig)
    cc_dpo: DPOConfig = field(default_factory=DPOConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)


@dataclass
class TokenizerTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.name": ("imagefolder", "mnist", "synthetic"),
    "train.objective": LOSSES,
    "train.lr_schedule": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.kernels": ("auto", "naive", "chunked", "triton"),
    "loss.mclr.negatives": ("uniform", "roll", "null", "mixed"),
}


# ---- reading -------------------------------------------------------------------------------------------------
def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(path.parent / base, seen + (path,)), raw)


def _merge(parent: dict, child: dict) -> dict:
    out = dict(parent)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, value = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[leaf] = yaml.safe_load(value)


# ---- checking ------------------------------------------------------------------------------------------------
def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _build(cls, tree: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in hints:
            errors.append(f"unknown key {name}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name} must be a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(tp, value, f"{name}.", errors)
        elif isinstance(value, bool) and tp is str:
            kwargs[key] = "yes" if value else "no"  # YAML 1.1 reads no/off as false (train.mixed_precision=no)
        elif isinstance(value, str) and _type_ok(1.0, tp) and _is_number(value):
            kwargs[key] = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        elif not _type_ok(value, tp):
            errors.append(f"{name} = {value!r} has the wrong type (expected {tp if isinstance(tp, type) else str(tp)})")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _check_values(cfg: Config, errors: list[str], check_files: bool) -> None:
    for dotted, allowed in CHOICES.items():
        section, *rest = dotted.split(".")
        value = getattr(cfg, section)
        for part in rest:
            value = getattr(value, part)
        if value not in allowed:
            errors.append(f"{dotted} = {value!r} is not one of {allowed}")
    positive = {"train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
                "train.grad_accum": cfg.train.grad_accum, "data.num_classes": cfg.data.num_classes,
                "data.resolution": cfg.data.resolution, "loss.mclr.K": cfg.loss.mclr.K}
    errors += [f"{k} must be positive, got {v}" for k, v in positive.items() if v <= 0]
    if not 0 <= cfg.train.class_dropout < 1:
        errors.append(f"train.class_dropout must be in [0, 1), got {cfg.train.class_dropout}")
    if cfg.model.embed_dim % cfg.model.num_heads:
        errors.append(f"model.embed_dim {cfg.model.embed_dim} is not divisible by "
                      f"model.num_heads {cfg.model.num_heads}")
    if not check_files:
        return
    for dotted, path in (("data.root", cfg.data.root if cfg.data.name == "imagefolder" else None),
                         ("tokenizer.checkpoint", cfg.tokenizer.checkpoint), ("model.init", cfg.model.init)):
        if path is not None and not Path(path).exists():
            errors.append(f"{dotted}: file or directory not found: {path}")
    if cfg.data.name == "imagefolder" and cfg.data.root is None:
        errors.append("data.root must be set for data.name = imagefolder")


def load_config(path: str | Path | None = None, overrides: list[str] = (), check_files: bool = True) -> Config:
    tree = _read_yaml(Path(path)) if path is not None else {}
    for assignment in overrides:
        _apply_override(tree, assignment)
    errors: list[str] = []
    cfg = _build(Config, tree, "", errors)
    if not errors:
        _check_values(cfg, errors, check_files)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(errors)} problem(s){where}:\n  " + "\n  ".join(errors))
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
