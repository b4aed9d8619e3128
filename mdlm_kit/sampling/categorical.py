"""Categorical sampling that keeps the temperature: Gumbel-max with float64 noise.

Float32 noise cannot draw a Gumbel value above -log(-log(1 - 2^-24)) ~ 16.6, so tokens more than that below the top
are never sampled and the effective temperature drops (Zheng et al. 2024, "Masked diffusion models are secretly
time-agnostic masked models and exploit inaccurate categorical sampling"); ``mdlm_kit.rng``'s 52-bit uniforms reach
36.7. ``precision="float32"`` reproduces the truncated sampler for comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit import rng
from mdlm_kit.kernels import Kernel, use_kernel

PRECISIONS = ("float64", "float32")


def gumbel(u: Tensor, precision: str = "float64") -> Tensor:
    """Standard Gumbel noise -log(-log u) from float64 uniforms in (0, 1)."""
    if precision == "float32":
        u = u.float().clamp(torch.finfo(torch.float32).tiny, 1.0 - 2.0**-24)
    return -torch.log(-torch.log(u))


def filter_logp(logits: Tensor, mask_id: int, temperature: float = 1.0, top_p: float = 1.0,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """Log-probabilities after temperature, SUBS (mask at -inf) and nucleus (top-p) truncation."""
    logits = logits.to(dtype) / temperature
    logits[..., mask_id] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        p = sorted_logp.exp()
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample_categorical(logits: Tensor, keys: Tensor, seed: int, mask_id: int, temperature: float = 1.0,
                       top_p: float = 1.0, precision: str = "float64", rows: Tensor | None = None,
                       kernel: Kernel = "auto") -> tuple[Tensor, Tensor]:
    """One token (never the mask) and its log-probability per row ``rows`` (R,) of ``logits`` (N, V) (default: all),
    noise keyed by ``keys`` (R,). Without float32 noise or top-p, ``kernel`` may pick the same draw's Triton kernel."""
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    if use_kernel(kernel, logits) and top_p == 1.0 and precision == "float64":
        from mdlm_kit.kernels.masked_categorical import masked_categorical_triton

        hashes = rng.row_hash(seed, rng.STREAM_SAMPLE, keys)
        return masked_categorical_triton(logits, rows, hashes, mask_id, temperature)
    dtype = torch.float64 if precision == "float64" else torch.float32
    logp = filter_logp(logits[rows], mask_id, temperature, top_p, dtype)
    u = rng.token_uniforms(seed, rng.STREAM_SAMPLE, keys, logits.shape[-1])
    tokens = (logp + gumbel(u, precision).to(dtype)).argmax(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
