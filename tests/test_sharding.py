"""var_mclr/sharding.py on one process: the launch check, the precision policy, the optimizer layout the checkpoints
keep, the held-out tracker's lockstep and the plan's FSDP accounting. The two-process runs are
tests/test_fsdp_accelerate.py (accelerate's FSDP2, the helpers) and tests/test_fsdp_train.py (train.py)."""
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from conftest import tiny_vae, tiny_var
from var_mclr import sharding
from var_mclr.config import load_config
from var_mclr.errors import UserError
from var_mclr.heldout import TrackedSet
from var_mclr.plan import arch, memory_plan, resolve_batch


def test_an_fsdp_launch_that_accelerate_turned_into_ddp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="accelerate shards only on GPUs"):
        sharding.check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    sharding.check_sharding(SimpleNamespace(distributed_type=DistributedType.FSDP))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    sharding.check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_the_fsdp_policy_gathers_bf16_and_reduces_and_outputs_fp32(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding.fsdp_plugin("bf16") is None  # a DDP launch gets accelerate's defaults
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    policy = sharding.fsdp_plugin("bf16").mixed_precision_policy
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert policy.output_dtype == torch.float32 and policy.cast_forward_inputs is False
    plain = sharding.fsdp_plugin("no").mixed_precision_policy
    assert plain.param_dtype is None and plain.output_dtype is None


def _stepped(seed=0):
    var = tiny_var(tiny_vae(), seed=seed)
    opt = torch.optim.AdamW([{"params": list(var.parameters())[:5], "weight_decay": 0.05},
                             {"params": list(var.parameters())[5:], "weight_decay": 0.0}], lr=1e-3)
    for p in var.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return var, opt


def test_the_gathered_optimizer_state_has_torchs_own_layout_and_loads_back():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    var, opt = _stepped()
    by_name = get_optimizer_state_dict(var, opt)  # what the FSDP gather returns, keyed by parameter names
    assert set(by_name["state"]) <= {n for n, _ in var.named_parameters()}
    by_index = sharding._by_index(by_name)
    own = opt.state_dict()
    assert set(by_index["state"]) == set(own["state"])
    assert [g["params"] for g in by_index["param_groups"]] == [g["params"] for g in own["param_groups"]]
    for i, s in own["state"].items():
        for k, v in s.items():
            assert torch.equal(by_index["state"][i][k], v)
    other, other_opt = _stepped(seed=1)
    other.load_state_dict(var.state_dict())
    sharding.FullOptimizer(other, other_opt).load_state_dict(own)  # index layout back to names, then loaded
    for i, s in other_opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], own["state"][i]["exp_avg"])


def test_ddp_keeps_the_model_and_optimizer_themselves():
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    var, opt = _stepped()
    assert sharding.FullModel.gather(ddp, var) is var and sharding.FullOptimizer.gather(ddp, var, opt) is opt
    assert sharding.restorable(ddp, var, opt) == (var, opt)
    with torch.no_grad():
        var.head.weight[0, :3] = float("nan")
    assert sharding.nonfinite_parameters(ddp, var) == {"head.weight": 3}


class _Counting(torch.nn.Module):
    def __init__(self, var):
        super().__init__()
        self.var, self.calls = var, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.var(*args, **kwargs)


def _tracked(n=5):
    vae = tiny_vae()
    images = torch.rand(n, 3, 16, 16) * 2 - 1
    return TrackedSet(images, torch.arange(n) % 4, vae, torch.device("cpu"), 4)


@pytest.mark.parametrize("lockstep", [False, True])
def test_lockstep_tracking_runs_as_many_forwards_on_every_process_and_scores_the_same(lockstep):
    tracked, var = _tracked(), tiny_var(tiny_vae(), num_classes=4)
    whole = tracked.sums(var, 0, 1, 2)
    counters = [_Counting(var) for _ in range(2)]
    parts = [tracked.sums(c, rank, 2, 2, lockstep=lockstep) for rank, c in enumerate(counters)]
    assert torch.allclose(parts[0] + parts[1], whole, rtol=1e-12)  # the extra forward is discarded
    assert [c.calls for c in counters] == ([2, 2] if lockstep else [2, 1])  # 5 images, 2 a batch, 2 processes


def test_the_plan_shards_fixed_state_and_counts_the_root_unit():
    cfg = load_config("configs/var_d30.yaml", [], check_files=False)
    a = arch(cfg)
    ddp, fsdp = memory_plan(cfg, 8, 2, "ddp"), memory_plan(cfg, 8, 2, "fsdp")
    assert fsdp.memory["weights (fp32)"] == pytest.approx(ddp.memory["weights (fp32)"] / 8)
    assert "autocast bf16 weight copies" not in fsdp.memory and "DDP gradient buckets (fp32)" not in fsdp.memory
    root = a.params - a.depth * a.block_params
    assert fsdp.memory["FSDP root unit (gathered + grads)"] == 2 * root * 2
    # the frozen reference is never sharded
    cca = load_config("configs/var_d30.yaml", ["train.objective=cca"], check_files=False)
    assert memory_plan(cca, 8, 2, "fsdp").memory["reference model (fp32, frozen)"] == 4 * a.params


def test_fsdp_resolves_the_batch_as_ddp_does():
    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=2"])
    assert resolve_batch(cfg, 2, torch.device("cpu"), "fsdp") == resolve_batch(cfg, 2, torch.device("cpu")) == (2, 2)
