"""Multi-scale residual vector quantiser (VAR, arXiv 2404.02905, Algorithm 1).

A feature map f (B, Cvae, H, W) is explained coarse-to-fine: at scale s the residual is area-downsampled to
p_s x p_s, quantised to the nearest codebook entry, upsampled back (bicubic), refined by a convolution phi_s,
and subtracted. The token maps r_1..r_S are VAR's sequence; the running sum f_hat is what the decoder sees.

Parameter names and shapes match the official ``VectorQuantizer2`` so official checkpoints load strictly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv(h): a residual refinement of an upsampled token map."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.resi_ratio) + super().forward(h_BChw) * self.resi_ratio


def _phi_ticks(count: int) -> np.ndarray:
    # Each phi owns the scales whose relative depth si/(S-1) is nearest its tick (official tick placement).
    if count == 4:
        return np.linspace(1 / 12, 11 / 12, 4)
    return np.linspace(1 / (2 * count), 1 - 1 / (2 * count), count)


class PhiShared(nn.Module):
    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def __getitem__(self, rel_depth: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: nn.ModuleList):
        super().__init__()
        self.qresi_ls = phis
        self.ticks = _phi_ticks(len(phis))

    def __getitem__(self, rel_depth: float) -> nn.Module:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - rel_depth)))]


class PhiNonShared(nn.ModuleList):
    def __init__(self, phis: list[nn.Module]):
        super().__init__(phis)
        self.ticks = _phi_ticks(len(phis))

    def __getitem__(self, rel_depth: float) -> nn.Module:
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - rel_depth))))


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size: int, Cvae: int, v_patch_nums: Sequence[int], using_znorm: bool = False,
                 beta: float = 0.25, quant_resi: float = 0.5, share_quant_resi: int = 4, default_qresi_counts: int = 0):
        super().__init__()
        if len(v_patch_nums) < 2:
            raise ValueError(f"the patch schedule needs at least two scales, got {tuple(v_patch_nums)}")
        if list(v_patch_nums) != sorted(set(v_patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing, got {tuple(v_patch_nums)}")
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.v_patch_nums = tuple(v_patch_nums)
        self.using_znorm, self.beta = using_znorm, beta

        def make_phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))

        # Per-scale EMA of codebook hits; a training statistic kept for checkpoint compatibility.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    @property
    def num_scales(self) -> int:
        return len(self.v_patch_nums)

    def phi(self, si: int) -> nn.Module:
        return self.quant_resi[si / (self.num_scales - 1)]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        codes_VC = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codes_VC, dim=-1).T, dim=1)
        dist_NV = z_NC.square().sum(1, keepdim=True) + codes_VC.square().sum(1) - 2 * z_NC @ codes_VC.T
        return torch.argmin(dist_NV, dim=1)

    def _upsampled_residual(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """phi_s(upsample(h)) at the full latent size: the contribution of scale si to f_hat."""
        full = self.v_patch_nums[-1]
        if h_BChw.shape[-1] != full:
            h_BChw = F.interpolate(h_BChw, size=(full, full), mode="bicubic")
        return self.phi(si)(h_BChw)

    def _check_latent(self, f_BChw: torch.Tensor) -> None:
        full = self.v_patch_nums[-1]
        if f_BChw.shape[-2:] != (full, full):
            raise ValueError(f"latent map is {tuple(f_BChw.shape[-2:])} but the patch schedule "
                             f"{self.v_patch_nums} ends at {full}x{full}")

    # ---- tokenizer training -------------------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise for VQ-VAE training. Returns (f_hat with straight-through grads, codebook hits S x V, vq loss)."""
        self._check_latent(f_BChw)
        f_BChw = f_BChw.float()
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        hits_SV = f_BChw.new_zeros(self.num_scales, self.vocab_size)
        vq_loss = f_BChw.new_zeros(())
        for si, pn in enumerate(self.v_patch_nums):
            idx_Bhw = self.nearest_code(self._area(f_rest, pn)).view(f_BChw.shape[0], pn, pn)
            hits_SV[si] = idx_Bhw.flatten().bincount(minlength=self.vocab_size).float()
            h_BChw = self._upsampled_residual(si, self.embedding(idx_Bhw).permute(0, 3, 1, 2))
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            # Commitment (encoder towards codes) plus codebook/phi loss (codes towards the encoder output).
            vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_BChw.detach())
        vq_loss = vq_loss / self.num_scales
        return f_BChw + (f_hat - f_BChw).detach(), hits_SV, vq_loss  # straight-through estimator

    @staticmethod
    def _area(f_BChw: torch.Tensor, pn: int) -> torch.Tensor:
        """Residual at p x p, as rows of Cvae-vectors (N, C)."""
        if f_BChw.shape[-1] != pn:
            f_BChw = F.interpolate(f_BChw, size=(pn, pn), mode="area")
        return f_BChw.permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])

    # ---- encoding -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums=None) -> list[torch.Tensor]:
        """Residual quantisation of an encoder map: per-scale token ids (B, p*p), or the running f_hat."""
        if v_patch_nums is not None and tuple(v_patch_nums) != self.v_patch_nums:
            raise ValueError(f"this quantiser was built for patch_nums {self.v_patch_nums}, got {tuple(v_patch_nums)}")
        self._check_latent(f_BChw)
        B = f_BChw.shape[0]
        f_rest = f_BChw.float().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si, pn in enumerate(self.v_patch_nums):
            idx_N = self.nearest_code(self._area(f_rest, pn))
            h_BChw = self._upsampled_residual(si, self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2))
            f_hat += h_BChw
            f_rest -= h_BChw
            out.append(f_hat.clone() if to_fhat else idx_N.view(B, pn * pn))
        return out

    # ---- decoding -----------------------------------------------------------------------------------------
    def idxBl_to_h(self, ms_idx_Bl: list[torch.Tensor]) -> list[torch.Tensor]:
        """Token ids per scale -> code maps (B, Cvae, p, p)."""
        self._check_token_maps(ms_idx_Bl)
        B = ms_idx_Bl[0].shape[0]
        return [self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                for idx_Bl, pn in zip(ms_idx_Bl, self.v_patch_nums)]

    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Sum of the refined, upsampled code maps; every prefix (for progressive previews) unless last_one."""
        if not all_to_max_scale:
            raise ValueError("only all_to_max_scale=True is supported (it is what VAR trains and samples with)")
        f_hat = None
        prefixes = []
        for si, h_BChw in enumerate(ms_h_BChw):
            h = self._upsampled_residual(si, h_BChw.float())
            f_hat = h if f_hat is None else f_hat + h
            prefixes.append(f_hat)
        return f_hat if last_one else prefixes

    def _check_token_maps(self, ms_idx_Bl: list[torch.Tensor]) -> None:
        if len(ms_idx_Bl) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} token maps for patch_nums {self.v_patch_nums}, "
                             f"got {len(ms_idx_Bl)}")
        for si, (idx_Bl, pn) in enumerate(zip(ms_idx_Bl, self.v_patch_nums)):
            if idx_Bl.ndim != 2 or idx_Bl.shape[1] != pn * pn:
                raise ValueError(f"token map {si} has shape {tuple(idx_Bl.shape)}, expected (B, {pn * pn})")

    # ---- VAR teacher forcing and sampling -----------------------------------------------------------------
    def idxBl_to_var_input(self, gt_ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """VAR's teacher-forcing input: for scales 2..S, f_hat after scales < s, area-downsampled to p_s.

        Returns x_BLCv_wo_first_l of shape (B, L - p_1^2, Cvae), float32.
        """
        self._check_token_maps(gt_ms_idx_Bl)
        next_inputs = []
        f_hat = None
        for si, h_BChw in enumerate(self.idxBl_to_h(gt_ms_idx_Bl)[:-1]):
            h = self._upsampled_residual(si, h_BChw.float())
            f_hat = h if f_hat is None else f_hat + h
            next_inputs.append(self._area(f_hat, self.v_patch_nums[si + 1]).view(f_hat.shape[0], -1, self.Cvae))
        return torch.cat(next_inputs, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor,
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's codes to f_hat (in place) and return (f_hat, next scale's input map B,Cvae,p,p)."""
        f_hat.add_(self._upsampled_residual(si, h_BChw))
        if si == SN - 1:
            return f_hat, f_hat
        pn_next = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
