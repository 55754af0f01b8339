"""Samples on disk as they are made: one uint8 shard per sampled batch, with the batch's features beside it.

A 50,000-sample evaluation at 256 px never holds its images on the host: each process writes its batches to
``OUT/shards/<start>.npz`` (uint8 images, labels, the feature network's outputs and timings) and keeps nothing; the
scores read back only the features (about 12 KB per sample with Inception), and the ADM-layout samples.npz is
streamed together from the shards at the end. A rerun continues from the shards present. Each shard records the
fingerprint of what made it (checkpoint and tokenizer hashes, sampling settings, seed, batch size); a shard made
otherwise is refused by name, never mixed in. Features made with another feature network are recomputed from the
shard's images.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.settings import SettingsError
from var_mclr.files import atomic_write

SHARD_FORMAT = "var-mclr/sample-shard/v1"


@dataclass
class Shard:
    images_NHW3: np.ndarray | None  # uint8; None when read without images
    labels_N: np.ndarray
    features_ND: np.ndarray
    score_probs_NK: np.ndarray | None
    predicted_N: np.ndarray | None
    seconds: float
    token_seconds: float
    transformer_rows_per_image: int


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_dir(out_dir: Path) -> Path:
    return out_dir / "shards"


def shard_path(out_dir: Path, start: int) -> Path:
    return shard_dir(out_dir) / f"{start:09d}.npz"


def write_shard(path: Path, shard: Shard, meta: dict) -> None:
    arrays = {"images": shard.images_NHW3, "labels": shard.labels_N, "features": shard.features_ND,
              "meta": np.array(json.dumps({**meta, "format": SHARD_FORMAT, "seconds": shard.seconds,
                                           "token_seconds": shard.token_seconds,
                                           "rows": shard.transformer_rows_per_image}))}
    if shard.score_probs_NK is not None:
        arrays["probs"] = shard.score_probs_NK
    if shard.predicted_N is not None:
        arrays["predicted"] = shard.predicted_N

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def read_shard(path: Path, sampling_fp: str, features_fp: str, count: int, with_images: bool = False
               ) -> tuple[Shard, bool]:
    """The shard at path, checked to come from these sampling settings and to hold count samples; the flag says
    whether its features are from this feature network (False: recompute them from its images)."""
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            labels = z["labels"]
            same_features = meta.get("features") == features_fp
            shard = Shard(z["images"] if with_images or not same_features else None, labels, z["features"],
                          z["probs"] if "probs" in z.files else None,
                          z["predicted"] if "predicted" in z.files else None,
                          meta["seconds"], meta["token_seconds"], meta["rows"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SettingsError(f"sample shard {path} is unreadable ({type(e).__name__}: {e}); delete it to resample "
                            "that batch") from e
    if meta.get("format") != SHARD_FORMAT or meta.get("sampling") != sampling_fp:
        raise SettingsError(f"sample shard {path} was made with other settings (checkpoint, tokenizer, sampling, seed "
                            "or batch size) than this run's; use another --out-dir, or delete "
                            f"{path.parent} to start over")
    if len(labels) != count:
        raise SettingsError(f"sample shard {path} holds {len(labels)} samples, not the {count} of its batch; "
                            "delete it to resample that batch")
    return shard, same_features


def stream_samples_npz(path: Path, shard_paths: list[Path], labels_N: np.ndarray) -> None:
    """samples.npz in ADM's layout (arr_0 uint8 N x H x W x 3, arr_1 labels), written one shard at a time: the
    archive is streamed into a ZIP64 member, so no step holds more than one shard's images."""
    with np.load(shard_paths[0]) as z:
        _, H, W, _ = z["images"].shape
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(labels_N), H, W, 3)}

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for p in shard_paths:
                    with np.load(p) as z:
                        f.write(np.ascontiguousarray(z["images"]).tobytes())
            buf = io.BytesIO()
            np.lib.format.write_array(buf, labels_N.astype(np.int64))
            zf.writestr("arr_1.npy", buf.getvalue())

    atomic_write(path, write)


def images_of_classes(shard_paths: list[Path], classes: list[int], per_class: int) -> dict[int, torch.Tensor]:
    """Up to per_class uint8 images (n, H, W, 3) of each class, the first ones in sample order, read shard by shard
    until every class has enough."""
    found: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    for p in shard_paths:
        if all(len(v) >= per_class for v in found.values()):
            break
        with np.load(p) as z:
            labels, images = z["labels"], z["images"]
            for c in classes:
                need = per_class - len(found[c])
                if need > 0:
                    found[c].extend(images[labels == c][:need])
    return {c: torch.from_numpy(np.stack(v)) if v else torch.empty(0, dtype=torch.uint8) for c, v in found.items()}
