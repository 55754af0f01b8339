"""The order training reads its data in: a function of (seed, step) only, so a resumed run, one process or many,
reads exactly what an uninterrupted run reads (docs/method.md, "Training schedule"). Used by the VAR and the tokenizer
trainers."""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Sampler


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """All randomness of one micro-batch, derived from (seed, step): resuming needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


@functools.lru_cache(maxsize=2)  # the epoch being read and the next (a micro-batch may straddle the two)
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of epoch `epoch`: drawn once per epoch (13 ms at 1.28M images), a function of (seed, epoch) only,
    so a resumed run reads the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))


def batch_indices(seed: int, micro_index: int, global_batch: int, n: int) -> torch.Tensor:
    """Dataset indices of one global micro-batch: a stream of seeded per-epoch permutations."""
    positions = torch.arange(micro_index * global_batch, (micro_index + 1) * global_batch)
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = epoch_permutation(seed, epoch, n)
        sel = positions.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n]
    return out


class RankBatchSampler(Sampler):
    """This process's share of every global micro-batch from micro-step `start` on (for DataLoader workers)."""

    def __init__(self, seed: int, global_batch: int, n: int, rank: int, batch_size: int, start: int, stop: int):
        self.seed, self.global_batch, self.n = seed, global_batch, n
        self.mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.start, self.stop = start, stop

    def __iter__(self):
        for micro_index in range(self.start, self.stop):
            yield batch_indices(self.seed, micro_index, self.global_batch, self.n)[self.mine].tolist()

    def __len__(self) -> int:
        return self.stop - self.start
