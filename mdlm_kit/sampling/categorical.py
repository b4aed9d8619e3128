"""Categorical sampling that keeps the temperature: Gumbel-max with float64 noise.

Gumbel-max with float32 noise cannot draw a Gumbel value above -log(-log(1 - 2^-24)) ~ 16.6,
so tokens whose log-probability sits more than ~16.6 + their rivals' noise below the top
are never sampled: the tail is truncated and the effective temperature drops (Zheng et al.
2024, "Masked diffusion models are secretly time-agnostic masked models and exploit
inaccurate categorical sampling"). Uniforms here carry 52 bits, are exact in float64
and never 0 or 1, and -log(-log u) is evaluated in float64, reaching 36.7 (float64's log
is accurate to an ulp of its result even next to u = 1). ``precision="float32"`` reproduces the
truncated sampler for comparison.

The noise is counter-based (``mdlm_kit.rng``): row r of a call uses uniforms keyed by
``keys[r]``, so a sample does not depend on the batch it is drawn in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit import rng
from mdlm_kit.kernels import Kernel, use_kernel

PRECISIONS = ("float64", "float32")


def gumbel(u: Tensor, precision: str = "float64") -> Tensor:
    """Standard Gumbel noise -log(-log u) from float64 uniforms in (0, 1)."""
    if precision == "float64":
        return -torch.log(-torch.log(u))
    u32 = u.float().clamp(torch.finfo(torch.float32).tiny, 1.0 - 2.0**-24)
    return -torch.log(-torch.log(u32))


def filter_logp(logits: Tensor, mask_id: int, temperature: float = 1.0, top_p: float = 1.0,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """Log-probabilities after temperature, SUBS (mask at -inf) and nucleus (top-p) truncation."""
    logits = logits.to(dtype) / temperature
    logits[..., mask_id] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        cum = sorted_logp.exp().cumsum(-1)
        drop_sorted = (cum - sorted_logp.exp()) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample_categorical(
    logits: Tensor,
    keys: Tensor,
    seed: int,
    mask_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    precision: str = "float64",
    rows: Tensor | None = None,
    kernel: Kernel = "auto",
) -> tuple[Tensor, Tensor]:
    """Draw one token per selected row of ``logits`` (N, V); never the mask.

    ``rows`` (R,) selects the rows to sample (default: all); ``keys`` (R,) index their noise.
    Returns (tokens (R,), log-probabilities (R,)). On CUDA with float64 noise and no nucleus
    truncation this runs the fused Triton kernel (``mdlm_kit.kernels.masked_categorical``; ``kernel``),
    which reads only the selected rows and draws the same tokens as this reference.
    """
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    if use_kernel(kernel, logits) and top_p == 1.0 and precision == "float64":
        from mdlm_kit.kernels.masked_categorical import masked_categorical_triton

        row_hash = rng.row_hash(seed, rng.STREAM_SAMPLE, keys)
        return masked_categorical_triton(logits, rows, row_hash, mask_id, temperature)
    logits = logits[rows]
    dtype = torch.float64 if precision == "float64" else torch.float32
    logp = filter_logp(logits, mask_id, temperature, top_p, dtype)
    u = rng.token_uniforms(seed, rng.STREAM_SAMPLE, keys, logits.shape[-1])
    tokens = (logp + gumbel(u, precision).to(dtype)).argmax(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
