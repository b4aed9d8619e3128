"""Likelihood of a model on packed blocks: NELBO bounds (diffusion) or exact NLL (autoregressive), summed in
float64, with the standard error of the per-token value over sequences (README, "Perplexity")."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from mdlm_kit import rng


def ratio_stderr(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error of sum(sums) / sum(counts) over independent units (sequences): the ratio
    estimator's linearization, i.e. per-unit means weighted by their counts."""
    n, sums, counts = len(sums), sums.double(), counts.double()
    if n < 2:
        return math.nan
    mean, w = sums.sum() / counts.sum(), counts / counts.mean()
    return float(torch.sqrt(((w * (sums / counts - mean)) ** 2).sum() / (n * (n - 1))))


@dataclass
class Likelihood:
    """Per-sequence estimates and what they add up to."""

    per_seq: torch.Tensor  # (N,) float64 nats
    num_tokens: torch.Tensor  # (N,) float64
    seconds: float
    endpoint: float = 0.0  # nats in the endpoint term, summed over sequences
    levels: torch.Tensor | None = None  # (N K,) noise level of each time sample; None for autoregressive models
    contributions: torch.Tensor | None = None  # (N K,) its diffusion nats, already / K

    @property
    def nelbo(self) -> float:
        return float(self.per_seq.sum()) / float(self.num_tokens.sum())

    @property
    def stderr(self) -> float:
        return ratio_stderr(self.per_seq, self.num_tokens)

    def buckets(self, num_buckets: int = 20) -> list[float]:
        """Nats per token from each noise-level bucket (b/n, (b+1)/n]; with the endpoint term they add up to nelbo."""
        idx = (torch.ceil(self.levels * num_buckets).long() - 1).clamp(0, num_buckets - 1)
        sums = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, idx, self.contributions)
        return (sums / float(self.num_tokens.sum())).tolist()

    def summary(self) -> dict:
        total, nelbo, se = float(self.num_tokens.sum()), self.nelbo, self.stderr
        return {"nelbo": nelbo, "ppl": math.exp(nelbo), "stderr": se,
                "ci95": [math.exp(nelbo - 1.96 * se), math.exp(nelbo + 1.96 * se)], "num_tokens": int(total),
                "num_sequences": len(self.per_seq),
                "tokens_per_second": total / self.seconds if self.seconds > 0 else math.nan}


@torch.no_grad()
def evaluate_likelihood(model, blocks: np.ndarray, batch_size: int = 64, seed: int = 0, num_steps: int | None = None,
                        num_t_samples: int = 1, estimator: str | None = None, progress: bool = False) -> Likelihood:
    """Exact NLL (autoregressive) or NELBO of a ``LanguageModel`` on ``blocks`` (N, L), averaged over K =
    ``num_t_samples`` noise samples per sequence keyed by i * K + k: independent of the batch size, stratified."""
    from tqdm.auto import tqdm

    model.eval()
    diffusion, family = model.kind == "diffusion", model.family
    K = num_t_samples if diffusion else 1
    if diffusion:  # the evaluation's own noise, time grid and estimator
        family = family.replace(seed=seed, num_steps=num_steps, estimator=estimator or family.estimator)
    per_seq, tokens, levels, contribs, endpoint = [], [], [], [], 0.0
    start, starts = time.perf_counter(), range(0, len(blocks), batch_size)
    for lo in tqdm(starts, desc="ppl", unit="batch", disable=None if progress and len(starts) > 1 else True,
                   leave=False):  # disable=None: a bar on a terminal only
        x0 = torch.from_numpy(np.asarray(blocks[lo : lo + batch_size], dtype=np.int64)).to(model.device)
        valid = None
        if getattr(blocks, "padded", False):  # padded blocks (one document each): only the real tokens are scored
            n = torch.from_numpy(blocks.lengths(slice(lo, lo + batch_size))).to(x0.device)
            valid = (torch.arange(x0.shape[1], device=x0.device)[None, :] < n[:, None]).repeat_interleave(K, dim=0)
        keys = torch.arange(lo, lo + len(x0), device=x0.device)[:, None] * K + torch.arange(K, device=x0.device)
        terms = family.loss(model.backbone, x0.repeat_interleave(K, dim=0), keys.reshape(-1), rng.STREAM_EVAL, valid)
        per_seq.append(terms.per_seq.cpu().view(-1, K).mean(1))
        tokens.append(terms.num_tokens.cpu().view(-1, K)[:, 0])
        endpoint += float(terms.endpoint.sum()) / K
        if diffusion:
            levels.append(terms.level.cpu())
            contribs.append((terms.per_seq - terms.endpoint).cpu() / K)
    return Likelihood(torch.cat(per_seq), torch.cat(tokens), time.perf_counter() - start, endpoint,
                      torch.cat(levels) if diffusion else None, torch.cat(contribs) if diffusion else None)
