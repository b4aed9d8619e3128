"""Fused masked categorical sampling: Gumbel-argmax over the vocabulary in one pass, never the mask column (SUBS).

One program per selected row streams the vocabulary in chunks with an online log-sum-exp (for the chosen token's
log-probability) and a running Gumbel-argmax. The noise is ``mdlm_kit.rng``'s, generated in the kernel, so kernel and
reference draw the same tokens. Layering: ``_masked_gumbel_argmax_kernel`` -> ``masked_categorical_triton``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit import rng


def masked_categorical_reference(logits: Tensor, rows: Tensor, row_hash: Tensor, mask_id: int,
                                 temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Pure-torch reference with the kernel's signature: for the rows ``rows`` (R,) of ``logits`` (N, V), with noise
    states ``row_hash`` (R,) (``rng.row_hash``), tokens (R,) int64 and their log-probabilities (R,) float64."""
    x = logits[rows].to(torch.float64) / temperature
    x[:, mask_id] = float("-inf")
    tokens = (x - torch.log(-torch.log(rng.hash_uniforms(row_hash, x.shape[1])))).argmax(-1)
    logp = x.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
    return tokens, logp


try:  # Triton is optional: the reference serves CPUs and machines without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

if triton is not None:

    @triton.jit
    def _splitmix64(z):
        z = z + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def _masked_gumbel_argmax_kernel(
        logits_ptr,  # *fp32/bf16/fp16 (N, V), row stride `stride_row`, unit column stride
        rows_ptr,  # *int64 (R,) rows to sample
        hash_ptr,  # *int64 (R,) per-row noise state
        tok_ptr,  # *int64 (R,) out: sampled token
        logp_ptr,  # *fp64 (R,) out: its log-probability
        V,  # vocabulary size
        stride_row,  # elements between rows
        mask_id,  # column never sampled
        inv_temp,  # 1 / temperature
        BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = tl.load(rows_ptr + pid).to(tl.int64)  # int64 offsets: N * V can exceed 2^31
        h = tl.load(hash_ptr + pid).to(tl.uint64, bitcast=True)
        base = logits_ptr + row * stride_row
        m = tl.full([], float("-inf"), tl.float64)  # running max
        s = tl.full([], 0.0, tl.float64)  # running sum of exp(x - m)
        best = tl.full([], float("-inf"), tl.float64)  # best Gumbel score
        best_x = tl.full([], 0.0, tl.float64)
        best_i = tl.full([], 0, tl.int64)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = (cols < V) & (cols != mask_id)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float64) * inv_temp
            x = tl.where(valid, x, float("-inf"))
            # online log-sum-exp
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(x - m_new), 0.0), 0)
            m = m_new
            # Gumbel noise of mdlm_kit.rng: splitmix64(h + (v + 1) * golden), 52-bit uniforms
            z = _splitmix64(h + (cols.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15)
            u = ((z >> 12).to(tl.float64) + 0.5) * (1.0 / 4503599627370496.0)
            score = tl.where(valid, x - tl.log(-tl.log(u)), float("-inf"))
            chunk_best = tl.max(score, 0)
            chunk_i = tl.argmax(score, 0)
            chunk_x = tl.sum(tl.where(tl.arange(0, BLOCK_V) == chunk_i, x, 0.0), 0)
            take = chunk_best > best
            best_x = tl.where(take, chunk_x, best_x)
            best_i = tl.where(take, (start + chunk_i).to(tl.int64), best_i)
            best = tl.maximum(best, chunk_best)
        tl.store(tok_ptr + pid, best_i)
        tl.store(logp_ptr + pid, best_x - m - tl.log(s))


def masked_categorical_triton(logits: Tensor, rows: Tensor, row_hash: Tensor, mask_id: int,
                              temperature: float = 1.0, block_v: int = 1024) -> tuple[Tensor, Tensor]:
    """Launch the kernel: one program per sampled row."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_rows = rows.numel()
    tokens = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    logp = torch.empty(n_rows, dtype=torch.float64, device=logits.device)
    if n_rows == 0:
        return tokens, logp
    vocab = logits.shape[-1]
    block = min(block_v, triton.next_power_of_2(vocab))
    _masked_gumbel_argmax_kernel[(n_rows,)](
        logits, rows.to(torch.int64).contiguous(), row_hash.to(torch.int64).contiguous(), tokens, logp,
        vocab, logits.stride(0), mask_id, 1.0 / temperature, BLOCK_V=block,
    )
    return tokens, logp
