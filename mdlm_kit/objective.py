"""The Rao-Blackwellized NELBO of absorbing-state (masked) diffusion (MDLM, MD4), per sequence, in nats.

Continuous time (Sahoo et al. 2024, eq. 10; Shi et al. 2024, eq. 5), with w(t) = -alpha'(t) / (1 - alpha(t)):

    NELBO(x) = E_{t ~ U(0,1]} E_{z_t ~ q(.|x)} [ w(t) * sum_{l : z_t^l = mask} -log p_theta(x^l | z_t) ]
             + alpha(1) * sum_l -log p_theta(x^l | all masked)            (endpoint, 0 when alpha(1) = 0)

SUBS: the mask token's logit is -inf and clean positions contribute 0. The endpoint term keeps the bound honest for
schedules that stop short of all-masked: generation starts all-masked. Discrete time, T steps: weight
(alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i)), t_i = i/T, s_i = (i-1)/T, one uniform i per sequence (times T); it
approaches the continuous NELBO from above as T grows.

The ``count`` estimator (time-agnostic models): given k masked tokens, the masked set is a uniform k-subset
whatever t was, so t integrates out. With m = 1 - alpha(t) (w dt = dm / m) and m1 = 1 - alpha(1):

    W(k) = int_0^1 w(t) Binom(k; L, m(t)) dt = (1/k) P(Binom(L, m1) >= k)      (= 1/k when alpha(1) = 0)
    NELBO(x) = sum_{k=1}^{L} W(k) E_{|S| = k} [ sum_{l in S} -log p(x^l | x with S masked) ] + endpoint

k is uniform on {1..L}, stratified; L W(k) <= L where w(t) is unbounded near t = 0: the same expectation without
the heavy tail (the any-order autoregressive form: Hoogeboom et al. 2022; Ou et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from mdlm_kit import rng
from mdlm_kit.kernels.weighted_ce import weighted_linear_cross_entropy
from mdlm_kit.sampling.base import Denoiser
from mdlm_kit.schedules import Schedule

Estimator = Literal["time", "count"]
ESTIMATORS = get_args(Estimator)


@dataclass
class NelboTerms:
    """Per-sequence NELBO estimates (float64, nats) and the number of tokens they cover."""

    per_seq: Tensor  # (B,) float64: diffusion + endpoint
    num_tokens: Tensor  # (B,) float64
    endpoint: Tensor  # (B,) float64: the endpoint part of per_seq (0 when alpha(1) = 0)
    level: Tensor | None = None  # (B,) float64 noise level of each estimate: t (time), k/L (count); None for AR
    total: Tensor | None = None  # differentiable sum of per_seq when per_seq itself is detached (masked-only head)

    def per_token(self) -> Tensor:
        total = self.per_seq.sum() if self.total is None else self.total
        return total / self.num_tokens.sum()


def subs_log_probs(logits: Tensor, mask_id: int) -> Tensor:
    """log-softmax in float32 with the mask token's logit at -inf (the model never predicts a mask)."""
    mask_col = torch.arange(logits.shape[-1], device=logits.device) == mask_id
    return torch.log_softmax(logits.float().masked_fill(mask_col, float("-inf")), dim=-1)


def masked_nll(logits: Tensor, x0: Tensor, masked: Tensor, mask_id: int) -> Tensor:
    """(B, L) float32 -log p(x0 | z_t) at masked positions; exactly 0 where the token is clean (SUBS carry-over)."""
    return torch.where(masked, -subs_log_probs(logits, mask_id).gather(-1, x0.unsqueeze(-1)).squeeze(-1), 0.0)


def count_weights(length: int, mask_rate_at_one: float, device=None) -> Tensor:
    """(length + 1,) float64: W(k) = (1/k) P(Binom(length, m1) >= k) for k >= 1, W(0) = 0."""
    k = torch.arange(length + 1, dtype=torch.float64, device=device)
    m1, n = float(mask_rate_at_one), float(length)
    if m1 >= 1.0:
        survival = torch.ones_like(k)
    else:
        log_pmf = (
            torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
            + k * math.log(m1) + (n - k) * math.log1p(-m1)
        )
        survival = torch.flip(torch.cumsum(torch.flip(log_pmf.exp(), [0]), 0), [0]).clamp(max=1.0)  # P(X >= k)
    weights = survival / k.clamp(min=1)
    weights[0] = 0.0
    return weights


