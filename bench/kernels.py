"""Kernel speed and achieved memory bandwidth: each Triton kernel vs its pure-torch reference, in one run.

    python bench/kernels.py [--rows 4096] [--vocab 50258]

- ``weighted_ce_rows``: the fused cross-entropy's row step (loss and gradient in place) over
  (rows, vocab) float32 logits: it reads the logits twice and writes them once.
- ``masked_categorical``: Gumbel-max sampling of ``rows`` rows of (rows, vocab) float32 logits
  with float64 noise: it reads each row once.

Bandwidth = bytes the kernel must move / time. On a machine without CUDA only the references run
(at the given shapes), which checks the script; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mdlm_kit import rng
from mdlm_kit.kernels.masked_categorical import masked_categorical_reference, masked_categorical_triton
from mdlm_kit.kernels.weighted_ce import weighted_ce_rows_reference, weighted_ce_rows_triton


def timed(fn, device: str, reps: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev, n, V = args.device, args.rows, args.vocab
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, V, generator=gen) * 2).to(dev)
    targets = torch.randint(0, V - 1, (n,), generator=gen).to(dev)
    weights = torch.rand(n, generator=gen).to(dev)
    rows = torch.arange(n, device=dev)
    hashes = rng.row_hash(0, rng.STREAM_SAMPLE, rows)
    out: dict = {"bench": "kernels", "device": dev, "rows": n, "vocab": V}

    impls = {"reference": (weighted_ce_rows_reference, masked_categorical_reference)}
    if dev == "cuda":
        impls["triton"] = (weighted_ce_rows_triton, masked_categorical_triton)
    for name, (ce, cat) in impls.items():
        buf = logits.clone()

        def ce_step(ce=ce, buf=buf):
            buf.copy_(logits)  # the step overwrites its input with the gradient
            ce(buf, targets, weights, V - 1, True)

        copy_s = timed(lambda buf=buf: buf.copy_(logits), dev, args.reps)
        ce_s = max(timed(ce_step, dev, args.reps) - copy_s, 1e-9)
        cat_s = timed(lambda cat=cat: cat(logits, rows, hashes, V - 1), dev, args.reps)
        out[f"weighted_ce_{name}_seconds"] = ce_s
        out[f"weighted_ce_{name}_gb_per_s"] = 3 * n * V * 4 / ce_s / 1e9
        out[f"masked_categorical_{name}_seconds"] = cat_s
        out[f"masked_categorical_{name}_gb_per_s"] = n * V * 4 / cat_s / 1e9
    if "triton" in impls:
        out["weighted_ce_speedup_vs_reference"] = (
            out["weighted_ce_reference_seconds"] / out["weighted_ce_triton_seconds"]
        )
        out["masked_categorical_speedup_vs_reference"] = (
            out["masked_categorical_reference_seconds"] / out["masked_categorical_triton_seconds"]
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
