"""MDLM's ancestral sampler on a grid of K time steps: from alpha_a to alpha_b each masked token is revealed with
probability (alpha_b - alpha_a) / (1 - alpha_a), drawn from p_theta(. | z) (deciding the reveals first is MDLM's joint
draw over (token, stay masked)); a schedule with alpha(1) > 0 first steps to alpha(1) (the NELBO's endpoint term).
``ancestral_cache`` calls the network only when a token changed: exact for time-agnostic models (MDLM, section 4.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit.errors import UserError
from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, draw_tokens, register, step_uniforms


@register("ancestral")
@torch.no_grad()
def ancestral(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
              cache: bool = False, progress=None) -> Tensor:
    z = check_template(template)
    steps = opts.steps or 1000  # MDLM's default
    # alpha at the start of each step and at the end: 0, [alpha(1),] alpha((K-1)/K), ..., alpha(0) = 1
    levels = ctx.schedule.alpha(torch.arange(steps, -1, -1, dtype=torch.float64, device=z.device) / steps)
    if ctx.schedule.alpha_at_one > 0:
        levels = torch.cat([levels.new_zeros(1), levels])
    levels[0], levels[-1] = 0.0, 1.0
    for i in range(len(levels) - 1):
        a, b = float(levels[i]), float(levels[i + 1])
        masked = z == ctx.mask_id
        if not masked.any():
            break
        reveal = masked & (step_uniforms(opts, sample_keys, i, z.shape[1], salt=1) < (b - a) / (1.0 - a))
        if progress is not None:
            progress(i + 1, len(levels) - 1)
        # MDLM's sampler calls the network on every sequence at every step; the cached one only where a token changes
        need = (reveal.any(-1) if cache else torch.ones_like(masked[:, 0])).nonzero().squeeze(-1)
        if len(need) == 0:
            continue
        logits = ctx.logits(z[need], torch.full((len(need),), 1.0 - a, device=z.device))
        rows, cols = reveal[need].nonzero(as_tuple=True)
        z[need[rows], cols] = draw_tokens(ctx, opts, logits, rows, cols, sample_keys[need], i)[0]
    return z


@register("ancestral_cache")
def ancestral_cache(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
                    progress=None) -> Tensor:
    if ctx.time_conditioning:
        raise UserError("ancestral_cache needs a time-agnostic model (its predictions may not depend on t)")
    return ancestral(ctx, template, sample_keys, opts, cache=True, progress=progress)