@dataclass
class Corruption:
    """A noised batch: z_t, which tokens are masked, each sequence's NLL weight and its noise level."""

    zt: Tensor  # (B, L) the input the denoiser sees
    masked: Tensor  # (B, L) bool
    weight: Tensor  # (B,) float64: weight of each masked token's NLL
    level: Tensor  # (B,) float64: t (time estimator; the grid time with T steps) or k / n (count)
    cond: Tensor | None  # (B,) the mask rate fed to a time-conditioned model, else None


def _hide_padding(u: Tensor, valid: Tensor | None) -> Tensor:
    return u if valid is None else torch.where(valid, u, 2.0)  # a uniform of 2 is never below a mask rate


def _real(x0: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(x0, dtype=torch.bool) if valid is None else valid  # (B, L) the tokens that count


def corrupt_time(x0: Tensor, t: Tensor, u: Tensor, schedule: Schedule, mask_id: int, num_steps: int | None = None,
                 valid: Tensor | None = None, time_conditioning: bool = False) -> Corruption:
    """The ``time`` estimator: each token masked with probability 1 - alpha(t), weight w(t) (continuous time) or T
    times the step weight (``num_steps`` = T)."""
    t = t.to(torch.float64)
    if num_steps is None:
        rate, weight, level = schedule.mask_rate(t), schedule.weight(t), t
    else:
        i = torch.ceil(t * num_steps).clamp(1, num_steps)
        level, s_i = i / num_steps, (i - 1) / num_steps
        rate = schedule.mask_rate(level)
        weight = num_steps * (rate - schedule.mask_rate(s_i)) / rate
    masked = _hide_padding(u, valid) < rate.to(u.dtype).unsqueeze(-1)
    cond = rate.float() if time_conditioning else None
    return Corruption(torch.where(masked, mask_id, x0), masked, weight, level, cond)


def corrupt_count(x0: Tensor, t: Tensor, u: Tensor, schedule: Schedule, mask_id: int,
                  valid: Tensor | None = None) -> Corruption:
    """The ``count`` estimator (time-agnostic models, continuous time): k = ceil(t n) of the n real tokens masked,
    the k with the smallest uniforms (a uniform k-subset), weight n W(k)."""
    n = _real(x0, valid).sum(-1).clamp(min=1)
    k = torch.minimum(torch.ceil(t.to(torch.float64) * n).clamp(min=1).long(), n)  # (B,) uniform on 1..n
    ranks = _hide_padding(u, valid).argsort(dim=-1).argsort(dim=-1)  # padding ranks last: never among the k
    masked = ranks < k.unsqueeze(-1)
    m1 = float(1.0 - schedule.alpha_at_one)
    weight = torch.empty(len(x0), dtype=torch.float64, device=x0.device)
    for n_i in n.unique().tolist():  # W depends on the sequence's length: one table per length
        rows = n == n_i
        weight[rows] = n_i * count_weights(n_i, m1, x0.device)[k[rows]]
    return Corruption(torch.where(masked, mask_id, x0), masked, weight, k.double() / n.double(), None)


def masked_rows_loss(features: Tensor, head: nn.Linear, x0: Tensor, masked: Tensor, weight: Tensor, mask_id: int,
                     kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """(differentiable weighted NLL sum, (B,) float64 detached per-sequence sums) of the masked tokens, projecting
    only the masked rows of ``features`` (B, L, D) through ``head``: same value and gradients as full logits."""
    b_idx, l_idx = masked.nonzero(as_tuple=True)
    row_w = weight[b_idx]  # (N,) float64
    total, nll_rows = weighted_linear_cross_entropy(features[b_idx, l_idx], head.weight, head.bias,
                                                    x0[b_idx, l_idx], row_w, mask_id, kernel=kernel)
    per_seq = torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
    return total, per_seq.index_add_(0, b_idx, nll_rows.double() * row_w)


def endpoint_term(logits_fn: Denoiser, x0: Tensor, schedule: Schedule, mask_id: int, valid: Tensor | None = None,
                  time_conditioning: bool = False) -> Tensor:
    """(B,) float64 alpha(1) * sum_l -log p(x0^l | all masked): the endpoint term (0 when alpha(1) = 0)."""
    alpha_one = schedule.alpha_at_one
    if alpha_one <= 0.0:
        return torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
    # without padding the all-masked input is the same for every sequence: one forward pass of batch 1; with
    # padding, every real token masked and the padding as given
    z1 = torch.full_like(x0[:1], mask_id) if valid is None else torch.where(valid, mask_id, x0)
    logits = logits_fn(z1, torch.ones(len(z1), device=x0.device) if time_conditioning else None)
    if valid is None:  # (B, L): -log p(x0[b, l] | all masked) at position l
        nll1 = -subs_log_probs(logits, mask_id)[0].gather(-1, x0.T).T
    else:
        nll1 = masked_nll(logits, x0, valid, mask_id)
    return alpha_one * nll1.double().sum(-1)


def nelbo(model: Denoiser, x0: Tensor, t: Tensor, u: Tensor, schedule: Schedule, mask_id: int,
          num_steps: int | None = None, time_conditioning: bool | None = None, estimator: Estimator = "time",
          head: nn.Linear | None = None, kernel: Literal["auto", "always", "never"] = "auto",
          valid: Tensor | None = None) -> NelboTerms:
    """One-sample NELBO estimate per sequence: corruption, the masked tokens' weighted NLL, the endpoint term.

    Args:
        model: ``model(z_t, cond) -> logits (B, L, V)``; with ``head``, its features (``dit.features``, ``dit.head``):
            only the masked rows are projected, ``per_seq`` is detached and ``total`` carries the gradient.
        x0: (B, L) clean token ids (never the mask id).
        t: (B,) stratified uniforms in (0, 1]: the time (``time``) or the masked fraction (``count``).
        u: (B, L) uniforms in (0, 1) that decide which tokens are masked.
        num_steps: None for continuous time, else the number of discrete steps T (``time`` only).
        time_conditioning: pass the mask rate to the model (else ``cond`` is None); None: as the model's
            ``config.time_conditioning`` says (False for a model without one).
        kernel: the fused cross-entropy's row step: ``auto`` (Triton on CUDA), ``always``, ``never``.
        valid: (B, L) bool, the real tokens (default: all); padding is never masked, scored or counted.
    """
    owner = getattr(model, "__self__", model)  # a bound method (dit.features) answers for its module
    conditioned = bool(getattr(getattr(owner, "config", None), "time_conditioning", False))
    if time_conditioning is None:
        time_conditioning = conditioned
    elif conditioned and not time_conditioning:
        raise ValueError("this model is time-conditioned (config.time_conditioning): call nelbo(..., "
                         "time_conditioning=True), or leave time_conditioning at None to follow the model")
    if estimator == "count":
        if time_conditioning or num_steps is not None:
            raise ValueError("the count estimator needs a time-agnostic model and continuous time")
        c = corrupt_count(x0, t, u, schedule, mask_id, valid)
    else:
        c = corrupt_time(x0, t, u, schedule, mask_id, num_steps, valid, time_conditioning)
    if head is None:
        total = None
        per_seq = (masked_nll(model(c.zt, c.cond), x0, c.masked, mask_id).double() * c.weight.unsqueeze(-1)).sum(-1)
    else:
        total, per_seq = masked_rows_loss(model(c.zt, c.cond), head, x0, c.masked, c.weight, mask_id, kernel)
    logits_fn = model if head is None else (lambda z, cond: head(model(z, cond)))
    endpoint = endpoint_term(logits_fn, x0, schedule, mask_id, valid, time_conditioning)
    return NelboTerms(per_seq + endpoint, _real(x0, valid).sum(-1).to(torch.float64), endpoint, c.level,
                      None if total is None else total + endpoint.sum())


def autoregressive_nll(model: Denoiser, x0: Tensor, start_id: int, valid: Tensor | None = None) -> NelboTerms:
    """Exact -log p(x0) of a causal model per sequence (float64 nats) from the input ``[start, x0[:-1]]``. ``start_id``
    (the mask id) is never predicted (logit -inf, as under SUBS): the diffusion model's support; padding unscored."""
    logits = model(torch.cat([torch.full_like(x0[:, :1], start_id), x0[:, :-1]], dim=1), None)  # (B, L, V)
    real = _real(x0, valid)
    nll = masked_nll(logits, x0, real, start_id).double().sum(-1)
    return NelboTerms(nll, real.sum(-1).to(torch.float64), torch.zeros_like(nll))


def nelbo_from_keys(model: Denoiser, x0: Tensor, keys: Tensor, schedule: Schedule, mask_id: int, seed: int,
                    stream: int, **options) -> NelboTerms:
    """``nelbo`` (``options``: its keyword arguments) with each sequence's noise drawn from (seed, stream, key) alone,
    never from the batch size or the number of processes; consecutive keys get stratified times."""
    t = rng.stratified_times(seed, stream, keys)
    u = rng.token_uniforms(seed, stream, keys, x0.shape[1])
    return nelbo(model, x0, t, u, schedule, mask_id, **options)
