"""Importing this lets accelerate's own FSDP run on CPU processes over gloo, for the two-process tests.

accelerate 1.15 gives FSDP only to GPU-like distributed types: AcceleratorState sets DistributedType.FSDP in its
branch for MULTI_GPU, MULTI_NPU, ... and MULTI_CPU is not among them, so `accelerate launch --config_file
configs/accelerate/fsdp.yaml` on a CPU trains with DDP (and var_mclr.sharding.check_sharding refuses that). torch's
FSDP2 itself runs on gloo. This admits MULTI_CPU into that branch, doing what the branch does (distributed type,
plugin, its precision, the type shared with PartialState); everything after it (accelerator.prepare's fully_shard per block, clip_grad_norm_,
no_sync, the plugin read from the accelerate config) is accelerate's code, unchanged.
"""
from __future__ import annotations

import functools

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import gloo_average  # noqa: F401  (torch 2.8's gloo sums where FSDP2 asks it to average)

_original_init = AcceleratorState.__init__


@functools.wraps(_original_init)
def _init(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
          *args, **kwargs):
    _original_init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type  # as the branch ends, so that later
        # AcceleratorState() calls (accelerate's optimizer wrapper makes one) keep FSDP


AcceleratorState.__init__ = _init
