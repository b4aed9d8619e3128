"""The report of a trained checkpoint that ends the quickstart: one JSON line."""

from __future__ import annotations

import json
import math
import sys

from mdlm_kit.eval.ppl import evaluate, resolve_device
from mdlm_kit.io import load_checkpoint


def report(checkpoint: str, batch_size: int = 64, seed: int = 0, num_samples: int = 0,
           sample_length: int = 128) -> dict:
    """Print and return the validation perplexity bound, unigram entropy and bits per character of a checkpoint:
    ``mdlm-kit ppl`` on the validation split with its default protocol (MDLM's: one stratified time per sequence).

    Args:
        checkpoint: a ``.ckpt`` written by ``mdlm-kit fit``, a folder written by ``mdlm-kit export``,
            or a checkpoint of the MDLM reference code.
        batch_size: evaluation batch size (the result does not depend on it).
        seed: seed of the evaluation's times and masks (and of the samples).
        num_samples: add this many samples from the first-hitting sampler (``samples``).
        sample_length: tokens per sample.
    """
    model, dm = load_checkpoint(checkpoint, kind="diffusion")
    res = evaluate(model.to(resolve_device("auto")), dm.blocks("val"), batch_size=batch_size, seed=seed)
    unigram = dm.unigram_entropy("val")
    out = {"val_nelbo": res["nelbo"], "ppl": res["ppl"], "stderr": res["stderr"], "ci95": res["ci95"],
           "unigram_entropy": unigram, "unigram_ratio": res["nelbo"] / unigram,  # near 1: token frequencies only
           "val_bpc": res["nelbo"] * res["num_tokens"] / math.log(2) / dm.val_num_chars,
           "val_tokens": res["num_tokens"], "val_chars": dm.val_num_chars, "protocol": res["protocol"],
           "params": model.backbone.num_parameters(), "checkpoint": str(checkpoint)}
    # how far training got: a run cut by max_time or SIGTERM is no measure of the recipe
    info = model.run_info or dict.fromkeys(("steps", "max_steps", "stopped_early", "stop_reason"))
    out.update(info)
    if info["stopped_early"]:
        of = f" of {info['max_steps']}" if info["max_steps"] else ""
        print(f"mdlm-kit: warning: {checkpoint} is from step {info['steps']}{of}: {info['stop_reason']}; these "
              "numbers are not those of the full run", file=sys.stderr)
    if num_samples > 0:
        from mdlm_kit.generate import generate_samples

        # on the CPU, where mdlm-kit generate samples: the same seed gives the same texts
        samples = generate_samples(model.cpu(), dm.tokenizer, "fhs", num_samples, sample_length, seed)
        out["samples"] = [s["text"] for s in samples]
    print(json.dumps(out))
    return out
