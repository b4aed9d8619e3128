"""Evaluation speed: the step of ``mdlm-kit ppl`` vs the reference forward, in one run.

    python bench/ppl.py [--size tiny] [--vocab 50258] [--seq_len 256] [--batch_size 16] [--batches 4]

Both evaluate the NELBO of the same random blocks with the same model, times and masks:

- reference: full logits at every position, the mask logit set to -inf, ``log_softmax`` over the
  whole vocabulary and a gather (the reference implementations' evaluation);
- toolkit: ``mdlm_kit.eval.likelihood.evaluate_likelihood`` (masked-only head, fused weighted
  cross-entropy), exactly what ``mdlm-kit ppl`` runs.

The two NELBOs must agree (the script fails otherwise); the last line is one JSON object with
``ppl_speedup_vs_reference``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mdlm_kit import rng
from mdlm_kit.eval.likelihood import evaluate_likelihood
from mdlm_kit.lightning import LanguageModel
from mdlm_kit.models import Backbone


@torch.no_grad()
def reference_nelbo(backbone, blocks: np.ndarray, batch_size: int, schedule, mask_id: int, seed: int) -> float:
    total, tokens = 0.0, 0
    for lo in range(0, len(blocks), batch_size):
        x0 = torch.from_numpy(blocks[lo : lo + batch_size].astype(np.int64)).to(next(backbone.parameters()).device)
        keys = torch.arange(lo, lo + len(x0), device=x0.device)
        t = rng.stratified_times(seed, rng.STREAM_EVAL, keys)
        u = rng.token_uniforms(seed, rng.STREAM_EVAL, keys, x0.shape[1])
        rate, weight = schedule.mask_rate(t), schedule.weight(t)
        masked = u < rate[:, None]
        zt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        logits = backbone(zt).float()
        logits[..., mask_id] = float("-inf")
        nll = -torch.log_softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
        total += float((nll.double() * masked * weight[:, None]).sum())
        tokens += x0.numel()
    return total / tokens


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    backbone = Backbone(args.size, max_seq_len=max(args.seq_len, 256))
    model = LanguageModel(args.vocab, backbone).to(args.device).eval()
    backbone, schedule, mask_id = model.backbone, model.family.schedule, model.mask_id
    for prm in backbone.final.parameters():  # the zero-initialized head would make every prediction uniform
        torch.nn.init.normal_(prm, std=0.02)
    gen = np.random.default_rng(args.seed)
    blocks = gen.integers(0, mask_id, (args.batch_size * args.batches, args.seq_len))

    def toolkit():
        res = evaluate_likelihood(model, blocks, batch_size=args.batch_size, seed=args.seed, estimator="time")
        # the reference drops the endpoint term (alpha(1) > 0); compare the diffusion part
        return res.nelbo - res.endpoint / float(res.num_tokens.sum())

    toolkit(), reference_nelbo(backbone, blocks[: args.batch_size], args.batch_size, schedule, mask_id, args.seed)
    times = {"reference": [], "toolkit": []}
    values = {}
    for _ in range(args.repeats):  # interleaved, so drifts of a shared machine hit both
        for name, fn in (("reference", lambda: reference_nelbo(backbone, blocks, args.batch_size, schedule,
                                                               mask_id, args.seed)), ("toolkit", toolkit)):
            sync(args.device)
            start = time.perf_counter()
            values[name] = fn()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    if abs(values["reference"] - values["toolkit"]) > 1e-4 * abs(values["reference"]):
        raise SystemExit(f"the two NELBOs disagree: {values}")
    tokens = blocks.size
    ref_tps = tokens / min(times["reference"])
    ours_tps = tokens / min(times["toolkit"])
    print(json.dumps({
        "bench": "ppl",
        "device": args.device,
        "size": args.size,
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens": int(tokens),
        "nelbo_without_endpoint": values["toolkit"],
        "reference_tokens_per_second": ref_tps,
        "toolkit_tokens_per_second": ours_tps,
        "ppl_speedup_vs_reference": ours_tps / ref_tps,
    }))


if __name__ == "__main__":
    main()
