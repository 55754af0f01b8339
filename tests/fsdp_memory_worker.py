"""Run by tests/test_fsdp_accelerate.py under `accelerate launch --config_file configs/accelerate/fsdp.yaml
--num_processes 2` (CPU, gloo; tests/accelerate_fsdp_on_cpu.py): the peak CPU memory of one process building a VAR,
having accelerate shard it and taking two AdamW steps, as var_mclr/memprobe.py measures train.py's single-process
steps, beside the memory plan's FSDP prediction (var_mclr/plan.py). Rank 0 prints the case's JSON line."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import accelerate_fsdp_on_cpu  # noqa: E402,F401
from accelerate import Accelerator  # noqa: E402

from gloo_exit import run_and_exit  # noqa: E402
from test_plan import _small  # noqa: E402
from var_mclr import plan as plan_mod  # noqa: E402
from var_mclr import sharding  # noqa: E402
from var_mclr.config import var_config, vqvae_config  # noqa: E402
from var_mclr.memprobe import peak_bytes  # noqa: E402
from var_mclr.model import VAR  # noqa: E402
from var_mclr.objectives import get_objective, objective_loss  # noqa: E402

# Fixed state is most of the first and third (the reference's in the third), activations of the second.
CASES = [dict(depth=4, width=256, objective="nll", precision="no", micro=2, global_batch=4),
         dict(depth=4, width=128, objective="nll", precision="no", micro=16, global_batch=32),
         dict(depth=2, width=256, objective="cca", precision="no", micro=2, global_batch=4)]


def _batches(cfg, rank: int, accum: int):
    vae_cfg = vqvae_config(cfg.tokenizer)
    g, micro = torch.Generator().manual_seed(rank), cfg.train.micro_batch
    L = sum(p * p for p in vae_cfg.v_patch_nums)
    return [(torch.randint(0, vae_cfg.vocab_size, (micro, L), generator=g),
             torch.randn(micro, L - 1, vae_cfg.z_channels, generator=g),
             torch.randint(0, cfg.data.num_classes, (micro,), generator=g)) for _ in range(accum)]


def fsdp_steps_peak(acc, cfg, steps: int = 2) -> int:
    vae_cfg = vqvae_config(cfg.tokenizer)
    var_cfg = var_config(cfg.model, vae_cfg.vocab_size, vae_cfg.z_channels, cfg.data.num_classes, vae_cfg.v_patch_nums)
    objective = get_objective(cfg.train.objective)
    accum = cfg.train.global_batch // (cfg.train.micro_batch * acc.num_processes)
    batches = _batches(cfg, acc.process_index, accum)

    def run():
        torch.manual_seed(0)
        var = VAR(var_cfg, logprob_impl="chunked")
        ref = VAR(var_cfg, logprob_impl="chunked").requires_grad_(False) if objective.needs_reference else None
        var, opt = acc.prepare(var, torch.optim.AdamW(var.parameters(), lr=1e-6))
        for step in range(steps):
            for idx, x, label in batches:
                plan = objective.plan(cfg.loss, label, cfg.data.num_classes, 0.0, torch.Generator().manual_seed(step))
                loss, _ = objective_loss(objective, cfg.loss, var, ref, plan, idx, x)
                acc.backward(loss / accum)
                del loss
            acc.clip_grad_norm_(var.parameters(), 2.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return peak_bytes(run)


def main() -> None:
    """One case (its index in CASES, argv[1]) per launch: a case measured after another in the same processes read
    up to 25% higher under torch 2.8 (the CCA case 104 MB after the two others, 80 MB alone, as in torch 2.14)."""
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True, mixed_precision="no", fsdp_plugin=sharding.fsdp_plugin("no"))
    case = CASES[int(sys.argv[1])]
    cfg = _small(**case)
    measured = fsdp_steps_peak(acc, cfg)
    fsdp = plan_mod.plan_config(cfg, acc.num_processes, 1000.0, "fsdp", device="cpu").peak
    ddp = plan_mod.plan_config(cfg, acc.num_processes, 1000.0, "ddp", device="cpu").peak
    if acc.is_main_process:
        print(json.dumps({"case": case, "measured": measured, "plan_fsdp": fsdp, "plan_ddp": ddp}), flush=True)


if __name__ == "__main__":
    run_and_exit(main)  # tests/gloo_exit.py: gloo can abort the interpreter's finalization
