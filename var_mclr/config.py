"""Run configuration: YAML files with inheritance and dotted command-line overrides, checked before any work.

A config file may name a parent with ``base: other.yaml`` (relative to itself); the child's keys are merged over
the parent's. ``--set train.lr=1e-5`` overrides one key (the value is parsed as YAML). Unknown keys, wrong
types and missing files are reported together, by dotted name.

Each architecture is declared once: the ``tokenizer`` section is tokenizer.model.VQVAEConfig plus the checkpoint to
load (TokenizerConfig), the ``model`` section var_mclr.model.VARConfig less what the tokenizer and the data decide
(vocabulary, latent width, patch schedule, class count) plus the weights to start from and the drop-path rate
(ModelConfig). Every section writes every key (Config.to_dict).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from tokenizer.model import VQVAEConfig
from var_mclr.errors import ConfigError, add_debug_flag, reporting_user_errors  # noqa: F401 (ConfigError: re-exported)
from var_mclr.files import config_file, write_text_atomic
from var_mclr.kernels.logprob import IMPLS as LOGPROB_KERNELS
from var_mclr.hub import is_hub_name
from var_mclr.model import VARConfig
from var_mclr.objectives import OBJECTIVES, LossConfig, objective_errors
from var_mclr.objectives.base import nonnegative, positive, share


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_ckpts: int = 2
    # Held-out tracking (var_mclr/heldout.py): every eval_every steps, the nll per token and the log-ratio per token
    # of up to eval_images held-out images, and of as many training images, go to metrics.jsonl; 0 = off.
    eval_every: int = 0
    eval_images: int = 512
    # Experiment tracker, through accelerate's log_with: tensorboard (run.out_dir/tb), wandb (needs wandb installed
    # and logged in), or none; metrics.jsonl is written either way.
    log_with: str = "tensorboard"


CROPS = ("imagenet", "center", "none")  # data.crop


@dataclass
class DataConfig:
    """data: which images, and how they are read. var_mclr/data.py takes every default from here."""
    name: str = "synthetic"  # imagefolder | mnist | synthetic
    root: str | None = None  # imagefolder: the directory holding train/ and val/, one sub-directory per class
    resolution: int = 16
    num_classes: int = 4
    hflip: bool = False
    num_workers: int = 0
    cache_tokens: bool = True  # tokenize the whole dataset once (small datasets); else tokenize each batch
    # imagefolder: open every file once before training so unreadable ones are never drawn (the index is cached
    # under the run's parent directory); false skips that scan (ImageNet) and a file that fails to decode is replaced
    # by the next readable one of its class when read.
    verify: bool = True
    # imagefolder: resize/crop policy (CROPS, applied by var_mclr/data.py var_transform): imagenet (VAR's 1.125x
    # resize + random crop), center (shorter side to the resolution + centre crop) or none (whole image resized to a
    # square).
    crop: str = "center"
    # imagefolder without val/: the last share of every class of train/ is held out as the val split (never trained
    # on, by the tokenizer or VAR); 0 = no held-out split. Ignored when val/ exists.
    heldout_share: float = 0.0


class _Derived:
    """A VARConfig key the run derives (var_config): ModelConfig declares it a class variable, which takes it out of
    the section's fields, and reading it says so instead of giving VARConfig's default."""

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        raise AttributeError(f"model.{self.name} is not a setting: the run derives it from the tokenizer and "
                             "data.num_classes (config.var_config)")


@dataclass
class TokenizerConfig(VQVAEConfig):
    """tokenizer: the VQ-VAE architecture (tokenizer/model.py, VQVAEConfig: every key and its default) and its
    weights."""
    checkpoint: str | None = None  # official vae_*.pth or our .safetensors; None only for tokenizer training


@dataclass
class ModelConfig(VARConfig):
    """model: the VAR architecture (var_mclr/model.py, VARConfig: every key and its default) less the keys the run
    derives, which a config may not set, plus two run-level keys."""
    init: str | None = None  # official var_d*.pth or our .safetensors; None = train from scratch
    # Stochastic depth of the last block while training (official VAR: 0.1 * depth / 24; 0 = off), not part of the
    # architecture.
    drop_path_rate: float = 0.0
    vocab_size: typing.ClassVar = _Derived()
    Cvae: typing.ClassVar = _Derived()
    num_classes: typing.ClassVar = _Derived()
    patch_nums: typing.ClassVar = _Derived()


# Architecture keys of VARConfig that the run derives instead of declaring: vocabulary, latent width and patch
# schedule come from the tokenizer, the class count from data.num_classes.
VAR_DERIVED = tuple(name for name, value in vars(ModelConfig).items() if isinstance(value, _Derived))


def vqvae_config(section) -> VQVAEConfig:
    """The tokenizer architecture a config's tokenizer section declares."""
    return VQVAEConfig(**{f.name: getattr(section, f.name) for f in dataclasses.fields(VQVAEConfig)})


