"""KV-cached next-scale sampling, guidance-free or with classifier-free guidance.

guidance="none" runs one transformer pass per scale on the batch; the null class is never evaluated.
guidance="cfg" stacks the conditional and null-class rows (2B) and mixes logits per scale s (0-based, S scales):
    z = (1 + t_s) z(x, c) - t_s z(x, null),  t_s = w * s / (S - 1) ("linear", VAR's ramp) or t_s = w ("constant").
strength: the input of a strength-conditioned model (GFT's beta; docs/method.md, "GFT"), given to the class rows; one
pass per scale at beta is GFT's sampling, what the model learnt to give for CFG at w = 1/beta - 1 on every scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tokenizer.model import VQVAE
from var_mclr.kernels import guided_sample
from var_mclr.kernels.sampling import IMPLS as SAMPLING_KERNELS
from var_mclr.model import VAR, KVCache

SCHEDULES = ("linear", "constant")


@dataclass
class SamplingConfig:
    guidance: str = "none"  # none | cfg
    cfg_scale: float = 1.5
    cfg_schedule: str = "linear"
    top_k: int = 0
    top_p: float = 0.0
    kernel: str = "auto"  # auto | naive | torch | triton: the guided sampling step (var_mclr/kernels/sampling.py)
    compile: bool = False  # torch.compile the transformer blocks for the per-scale forward (VAR.compiled_blocks)
    # bf16: the transformer runs under autocast (GPU speed); logits, sampling and the tokenizer stay float32.
    mixed_precision: str = "no"  # no | bf16
    # The strength input of a strength-conditioned model (model.strength_cond), > 0; None: the model's neutral input
    # (1, unguided). The null rows of CFG always get the neutral input (VAR.strength_input).
    strength: float | None = None

    def __post_init__(self):
        if self.guidance not in ("none", "cfg"):
            raise ValueError(f"guidance must be 'none' or 'cfg', got {self.guidance!r}")
        if self.cfg_schedule not in SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {SCHEDULES}, got {self.cfg_schedule!r}")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 <= top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.kernel not in SAMPLING_KERNELS:
            raise ValueError(f"kernel must be one of {SAMPLING_KERNELS}, got {self.kernel!r}")
        if self.strength is not None and not (math.isfinite(self.strength) and self.strength > 0):
            raise ValueError(f"strength must be a finite number > 0 (or None), got {self.strength}")

    def record(self) -> dict:
        """The settings as recorded and fingerprinted (eval/fid.py, eval/sample.py): the strength only when set, so
        every earlier record and shard fingerprint is unchanged."""
        return {k: v for k, v in self.__dict__.items() if k != "strength" or v is not None}

    def guidance_at(self, si: int, num_scales: int) -> float:
        if self.guidance == "none":
            return 0.0
        if self.cfg_schedule == "constant":
            return self.cfg_scale
        return self.cfg_scale * si / (num_scales - 1)


@dataclass
class SampleResult:
    idx_Bl: list[torch.Tensor]  # per-scale token ids (B, p*p)
    f_hat: torch.Tensor  # the tokenizer's latent reconstruction (B, Cvae, p_S, p_S)
    logits_cond_BlV: list[torch.Tensor] = field(default_factory=list)  # only when keep_logits
    logits_null_BlV: list[torch.Tensor] = field(default_factory=list)
    transformer_rows: int = 0  # rows pushed through the transformer per scale (B or 2B): the CFG cost


@torch.no_grad()
def sample_tokens(var: VAR, quantizer, label_B: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None, keep_logits: bool = False) -> SampleResult:
    """Sample every scale of a token pyramid for the given classes."""
    var.check_labels(label_B, check_range=True)  # once per batch, before any work
    if tuple(quantizer.v_patch_nums) != tuple(var.patch_nums):
        raise ValueError(f"tokenizer patch_nums {quantizer.v_patch_nums} != VAR patch_nums {var.patch_nums}")
    B, S = label_B.shape[0], len(var.patch_nums)
    guided = cfg.guidance == "cfg"
    rows_B = torch.cat((label_B, torch.full_like(label_B, var.num_classes))) if guided else label_B
    strength_B = None if cfg.strength is None else torch.full(rows_B.shape, cfg.strength, device=rows_B.device)
    cond_BD, block_cond = var.class_condition(rows_B, strength_B)
    caches = [KVCache(var.L) for _ in var.blocks]
    blocks = var.compiled_blocks() if cfg.compile else None
    f_hat = cond_BD.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    x_BlC = var.start_tokens(cond_BD)
    result = SampleResult(idx_Bl=[], f_hat=f_hat, transformer_rows=rows_B.shape[0])

    for si, pn in enumerate(var.patch_nums):
        with torch.autocast(x_BlC.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            logits_BlV = var.forward_scale(x_BlC, cond_BD, block_cond, caches, blocks).float()
        logits_cond, logits_null = (logits_BlV[:B], logits_BlV[B:]) if guided else (logits_BlV, None)
        if keep_logits:
            result.logits_cond_BlV.append(logits_cond.clone())
            if guided:
                result.logits_null_BlV.append(logits_null.clone())
        idx_Bl = guided_sample(logits_cond, logits_null, cfg.guidance_at(si, S), cfg.top_k, cfg.top_p, generator,
                               impl=cfg.kernel)
        result.idx_Bl.append(idx_Bl)
        h_BChw = quantizer.embedding(idx_Bl).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_BChw = quantizer.get_next_autoregressive_input(si, S, f_hat, h_BChw)
        if si < S - 1:
            begin, end = var.begin_ends[si + 1]
            x_BlC = var.embed_scale_inputs(next_BChw.flatten(2).transpose(1, 2), begin, end)
            if guided:
                x_BlC = torch.cat((x_BlC, x_BlC))
    result.f_hat = f_hat
    return result


@torch.no_grad()
def sample_images(var: VAR, vae: VQVAE, label_B: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images in [-1, 1] (B, 3, H, W) and their token maps."""
    result = sample_tokens(var, vae.quantize, label_B, cfg, generator)
    return vae.fhat_to_img(result.f_hat), result.idx_Bl


@torch.no_grad()
def autoregressive_infer_cfg(var: VAR, vae: VQVAE, B: int, label_B: torch.Tensor | int | None,
                             g_seed: int | None = None, cfg: float = 1.5, top_k: int = 0,
                             top_p: float = 0.0) -> torch.Tensor:
    """The official VAR.autoregressive_infer_cfg, as a function of (var, vae): images in [0, 1].

    label_B None = uniform random classes, an int = that class for all rows (negative: the null class); cfg is the
    linear-ramp scale, and cfg = 0 samples guidance-free with a single pass per scale.
    """
    device = var.lvl_1L.device
    generator = None if g_seed is None else torch.Generator(device=device).manual_seed(g_seed)
    if label_B is None:
        label_B = torch.randint(0, var.num_classes, (B,), generator=generator, device=device)
    elif isinstance(label_B, int):
        label_B = torch.full((B,), var.num_classes if label_B < 0 else label_B, device=device, dtype=torch.long)
    sampling = SamplingConfig(guidance="cfg" if cfg != 0 else "none", cfg_scale=cfg, cfg_schedule="linear",
                              top_k=top_k, top_p=top_p)
    images, _ = sample_images(var, vae, label_B.to(device), sampling, generator)
    return images.add(1).mul(0.5)
