"""A run directory holds one run: one writer at a time, and never a silent change of what it trains.

- Lock: ``run.out_dir/.lock`` is flock'ed by the training's main process, so a second run into the same directory
  fails at once with the holder's PID. The kernel drops an flock when its holder dies, however it dies (SIGKILL
  included), so a lock left by a dead run is simply taken over (with a warning naming its PID); the file is removed
  on a clean exit.
- Identity: once a directory holds checkpoints or final weights, a config that changes the objective, the
  architecture (of the VAR, of the tokenizer, or the classes and resolution they are built for) or the images
  (data.name, data.root, data.heldout_share) is refused: resuming would continue the old weights under the new name.
  It is checked against every record the directory holds (config.yaml, the newest checkpoint's state.json, the
  result's model.json), so deleting config.yaml does not lift it. A resume from another tokenizer or model.init file
  (by content hash), or past train.steps, is refused too. ``fresh`` (train.py ``--fresh``) deletes the earlier run's
  outputs and starts over instead. Other changes (learning rate, steps, ...) resume, with a warning, and are recorded
  in the checkpoints' and the result's ``config_history``.
- A finished result whose checkpoints were deleted is never trained again from scratch over it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import torch
import yaml

from tokenizer.model import VQVAEConfig
from var_mclr.checkpoints import CheckpointError, read_model_info
from var_mclr.config import VAR_DERIVED, Config, with_defaults
from var_mclr.errors import UserError
from var_mclr.files import tensors_sha256
from var_mclr.model import VARConfig
from var_mclr.train_state import checkpoint_dirs

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# What a run leaves in its directory; --fresh removes exactly these (never the shared token cache beside it).
RUN_OUTPUTS = ("checkpoints", "tb", "metrics.jsonl", "config.yaml", "model.safetensors", "model.json",
               "best.safetensors", "best.json")


class RunDirError(UserError):
    pass


def identity_keys() -> list[str]:
    """Dotted config keys that define what a run directory trains: the objective and the architecture."""
    return (["train.objective", "data.num_classes", "data.resolution", "data.name", "data.root", "data.heldout_share"]
            + [f"model.{f.name}" for f in dataclasses.fields(VARConfig) if f.name not in VAR_DERIVED]
            + [f"tokenizer.{f.name}" for f in dataclasses.fields(VQVAEConfig)])


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _identity(tree: dict, dotted: str):
    """A key's value as the identity check compares it: paths without a trailing slash or ./ (the same folder)."""
    value = _lookup(tree, dotted)
    return os.path.normpath(value) if dotted == "data.root" and isinstance(value, str) else value


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "unknown (still starting)"


