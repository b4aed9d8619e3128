"""NELBO bounds of a model on packed blocks, accumulated in float64, with standard errors."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from mdlm_kit import rng
from mdlm_kit.objective import nelbo_from_keys


@torch.no_grad()
def evaluate_nelbo(
    model,
    blocks: np.ndarray,
    batch_size: int = 64,
    seed: int = 0,
    num_steps: int | None = None,
) -> dict:
    """Per-token NELBO (nats) of ``model`` (a MaskedDiffusionLM) on ``blocks`` (N, L).

    One stratified time sample per sequence (the MDLM protocol); a sequence's
    noise depends only on (seed, its index), so the result does not depend on
    ``batch_size``. ``stderr`` is the standard error of the per-token NELBO
    over sequences.
    """
    model.eval()
    device = model.device
    per_seq, tokens = [], []
    start = time.perf_counter()
    for lo in range(0, len(blocks), batch_size):
        x0 = torch.from_numpy(blocks[lo : lo + batch_size].astype(np.int64)).to(device)
        keys = torch.arange(lo, lo + len(x0), device=device)
        terms = nelbo_from_keys(
            model.backbone,
            x0,
            keys,
            model.schedule,
            model.mask_id,
            seed=seed,
            stream=rng.STREAM_EVAL,
            num_steps=num_steps,
            time_conditioning=model.config.time_conditioning,
            estimator=model.estimator,
        )
        per_seq.append(terms.per_seq.cpu())
        tokens.append(terms.num_tokens.cpu())
    elapsed = time.perf_counter() - start
    per_seq_t, tokens_t = torch.cat(per_seq), torch.cat(tokens)
    n = len(per_seq_t)
    total_tokens = float(tokens_t.sum())
    nelbo = float(per_seq_t.sum()) / total_tokens
    # ratio estimator: per-token values per sequence, weighted by their token counts
    y = per_seq_t / tokens_t
    w = tokens_t / tokens_t.mean()
    stderr = float(torch.sqrt(((w * (y - nelbo)) ** 2).sum() / (n * (n - 1)))) if n > 1 else math.nan
    return {
        "nelbo": nelbo,
        "stderr": stderr,
        "num_tokens": int(total_tokens),
        "num_sequences": n,
        "tokens_per_second": total_tokens / elapsed if elapsed > 0 else math.nan,
    }
