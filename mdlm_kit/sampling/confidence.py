"""Confidence-based decoding (MaskGIT, LLaDA's low-confidence remasking), approximate: per step every masked position
of the current block draws a candidate and the k most probable are committed, k such that the block is full after its
share of the ``steps``; blocks go left to right. It trades the model's distribution for quality.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, draw_tokens, register


@register("confidence")
@torch.no_grad()
def confidence(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
               progress=None) -> Tensor:
    z = check_template(template)
    batch, length = z.shape
    block = opts.block_length or length
    starts = range(0, length, block)
    per_block = max(1, (opts.steps or length) // len(starts))
    step = 0
    for b0 in starts:
        for j in range(per_block):
            in_block = torch.zeros_like(z, dtype=torch.bool)
            in_block[:, b0 : b0 + block] = z[:, b0 : b0 + block] == ctx.mask_id
            if not in_block.any():
                break
            logits = ctx.logits(z, (z == ctx.mask_id).double().mean(-1))
            rows, cols = in_block.nonzero(as_tuple=True)
            tokens, logp = draw_tokens(ctx, opts, logits, rows, cols, sample_keys, step)
            conf = torch.full((batch, length), float("-inf"), dtype=torch.float64, device=z.device)
            conf[rows, cols] = logp.double()
            k = torch.ceil(in_block.sum(-1) / (per_block - j)).long()  # (B,)
            ranks = conf.argsort(-1, descending=True).argsort(-1)
            commit = (in_block & (ranks < k.unsqueeze(-1)))[rows, cols]
            z[rows[commit], cols[commit]] = tokens[commit]
            step += 1
            if progress is not None:
                progress(step, per_block * len(starts))
    return z