def _acquire(path: Path) -> int:
    for _ in range(3):  # a holder that releases between our open and flock unlinks the file: open it again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the user's umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirError(f"{path.parent} is in use by another run (PID {holder}, lock file {path}); wait for "
                              "it to finish or choose another run.out_dir") from None
        if path.exists() and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break
        os.close(fd)
    else:
        raise RunDirError(f"could not lock {path}: another run keeps taking and releasing it")
    previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if previous:
        log.warning("taking over the lock %s of PID %s, which ended without releasing it", path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def run_dir_lock(out_dir: Path) -> Iterator[Path]:
    """Hold out_dir for this process until the block ends (RunDirError naming the holder's PID if another has it).
    A directory this call created is removed again if the run left nothing in it (refused before writing)."""
    path = out_dir / LOCK_FILE
    created = not out_dir.exists()
    if out_dir.exists() and not out_dir.is_dir():  # mkdir would say only "File exists"
        raise RunDirError(f"run.out_dir {out_dir} cannot hold a run: it is a file, not a directory; choose another "
                          "run.out_dir")
    try:  # a file in the way, a read-only mount, no permission: the user's to fix, named in one line
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as e:
        raise RunDirError(f"run.out_dir {out_dir} cannot hold a run: {e.strerror or e} ({e.filename or path}); "
                          "choose a writable directory") from None
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one locks the file just before it disappears
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty (the run wrote something), or taken by another run
                out_dir.rmdir()


def has_trained(out_dir: Path) -> bool:
    return bool(checkpoint_dirs(out_dir)) or (out_dir / "model.safetensors").exists()


def claim_run_dir(out_dir: Path, cfg: Config, fresh: bool) -> None:
    """Make out_dir ready for this run: cleared when fresh, else refused if it holds a run of another objective or
    architecture. Call it holding the lock."""
    if fresh:
        removed = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
        for name in removed:
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if removed:
            log.warning("--fresh: removed %s from %s", ", ".join(removed), out_dir)
        return
    if not has_trained(out_dir):
        return
    if not checkpoint_dirs(out_dir):  # rerunning would train from step 0 and replace the result
        raise RunDirError(f"{out_dir / 'model.safetensors'} is a finished result and {out_dir / 'checkpoints'} is "
                          "gone, so this run cannot resume: it would train again from scratch over it (nothing was "
                          "overwritten); to train on from it, use another run.out_dir with model.init set to it; "
                          "to replace it, rerun with --fresh")
    new = cfg.to_dict()
    for source, old in _recorded_configs(out_dir):
        old = with_defaults(old)
        changed = [f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in identity_keys()
                   if _identity(old, k) != _identity(new, k)]
        if changed:
            raise RunDirError(f"{out_dir} holds a run of another objective or architecture "
                              f"({'; '.join(changed)}; recorded in {source.name}); choose another run.out_dir, or "
                              "rerun with --fresh to delete that run and start over")


def _recorded_configs(out_dir: Path) -> Iterator[tuple[Path, dict]]:
    """Every config the directory records: config.yaml, the newest checkpoint's, the result's (source_config)."""
    saved = out_dir / "config.yaml"
    if saved.is_file():
        try:
            yield saved, yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunDirError(f"{saved} is not valid YAML ({e.__class__.__name__}), so the run in {out_dir} cannot "
                              "be checked against this config; rerun with --fresh to start over") from e
    dirs = checkpoint_dirs(out_dir)
    if dirs:
        try:
            yield dirs[-1] / "state.json", json.loads((dirs[-1] / "state.json").read_text()).get("config", {})
        except (OSError, ValueError):  # an unusable checkpoint: resume_newest names it and falls back
            pass
    result = out_dir / "model.safetensors"
    if result.exists():
        try:
            recorded = read_model_info(result).get("source_config")
        except CheckpointError:  # an incomplete result: rebuilt from the checkpoints
            recorded = None
        if recorded:
            yield out_dir / "model.json", recorded


def input_hashes(cfg: Config, vae: torch.nn.Module, var: torch.nn.Module) -> dict[str, str]:
    """Hashes of the weights a run starts from (tokenizer.checkpoint, and model.init when set), for its checkpoints.
    The weights, not the file: a result re-saved with other provenance, or converted, still hashes the same."""
    def params(model):
        return dict(model.named_parameters())

    hashes = {"tokenizer.checkpoint": tensors_sha256(params(vae))}
    if cfg.model.init is not None:
        hashes["model.init"] = tensors_sha256(params(var))
    return hashes


def check_resume(ckpt: Path, state: dict, cfg: Config, inputs: dict[str, str], steps: int) -> None:
    """Refuse a resume that would continue another run under this config's name: from a checkpoint past `steps`
    (saved as the step-`steps` result, mislabelled), or from other tokenizer or model.init files than it trained
    with (another tokenizer's codes mean other images)."""
    if state["step"] > steps:
        raise RunDirError(f"{ckpt} is at step {state['step']}, past the {steps} steps asked for; its weights would be "
                          f"saved as a {steps}-step result. Ask for at least {state['step']} steps, choose another "
                          "run.out_dir, or rerun with --fresh")
    recorded = state.get("inputs")
    old_cfg = state.get("config", {})
    for key in ("tokenizer.checkpoint", "model.init"):
        old_path, new_path = _lookup(old_cfg, key) or None, _lookup(cfg.to_dict(), key) or None
        same = (recorded.get(key) == inputs.get(key)) if recorded is not None else old_path == new_path
        if not same:
            raise RunDirError(f"{ckpt} was trained from {key} {old_path} and this config gives {new_path}"
                              f"{' (other contents)' if old_path == new_path else ''}; resuming would continue it "
                              f"from other files. Restore {key}, choose another run.out_dir, or rerun with --fresh")


def record_changes(old: dict, new: dict, step: int, history: list) -> list:
    """Warn about the settings a resume changes, and return the run's history of such changes with this one."""
    changed = {k: [a, b] for k, a, b in _differences(with_defaults(old), new)}
    if not changed:
        return history
    log.warning("resuming at step %d with a config that differs from the checkpoint's: %s", step,
                "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return [*history, {"step": step, "changed": changed}]


def _differences(old: dict, new: dict, prefix: str = "") -> Iterator[tuple[str, object, object]]:
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            yield f"{prefix}{k}", a, b
