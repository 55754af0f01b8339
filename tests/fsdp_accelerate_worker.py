"""Run by tests/test_fsdp_accelerate.py under `accelerate launch --config_file configs/accelerate/fsdp.yaml
--num_processes 2` (CPU, gloo; accelerate's FSDP admitted on CPU by tests/accelerate_fsdp_on_cpu.py).

accelerate shards a VAR whose fused log-prob head (the chunked custom autograd Function) and per-block activation
checkpointing are on, with a fused AdamW. Every process also trains an unsharded copy with the naive head (plain
autograd) and no checkpointing on the whole global batch: what DDP computes. Rank 0 prints the comparisons as JSON.
"""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import accelerate_fsdp_on_cpu  # noqa: E402,F401
from gloo_exit import run_and_exit  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from var_mclr import sharding  # noqa: E402
from var_mclr.checkpoints import read_safetensors, save_model  # noqa: E402
from var_mclr.heldout import TrackedSet  # noqa: E402
from var_mclr.model import VAR, VARConfig  # noqa: E402
from var_mclr.step_skip import skip_unless  # noqa: E402

V, CLIP = 64, 0.5


def build(impl: str, checkpointing: bool) -> VAR:
    torch.manual_seed(0)
    var = VAR(VARConfig(vocab_size=V, Cvae=8, num_classes=5, depth=3, embed_dim=64, num_heads=2,
                        patch_nums=(1, 2, 3, 4)), logprob_impl=impl)
    var.init_weights()
    var.activation_checkpointing = checkpointing
    return var


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own share of the global batch
    return torch.randint(0, 5, (4,), generator=g), torch.randn(4, 29, 8, generator=g), torch.randint(0, V, (4, 30),
                                                                                                   generator=g)


def global_batch(step: int, world: int):
    parts = [batch(step, r) for r in range(world)]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def loss_of(model, label, x, idx):
    return -model(label, x, target_BL=idx).sum(-1).mean()


def reference_step(ref, opt, step, world):
    loss = loss_of(ref, *global_batch(step, world))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss), float(norm), grads


