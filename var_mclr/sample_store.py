"""A set of a reference model's own samples, DDO's second data source (docs/method.md, "DDO").

A set is one directory written as one unit (built beside it, then renamed into place): samples.safetensors holds the
token indices (N, L) and the class each was sampled for; settings.json records how they were drawn and the weight
hashes of the VAR and tokenizer that drew them. A run opens a set only when those hashes are its own reference model's
and tokenizer's: samples of another model would train the discriminator against the wrong distribution.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from var_mclr.checkpoints import CheckpointError, read_safetensors, weights_sha256
from var_mclr.errors import UserError
from var_mclr.files import make_temp_dir
from var_mclr.objectives.base import ExtraRows

SAMPLES_FILE, SETTINGS_FILE, FORMAT = "samples.safetensors", "settings.json", 1
# Mixed into the order's seed so the samples are not drawn in the same order as the data images.
ORDER_SALT = 104_729


class SampleSetError(UserError, ValueError):
    pass


def write_sample_set(out: Path, idx_NL: torch.Tensor, label_N: torch.Tensor, settings: dict) -> Path:
    """Write the set into `out` (which must not exist) as one unit: both files or neither."""
    out = Path(out)
    if out.exists():
        raise SampleSetError(f"--out {out} already exists: a sample set is never overwritten (choose another "
                             "directory or delete it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        save_file({"idx": idx_NL.to(torch.int32).contiguous(), "label": label_N.to(torch.int64).contiguous()},
                  str(tmp / SAMPLES_FILE))
        record = {"format": FORMAT, "num_samples": int(idx_NL.shape[0]), "L": int(idx_NL.shape[1]), **settings}
        (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_sample_set(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(idx_NL int32, label_N, settings) of a set; `key` names the flag or config key that gave the path in errors."""
    path = Path(path)
    samples, settings_file = path / SAMPLES_FILE, path / SETTINGS_FILE
    if not samples.is_file() or not settings_file.is_file():
        raise SampleSetError(f"{key} {path} is not a reference-sample set (needs {SAMPLES_FILE} and {SETTINGS_FILE}; "
                             "make one with python -m var_mclr.reference_samples)")
    try:
        settings = json.loads(settings_file.read_text())
        tensors = read_safetensors(samples)
    except (json.JSONDecodeError, CheckpointError) as e:
        raise SampleSetError(f"{key} {path}: unreadable ({e})") from e
    idx, label = tensors.get("idx"), tensors.get("label")
    if settings.get("format") != FORMAT or idx is None or label is None or idx.ndim != 2 \
            or label.shape != (idx.shape[0],) or idx.shape[0] != settings.get("num_samples"):
        raise SampleSetError(f"{key} {path}: not a format-{FORMAT} sample set of matching idx (N, L), label (N,) "
                             "and settings.json")
    return idx, label.long(), settings  # idx stays int32 in memory: half the bytes (ImageNet: L = 680 per sample)


def check_source(settings: dict, path: Path, key: str, ref, vae) -> None:
    """Refuse a set that the run's reference model (and tokenizer) did not draw, or whose tokens it cannot score."""
    source = settings.get("source", {})
    for what, model, recorded in (("reference model (model.init)", ref, source.get("weights_sha256")),
                                  ("tokenizer (tokenizer.checkpoint)", vae, source.get("tokenizer_weights_sha256"))):
        got = weights_sha256(model)
        if recorded != got:
            raise SampleSetError(
                f"{key} {path} was sampled by {source.get('checkpoint')} (weights {str(recorded)[:12]}, tokenizer "
                f"{source.get('tokenizer')}), not by this run's {what} (weights {got[:12]}): sample from this run's "
                "model.init with python -m var_mclr.reference_samples")
    if settings.get("L") != ref.L:
        raise SampleSetError(f"{key} {path} holds sequences of {settings.get('L')} tokens, the model has {ref.L}")


@functools.lru_cache(maxsize=2)  # the epoch being read and the next
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed + ORDER_SALT) * 7_919 + epoch))


def sample_indices(seed: int, micro_index: int, global_batch: int, n: int) -> torch.Tensor:
    """Indices of the samples of one global micro-batch: a stream of seeded per-epoch permutations of the set, a
    function of (seed, micro_index) only (as train.py's batch_indices is of the data), so resuming needs no state."""
    positions = torch.arange(micro_index * global_batch, (micro_index + 1) * global_batch)
    epochs = positions.div(n, rounding_mode="floor")
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        sel = epochs == epoch
        out[sel] = _epoch_order(seed, epoch, n)[positions[sel] % n]
    return out


class ReferenceSamples:
    """The RowSource of a sample set (var_mclr/objectives/base.py): rows for every micro-batch, on the device."""

    def __init__(self, idx_NL: torch.Tensor, label_N: torch.Tensor, vae, device: torch.device):
        self.idx_NL, self.label_N, self.vae, self.device = idx_NL, label_N, vae, device
        self.sizes = [pn * pn for pn in vae.patch_nums]

    def __len__(self) -> int:
        return len(self.label_N)

    @torch.no_grad()
    def rows(self, seed: int, micro_index: int, global_batch: int, mine: slice) -> ExtraRows:
        chosen = sample_indices(seed, micro_index, global_batch, len(self))[mine]
        idx_FL = self.idx_NL[chosen].long().to(self.device, non_blocking=True)
        x_FLCv = self.vae.quantize.idxBl_to_var_input(list(idx_FL.split(self.sizes, dim=1)))
        return ExtraRows(self.label_N[chosen], idx_FL, x_FLCv)  # labels on the host, as a plan's classes are


def open_reference_samples(path: str | None, key: str, ref, vae, device: torch.device) -> ReferenceSamples:
    """The set at `path` (config key `key`), checked against the run's reference model and tokenizer."""
    if path is None:
        raise SampleSetError(f"{key} is not set: sample the reference model (model.init) with python -m "
                             "var_mclr.reference_samples --ckpt MODEL_INIT --n-per-class N --out DIR, then set it to "
                             "DIR")
    idx_NL, label_N, settings = read_sample_set(Path(path), key)
    check_source(settings, Path(path), key, ref, vae)
    if len(label_N) == 0 or int(label_N.min()) < 0 or int(label_N.max()) >= ref.num_classes \
            or int(idx_NL.min()) < 0 or int(idx_NL.max()) >= vae.V:
        raise SampleSetError(f"{key} {path}: labels or token indices out of range for the model")
    return ReferenceSamples(idx_NL, label_N, vae, device)
