"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., NeurIPS 2024).

An image is a pyramid of token maps r_1..r_S (sides patch_nums). The transformer sees, for every scale s, the
tokenizer's running reconstruction f_hat_{<s} downsampled to p_s x p_s and predicts all p_s^2 tokens of r_s at
once. A block-causal mask lets scale s attend to scales <= s, so one teacher-forced pass yields the logits of all
L = sum p_s^2 tokens, and hence the exact log-likelihood of an image under a class.

The class enters twice: as the start token (class_emb + pos_start) and as the AdaLN condition of every block.
Index num_classes is the null class used for classifier-free guidance. With strength_cond, a strength s (GFT's beta,
the MCLR dial's input) is embedded and added to the class embedding, so it enters wherever the class does.

Parameter and buffer names and shapes match the official release, so var_d{16,20,24,30}.pth load strictly (the
optional strength module is not in them: var_mclr/checkpoints.py, with_strength_conditioning).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth

from tokenizer.model import VAR_256_PATCH_NUMS
from var_mclr import kernels


@dataclass
class VARConfig:
    vocab_size: int = 4096
    Cvae: int = 32
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = field(default=VAR_256_PATCH_NUMS)
    # A strength input (StrengthEmbedding) added to the class embedding: GFT and the MCLR dial (docs/method.md, "GFT").
    # Off: the official architecture. Left out of to_dict while off, so every earlier model.json and hash is unchanged.
    strength_cond: bool = field(default=False, metadata={"omitted_at_default": True})

    @classmethod
    def official(cls, depth: int, **overrides) -> "VARConfig":
        """The released VAR-d{depth}: width 64*depth, depth heads."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, **overrides)

    def to_dict(self) -> dict:
        omitted = {f.name for f in fields(self)
                   if f.metadata.get("omitted_at_default") and getattr(self, f.name) == f.default}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in omitted}


class KVCache:
    """Keys and values of the scales seen so far, for one attention layer during sampling.

    The buffers are allocated once for all max_len tokens and each scale is written into them: concatenating per
    scale would copy the whole growing prefix again at every scale."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.len = 0
        self.k_BHLc: torch.Tensor | None = None
        self.v_BHLc: torch.Tensor | None = None

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, l, c = k_BHlc.shape
        if self.k_BHLc is None:
            self.k_BHLc = k_BHlc.new_empty(B, H, self.max_len, c)
            self.v_BHLc = v_BHlc.new_empty(B, H, self.max_len, c)
        end = self.len + l
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, {end} were asked for")
        self.k_BHLc[:, :, self.len:end] = k_BHlc
        self.v_BHLc[:, :, self.len:end] = v_BHlc
        self.len = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]


_NORM_EPS = 1e-12  # F.normalize's default


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # Cosine attention with a learnt per-head temperature, capped at 100 (official init: log 4).
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))  # keys carry no bias
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B,H,L,c
        if self.attn_l2_norm:
            # F.normalize's x / max(|x|, eps) as one multiply by a per-token factor, with q's temperature folded into
            # it: one elementwise pass over q and one over k (F.normalize then the temperature take three divides
            # and multiplies, and the divides' backward is dearer).
            temp_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = q * (temp_1H11 / q.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS))
            k = k * k.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS).reciprocal()
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


