"""Held-out tracking while training (run.eval_every; docs/method.md, "Training length").

Every run.eval_every steps the model, in evaluation mode and without gradients, scores two fixed sets of images:
up to run.eval_images of the held-out split and as many of the training split. For each it reports the nll per token
under the true class and the log-ratio per token against one fixed mismatched class per image. The gap between the
two sets is memorisation: a base whose training log-ratio runs far ahead of its held-out one has learned its
training images, not its classes. Neither set draws from torch's global random state, so tracking leaves the
training trajectory bit for bit unchanged.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import TensorDataset

from tokenizer.model import VQVAE
from var_mclr.data import build_dataset, dataset_tensors, spread_indices
from var_mclr.likelihood import loglik_under_classes
from var_mclr.tokens import TokenStore

NEGATIVE_SEED = 4_099  # the fixed mismatched class of every tracked image


class TrackedSet:
    """Token ids, teacher-forcing inputs, labels and fixed negatives of a fixed set of images."""

    def __init__(self, images_N3HW: torch.Tensor, labels_N: torch.Tensor, vae: VQVAE, device: torch.device,
                 num_classes: int):
        store = TokenStore(TensorDataset(images_N3HW, labels_N), vae, device, cache_dir=None, data_key="",
                           with_flips=False)
        self.idx_NL, self.x_NLC = store.batch(torch.arange(len(labels_N)))
        self.labels_N = labels_N.to(device)
        gen = torch.Generator().manual_seed(NEGATIVE_SEED)
        shift_N = torch.randint(1, num_classes, (len(labels_N),), generator=gen).to(device)
        self.negatives_N = (self.labels_N + shift_N) % num_classes

    def __len__(self) -> int:
        return len(self.labels_N)

    @torch.no_grad()
    def sums(self, var, rank: int, world: int, batch_size: int, lockstep: bool = False) -> torch.Tensor:
        """(sum of nll per token, sum of log-ratio per token, count) over this process's share of the images.
        lockstep: every process runs the same number of forwards (a sharded model gathers its weights in each, so
        all must take part); a process past its share scores the first batch again and discards it."""
        out = torch.zeros(3, dtype=torch.float64, device=self.labels_N.device)
        L = self.idx_NL.shape[1]
        stride = world * batch_size
        end = math.ceil(len(self) / stride) * stride if lockstep else len(self)
        for start in range(rank * batch_size, end, stride):
            mine = start < len(self)
            sl = slice(start, start + batch_size) if mine else slice(0, batch_size)
            classes_BK = torch.stack([self.labels_N[sl], self.negatives_N[sl]], dim=1)
            l_BK = loglik_under_classes(var, classes_BK, self.x_NLC[sl], self.idx_NL[sl]).double()
            if not mine:
                continue
            out[0] += (-l_BK[:, 0] / L).sum()
            out[1] += ((l_BK[:, 0] - l_BK[:, 1]) / L).sum()
            out[2] += len(l_BK)
        return out


class HeldoutTracker:
    """The two tracked sets of a run, built once before training (docs/method.md, "Training length")."""

    def __init__(self, data_args: dict, max_images: int, vae: VQVAE, device: torch.device, num_classes: int,
                 batch_size: int = 64):
        self.batch_size = batch_size
        self.sets = {}
        for name, split in (("heldout", "val"), ("train", "train")):
            ds = build_dataset(data_args, split, deterministic=True)
            images, labels = dataset_tensors(ds, spread_indices(len(ds), max_images))
            self.sets[name] = TrackedSet(images, labels, vae, device, num_classes)

    def evaluate(self, var, rank: int = 0, world: int = 1,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                 lockstep: bool = False) -> dict[str, float]:
        """heldout_nll, heldout_log_ratio, train_nll, train_log_ratio (per token, means over the set's images).
        lockstep: for a sharded model (TrackedSet.sums)."""
        was_training = var.training
        var.eval()
        try:
            out = {}
            for name, tracked in self.sets.items():
                nll, ratio, count = reduce_sum(tracked.sums(var, rank, world, self.batch_size, lockstep)).tolist()
                out[f"{name}_nll"], out[f"{name}_log_ratio"] = nll / count, ratio / count
        finally:
            var.train(was_training)
        return out


def is_improvement(value: float, best: float | None) -> bool:
    return math.isfinite(value) and (best is None or value < best)
