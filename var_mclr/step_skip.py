"""Skipping a non-finite training step without a host sync (CUDA).

The trainer skips the update of a step whose loss (on any process) or gradient norm is not finite. Deciding that on
the host needs the value, i.e. a sync with the GPU every step. Instead, the fused AdamW is told on the device:
`found_inf` (the flag GradScaler uses) makes its step leave weights, moments and step count untouched, exactly as if
step() had not been called. The host reads the flags of the pending steps at once, at the next log or checkpoint
step, to count, warn and stop. On the CPU, or under fp16 (where GradScaler owns found_inf), the host decides at once.
"""
from __future__ import annotations

import torch


def device_skip_available(optimizer, device: torch.device, mixed_precision: str) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the optimizer
    return device.type == "cuda" and mixed_precision != "fp16" and bool(inner.defaults.get("fused"))


def skip_unless(optimizer, finite: torch.Tensor) -> None:
    """The next optimizer.step() updates nothing unless `finite` (a device bool scalar) is True."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (~finite).float().reshape(())


class PendingSteps:
    """(step, finite) of the steps whose outcome the host has not read yet."""

    def __init__(self):
        self.steps: list[tuple[int, torch.Tensor]] = []

    def append(self, step: int, finite: torch.Tensor) -> None:
        self.steps.append((step, finite))

    def settle(self) -> list[tuple[int, bool]]:
        """Every pending step with whether it updated, read with one host sync."""
        if not self.steps:
            return []
        flags = torch.stack([f.reshape(()) for _, f in self.steps]).cpu().tolist()
        out = [(s, bool(ok)) for (s, _), ok in zip(self.steps, flags)]
        self.steps.clear()
        return out
