"""Sampler speed on CPU: fhs vs MDLM's ancestral sampler (1000 steps) vs ancestral_cache, in one run.

    python bench/sampling.py [--checkpoint runs/quickstart/checkpoints/last.ckpt] [--num_samples 4] [--length 128]

Without a checkpoint it uses the quickstart's tiny backbone with random weights and a
2,049-token vocabulary (the cost of a network call does not depend on the weights).
All three sample the same number of sequences of the same length with float64 noise;
the last line is one JSON object with the times and the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.sampling import SamplerOptions, SamplingContext, get_sampler
from mdlm_kit.schedules import make_schedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.checkpoint:
        from mdlm_kit.io import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint, kind="diffusion")
        backbone, schedule, mask_id = model.backbone, model.family.schedule, model.mask_id
        source = args.checkpoint
    else:
        torch.manual_seed(args.seed)
        backbone = DiT(DiTConfig.from_name("tiny", vocab_size=2049)).eval()
        for prm in backbone.final.parameters():  # the zero output layer would make every draw uniform
            torch.nn.init.normal_(prm, std=0.02)
        schedule, mask_id = make_schedule("loglinear"), 2048
        source = "tiny backbone, random weights, vocabulary 2049"

    template = torch.full((args.num_samples, args.length), mask_id, dtype=torch.long)
    keys = torch.arange(args.num_samples)
    # warm-up: the first network calls pay one-off costs that would otherwise land on whichever sampler runs first
    warm = SamplingContext(backbone, schedule, mask_id)
    get_sampler("fhs")(warm, template[:1, :32], keys[:1], SamplerOptions(seed=args.seed))
    results = {}
    for name, steps in (("fhs", None), ("ancestral", args.steps), ("ancestral_cache", args.steps)):
        ctx = SamplingContext(backbone, schedule, mask_id)
        opts = SamplerOptions(steps=steps, seed=args.seed, precision="float64")
        start = time.perf_counter()
        out = get_sampler(name)(ctx, template, keys, opts)
        elapsed = time.perf_counter() - start
        assert not (out == mask_id).any()
        results[name] = {"seconds": elapsed, "network_calls": ctx.calls}
        print(f"{name:16s} {elapsed:8.2f} s  {ctx.calls:5d} network calls", flush=True)

    fhs_s = results["fhs"]["seconds"]
    print(json.dumps({
        "fhs_speedup_vs_ancestral_1000" if args.steps == 1000 else f"fhs_speedup_vs_ancestral_{args.steps}":
            results["ancestral"]["seconds"] / fhs_s,
        "fhs_speedup_vs_ancestral_cache": results["ancestral_cache"]["seconds"] / fhs_s,
        "seconds": {k: v["seconds"] for k, v in results.items()},
        "network_calls": {k: v["network_calls"] for k, v in results.items()},
        "num_samples": args.num_samples,
        "length": args.length,
        "threads": torch.get_num_threads(),
        "model": source,
    }))


if __name__ == "__main__":
    main()
