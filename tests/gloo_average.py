"""Importing this makes a gloo reduce-scatter asked to average return the average in every torch, for the CPU FSDP2
tests (tests/fsdp_worker.py, tests/accelerate_fsdp_on_cpu.py).

FSDP2 reduce-scatters float32 and bf16 gradients with ReduceOp.AVG. torch 2.8's gloo sums instead (measured: two
ranks holding 1 and 2 get 3, where torch 2.14 gives 1.5), so on that floor the two-process tests trained with
world-size-times gradients: AdamW hid most of it (losses 4e-6 apart), the global gradient norm showed it (exactly
2x). NCCL, what FSDP runs on in practice, averages. Here an average on a gloo group is a sum and then the division
by the group's size, which is also what DDP's all-reduce does."""
import torch.distributed as dist

_reduce_scatter_tensor = dist.reduce_scatter_tensor


def _averaging_reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    if op != dist.ReduceOp.AVG or dist.get_backend(group) != "gloo":
        return _reduce_scatter_tensor(output, input, op=op, group=group, async_op=async_op)
    work = _reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    if work is not None:
        work.wait()
    output.div_(dist.get_world_size(group))
    return work


dist.reduce_scatter_tensor = _averaging_reduce_scatter_tensor
