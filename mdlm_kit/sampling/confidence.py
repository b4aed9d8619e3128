"""Confidence-based decoding (MaskGIT, LLaDA's low-confidence remasking): approximate.

Per step, every masked position of the current block gets a candidate token drawn from
p_theta(. | z); the k candidates with the highest log-probability are committed, with k
chosen so the block is full after its share of the ``steps``. Blocks (``block_length``,
default the whole sequence) are decoded left to right. Committing the most confident
tokens first does not sample from the model's distribution: it trades diversity for
quality and is not covered by the NELBO.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mdlm_kit import rng
from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, register
from mdlm_kit.sampling.categorical import sample_categorical


@register("confidence")
@torch.no_grad()
def confidence(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
               progress=None) -> Tensor:
    z = check_template(template, ctx.mask_id)
    batch, length = z.shape
    block = opts.block_length or length
    n_blocks = math.ceil(length / block)
    per_block = max(1, (opts.steps or length) // n_blocks)
    step = 0
    for b0 in range(0, length, block):
        b1 = min(b0 + block, length)
        for j in range(per_block):
            in_block = torch.zeros_like(z, dtype=torch.bool)
            in_block[:, b0:b1] = z[:, b0:b1] == ctx.mask_id
            if not in_block.any():
                break
            masked = z == ctx.mask_id
            logits = ctx.logits(z, masked.double().mean(-1))
            rows, cols = in_block.nonzero(as_tuple=True)
            keys = rng.combine(sample_keys[rows], step, 0, cols)
            tokens, logp = sample_categorical(
                logits.reshape(-1, logits.shape[-1]), keys, opts.seed, ctx.mask_id, opts.temperature, opts.top_p,
                opts.precision, rows=rows * length + cols, kernel=opts.kernel,
            )
            conf = torch.full((batch, length), float("-inf"), dtype=torch.float64, device=z.device)
            conf[rows, cols] = logp.double()
            cand = z.clone()
            cand[rows, cols] = tokens
            k = torch.ceil(in_block.sum(-1) / (per_block - j)).long()  # (B,)
            ranks = conf.argsort(-1, descending=True).argsort(-1)
            commit = in_block & (ranks < k.unsqueeze(-1))
            z[commit] = cand[commit]
            step += 1
            if progress is not None:
                progress(step, per_block * n_blocks)
    return z