# Elements of FFN input per row chunk in CPU inference (1024 tokens at width 384): see FFN._forward_rows_chunked.
_FFN_CHUNK_ELEMS = 384 * 1024


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() > _FFN_CHUNK_ELEMS:
            return self._forward_rows_chunked(x)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def _forward_rows_chunked(self, x: torch.Tensor) -> torch.Tensor:
        """Inference on the CPU, a few thousand tokens at a time: the 4C-wide hidden tensor of a whole sampling
        batch (e.g. 128 rows x 64 tokens x 1536 x 4 B = 50 MB) is freshly mapped and page-faulted on every call,
        while a chunk's stays in the allocator's reused memory and in cache (about 10% faster per FFN)."""
        x_NC = x.reshape(-1, x.shape[-1])
        out_NC = x_NC.new_empty(x_NC.shape[0], self.fc2.out_features)
        rows = max(1, _FFN_CHUNK_ELEMS // x_NC.shape[1])
        for i in range(0, x_NC.shape[0], rows):
            out_NC[i:i + rows] = self.fc2(F.gelu(self.fc1(x_NC[i:i + rows]), approximate="tanh"))
        return out_NC.view(*x.shape[:-1], self.fc2.out_features)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the class: scale, shift and a residual gate."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
                 shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.C = embed_dim
        self.drop_path_rate = 0.0  # stochastic depth while training; set by VAR.set_drop_path_rate
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / math.sqrt(embed_dim))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.shared_aln:
            ada_B16C = self.ada_gss + cond_BD  # cond_BD is already B,1,6,C from the shared projection
        else:
            ada_B16C = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        # addcmul: modulation and gated residual in one pass each (the official code spends two on each).
        h = torch.addcmul(shift1, self.ln_wo_grad(x_BLC), scale1 + 1)
        x_BLC = self.gated_residual(x_BLC, self.attn(h, attn_bias, kv_cache), gamma1)
        h = torch.addcmul(shift2, self.ln_wo_grad(x_BLC), scale2 + 1)
        return self.gated_residual(x_BLC, self.ffn(h), gamma2)

    def gated_residual(self, x_BLC: torch.Tensor, branch_BLC: torch.Tensor, gamma_B1C: torch.Tensor) -> torch.Tensor:
        if self.drop_path_rate == 0 or not self.training:
            return torch.addcmul(x_BLC, branch_BLC, gamma_B1C)
        return x_BLC + self.drop_path(branch_BLC * gamma_B1C)

    def drop_path(self, branch_BLC: torch.Tensor) -> torch.Tensor:
        """Drops the whole residual branch of a random share of samples (rescaling the rest) while training."""
        return stochastic_depth(branch_BLC, self.drop_path_rate, "row", training=self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return torch.addcmul(shift, self.ln_wo_grad(x_BLC), scale + 1)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


# Strength conditioning as GFT's (thu-ml/GFT, LlamaGen/autoregressive/models/gpt.py, TimestepEmbedder): a sinusoid of
# 1000 s at 256 frequencies (periods up to 10000) through Linear-SiLU-Linear. docs/method.md, "GFT".
STRENGTH_FREQ_DIM, STRENGTH_MAX_PERIOD, STRENGTH_SCALE = 256, 10_000.0, 1000.0
NEUTRAL_STRENGTH = 1.0  # GFT's beta = 1, the unguided model: the null class always gets it, as does a row given none


class StrengthEmbedding(nn.Module):
    """s_B -> MLP(sinusoid(1000 s)), (B, D). The last layer starts at zero, so a model that gains this module computes
    exactly what it computed without it until training moves that layer."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(STRENGTH_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        half = STRENGTH_FREQ_DIM // 2
        self.register_buffer("freqs_F", torch.exp(-math.log(STRENGTH_MAX_PERIOD) * torch.arange(half) / half),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.mlp[0].weight, std=0.02)  # GFT's init
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, strength_B: torch.Tensor) -> torch.Tensor:
        args_BF = (strength_B.float() * STRENGTH_SCALE).unsqueeze(1) * self.freqs_F.unsqueeze(0)
        return self.mlp(torch.cat((torch.cos(args_BF), torch.sin(args_BF)), dim=1))


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig | None = None, logprob_impl: str = "auto", **overrides):
        """logprob_impl picks the token log-prob kernel behind forward(..., target_BL): auto | naive | chunked |
        triton (var_mclr/kernels/logprob.py); it is not part of the architecture and never saved."""
        super().__init__()
        cfg = cfg or VARConfig()
        if overrides:
            cfg = VARConfig(**{**asdict(cfg), **overrides})
        cfg.patch_nums = tuple(cfg.patch_nums)
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.V, self.Cvae, self.num_classes = cfg.vocab_size, cfg.Cvae, cfg.num_classes
        self.depth, self.C, self.D = cfg.depth, cfg.embed_dim, cfg.embed_dim
        self.patch_nums = cfg.patch_nums
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        start = 0
        for pn in self.patch_nums:
            self.begin_ends.append((start, start + pn * pn))
            start += pn * pn
        self.logprob_impl = kernels.logprob.check_impl(logprob_impl)

        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(self.num_classes + 1, self.C)  # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(self.C, self.D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm)
            for _ in range(cfg.depth)
        ])

        # Scale index of every token, and the block-causal mask: token i sees token j iff scale(j) <= scale(i).
        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L))
        mask_LL = lvl_L.view(-1, 1) >= lvl_L.view(1, -1)
        self.register_buffer("attn_bias_for_masking",
                             torch.zeros(self.L, self.L).masked_fill(~mask_LL, -torch.inf).view(1, 1, self.L, self.L))

        self.head_nm = AdaLNBeforeHead(self.C, self.D, cfg.norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self.strength_emb = StrengthEmbedding(self.D) if cfg.strength_cond else None
        self.drop_path_rate = 0.0
        # Per-block activation checkpointing while training (train.activation_checkpointing); not part of the
        # architecture, never saved.
        self.activation_checkpointing = False

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth for training, rising linearly from 0 at the first block to rate at the last, as in the
        official recipe (docs/method.md, "Training schedule"). Not part of the architecture: never saved."""
        if not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        self.drop_path_rate = rate
        for block, block_rate in zip(self.blocks, torch.linspace(0, rate, self.depth).tolist()):
            block.drop_path_rate = block_rate

    # ---- inputs ---------------------------------------------------------------------------------------------
    def check_labels(self, label_B: torch.Tensor, check_range: bool | None = None) -> None:
        """Shape and dtype always; the id range by default only for CPU tensors, where reading it costs no
        device sync (the trainer checks its dataset's labels once; the sampler checks each batch)."""
        if label_B.ndim != 1 or label_B.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"label_B must be a 1-D integer tensor, "
                             f"got {label_B.dtype} of shape {tuple(label_B.shape)}")
        if check_range is None:
            check_range = label_B.device.type == "cpu"
        if check_range and label_B.numel() and (int(label_B.min()) < 0 or int(label_B.max()) > self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                             f"got range [{int(label_B.min())}, {int(label_B.max())}]")

    def class_condition(self, label_B: torch.Tensor, strength_B: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond_BD, the per-block AdaLN input): class embedding (plus the strength's, with strength_cond),
        shared-projected when shared_aln."""
        self.check_labels(label_B)
        cond_BD = self.class_emb(label_B)
        if self.strength_emb is not None:
            cond_BD = cond_BD + self.strength_emb(self.strength_input(label_B, strength_B))
        elif strength_B is not None:
            raise ValueError("this VAR has no strength conditioning (model.strength_cond is off): it takes no strength")
        return cond_BD, self.shared_ada_lin(cond_BD)

    def strength_input(self, label_B: torch.Tensor, strength_B: torch.Tensor | None) -> torch.Tensor:
        """The strength each row is embedded with: NEUTRAL_STRENGTH for the null class (GFT gives its dropped labels
        beta = 1) and for rows given none; docs/method.md, "GFT"."""
        neutral_B = torch.full(label_B.shape, NEUTRAL_STRENGTH, device=label_B.device)
        if strength_B is None:
            return neutral_B
        if tuple(strength_B.shape) != tuple(label_B.shape):
            raise ValueError(f"strength_B must have shape {tuple(label_B.shape)}, got {tuple(strength_B.shape)}")
        return torch.where(label_B == self.num_classes, neutral_B, strength_B.to(neutral_B))

    def embed_scale_inputs(self, x_BlCv: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """Word embedding of tokenizer features plus level and position embeddings for tokens [begin, end)."""
        lvl_pos = self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]
        return self.word_embed(x_BlCv.float()) + lvl_pos

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        lvl_pos = self.lvl_embed(self.lvl_1L[:, :self.first_l]) + self.pos_1LC[:, :self.first_l]
        return cond_BD.unsqueeze(1) + self.pos_start + lvl_pos

    # ---- teacher forcing ------------------------------------------------------------------------------------
    def head_hidden(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                    strength_B: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the AdaLN head norm for all L positions: logits_BLV = self.head(h_BLC)."""
        B = label_B.shape[0]
        expected = (B, self.L - self.first_l, self.Cvae)
        if tuple(x_BLCv_wo_first_l.shape) != expected:
            raise ValueError(f"teacher-forcing input has shape {tuple(x_BLCv_wo_first_l.shape)}, expected {expected}")
        cond_BD, block_cond = self.class_condition(label_B, strength_B)
        x_BLC = torch.cat((self.start_tokens(cond_BD),
                           self.embed_scale_inputs(x_BLCv_wo_first_l, self.first_l, self.L)), dim=1)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                # Keeps only the block's input; its activations are recomputed in the backward (same RNG state, so
                # drop-path draws the same paths), trading one more block forward for ~20x less saved memory.
                x_BLC = checkpoint(block, x_BLC, block_cond, self.attn_bias_for_masking, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, block_cond, self.attn_bias_for_masking)
        return self.head_nm(x_BLC.float(), cond_BD.float()).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                target_BL: torch.Tensor | None = None, strength_B: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits_BLV (float32) of every token, or, given target ids, their log-probs logp_BL.

        With targets, the fused kernel computes log p(target) without materialising the B x L x V logits.
        No class dropout here: the trainer applies it. strength_B: per-row strength (only with strength_cond).
        """
        h_BLC = self.head_hidden(label_B, x_BLCv_wo_first_l, strength_B)
        if target_BL is None:
            return self.head(h_BLC).float()
        return kernels.token_logprobs(h_BLC, self.head.weight, self.head.bias, target_BL, impl=self.logprob_impl)

    # ---- one scale of KV-cached sampling --------------------------------------------------------------------
    def forward_scale(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor, block_cond: torch.Tensor,
                      caches: list[KVCache], blocks: Sequence[Callable[..., torch.Tensor]] | None = None
                      ) -> torch.Tensor:
        """Logits of one scale given its embedded input; earlier scales come from the caches (no mask needed).
        blocks: callables standing in for self.blocks (e.g. compiled_blocks()), same parameters."""
        for block, cache in zip(self.blocks if blocks is None else blocks, caches):
            x_BlC = block(x_BlC, block_cond, None, cache)
        return self.head(self.head_nm(x_BlC.float(), cond_BD.float())).float()

    # ---- compiled path (optional) ---------------------------------------------------------------------------
    def compile_blocks(self) -> None:
        """torch.compile every transformer block in place, for training (train.compile). nn.Module.compile keeps
        the module tree, so parameter names, state dicts and checkpoints are unchanged; the blocks share one
        code object, so one compilation serves them all. The embeddings, the head and the fused log-prob kernel
        (a hand-written autograd Function) stay eager."""
        for block in self.blocks:
            block.compile()

    def compiled_blocks(self) -> list[Callable[..., torch.Tensor]]:
        """Compiled stand-ins for self.blocks (sharing their parameters) for forward_scale; the model itself is left
        as it is. Shapes change from scale to scale, so dynamic shapes are used instead of one compilation per
        scale."""
        return [torch.compile(block, dynamic=True) for block in self.blocks]

    # ---- initialisation (official recipe) -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """Truncated-normal init with small gates, so every block starts near the identity."""
        std = math.sqrt(1 / self.C / 3) if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
                block.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()
        if self.strength_emb is not None:  # the loop above drew its weights too: back to GFT's zero-output init
            self.strength_emb.reset_parameters()
