"""MDLM's ancestral sampler: the reverse process on a grid of K time steps.

From the current level alpha_a to the next alpha_b > alpha_a, each masked token is revealed
with probability (alpha_b - alpha_a) / (1 - alpha_a) and its value drawn from
p_theta(. | z). The process starts from the all-masked sequence at alpha = 0; for schedules
with alpha(1) > 0 the first step goes from 0 to alpha(1), which is the step the NELBO's
endpoint term accounts for (``mdlm_kit.objective``).

Which tokens are revealed is decided before the network is called, and only the revealed
positions are sampled: the same distribution as MDLM's joint draw over (token, stay masked).
``ancestral`` evaluates the network at every step, as MDLM's sampler does (K calls: the
reference cost); ``ancestral_cache`` evaluates it only when a token changes, which is exact
for time-agnostic models, whose prediction depends on z alone (MDLM, section 4.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, draw_tokens, register, step_uniforms

DEFAULT_STEPS = 1000


def alpha_levels(ctx: SamplingContext, steps: int, device) -> Tensor:
    """alpha at the start of each step and at the end: 0, [alpha(1),] alpha((K-1)/K), ..., alpha(0) = 1."""
    t = torch.arange(steps, -1, -1, dtype=torch.float64, device=device) / steps
    levels = ctx.schedule.alpha(t)
    if ctx.schedule.alpha_at_one > 0:
        levels = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), levels])
    else:
        levels[0] = 0.0
    levels[-1] = 1.0
    return levels


@register("ancestral")
@torch.no_grad()
def ancestral(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
              cache: bool = False, progress=None) -> Tensor:
    z = check_template(template, ctx.mask_id)
    batch, length = z.shape
    levels = alpha_levels(ctx, opts.steps or DEFAULT_STEPS, z.device)
    for i in range(len(levels) - 1):
        a, b = float(levels[i]), float(levels[i + 1])
        masked = z == ctx.mask_id
        if not masked.any():
            break
        reveal_p = (b - a) / (1.0 - a)
        u = step_uniforms(opts, sample_keys, i, length, salt=1)
        reveal = masked & (u < reveal_p)
        if progress is not None:
            progress(i + 1, len(levels) - 1)
        rate = torch.full((batch,), 1.0 - a, device=z.device)
        if not cache:
            # MDLM's plain sampler evaluates the network on every sequence at every step
            logits, need = ctx.logits(z, rate), torch.arange(batch, device=z.device)
        else:
            # only sequences in which a token changes now need a prediction
            need = reveal.any(-1).nonzero().squeeze(-1)
            if len(need) == 0:
                continue
            logits = ctx.logits(z[need], rate[need])
        rows, cols = reveal[need].nonzero(as_tuple=True)
        z[need[rows], cols] = draw_tokens(ctx, opts, logits, rows, cols, sample_keys[need], i)
    return z


@register("ancestral_cache")
def ancestral_cache(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions,
                    progress=None) -> Tensor:
    if ctx.time_conditioning:
        from mdlm_kit.errors import UserError

        raise UserError("ancestral_cache needs a time-agnostic model (its predictions may not depend on t)")
    return ancestral(ctx, template, sample_keys, opts, cache=True, progress=progress)
