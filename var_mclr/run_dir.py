"""A run directory holds one run: one writer at a time, and never a silent change of what it trains.

- Lock: ``run.out_dir/.lock`` is flock'ed by the training's main process, so a second run into the same directory
  fails at once with the holder's PID. The kernel drops an flock when its holder dies, however it dies (SIGKILL
  included), so a lock left by a dead run is simply taken over (with a warning naming its PID); the file is removed
  on a clean exit.
- Identity: once a directory holds checkpoints or final weights, a config that changes the objective or the
  architecture (of the VAR, of the tokenizer, or the classes and resolution they are built for) is refused: resuming
  would continue the old weights under the new name. ``fresh`` (train.py ``--fresh``) deletes the earlier run's
  outputs and starts over instead. Other changes (learning rate, steps, ...) resume, with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import yaml

from tokenizer.model import VQVAEConfig
from var_mclr.config import VAR_DERIVED, Config
from var_mclr.errors import UserError
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
    return (["train.objective", "data.num_classes", "data.resolution"]
            + [f"model.{f.name}" for f in dataclasses.fields(VARConfig) if f.name not in VAR_DERIVED]
            + [f"tokenizer.{f.name}" for f in dataclasses.fields(VQVAEConfig)])


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


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
    """Hold out_dir for this process until the block ends (RunDirError naming the holder's PID if another has it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = _acquire(path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one locks the file just before it disappears
        os.close(fd)


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
    saved = out_dir / "config.yaml"
    if not has_trained(out_dir) or not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunDirError(f"{saved} is not valid YAML ({e.__class__.__name__}), so the run in {out_dir} cannot be "
                          "checked against this config; rerun with --fresh to start over") from e
    new = cfg.to_dict()
    changed = [f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in identity_keys()
               if _lookup(old, k) != _lookup(new, k)]
    if changed:
        raise RunDirError(f"{out_dir} holds a run of another objective or architecture ({'; '.join(changed)}); "
                          "choose another run.out_dir, or rerun with --fresh to delete that run and start over")
