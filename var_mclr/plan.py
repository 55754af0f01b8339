"""What a training config needs before it starts: GPU memory per component and step / epoch time from FLOPs.

    python -m var_mclr.plan --cfg configs/var_d30.yaml --gpus 8 --gpu-memory 80 [--sharding fsdp] [--set k=v ...]

Memory per GPU is the sum of
- fixed state: fp32 weights (4 B/param), fp32 grads (4), AdamW's two moments (8), DDP's gradient buckets (4, when
  more than one process), the bf16 weight copies autocast caches for the backward (2); with FSDP the first three are
  split over the processes, the bf16 copies go (FSDP gathers bf16 weights; var_mclr/sharding.py), and two gathered
  blocks plus the root unit (embeddings, head norm, head: gathered for the whole step, with its unsharded grads)
  are added; the frozen reference (never sharded) of cca / cc_dpo / unlearning (4)
  and the tokenizer when images are encoded on the fly;
- activations: rows per image (the objective's classes scored per image: nll 1, mclr 1 + K, the pair objectives 2)
  x micro-batch x L x width x a per-token constant per block. The constants (ACTIVATION_BYTES) were measured on the
  CPU with torch.profiler at the real widths and L = 680 by bench/plan_constants.py; they do not depend on the width.
  With train.activation_checkpointing a block keeps only its 4-byte input and one block is recomputed at a time;
  an objective whose loss reads whole logits (GFT) adds Objective.logits_per_row float32 L x V tensors per row;
- the peak is the largest of the forward/backward phase, the optimizer step (grads alive; train.py's AdamW is fused
  on CUDA, one kernel without per-parameter temporaries) and the tokenizer's encode.
A config fits when the peak stays under HEADROOM of the GPU's memory (the rest: CUDA context, NCCL, fragmentation).

Time: forward FLOPs per row = 24 L C^2 per block (qkv, proj, two FFN matmuls) + 4 L^2 C per block (attention, masked
but dense) + 2 L C V (head); training costs 3x the forward (4x for the fused head, which recomputes its logits in the
backward), +1x the blocks with checkpointing, +1x per reference row and per no-gradient row of the objective
(Objective.no_grad_rows: GFT's unconditional pass), + the tokenizer's encoder per image when encoding on the fly.
Step time = FLOPs per GPU / (GPU_TFLOPS x MFU): an assumed throughput (A100 bf16 dense 312 TFLOPS) and an assumed
utilisation (MFU 0.35), both flags; bench/gpu_check.py measures the real step beside this prediction. Plus the
collectives, counted as not overlapped with compute (an upper bound) at an assumed NCCL bus bandwidth (BUS_GBPS,
--bus-gbps), in nccl-tests' terms: DDP all-reduces the fp32 gradients once per step (4P x 2(w-1)/w bytes; the
accumulation micro-steps skip the sync); FSDP, on every micro-step, all-gathers the weights in the compute dtype for
the forward and again for the backward, and reduce-scatters fp32 gradients ((2 b + 4) P (w-1)/w, b = 2 under bf16).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch

from tokenizer.model import VQVAE
from var_mclr.config import Config, ConfigError, load_config, var_config, vqvae_config
from var_mclr.errors import add_debug_flag, reporting_user_errors
from var_mclr.model import VAR
from var_mclr.objectives import get_objective

# GPU memory comes in GiB: an "80 GB" GPU holds 80 GiB (torch reports ~79.2 of them), a "40 GB" one 40.
GIB = 2 ** 30
IMAGENET_TRAIN_IMAGES = 1_281_167
HEADROOM = 0.92  # share of GPU memory the plan may fill
GPU_TFLOPS, MFU = 312.0, 0.35  # assumed: A100 bf16 dense peak; a typical utilisation for a 1-2B transformer
BUS_GBPS = 200.0  # assumed: NCCL bus bandwidth per GPU inside one NVLink node (nccl-tests reports ~230 on DGX A100)

# Bytes per token per channel that one row keeps alive between forward and backward, measured on the CPU at widths
# 1024 and 1920, L = 680 (bench/plan_constants.py, torch 2.14): "block" per transformer block (its output counted, its
# input being the previous block's output), "block_ckpt" per checkpointed block, "rest" for the embeddings, the head
# norm and the fused log-prob head. "no" is fp32 training; fp16 keeps what bf16 keeps.
ACTIVATION_BYTES = {
    "bf16": {"block": 52.29, "block_ckpt": 4.00, "rest": 10.07},
    "no": {"block": 88.44, "block_ckpt": 4.00, "rest": 12.03},
}
ACTIVATION_BYTES["fp16"] = ACTIVATION_BYTES["bf16"]
# Peak bytes per input pixel of the tokenizer's no-grad encode of one image (bench/plan_constants.py, 256 px).
ENCODE_BYTES_PER_PIXEL = 3_854.0
CHUNKED_LOGITS_ELEMS = 4 * 2 ** 20  # kernels/logprob.py _CHUNK_ELEMS: float32 logits per chunk of the chunked path


@dataclass
class Arch:
    params: int  # trained VAR parameters
    block_params: int  # one transformer block's
    vae_params: int
    depth: int
    width: int
    vocab: int
    L: int
    image_pixels: int


@dataclass
class Plan:
    world: int
    micro_batch: int
    grad_accum: int
    rows: int  # rows per micro-batch on one GPU: micro_batch x rows per image
    memory: dict[str, float] = field(default_factory=dict)  # component -> bytes per GPU
    phases: dict[str, float] = field(default_factory=dict)  # phase -> bytes per GPU at its peak
    gpu_memory: float = 0.0
    step_s: float = 0.0  # compute + communication
    comm_s: float = 0.0  # of which the collectives, not overlapped
    epoch_s: float = 0.0
    flops_per_step: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= HEADROOM * self.gpu_memory


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_ARCHS: dict[str, Arch] = {}


def _arch_of(var_cfg, vae_cfg) -> Arch:
    key = repr((var_cfg, vae_cfg))  # the config dataclasses are not hashable
    if key not in _ARCHS:
        _ARCHS[key] = _count(var_cfg, vae_cfg)
    return _ARCHS[key]


def _count(var_cfg, vae_cfg) -> Arch:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        var, vae = VAR(var_cfg), VQVAE(vae_cfg)
    return Arch(params=_numel(var), block_params=_numel(var.blocks[0]), vae_params=_numel(vae), depth=var.depth,
                width=var.C, vocab=var.V, L=var.L, image_pixels=vae.resolution ** 2)


def arch(cfg: Config) -> Arch:
    vae_cfg = vqvae_config(cfg.tokenizer)
    var_cfg = var_config(cfg.model, vae_cfg.vocab_size, vae_cfg.z_channels, cfg.data.num_classes,
                         vae_cfg.v_patch_nums)
    return _arch_of(var_cfg, vae_cfg)


def rows_per_image(cfg: Config) -> int:
    """How many (image, class) rows the objective scores per image, read from its own class plan (plus one row of
    its second data source per image: DDO's reference samples, docs/method.md, "DDO")."""
    objective = get_objective(cfg.train.objective)
    plan = objective.plan(cfg.loss, torch.zeros(2, dtype=torch.long), cfg.data.num_classes, 0.0,
                          torch.Generator().manual_seed(0))
    return plan.classes_BK.shape[1] + (objective.extra_rows is not None)


def _fixed_memory(cfg: Config, a: Arch, world: int, sharding: str, device: str) -> dict[str, float]:
    """State held through the whole step, bytes per GPU."""
    P, lowp = a.params, cfg.train.mixed_precision != "no"
    split = world if sharding == "fsdp" else 1
    mem = {"weights (fp32)": 4 * P / split, "AdamW moments (fp32)": 8 * P / split}
    if sharding == "fsdp":  # the gathered block being computed and the next one prefetched, in the compute dtype
        mem["FSDP gathered blocks"] = 2 * a.block_params * (2 if lowp else 4)
        # the root unit stays gathered from the forward to the end of the backward, its grads unsharded till then
        mem["FSDP root unit (gathered + grads)"] = 2 * (P - a.depth * a.block_params) * (2 if lowp else 4)
    elif world > 1:
        mem["DDP gradient buckets (fp32)"] = 4 * P
    if lowp and sharding != "fsdp":
        mem["autocast bf16 weight copies"] = 2 * P
    if get_objective(cfg.train.objective).needs_reference:
        mem["reference model (fp32, frozen)"] = 4 * P
    if not cfg.data.cache_tokens:
        mem["tokenizer (fp32, frozen)"] = 4 * a.vae_params
    return mem


def activation_bytes(cfg: Config, a: Arch, rows: int, device: str = "cuda") -> dict[str, float]:
    """What the rows of one micro-batch keep for the backward, and the backward's own transient memory."""
    k = ACTIVATION_BYTES[cfg.train.mixed_precision]
    per_token = rows * a.L * a.width
    ckpt = cfg.train.activation_checkpointing
    return {"activations (blocks)": per_token * a.depth * k["block_ckpt" if ckpt else "block"],
            "activations (embeddings, head)": per_token * k["rest"],
            "logits kept by the loss (fp32)": 4.0 * rows * a.L * a.vocab
            * get_objective(cfg.train.objective).logits_per_row,
            "head backward workspace": head_workspace(cfg, a, rows, device),
            # checkpointing: one block's activations alive again while it is recomputed, after the head's backward
            "recomputed block (checkpointing)": per_token * k["block"] if ckpt else 0.0}


def head_workspace(cfg: Config, a: Arch, rows: int, device: str) -> float:
    """The fused log-prob head's backward buffers: float32 dW and db, plus on CUDA (Triton) a float32 dh, on the CPU
    (chunked) one float32 logits chunk and, in bf16, the chunk's bf16 product and its bf16 gradient tile."""
    n = rows * a.L
    dw = 4 * a.vocab * (a.width + 1)
    if device == "cuda":
        return dw + 4 * n * a.width
    chunk = min(n, CHUNKED_LOGITS_ELEMS // a.vocab) * a.vocab
    return dw + 4 * chunk + (2 * 2 * chunk if cfg.train.mixed_precision != "no" else 0)


def memory_plan(cfg: Config, world: int, micro_batch: int, sharding: str = "ddp", device: str = "cuda",
                gpu_memory_gb: float = 80.0) -> Plan:
    """Memory per GPU of training cfg on `world` processes at this micro-batch (per process)."""
    a = arch(cfg)
    global_batch = cfg.train.global_batch or cfg.train.batch_size * world * cfg.train.grad_accum
    accum = max(1, global_batch // (world * micro_batch))
    rows = micro_batch * rows_per_image(cfg)
    P, split = a.params, world if sharding == "fsdp" else 1
    mem = _fixed_memory(cfg, a, world, sharding, device)
    fixed = sum(mem.values())
    acts = activation_bytes(cfg, a, rows, device)
    grads = 4 * P / split
    encode = 0.0 if cfg.data.cache_tokens else ENCODE_BYTES_PER_PIXEL * a.image_pixels * micro_batch
    mem.update({"grads (fp32)": grads, **acts, "tokenizer encode (transient)": encode})
    # Grads of earlier micro-batches are alive during the forward when accumulating; else only the backward makes
    # them, while it frees activations, so the backward's peak is near its start.
    held_grads = grads if accum > 1 else 0.0
    kept = sum(acts[k] for k in ("activations (blocks)", "activations (embeddings, head)",
                                 "logits kept by the loss (fp32)"))
    transient = max(acts["head backward workspace"], acts["recomputed block (checkpointing)"])
    phases = {"forward/backward": fixed + held_grads + kept + transient,
              # train.py's AdamW is fused on CUDA and single-tensor on the CPU: no model-sized temporaries
              "optimizer step": fixed + grads - mem.get("autocast bf16 weight copies", 0.0),
              "tokenizer encode": fixed + held_grads + encode}
    return Plan(world=world, micro_batch=micro_batch, grad_accum=accum, rows=rows, memory=mem, phases=phases,
                gpu_memory=gpu_memory_gb * GIB)


def forward_flops_per_row(a: Arch) -> tuple[float, float]:
    """(blocks, head) forward FLOPs of one row: multiply-adds x 2."""
    mlp = 4  # every shipped config has mlp_ratio 4
    blocks = a.depth * (2 * a.L * a.width * a.width * (3 + 1 + 2 * mlp) + 4 * a.L * a.L * a.width)
    return blocks, 2.0 * a.L * a.width * a.vocab


_ENCODE_FLOPS: dict[str, float] = {}


def _encode_flops(vae_cfg) -> float:
    if repr(vae_cfg) not in _ENCODE_FLOPS:
        _ENCODE_FLOPS[repr(vae_cfg)] = _count_encode_flops(vae_cfg)
    return _ENCODE_FLOPS[repr(vae_cfg)]


def _count_encode_flops(vae_cfg) -> float:
    """Forward FLOPs of the tokenizer's encoder for one image, counted by torch's FlopCounterMode on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = VQVAE(vae_cfg)
        img = torch.empty(1, 3, vae.resolution, vae.resolution)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.quant_conv(vae.encoder(img))
    return float(counter.get_total_flops())


def step_flops(cfg: Config, global_batch: int) -> float:
    """Training FLOPs of one optimizer step over the global batch, all GPUs together."""
    a = arch(cfg)
    blocks, head = forward_flops_per_row(a)
    per_row = 3 * blocks + 4 * head + (blocks if cfg.train.activation_checkpointing else 0.0)
    objective = get_objective(cfg.train.objective)
    if objective.needs_reference:
        per_row += blocks + head
    flops = global_batch * (rows_per_image(cfg) * per_row + objective.no_grad_rows * (blocks + head))
    if not cfg.data.cache_tokens:
        flops += global_batch * _encode_flops(vqvae_config(cfg.tokenizer))
    return flops


def comm_bytes(cfg: Config, world: int, grad_accum: int, sharding: str) -> float:
    """Bytes one GPU's collectives move per optimizer step, in nccl-tests' bus-bandwidth terms (module docstring)."""
    if world == 1:
        return 0.0
    P, share = arch(cfg).params, (world - 1) / world
    if sharding == "fsdp":
        gathered = 2 if cfg.train.mixed_precision != "no" else 4
        return grad_accum * (2 * gathered + 4) * P * share
    return 4 * P * 2 * share


def add_time(plan: Plan, cfg: Config, global_batch: int, images: int, gpu_tflops: float, mfu: float,
             sharding: str = "ddp", bus_gbps: float = BUS_GBPS) -> Plan:
    plan.flops_per_step = step_flops(cfg, global_batch)
    plan.comm_s = comm_bytes(cfg, plan.world, plan.grad_accum, sharding) / (bus_gbps * 1e9)
    plan.step_s = plan.flops_per_step / plan.world / (gpu_tflops * 1e12 * mfu) + plan.comm_s
    plan.epoch_s = plan.step_s * math.ceil(images / global_batch)
    return plan


def global_batch_of(cfg: Config, world: int) -> int:
    t = cfg.train
    return t.global_batch if t.global_batch else t.batch_size * world * t.grad_accum


def micro_batch_options(cfg: Config, world: int) -> list[int]:
    """Per-process micro-batches that make the global batch exactly, largest first."""
    gb = global_batch_of(cfg, world)
    if gb % world:
        return []
    share = gb // world
    return [m for m in range(share, 0, -1) if share % m == 0]


def plan_config(cfg: Config, world: int, gpu_memory_gb: float, sharding: str = "ddp", device: str = "cuda",
                images: int = IMAGENET_TRAIN_IMAGES, gpu_tflops: float = GPU_TFLOPS, mfu: float = MFU,
                bus_gbps: float = BUS_GBPS) -> Plan:
    """The plan at the config's micro-batch; with train.micro_batch = auto, the largest that fits (or the smallest
    option when none does, so the caller can report what is missing)."""
    options = micro_batch_options(cfg, world)
    if not options:
        raise ValueError(f"train.global_batch {global_batch_of(cfg, world)} does not divide over {world} processes")
    mb = cfg.train.micro_batch if cfg.train.global_batch else cfg.train.batch_size
    if mb == "auto" or mb is None and cfg.train.global_batch:
        candidates = options if mb == "auto" else options[:1]
    else:
        candidates = [int(mb)]
    for m in candidates:
        plan = memory_plan(cfg, world, m, sharding, device, gpu_memory_gb)
        if plan.fits:
            break
    return add_time(plan, cfg, global_batch_of(cfg, world), images, gpu_tflops, mfu, sharding, bus_gbps)


def fix_hints(cfg: Config, world: int, gpu_memory_gb: float, sharding: str) -> list[str]:
    """The settings that would make a config fit that does not, each checked with the plan."""
    hints = []

    def fits(overrides: dict, shard: str = sharding) -> int | None:
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
        for m in micro_batch_options(c, world):
            if memory_plan(c, world, m, shard, "cuda", gpu_memory_gb).fits:
                return m
        return None

    gb = dict(global_batch=global_batch_of(cfg, world))
    # a config in the per-process form (batch_size, grad_accum) takes a micro-batch only with a global batch
    pre = "" if cfg.train.global_batch else f"train.global_batch={gb['global_batch']} with "
    if (m := fits({**gb, "micro_batch": "auto"})) is not None:
        hints.append(f"{pre}train.micro_batch={m} (or auto)")
    if not cfg.train.activation_checkpointing and (m := fits({**gb, "activation_checkpointing": True})):
        hints.append(f"{pre}train.activation_checkpointing=true with train.micro_batch={m}")
    for ckpt in (False, True):
        if sharding != "fsdp" and (m := fits({**gb, "activation_checkpointing": ckpt}, "fsdp")):
            hints.append(f"sharding (FSDP: accelerate launch --config_file configs/accelerate/fsdp.yaml, with "
                         f"train.micro_batch={m}" + (" and train.activation_checkpointing=true" if ckpt else "")
                         + "); or larger GPUs")
            break
    return hints or ["nothing in train.* fits: use more or larger GPUs, or a smaller model"]


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def format_plan(cfg: Config, plan: Plan, sharding: str, gpu_tflops: float, mfu: float,
                bus_gbps: float = BUS_GBPS) -> str:
    a = arch(cfg)
    lines = [f"VAR depth {a.depth}, width {a.width}, {a.params / 1e6:.0f}M parameters; objective "
             f"{cfg.train.objective} ({rows_per_image(cfg)} rows per image), {cfg.train.mixed_precision} autocast, "
             f"checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}, {sharding}",
             f"{plan.world} GPUs x {plan.gpu_memory / GIB:.0f} GiB; global batch {global_batch_of(cfg, plan.world)} = "
             f"micro-batch {plan.micro_batch} x {plan.world} processes x {plan.grad_accum} accumulation "
             f"({plan.rows} rows per forward)", "", "memory per GPU:"]
    lines += [f"  {k:34s} {v / GIB:8.2f} GiB" for k, v in plan.memory.items() if v]
    lines += [f"  peak, {k:28s} {v / GIB:8.2f} GiB" for k, v in plan.phases.items()]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [f"  -> {plan.peak / GIB:.1f} GiB of {HEADROOM:.0%} x {plan.gpu_memory / GIB:.0f} GiB: {verdict}", "",
              f"time (assumed {gpu_tflops:g} TFLOPS per GPU at MFU {mfu:g}): {plan.flops_per_step / 1e12:.4g} TFLOP "
              f"per step, {_duration(plan.step_s)} per step (of which collectives {_duration(plan.comm_s)} at an "
              f"assumed {bus_gbps:g} GB/s, not overlapped), {_duration(plan.epoch_s)} per epoch"]
    if not plan.fits:
        lines += ["to fit, change:"] + [f"  {h}" for h in fix_hints(cfg, plan.world, plan.gpu_memory / GIB, sharding)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="YAML config, as for var_mclr.train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-5")
    p.add_argument("--gpus", type=int, default=8, help="processes (one GPU each)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU: 80 for an 80 GB GPU")
    p.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--gpu-tflops", type=float, default=GPU_TFLOPS, help="dense bf16 peak per GPU (H100: 989)")
    p.add_argument("--mfu", type=float, default=MFU, help="assumed model FLOPs utilisation")
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN_IMAGES, help="images per epoch")
    p.add_argument("--bus-gbps", type=float, default=BUS_GBPS,
                   help="assumed NCCL bus bandwidth per GPU in GB/s (one NVLink node ~200; across nodes far less)")
    args = add_debug_flag(p).parse_args(argv)
    with reporting_user_errors(args.debug):
        cfg = load_config(args.cfg, args.set, check_files=False)
        plan = plan_config(cfg, args.gpus, args.gpu_memory, args.sharding, "cuda", args.images, args.gpu_tflops,
                           args.mfu, args.bus_gbps)
        sys.stdout.write(format_plan(cfg, plan, args.sharding, args.gpu_tflops, args.mfu, args.bus_gbps))
        return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())


def resolve_batch(cfg: Config, world: int, device: torch.device, sharding: str = "ddp") -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) that make cfg's global batch on `world` processes; on CUDA the
    plan must fit the GPU's memory (train.micro_batch = auto: the largest micro-batch that does). A ConfigError names
    the keys to change otherwise. Without train.global_batch the config's batch_size and grad_accum stand."""
    t = cfg.train
    if not t.global_batch:
        micro = t.batch_size
    else:
        options = micro_batch_options(cfg, world)
        if not options:
            raise ConfigError(f"train.global_batch {t.global_batch} cannot be split over {world} processes; set it to "
                              f"a multiple of {world}")
        micro = options[0] if t.micro_batch in (None, "auto") else t.micro_batch
        if micro not in options:
            raise ConfigError(f"train.micro_batch {micro} x {world} processes does not divide train.global_batch "
                              f"{t.global_batch}; use one of {options} (or auto)")
    if device.type == "cuda":
        memory_gb = torch.cuda.get_device_properties(device).total_memory / GIB
        cfg_at = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch="auto" if t.micro_batch == "auto"
                                                                     else micro))
        plan = plan_config(cfg_at, world, memory_gb, sharding) if t.global_batch else memory_plan(
            cfg, world, micro, sharding, "cuda", memory_gb)
        if not plan.fits:
            raise ConfigError(f"the memory plan needs {plan.peak / GIB:.1f} GiB per GPU, {HEADROOM:.0%} of this GPU's "
                              f"{memory_gb:.0f} GiB is {HEADROOM * memory_gb:.1f} GiB (python -m var_mclr.plan "
                              f"--gpus {world} --gpu-memory {memory_gb:.0f} shows each part); change: "
                              + "; or ".join(fix_hints(cfg, world, memory_gb, sharding)))
        micro = plan.micro_batch
    accum = t.global_batch // (world * micro) if t.global_batch else t.grad_accum
    return micro, accum


def sharding_of(accelerator) -> str:
    """fsdp when accelerate was launched with an FSDP config (configs/accelerate/), else ddp."""
    return "fsdp" if str(accelerator.distributed_type).endswith("FSDP") else "ddp"
