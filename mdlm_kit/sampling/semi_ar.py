"""Semi-autoregressive generation (the block-wise factorization of SSD-LM and BD3-LM): any length, block by block,
each by the ``inner`` sampler over a window that ends with it and holds as much of the text before it as fits."""

from __future__ import annotations

from torch import Tensor

from mdlm_kit import rng
from mdlm_kit.errors import UserError
from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, get_sampler, register


@register("semi_ar")
def semi_ar(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
            progress=None) -> Tensor:
    if opts.inner == "semi_ar":
        raise UserError("semi_ar cannot be its own inner sampler")
    inner = get_sampler(opts.inner)
    z = check_template(template)
    total = z.shape[1]
    window = min(ctx.max_len or total, total)
    block = opts.block_length or max(1, window // 2)
    if block > window:
        raise UserError(f"block_length {block} is above the model's maximum sequence length {window}")
    for index, start in enumerate(range(0, total, block)):
        end = min(start + block, total)
        lo = max(0, end - window)
        keys = rng.combine(sample_keys, index)  # fresh noise per block, still per sample
        z[:, lo:end] = inner(ctx, z[:, lo:end], keys, opts)
        if progress is not None:
            progress(end, total)
    return z
