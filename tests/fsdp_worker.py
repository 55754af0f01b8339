"""Run by tests/test_fsdp.py under torch.distributed.run (2 CPU processes, gloo): the same VAR trained 3 AdamW steps
with DDP and with FSDP2 (each block a unit, the head in the root unit). Rank 0 prints the comparison as JSON."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gloo_average  # noqa: E402,F401  (torch 2.8's gloo sums where FSDP2 asks it to average)
from gloo_exit import run_and_exit  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402


def build() -> VAR:
    torch.manual_seed(0)
    var = VAR(VARConfig(vocab_size=64, Cvae=8, num_classes=5, depth=3, embed_dim=64, num_heads=2,
                        patch_nums=(1, 2, 3, 4)), logprob_impl="chunked")
    var.init_weights()
    return var


def train(model, rank: int, world: int, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own share of the batch
        label, x = torch.randint(0, 5, (4,), generator=g), torch.randn(4, 29, 8, generator=g)
        idx = torch.randint(0, 64, (4, 30), generator=g)
        loss = -model(label, x, target_BL=idx).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(build())
    ddp_losses = train(ddp, rank, world)
    ddp_state = ddp.module.state_dict()

    var = build()
    for block in var.blocks:
        fully_shard(block)
    fully_shard(var)
    head_local = tuple(var.head.weight.to_local().shape)  # this rank's shard of the head weight
    fsdp_losses = train(var, rank, world)
    full = get_model_state_dict(var, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        diffs = {k: float((full[k].float() - v.float()).abs().max()) for k, v in ddp_state.items() if k in full}
        print(json.dumps({"ddp": ddp_losses, "fsdp": fsdp_losses, "head_local": head_local,
                          "head_full": tuple(full["head.weight"].shape), "same_keys": set(full) == set(ddp_state),
                          "max_state_diff": max(diffs.values())}))
    dist.barrier()  # no rank tears the group down while its peer still works
    dist.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)  # tests/gloo_exit.py: gloo can abort the interpreter's finalization
