"""Multi-scale residual VQ-VAE tokenizer, compatible with VAR's official vae_ch160v4096z32.pth."""
from tokenizer.model import VQVAE, VQVAEConfig
from tokenizer.quant import VectorQuantizer2

__all__ = ["VQVAE", "VQVAEConfig", "VectorQuantizer2"]