def sharded_step(acc, var, opt, step, finite=True):
    loss = loss_of(var, *batch(step, acc.process_index))
    acc.backward(loss)
    norm = sharding.plain(acc.clip_grad_norm_(var.parameters(), CLIP))
    grads = {n: p.grad.full_tensor() for n, p in var.named_parameters()}
    skip_unless(opt, torch.tensor(finite))  # the device skip of step_skip.py, on DTensor parameters
    opt.step()
    opt.zero_grad(set_to_none=True)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return float(total) / acc.num_processes, float(norm), grads


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def main() -> None:
    acc = Accelerator(cpu=True, mixed_precision="no", fsdp_plugin=sharding.fsdp_plugin("no"))
    sharding.check_sharding(acc)
    world = acc.num_processes
    var = build("chunked", checkpointing=True)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-2, fused=True)  # created before prepare, as accelerate requires
    var, opt = acc.prepare(var, opt)
    ref = build("naive", checkpointing=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    out = {"fsdp2": acc.is_fsdp2, "units": sorted({type(m).__name__ for m in var.modules() if
                                                   type(m).__name__.startswith("FSDP")}),
           "head_local_rows": var.head.weight.to_local().shape[0], "losses": [], "ref_losses": [], "norms": [],
           "ref_norms": [], "grad_diff": []}
    for step in range(3):
        loss, norm, grads = sharded_step(acc, var, opt, step)
        ref_loss, ref_norm, ref_grads = reference_step(ref, ref_opt, step, world)
        out["losses"].append(loss), out["ref_losses"].append(ref_loss)
        out["norms"].append(norm), out["ref_norms"].append(ref_norm)
        out["grad_diff"].append(max_diff(grads, ref_grads))
    out["head_grad_scale"] = float(ref_grads["head.weight"].abs().max())
    out.update(heldout_check(acc, var, ref))
    full = sharding.FullModel.gather(acc, var)
    full_opt = sharding.FullOptimizer.gather(acc, var, opt)
    before = var.head.weight.to_local().clone()
    sharded_step(acc, var, opt, 3, finite=False)
    out["skipped_step_kept_weights"] = torch.equal(before, var.head.weight.to_local())
    out.update(resume_check(acc, full, full_opt, var, opt))
    if acc.is_main_process:
        ref_sd = ref.state_dict()
        state = full.state_dict()
        out["same_keys"] = set(state) == set(ref_sd)
        out["same_shapes"] = all(state[k].shape == v.shape for k, v in ref_sd.items())
        out["state_diff"] = max_diff(state, ref_sd)
        own = ref_opt.state_dict()
        gathered = full_opt.state_dict()
        out["opt_same_layout"] = ([g["params"] for g in gathered["param_groups"]] ==
                                  [g["params"] for g in own["param_groups"]] and set(gathered["state"]) ==
                                  set(own["state"]))
        out["opt_diff"] = max(float((gathered["state"][i]["exp_avg"] - s["exp_avg"]).abs().max())
                              for i, s in own["state"].items())
    out.update(nonfinite_check(acc, var))
    if acc.is_main_process:
        print(json.dumps(out))
    # every rank past its last collective, then the gloo group destroyed before exit: without the destroy rank 1 can
    # abort there (pytorch#190489), and without the barrier rank 0 still did in a fresh clone's make test
    acc.wait_for_everyone()
    acc.end_training()


def resume_check(acc, full, full_opt, var, opt) -> dict:
    """The gathered state written as save_model writes it; one more step; then that file and the optimizer state
    loaded back onto the shards and the same step again: the same loss and the same weights only if both the model
    and the optimizer (moments, step count) were restored."""
    path = os.path.join(tempfile.gettempdir(), f"fsdp_worker_{os.environ.get('MASTER_PORT', '0')}.safetensors")
    if acc.is_main_process:
        save_model(full, path)
        torch.save(full_opt.state_dict(), path + ".opt")
    acc.wait_for_everyone()
    # the checkpoint was taken before the skipped step, which changed nothing: this continues from the same state
    continued = sharded_step(acc, var, opt, 4)[0]
    after = var.head.weight.to_local().clone()
    model, optimizer = sharding.restorable(acc, var, opt)
    model.load_state_dict(read_safetensors(path), strict=True)
    optimizer.load_state_dict(torch.load(path + ".opt", weights_only=True))
    resumed = sharded_step(acc, var, opt, 4)[0]
    same = torch.equal(after, var.head.weight.to_local())
    acc.wait_for_everyone()
    if acc.is_main_process:
        os.remove(path), os.remove(path + ".opt"), os.remove(path.replace(".safetensors", ".json"))
    return {"resumed_loss": resumed, "continued_loss": continued, "resumed_weights_equal": same}


def heldout_check(acc, var, ref) -> dict:
    """Held-out sums of 5 images, 2 a batch, on 2 processes: rank 1 has one batch fewer, so only lockstep lets the
    sharded forwards meet; the sums then equal the unsharded model's over all images."""
    from conftest import tiny_vae

    tracked = TrackedSet(torch.rand(5, 3, 16, 16) * 2 - 1, torch.arange(5), tiny_vae(), torch.device("cpu"), 5)
    sums = tracked.sums(var, acc.process_index, acc.num_processes, 2, lockstep=True)
    torch.distributed.all_reduce(sums)
    whole = tracked.sums(ref, 0, 1, 2)
    return {"heldout_sharded": sums.tolist(), "heldout_whole": whole.tolist()}


def nonfinite_check(acc, var) -> dict:
    """A NaN in rank 1's shard only: every process counts it."""
    with torch.no_grad():
        if acc.process_index == 1:
            var.head.weight.to_local()[0, :2] = float("nan")
    counts = sharding.nonfinite_parameters(acc, var)  # a collective: every process calls it
    return {"nonfinite_seen_by_rank0": counts} if acc.is_main_process else {}


def bf16_main() -> None:
    """The bf16 policy (sharding.fsdp_plugin) against the unsharded model under bf16 autocast, as DDP trains it: what
    the gathered weights, the residual stream and the log-likelihoods are held in, and the losses of 4 steps."""
    acc = Accelerator(cpu=True, mixed_precision="bf16", fsdp_plugin=sharding.fsdp_plugin("bf16"))
    var = build("chunked", checkpointing=False)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-2)
    var, opt = acc.prepare(var, opt)
    ref = build("chunked", checkpointing=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    seen = {}
    var.blocks[0].register_forward_hook(lambda m, i, o: seen.update(block_output=str(o.dtype)) and None)
    var.head_nm.register_forward_pre_hook(lambda m, i: seen.update(gathered_head=str(var.head.weight.dtype)) and None)
    losses, ref_losses = [], []
    for step in range(4):
        with acc.autocast():
            logp = var(*batch(step, acc.process_index)[:2], target_BL=batch(step, acc.process_index)[2])
            loss = -logp.sum(-1).mean()
        seen.setdefault("logp", str(logp.dtype))
        acc.backward(loss)
        acc.clip_grad_norm_(var.parameters(), CLIP)
        seen.setdefault("sharded_grad", str(var.head.weight.grad.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / acc.num_processes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_loss = loss_of(ref, *global_batch(step, acc.num_processes))
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_losses.append(float(ref_loss))
    if acc.is_main_process:
        print(json.dumps({**seen, "master": str(var.head.weight.dtype), "losses": losses, "ref_losses": ref_losses}))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    run_and_exit(bf16_main if sys.argv[1:] == ["bf16"] else main)  # tests/gloo_exit.py
