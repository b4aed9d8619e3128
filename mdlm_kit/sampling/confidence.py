"""Confidence-based decoding (MaskGIT, LLaDA's low-confidence remasking): approximate.

Per step every masked position of the current block draws a candidate from p_theta(. | z) and the k most probable
candidates are committed, k such that the block is full after its share of the ``steps``; blocks go left to right.
This does not sample from the model's distribution: it trades diversity for quality.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, draw_tokens, register


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
                progress(step, per_block * n_blocks)
    return z
