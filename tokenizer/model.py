"""The multi-scale VQ-VAE tokenizer: image <-> per-scale token maps.

Defaults reproduce the official VAR tokenizer (vae_ch160v4096z32.pth: V=4096, Cvae=32, ch=160,
ch_mult=(1,1,2,2,4), 16x downsampling, patch_nums 1..16 for 256 px). Smaller ch/ch_mult give the demo tokenizer.
Images are float tensors in [-1, 1], shape (B, 3, H, W).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from tokenizer.blocks import Decoder, Encoder
from tokenizer.quant import VectorQuantizer2

VAR_256_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    v_patch_nums: tuple[int, ...] = field(default=VAR_256_PATCH_NUMS)
    using_sa: bool = True
    using_mid_sa: bool = True

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VQVAEConfig()
        if overrides:
            cfg = VQVAEConfig(**{**asdict(cfg), **overrides})
        cfg.ch_mult, cfg.v_patch_nums = tuple(cfg.ch_mult), tuple(cfg.v_patch_nums)
        self.cfg = cfg
        self.V, self.Cvae, self.vocab_size = cfg.vocab_size, cfg.z_channels, cfg.vocab_size
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                    dropout=cfg.dropout, using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = VectorQuantizer2(cfg.vocab_size, cfg.z_channels, cfg.v_patch_nums, using_znorm=cfg.using_znorm,
                                         beta=cfg.beta, quant_resi=cfg.quant_resi,
                                         share_quant_resi=cfg.share_quant_resi)
        pad = cfg.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.v_patch_nums

    @property
    def resolution(self) -> int:
        return self.cfg.v_patch_nums[-1] * self.downsample

    def _check_images(self, img_B3HW: torch.Tensor) -> None:
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(img_B3HW.shape)}")
        if img_B3HW.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"images are {img_B3HW.shape[-2]}x{img_B3HW.shape[-1]} but the patch schedule "
                             f"{self.patch_nums} with {self.downsample}x downsampling needs "
                             f"{self.resolution}x{self.resolution}")

    # ---- training -----------------------------------------------------------------------------------------
    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction for tokenizer training: (reconstruction, codebook hits S x V, vq loss)."""
        self._check_images(img_B3HW)
        f_hat, hits_SV, vq_loss = self.quantize(self.quant_conv(self.encoder(img_B3HW)))
        return self.decoder(self.post_quant_conv(f_hat)), hits_SV, vq_loss

    # ---- official entry points ----------------------------------------------------------------------------
    @torch.no_grad()
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> list[torch.Tensor]:
        """Images in [-1, 1] -> list of per-scale token ids, each (B, p*p)."""
        self._check_images(inp_img_no_grad)
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool = True,
                     last_one: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Token maps -> images in [-1, 1]; every coarse-to-fine prefix unless last_one."""
        ms_h = self.quantize.idxBl_to_h(ms_idx_Bl)
        if last_one:
            return self.fhat_to_img(self.quantize.embed_to_fhat(ms_h, all_to_max_scale=same_shape, last_one=True))
        return [self.fhat_to_img(f) for f in self.quantize.embed_to_fhat(ms_h, all_to_max_scale=same_shape)]

    # ---- clearer names ------------------------------------------------------------------------------------
    def encode(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        return self.img_to_idxBl(img_B3HW)

    def decode(self, ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        return self.idxBl_to_img(ms_idx_Bl, last_one=True)
