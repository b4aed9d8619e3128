"""Likelihood of a model on packed blocks: NELBO bounds (diffusion) or exact NLL (autoregressive).

Sums are accumulated in float64. The standard error is that of the per-token value over sequences
(a ratio estimator: sequence values weighted by their token counts), so it includes both the
spread of -log p(x) between sequences and the Monte Carlo noise of the time samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mdlm_kit import rng
from mdlm_kit.objective import autoregressive_nll, nelbo_from_keys


def ratio_stderr(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error of sum(sums) / sum(counts) over independent units (sequences): the ratio
    estimator's linearization, i.e. per-unit means weighted by their counts."""
    sums, counts = sums.double(), counts.double()
    n = len(sums)
    if n < 2:
        return math.nan
    mean = sums.sum() / counts.sum()
    w = counts / counts.mean()
    return float(torch.sqrt(((w * (sums / counts - mean)) ** 2).sum() / (n * (n - 1))))


@dataclass
class Likelihood:
    """Per-sequence estimates and what they add up to."""

    per_seq: torch.Tensor  # (N,) float64 nats
    num_tokens: torch.Tensor  # (N,) float64
    seconds: float
    endpoint: float = 0.0  # nats in the endpoint term, summed over sequences
    levels: list[torch.Tensor] = field(default_factory=list)  # noise level of each time sample
    contributions: list[torch.Tensor] = field(default_factory=list)  # its diffusion nats, already / K

    @property
    def nelbo(self) -> float:
        return float(self.per_seq.sum()) / float(self.num_tokens.sum())

    @property
    def stderr(self) -> float:
        return ratio_stderr(self.per_seq, self.num_tokens)

    def buckets(self, num_buckets: int = 20) -> list[dict]:
        """Where the bound comes from: nats per token contributed by each noise-level bucket (lo, hi].

        The buckets and the endpoint term add up to ``nelbo``. Empty for autoregressive models.
        """
        if not self.levels:
            return []
        level, contrib = torch.cat(self.levels), torch.cat(self.contributions)
        idx = (torch.ceil(level * num_buckets).long() - 1).clamp(0, num_buckets - 1)
        sums = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, idx, contrib)
        counts = torch.bincount(idx, minlength=num_buckets)
        total = float(self.num_tokens.sum())
        return [
            {"lo": b / num_buckets, "hi": (b + 1) / num_buckets, "nats_per_token": float(sums[b]) / total,
             "samples": int(counts[b])}
            for b in range(num_buckets)
        ]

    def summary(self) -> dict:
        total = float(self.num_tokens.sum())
        return {
            "nelbo": self.nelbo,
            "stderr": self.stderr,
            "num_tokens": int(total),
            "num_sequences": len(self.per_seq),
            "tokens_per_second": total / self.seconds if self.seconds > 0 else math.nan,
        }


def _batches(blocks: np.ndarray, batch_size: int, device, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, len(blocks), batch_size)
    disable = None if progress and len(starts) > 1 else True  # None: only on a terminal
    padded = getattr(blocks, "padded", False)
    for lo in tqdm(starts, desc=desc, unit="batch", disable=disable, leave=False):
        x0 = torch.from_numpy(np.asarray(blocks[lo : lo + batch_size], dtype=np.int64)).to(device)
        valid = None
        if padded:  # padded blocks (one document each): only the real tokens are scored
            n = torch.from_numpy(blocks.lengths(slice(lo, lo + batch_size))).to(device)
            valid = torch.arange(x0.shape[1], device=device)[None, :] < n[:, None]
        yield lo, x0, valid


@torch.no_grad()
def evaluate_likelihood(
    model,
    blocks: np.ndarray,
    batch_size: int = 64,
    seed: int = 0,
    num_steps: int | None = None,
    num_t_samples: int = 1,
    estimator: str | None = None,
    progress: bool = False,
) -> Likelihood:
    """Likelihood of ``model`` (``MaskedDiffusionLM`` or ``AutoregressiveLM``) on ``blocks`` (N, L).

    Diffusion: the NELBO with ``num_t_samples`` time samples per sequence, averaged (one is the MDLM
    protocol), continuous time or ``num_steps`` discrete steps, with ``estimator`` ``time`` or ``count``
    (default: the model's). Sample k of sequence i is keyed by i * K + k: its noise depends only on
    (seed, i, k), never on the batch size, and the K times of a sequence are stratified.
    Autoregressive: the exact NLL (the other options do not apply).
    """
    model.eval()
    device = model.device
    per_seq, tokens, levels, contribs, endpoint = [], [], [], [], 0.0
    K = num_t_samples
    start = time.perf_counter()
    for lo, x0, valid in _batches(blocks, batch_size, device, progress, "ppl"):
        if model.kind == "autoregressive":
            terms = autoregressive_nll(model.backbone, x0, start_id=model.mask_id, valid=valid)
            per_seq.append(terms.per_seq.cpu())
            tokens.append(terms.num_tokens.cpu())
            continue
        keys = (torch.arange(lo, lo + len(x0), device=device)[:, None] * K + torch.arange(K, device=device)).reshape(-1)
        terms = nelbo_from_keys(
            model.backbone,
            x0.repeat_interleave(K, dim=0),
            keys,
            model.schedule,
            model.mask_id,
            seed=seed,
            stream=rng.STREAM_EVAL,
            num_steps=num_steps,
            time_conditioning=model.config.time_conditioning,
            estimator=estimator or model.estimator,
            masked_only=model.hparams.get("masked_only", True),
            kernel=model.hparams.get("ce_kernel", "auto"),
            valid=None if valid is None else valid.repeat_interleave(K, dim=0),
        )
        per_seq.append(terms.per_seq.cpu().view(-1, K).mean(1))
        tokens.append(terms.num_tokens.cpu().view(-1, K)[:, 0])
        levels.append(terms.level.cpu())
        contribs.append((terms.per_seq - terms.endpoint).cpu() / K)
        endpoint += float(terms.endpoint.sum()) / K
    return Likelihood(
        per_seq=torch.cat(per_seq),
        num_tokens=torch.cat(tokens),
        seconds=time.perf_counter() - start,
        endpoint=endpoint,
        levels=levels,
        contributions=contribs,
    )


def evaluate_nelbo(
    model, blocks: np.ndarray, batch_size: int = 64, seed: int = 0, num_steps: int | None = None
) -> dict:
    """``evaluate_likelihood`` with one time sample per sequence, as a dict of its summary."""
    return evaluate_likelihood(model, blocks, batch_size=batch_size, seed=seed, num_steps=num_steps).summary()