def var_config(section, vocab_size: int, Cvae: int, num_classes: int, patch_nums: tuple[int, ...]) -> VARConfig:
    """The VAR architecture a config's model section declares, completed by the tokenizer and the data."""
    declared = {f.name: getattr(section, f.name) for f in dataclasses.fields(VARConfig) if f.name not in VAR_DERIVED}
    return VARConfig(vocab_size=vocab_size, Cvae=Cvae, num_classes=num_classes, patch_nums=tuple(patch_nums),
                     **declared)


@dataclass
class TrainConfig:
    objective: str = "nll"  # a name of the objectives' registry (var_mclr/objectives/__init__.py, REGISTERED)
    steps: int = 1000
    # Length in passes over the training split instead of steps: steps = ceil(epochs x images / global batch),
    # resolved when the run starts and logged (docs/method.md, "Training length"). null = use steps.
    epochs: float | None = None
    # Which weights the run returns: last, or best_heldout (the lowest held-out nll of the run.eval_every
    # evaluations; needs run.eval_every > 0 and held-out data): early stopping for a base that would memorise.
    keep: str = "last"
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    # The recipe's batch: images per optimizer step over all processes (CCA: 256). When set, batch_size and
    # grad_accum are derived from it, train.micro_batch and the process count when the run starts (and logged); a
    # global batch the processes cannot make exactly is refused. null = the per-process form above (global batch =
    # batch_size x processes x grad_accum), kept for the single-process demo configs.
    global_batch: int | None = None
    # With global_batch: images per process per forward; auto = the largest the memory plan fits on this GPU
    # (var_mclr/plan.py); null = global_batch / processes (no accumulation).
    micro_batch: int | str | None = None
    # Keep only each block's input and recompute its activations in the backward (VAR.activation_checkpointing):
    # ~13x less activation memory for one more forward of the blocks (bench/bench_checkpointing.py).
    activation_checkpointing: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warm-up) | lin0 (VAR's: docs/method.md)
    min_lr_ratio: float = 0.1
    grad_clip: float = 2.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    # nll and mclr: share of labels replaced by the null class (pretraining: 0.1); the reference baselines null-mask
    # with their own loss.*.uncond_ratio instead.
    class_dropout: float = 0.0
    max_nonfinite_in_row: int = 10
    kernels: str = "auto"  # auto | naive | chunked | triton: the token log-prob implementation
    # CPU only: flush subnormal floats to zero. Once a mismatched class's tokens become very unlikely (smooth or no
    # cap, CC-DPO at a large beta), subnormals appear and slowed CPU training 4-5x in measured runs (docs/
    # performance.md, "Subnormal floats"). configs/folder turns it on; off here so the demo's numbers stay as given.
    flush_denormal: bool = False
    # torch.compile the transformer blocks (VAR.compile_blocks); checkpoints are unchanged. README "Performance"
    # gives the measured CPU speed-up and the compile time.
    compile: bool = False


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
        return _plain(dataclasses.asdict(self))


def _plain(tree):
    """Tuples as lists, so the tree dumps to YAML and JSON and compares equal to what was read back."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    return tree


CHOICES = {
    "data.name": ("imagefolder", "mnist", "synthetic"),
    "run.log_with": ("tensorboard", "wandb", "none"),
    "data.crop": CROPS,
    "train.objective": tuple(OBJECTIVES),
    "train.keep": ("last", "best_heldout"),
    "train.lr_schedule": ("cosine", "linear", "constant", "lin0"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.kernels": LOGPROB_KERNELS,
}  # an objective's own choices are checked by its file (var_mclr/objectives/)


# ---- reading -------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a second
    ``train:`` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):  # PyYAML's own construct_mapping refuses it, naming the line
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str):
    """YAML, or a ConfigError naming the file (or override) and the line instead of PyYAML's traceback."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{at}: malformed YAML: {problem}") from e


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    raw = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base = {base!r} must be the path of one parent config file (a string)")
    return _merge(_read_yaml(path.parent / base, seen + (path,)), raw)


def with_defaults(recorded: dict) -> dict:
    """A config tree a run recorded, completed with the defaults of the keys it lacks (earlier versions left some out
    while at their defaults), so it compares with to_dict() key by key."""
    return _merge(Config().to_dict(), recorded)


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
    node[leaf] = _parse_yaml(value, f"override {assignment!r}")


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
    if origin is tuple:  # tuple[int, ...] in an architecture config: a YAML list
        item = typing.get_args(tp)[0]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
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


def _admits_str(tp) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _build(cls, tree: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    keys = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(vars(cls).get(key), _Derived):
            errors.append(f"{name} is not a setting: the run derives it from the tokenizer and data.num_classes; "
                          "remove it")
            continue
        if key not in keys:
            errors.append(f"unknown key {name}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name} must be a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(tp, value, f"{name}.", errors)
        elif isinstance(value, bool) and _admits_str(tp):
            if "no" in CHOICES.get(name, ()):  # YAML 1.1 reads no/off as false: train.mixed_precision=no
                kwargs[key] = "yes" if value else "no"
            else:
                errors.append(f"{name} = {value!r}: YAML reads an unquoted yes/no/on/off as a boolean; quote the "
                              f"word (e.g. {key}: \"off\", or --set '{name}=\"off\"')")
        elif isinstance(value, str) and _type_ok(1.0, tp) and _is_number(value):
            kwargs[key] = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        elif not _type_ok(value, tp):
            errors.append(f"{name} = {value!r} has the wrong type (expected {tp if isinstance(tp, type) else str(tp)})")
        elif typing.get_origin(tp) is tuple:
            kwargs[key] = tuple(value)
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
                "data.resolution": cfg.data.resolution}
    errors += [f"{k} must be positive, got {v}" for k, v in positive.items() if v <= 0]
    errors += objective_errors(cfg)  # each objective's section, by its own file
    errors += _batch_errors(cfg.train)
    if cfg.train.keep == "best_heldout" and cfg.run.eval_every == 0:
        errors.append("train.keep = best_heldout needs run.eval_every > 0 (the held-out evaluations it chooses from)")
    if not 0 <= cfg.train.class_dropout < 1:
        errors.append(f"train.class_dropout must be in [0, 1), got {cfg.train.class_dropout}")
    errors += _range_errors(cfg)
    if cfg.model.embed_dim % cfg.model.num_heads:
        errors.append(f"model.embed_dim {cfg.model.embed_dim} is not divisible by "
                      f"model.num_heads {cfg.model.num_heads}")
    if not check_files:
        return
    for dotted, path in (("data.root", cfg.data.root if cfg.data.name == "imagefolder" else None),
                         ("tokenizer.checkpoint", cfg.tokenizer.checkpoint), ("model.init", cfg.model.init)):
        if path is not None and not is_hub_name(path) and not Path(path).exists():
            errors.append(f"{dotted}: file or directory not found: {path}")
    if cfg.data.name == "imagefolder" and cfg.data.root is None:
        errors.append("data.root must be set for data.name = imagefolder")
    elif (cfg.data.name == "imagefolder" and cfg.run.eval_every and cfg.data.heldout_share == 0
          and Path(cfg.data.root).is_dir() and not (Path(cfg.data.root) / "val").is_dir()):
        errors.append(f"run.eval_every needs held-out images, but data.root {cfg.data.root} has no val/ and "
                      "data.heldout_share is 0 (set it to e.g. 0.1)")


def _batch_errors(t: TrainConfig) -> list[str]:
    if t.global_batch is None:
        return [] if t.micro_batch is None else ["train.micro_batch needs train.global_batch (the images per step "
                                                 "it divides); or set train.batch_size alone"]
    errors = [] if t.global_batch > 0 else [f"train.global_batch must be positive, got {t.global_batch}"]
    mb = t.micro_batch
    if not (mb is None or mb == "auto" or (isinstance(mb, int) and mb > 0)):
        errors.append(f"train.micro_batch = {mb!r} must be a positive integer, auto or null")
    elif isinstance(mb, int) and t.global_batch > 0 and t.global_batch % mb:
        errors.append(f"train.micro_batch {mb} does not divide train.global_batch {t.global_batch}")
    return errors


def _range_errors(cfg: Config) -> list[str]:
    """Numbers outside the range where they mean what their name says. Each of these used to train silently wrong
    (grad_clip < 0 ascends the gradient, 0 freezes the model, min_lr_ratio < 0 gives a negative rate) or to fail only
    after files were written (ckpt_every 0, log_every 0, tokenizer_train.steps 0)."""
    t, tt, run = cfg.train, cfg.tokenizer_train, cfg.run

    pos, nonneg = positive, nonnegative  # the wording of every objective's rules too (var_mclr/objectives/base.py)
    rules = [
        # numpy's global seed (accelerate's set_seed) takes [0, 2**32): anything else fails after out_dir is made.
        ("run.seed", run.seed, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
        ("train.lr", t.lr, pos, "a finite number > 0"),
        ("train.weight_decay", t.weight_decay, nonneg, "a finite number >= 0"),
        ("train.warmup_steps", t.warmup_steps, lambda v: v >= 0, "an integer >= 0"),
        ("train.min_lr_ratio", t.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
        # inf is allowed: clip_grad_norm_ then measures the norm without clipping.
        ("train.grad_clip", t.grad_clip, lambda v: v > 0, "> 0 (.inf turns clipping off)"),
        ("train.betas", t.betas, lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        ("train.max_nonfinite_in_row", t.max_nonfinite_in_row, lambda v: v >= 1, "an integer >= 1"),
        ("run.log_every", run.log_every, lambda v: v > 0, "an integer > 0"),
        ("run.ckpt_every", run.ckpt_every, lambda v: v > 0, "an integer > 0"),
        ("run.keep_ckpts", run.keep_ckpts, lambda v: v >= 1, "an integer >= 1"),
        ("run.eval_every", run.eval_every, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
        ("run.eval_images", run.eval_images, lambda v: v > 0, "an integer > 0"),
        ("train.epochs", t.epochs, lambda v: v is None or pos(v), "null or a finite number > 0"),
        ("data.heldout_share", cfg.data.heldout_share, share, "in [0, 1)"),
        ("data.num_workers", cfg.data.num_workers, lambda v: v >= 0, "an integer >= 0"),
        ("tokenizer_train.steps", tt.steps, lambda v: v > 0, "an integer > 0"),
        ("tokenizer_train.batch_size", tt.batch_size, lambda v: v > 0, "an integer > 0"),
        ("tokenizer_train.lr", tt.lr, pos, "a finite number > 0"),
        ("tokenizer_train.warmup_steps", tt.warmup_steps, lambda v: v >= 0, "an integer >= 0"),
        ("tokenizer_train.grad_clip", tt.grad_clip, lambda v: v > 0, "> 0 (.inf turns clipping off)"),
    ]
    return [f"{key} = {value!r} is out of range: must be {allowed}" for key, value, ok, allowed in rules
            if not ok(value)]


def load_config(path: str | Path | None = None, overrides: list[str] = (), check_files: bool = True) -> Config:
    tree = _read_yaml(config_file(path)) if path is not None else {}
    for assignment in overrides:
        _apply_override(tree, assignment)
    errors: list[str] = []
    cfg = _build(Config, tree, "", errors)
    if not errors:
        _check_values(cfg, errors, check_files)
    if errors:
        if len(errors) == 1:  # one line, as every user error is reported
            raise ConfigError(f"{path}: {errors[0]}" if path else errors[0])
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(errors)} problem(s){where}:\n  " + "\n  ".join(errors))
    return cfg


def config_arg_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line of every config-driven entry point: --cfg FILE, repeated --set KEY=VALUE, --fresh, --debug."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML config (may name a parent with `base:`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-5")
    p.add_argument("--fresh", action="store_true",
                   help="delete what an earlier run left in run.out_dir (checkpoints, metrics, tb/, config.yaml, final "
                        "weights) and start over; needed to change the objective or the architecture of a directory "
                        "that already holds a run")
    return add_debug_flag(p)


def run_from_command_line(run: Callable[..., object], description: str | None, argv: list[str] | None) -> None:
    """Parse the config command line, then run(config, fresh=...), printing user errors as one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = config_arg_parser(description).parse_args(argv)
    with reporting_user_errors(args.debug):
        run(load_config(args.cfg, args.set), fresh=args.fresh)


def save_config(cfg: Config, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
