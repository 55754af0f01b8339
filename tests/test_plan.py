"""The memory and time plan (var_mclr/plan.py): its predictions against peaks measured on the CPU, its FLOPs against
torch's counter, and what it says of the shipped ImageNet configs."""
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from var_mclr import plan as plan_mod
from var_mclr.config import load_config, var_config, vqvae_config
from var_mclr.memprobe import train_steps_peak
from var_mclr.model import VAR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["tokenizer.v_patch_nums=[1, 2, 3, 4, 5, 6, 8]", "tokenizer.vocab_size=2048", "data.num_classes=10",
         "loss.mclr.tau=0.1"]


def _small(depth, width, objective, precision, micro, global_batch, ckpt=False, extra=()):
    return load_config(None, SMALL + [f"model.depth={depth}", f"model.embed_dim={width}",
                                      f"model.num_heads={width // 64}", f"train.objective={objective}",
                                      f"train.mixed_precision={precision}", f"train.micro_batch={micro}",
                                      f"train.global_batch={global_batch}",
                                      f"train.activation_checkpointing={str(ckpt).lower()}", *extra])


# Activations are 76% of the first peak and about half of the second; the head's buffers, weights, moments and the
# reference weigh more in the others; the last accumulates over two micro-batches with fp32 grads alive in the forward.
MEASURED = [
    dict(depth=4, width=128, objective="nll", precision="no", micro=16, global_batch=16),
    dict(depth=2, width=256, objective="nll", precision="no", micro=6, global_batch=6),
    dict(depth=3, width=128, objective="mclr", precision="bf16", micro=3, global_batch=3, ckpt=True),
    dict(depth=2, width=128, objective="cca", precision="bf16", micro=2, global_batch=2),
    dict(depth=2, width=128, objective="mclr", precision="bf16", micro=2, global_batch=4, extra=("loss.mclr.K=2",)),
    # GFT's loss reads whole logits (4 float32 L x V per row, a third of this peak) and runs a no-gradient pass
    dict(depth=2, width=128, objective="gft", precision="no", micro=8, global_batch=8,
         extra=("model.strength_cond=true",)),
]


@pytest.mark.parametrize("case", MEASURED, ids=lambda c: f"{c['objective']}-{c['precision']}-d{c['depth']}")
def test_plan_predicts_the_cpu_peak_within_15_percent(case):
    torch.set_num_threads(1)
    cfg = _small(**case)
    predicted = plan_mod.plan_config(cfg, 1, 1000.0, device="cpu").peak
    measured = train_steps_peak(cfg)
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 1e6, measured / 1e6)


def test_gft_counts_its_unconditional_pass_once_per_image():
    nll, gft = (_small(2, 128, o, "no", 4, 4, extra=("model.strength_cond=true",)) for o in ("nll", "gft"))
    blocks, head = plan_mod.forward_flops_per_row(plan_mod.arch(nll))
    assert plan_mod.step_flops(gft, 4) == pytest.approx(plan_mod.step_flops(nll, 4) + 4 * (blocks + head))


def test_forward_flops_match_torchs_counter():
    cfg = _small(2, 128, "nll", "no", 1, 1)
    a = plan_mod.arch(cfg)
    vae_cfg = vqvae_config(cfg.tokenizer)
    var = VAR(var_config(cfg.model, vae_cfg.vocab_size, vae_cfg.z_channels, 10, vae_cfg.v_patch_nums))
    # The math attention (bmm + softmax) is counted; the CPU's fused attention kernel is not.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        var(torch.zeros(1, dtype=torch.long), torch.zeros(1, a.L - 1, vae_cfg.z_channels))
    blocks, head = plan_mod.forward_flops_per_row(a)
    assert blocks + head == pytest.approx(counter.get_total_flops(), rel=0.03)


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
@pytest.mark.parametrize("objective", ["nll", "mclr", "cca", "cc_dpo", "unlearning"])
def test_shipped_configs_fit_8_gpus_of_80_gb(depth, objective):
    cfg = load_config(CONFIGS / f"var_d{depth}.yaml", [f"train.objective={objective}"], check_files=False)
    p = plan_mod.plan_config(cfg, 8, 80.0)
    assert p.fits, plan_mod.format_plan(cfg, p, "ddp", plan_mod.GPU_TFLOPS, plan_mod.MFU)
    assert p.micro_batch * 8 * p.grad_accum == cfg.train.global_batch == 256


def test_auto_micro_batch_is_the_largest_that_fits():
    cfg = load_config(CONFIGS / "var_d30.yaml", ["train.micro_batch=auto", "train.activation_checkpointing=false"],
                      check_files=False)
    p = plan_mod.plan_config(cfg, 8, 80.0)
    assert p.fits
    larger = [m for m in plan_mod.micro_batch_options(cfg, 8) if m > p.micro_batch]
    assert larger and not plan_mod.memory_plan(cfg, 8, min(larger)).fits


def test_a_config_that_does_not_fit_names_the_keys_to_change():
    cfg = load_config(CONFIGS / "var_d30.yaml", ["train.micro_batch=32", "train.activation_checkpointing=false"],
                      check_files=False)
    p = plan_mod.plan_config(cfg, 8, 80.0)
    assert not p.fits
    text = plan_mod.format_plan(cfg, p, "ddp", plan_mod.GPU_TFLOPS, plan_mod.MFU)
    assert "DOES NOT FIT" in text and "train.micro_batch=" in text and "train.activation_checkpointing=true" in text


def test_a_global_batch_the_processes_cannot_make_is_refused():
    cfg = load_config(CONFIGS / "var_d16.yaml", check_files=False)
    assert plan_mod.micro_batch_options(cfg, 3) == []
    with pytest.raises(ValueError, match="does not divide"):
        plan_mod.plan_config(cfg, 3, 80.0)


def test_a_per_process_config_is_told_to_set_the_global_batch_with_the_micro_batch():
    cfg = load_config(CONFIGS / "var_d30.yaml", ["train.global_batch=null", "train.micro_batch=null",
                                                 "train.batch_size=16", "train.grad_accum=2"], check_files=False)
    hints = plan_mod.fix_hints(cfg, 8, 80.0, "ddp")
    assert hints[0].startswith("train.global_batch=256 with train.micro_batch=")


def test_collectives_are_counted_per_step_for_ddp_and_per_micro_step_for_fsdp():
    cfg = load_config(CONFIGS / "var_d30.yaml", [], check_files=False)
    P = plan_mod.arch(cfg).params
    assert plan_mod.comm_bytes(cfg, 1, 16, "ddp") == plan_mod.comm_bytes(cfg, 1, 4, "fsdp") == 0.0
    # DDP: one fp32 all-reduce per step, whatever the accumulation (the micro-steps before the last do not sync)
    assert plan_mod.comm_bytes(cfg, 8, 16, "ddp") == plan_mod.comm_bytes(cfg, 8, 1, "ddp") == pytest.approx(
        4 * P * 2 * 7 / 8)
    # FSDP under bf16: two bf16 all-gathers and one fp32 reduce-scatter on every micro-step
    assert plan_mod.comm_bytes(cfg, 8, 4, "fsdp") == pytest.approx(4 * (2 * 2 + 4) * P * 7 / 8)
    fast = plan_mod.plan_config(cfg, 8, 80.0, bus_gbps=1e9)
    slow = plan_mod.plan_config(cfg, 8, 80.0, bus_gbps=100.0)
    assert slow.comm_s == pytest.approx(4 * P * 2 * 7 / 8 / 100e9)
    assert slow.step_s == pytest.approx(fast.step_s - fast.comm_s + slow.comm_s)
