"""The first-hitting sampler (Zheng et al. 2024).

In the forward process each token is masked at its own time T_l with P(T_l <= t) = 1 - alpha(t).
Going backwards from t with n tokens still masked, the next reveal happens at the largest of
their n (conditionally independent) masking times: 1 - alpha(s) = (1 - alpha(t)) u^(1/n) with
u ~ U(0, 1), so s = alpha^{-1}(1 - (1 - alpha(t)) u^(1/n)). One uniformly chosen masked
position is revealed then, its token drawn from p_theta(. | z_t). This is the continuous-time
reverse process exactly (ancestral sampling with infinitely many steps), with one network
call per token instead of one per time step; for a time-agnostic model the times do not
matter and it is any-order autoregressive sampling.

For schedules with alpha(1) > 0 the process first takes the step from all-masked to
alpha(1) (each token revealed with probability alpha(1)), as in the NELBO's endpoint term.

``tokens_per_step = k > 1`` reveals k positions per network call, all drawn from the same
prediction: faster and approximate (the k tokens are sampled independently given z).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit.sampling.base import SamplerOptions, SamplingContext, check_template, draw_tokens, register, step_uniforms


@register("fhs")
@torch.no_grad()
def fhs(ctx: SamplingContext, template: Tensor, sample_keys: Tensor, opts: SamplerOptions, progress=None) -> Tensor:
    z = check_template(template, ctx.mask_id)
    batch, length = z.shape
    device = z.device
    rate = torch.ones(batch, dtype=torch.float64, device=device)  # current mask rate 1 - alpha(t)
    step = 0
    alpha_one = ctx.schedule.alpha_at_one
    if alpha_one > 0:
        masked = z == ctx.mask_id
        reveal = masked & (step_uniforms(opts, sample_keys, step, length, salt=1) < alpha_one)
        if reveal.any():
            logits = ctx.logits(z, rate)
            rows, cols = reveal.nonzero(as_tuple=True)
            z[rows, cols] = draw_tokens(ctx, opts, logits, rows, cols, sample_keys, step)
        rate = torch.full_like(rate, 1.0 - alpha_one)
        step += 1
    total = int((z == ctx.mask_id).sum(-1).max())
    while True:
        masked = z == ctx.mask_id
        n = masked.sum(-1)  # (B,)
        if not bool((n > 0).any()):
            break
        active = n > 0
        k = torch.clamp(n, max=opts.tokens_per_step)
        # next reveal time: the largest of n masking times below t (k of them: the k-th largest, approximately)
        u = step_uniforms(opts, sample_keys, step, 2, salt=2)[:, 0]
        rate = torch.where(active, rate * u ** (1.0 / n.clamp(min=1).double()), rate)
        need = active.nonzero().squeeze(-1)  # finished sequences need no prediction
        logits = ctx.logits(z[need], rate[need])
        # reveal k uniformly chosen masked positions: the k smallest uniforms among the masked ones
        pick_u = step_uniforms(opts, sample_keys, step, length, salt=3).masked_fill(~masked, 2.0)
        ranks = pick_u.argsort(-1).argsort(-1)
        reveal = masked & (ranks < k.unsqueeze(-1))
        rows, cols = reveal[need].nonzero(as_tuple=True)
        z[need[rows], cols] = draw_tokens(ctx, opts, logits, rows, cols, sample_keys[need], step)
        step += 1
        if progress is not None:
            progress(total - int(n.max()) + 1, total)
    return z
