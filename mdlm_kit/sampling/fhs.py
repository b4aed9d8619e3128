"""The first-hitting sampler (Zheng et al. 2024): the continuous-time reverse process exactly, one call per token.

Token l is masked at its own time T_l, P(T_l <= t) = 1 - alpha(t). Going back from t with n tokens masked, the next
reveal, of one uniformly chosen masked position drawn from p_theta(. | z_t), is at the largest of their n masking
times: 1 - alpha(s) = (1 - alpha(t)) u^(1/n), u ~ U(0, 1). A schedule with alpha(1) > 0 first steps to alpha(1) (the
NELBO's endpoint term). ``tokens_per_step = k > 1`` reveals k positions per call: faster and approximate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, draw_tokens, register, step_uniforms


@register("fhs")
@torch.no_grad()
def fhs(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions, progress=None) -> Tensor:
    z = check_template(template)
    batch, length = z.shape
    rate = torch.ones(batch, dtype=torch.float64, device=z.device)  # current mask rate 1 - alpha(t)
    step = 0
    alpha_one = ctx.schedule.alpha_at_one
    if alpha_one > 0:
        reveal = (z == ctx.mask_id) & (step_uniforms(opts, sample_keys, step, length, salt=1) < alpha_one)
        if reveal.any():
            logits = ctx.logits(z, rate)
            rows, cols = reveal.nonzero(as_tuple=True)
            z[rows, cols] = draw_tokens(ctx, opts, logits, rows, cols, sample_keys, step)[0]
        rate = torch.full_like(rate, 1.0 - alpha_one)
        step += 1
    total = int((z == ctx.mask_id).sum(-1).max())
    while True:
        masked = z == ctx.mask_id
        n = masked.sum(-1)  # (B,)
        active = n > 0
        if not active.any():
            break
        # next reveal time: the largest of n masking times below t (k of them: the k-th largest, approximately)
        u = step_uniforms(opts, sample_keys, step, 2, salt=2)[:, 0]
        rate = torch.where(active, rate * u ** (1.0 / n.clamp(min=1).double()), rate)
        need = active.nonzero().squeeze(-1)  # finished sequences need no prediction
        logits = ctx.logits(z[need], rate[need])
        # reveal k uniformly chosen masked positions: the k smallest uniforms among the masked ones
        pick_u = step_uniforms(opts, sample_keys, step, length, salt=3).masked_fill(~masked, 2.0)
        ranks = pick_u.argsort(-1).argsort(-1)
        reveal = masked & (ranks < n.clamp(max=opts.tokens_per_step).unsqueeze(-1))
        rows, cols = reveal[need].nonzero(as_tuple=True)
        z[need[rows], cols] = draw_tokens(ctx, opts, logits, rows, cols, sample_keys[need], step)[0]
        step += 1
        if progress is not None:
            progress(total - int(n.max()) + 1, total)
    return z
