"""Images -> VAR training inputs (token ids and teacher-forcing features), cached for small datasets.

With caching, the frozen tokenizer encodes every image once (and its mirror image when hflip is on) and the ids are
kept in memory and on disk, keyed by everything that determines them: the tokenizer (weights and configuration) and
the data (the tensors of an in-memory dataset; for an image folder its resolved path, every file's name, size,
modification time and label, and the transform). Every later run on the same data and tokenizer reuses them; two
folders of the same size never share a cache. Without caching (ImageNet), each batch is encoded on the fly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, TensorDataset

from tokenizer.model import VQVAE
from var_mclr.files import atomic_write

log = logging.getLogger(__name__)


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """All labels without decoding any image."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if hasattr(ds, "samples"):
        return torch.tensor([label for _, label in ds.samples], dtype=torch.long)
    raise ValueError(f"cannot read labels of a {type(ds).__name__} without loading it")


def dataset_fingerprint(ds: Dataset) -> str:
    """A hash of what the images of ds are: cheap for image folders (file metadata, no pixels read)."""
    h = hashlib.sha256()
    if isinstance(ds, TensorDataset):
        for t in ds.tensors:
            h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif hasattr(ds, "samples"):
        h.update(repr(getattr(ds, "transform", None)).encode())
        for path, label in ds.samples:
            st = os.stat(path)
            h.update(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    else:
        raise ValueError(f"cannot fingerprint a {type(ds).__name__} for the token cache")
    return h.hexdigest()[:16]


def tokenizer_fingerprint(vae: VQVAE) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(vae.cfg.to_dict(), sort_keys=True).encode())  # the patch schedule is not in the weights
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """A token cache file, or None to encode again: missing, or unreadable (cut short by a full disk or a copy),
    which is said naming the file; encoding again rewrites it."""
    if not path.is_file():
        return None
    try:
        cached = load_file(path)
    except Exception as e:  # safetensors' errors do not name the file
        log.warning("token cache %s is unreadable (%s: %s); encoding again", path, type(e).__name__, e)
        return None
    if "idx" not in cached:
        log.warning("token cache %s holds no token ids; encoding again", path)
        return None
    return cached


class TokenStore:
    """Serves (idx_BL, x_BLCv_wo_first_l) for dataset indices, optionally horizontally flipped."""

    def __init__(self, ds: Dataset, vae: VQVAE, device: torch.device, cache_dir: str | None, data_key: str,
                 with_flips: bool, encode_batch: int = 256):
        self.ds, self.vae, self.device = ds, vae, device
        self.labels_N = dataset_labels(ds)
        self.with_flips = with_flips
        self.encode_batch = encode_batch
        self.idx_NL = self.idx_flip_NL = None
        if cache_dir is not None:
            self._load_or_build(Path(cache_dir), data_key)

    def __len__(self) -> int:
        return len(self.labels_N)

    @torch.no_grad()
    def _encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.vae.img_to_idxBl(img_B3HW.to(self.device)), dim=1)

    def _images(self, indices: torch.Tensor) -> torch.Tensor:
        if isinstance(self.ds, TensorDataset):
            return self.ds.tensors[0][indices]
        return torch.stack([self.ds[int(i)][0] for i in indices])

    def _load_or_build(self, cache_dir: Path, data_key: str) -> None:
        if getattr(self.ds, "is_random", False):  # e.g. an image folder's random crop: one draw would be frozen
            raise ValueError("the token cache would freeze one random crop or flip per image; build the dataset with "
                             "build_dataset(..., deterministic=True) or set data.cache_tokens=false")
        key = hashlib.sha256(f"{dataset_fingerprint(self.ds)}|{tokenizer_fingerprint(self.vae)}".encode())
        path = cache_dir / f"tokens-{data_key}-{key.hexdigest()[:16]}.safetensors"
        cached = _read_cache(path)
        if cached is not None:
            self.idx_NL, self.idx_flip_NL = cached["idx"].long(), cached.get("idx_flip")
            if self.idx_flip_NL is not None:
                self.idx_flip_NL = self.idx_flip_NL.long()
            if len(self.idx_NL) == len(self) and (self.idx_flip_NL is not None or not self.with_flips):
                log.info("token cache hit: %s", path)
                return
        log.info("encoding %d images into a token cache at %s", len(self), path)
        chunks, flips = [], []
        for start in range(0, len(self), self.encode_batch):
            img = self._images(torch.arange(start, min(start + self.encode_batch, len(self))))
            chunks.append(self._encode(img).cpu())
            if self.with_flips:
                flips.append(self._encode(img.flip(-1)).cpu())
        self.idx_NL = torch.cat(chunks)
        tensors = {"idx": self.idx_NL.to(torch.int32)}
        if self.with_flips:
            self.idx_flip_NL = torch.cat(flips)
            tensors["idx_flip"] = self.idx_flip_NL.to(torch.int32)
        atomic_write(path, lambda tmp: save_file(tensors, tmp))

    @property
    def cached(self) -> bool:
        return self.idx_NL is not None

    def batch(self, indices: torch.Tensor, flip_B: torch.Tensor | None = None,
              images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and the teacher-forcing input (B, L - first_l, Cvae) for these dataset items.

        Without a cache, `images` (the items already loaded, e.g. by a DataLoader) are encoded on the fly.
        """
        if self.cached:
            idx_BL = self.idx_NL[indices]
            if flip_B is not None and self.idx_flip_NL is not None:
                idx_BL = torch.where(flip_B.view(-1, 1), self.idx_flip_NL[indices], idx_BL)
            idx_BL = idx_BL.to(self.device, non_blocking=True)  # a fresh tensor: no host sync for its copy
        else:
            # To the device first (pinned: asynchronously), then flipped there: the host never touches the pixels.
            img = (self._images(indices) if images is None else images).to(self.device, non_blocking=True)
            if flip_B is not None:
                img = torch.where(flip_B.to(self.device, non_blocking=True).view(-1, 1, 1, 1), img.flip(-1), img)
            idx_BL = self._encode(img)
        return idx_BL, self.var_input(idx_BL)

    @torch.no_grad()
    def var_input(self, idx_BL: torch.Tensor) -> torch.Tensor:
        sizes = [pn * pn for pn in self.vae.patch_nums]
        return self.vae.quantize.idxBl_to_var_input(list(idx_BL.split(sizes, dim=1)))
