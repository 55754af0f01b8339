"""Small file helpers shared by every package layer: atomic writes and content hashes. Imports nothing of ours."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Run write(tmp_path) then rename over path, so a crash never leaves a half-written file.

    The temporary file is created private (mode 0600); before the rename it gets the mode an ordinary open() would
    have given it (0666 minus the umask), so shared results directories stay readable by colleagues.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory to build in and rename into place, with the mode an ordinary mkdir() would give it
    (tempfile's 0700 would make every checkpoint unreadable to colleagues)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | os.PathLike) -> str:
    """Hash of a file's bytes, for provenance records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors (names, dtypes, shapes, values): the same weights give the same hash whatever file
    format or metadata they were stored with."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# configs/: in a checkout, beside the packages; in an installed wheel, inside var_mclr (pyproject.toml installs the
# repository's configs/ as var_mclr/configs). The package's copy is looked for first: it exists only when installed.
_PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = next((d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if d.is_dir()),
                  _PACKAGE.parent / "configs")


def config_file(path: str | os.PathLike) -> Path:
    """path itself when it exists; else a relative configs/... path names the shipped config, so the commands the
    docs give (--cfg configs/mnist/mclr.yaml) also run from an installed wheel in any directory."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and path.parts[:1] == ("configs",):
        shipped = CONFIG_DIR.joinpath(*path.parts[1:])
        if shipped.is_file():
            return shipped
    return path
