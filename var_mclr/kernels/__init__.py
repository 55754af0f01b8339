"""Fused logit kernels: token log-probs through the LM head, and the guided sampling step.

Triton is imported lazily (only when a Triton path runs), so CPU-only installs without triton work.
"""

from var_mclr.kernels.logprob import IGNORE_INDEX, token_logprobs
from var_mclr.kernels.sampling import guided_sample

__all__ = ["IGNORE_INDEX", "token_logprobs", "guided_sample"]
