"""``mdlm-kit generate``: samples from a trained checkpoint as JSON lines."""

from __future__ import annotations

import json
import sys

import torch

from mdlm_kit.errors import UserError
from mdlm_kit.sampling import SamplerOptions, get_sampler
from mdlm_kit.utils import atomic_write_text, check_writable_folder


def generate_samples(model, tokenizer, sampler: str = "fhs", num_samples: int = 4, length: int = 128,
                     seed: int = 0, steps: int | None = None, prompt: str | None = None,
                     temperature: float = 1.0, top_p: float = 1.0, precision: str = "float64",
                     tokens_per_step: int = 1, batch_size: int = 16, progress: bool = False,
                     block_length: int | None = None, inner: str = "fhs") -> list[dict]:
    """Samples from a ``MaskedDiffusionLM`` as dicts with ``text`` and ``tokens`` (BOS/EOS dropped from text)."""
    sample_fn = get_sampler(sampler)
    opts = SamplerOptions(steps=steps, temperature=temperature, top_p=top_p, precision=precision, seed=seed,
                          tokens_per_step=tokens_per_step, block_length=block_length, inner=inner)
    if num_samples < 1 or length < 1 or batch_size < 1:
        raise UserError("num_samples, length and batch_size must be >= 1")
    max_len = model.config.max_seq_len
    if length > max_len and sampler != "semi_ar":
        raise UserError(
            f"--length {length} is above the model's maximum sequence length {max_len} (semi_ar generates longer text)"
        )
    given = [tokenizer.bos_id] + (tokenizer.encode(prompt) if prompt else [])
    if len(given) > length:
        raise UserError(f"the prompt is {len(given) - 1} tokens (plus BOS), longer than --length {length}")
    ctx = model.family.sampling_context(model.backbone, max_len=model.config.max_seq_len)
    device = model.device
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_samples, desc=f"{sampler}", unit="sample", file=sys.stderr)
    tok_id = tokenizer.fingerprint()
    for lo in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - lo)
        template = torch.full((n, length), model.mask_id, dtype=torch.long, device=device)
        template[:, : len(given)] = torch.tensor(given, device=device)
        tokens = sample_fn(ctx, template, torch.arange(lo, lo + n, device=device), opts)
        for i, row in enumerate(tokens.tolist()):
            text = tokenizer.decode(row)
            out.append({"index": lo + i, "text": text, "tokens": row, "sampler": sampler, "seed": seed,
                        "prompt": prompt or "", "completion": tokenizer.decode(row[len(given):]),
                        "prompt_tokens": len(given), "tokenizer": tok_id, "precision": precision})
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return out


def generate(checkpoint: str, sampler: str = "fhs", num_samples: int = 4, length: int = 128, seed: int = 0,
             steps: int | None = None, prompt: str | None = None, output: str | None = None,
             temperature: float = 1.0, top_p: float = 1.0, precision: str = "float64",
             tokens_per_step: int = 1, batch_size: int = 16, block_length: int | None = None,
             inner: str = "fhs") -> None:
    """Generate samples from a checkpoint; one JSON object per sample (``text``, ``tokens``, ...).

    Args:
        checkpoint: a ``.ckpt`` written by ``mdlm-kit fit``, a folder written by ``mdlm-kit export``,
            or a checkpoint of the MDLM reference code.
        sampler: ``fhs`` (first-hitting, exact, one network call per token), ``ancestral``,
            ``ancestral_cache``, ``semi_ar`` (blocks left to right, any length) or ``confidence``
            (MaskGIT/LLaDA-style, approximate).
        num_samples: how many sequences.
        length: tokens per sequence, BOS and prompt included.
        seed: noise seed; sample i depends only on (seed, i).
        steps: time steps of the ancestral samplers (default 1000).
        prompt: text the samples continue.
        output: a ``.jsonl`` file written atomically (default: standard output).
        temperature: softmax temperature (> 0).
        top_p: nucleus sampling mass in (0, 1].
        precision: Gumbel noise precision, ``float64`` (default) or ``float32`` (truncates the tail).
        tokens_per_step: fhs only: tokens revealed per network call (> 1 is approximate).
        batch_size: sequences generated together.
        block_length: semi_ar / confidence: tokens per block.
        inner: semi_ar: the sampler used inside each block.
    """
    from pathlib import Path

    get_sampler(sampler)  # fail on a bad name before loading anything
    SamplerOptions(steps=steps, temperature=temperature, top_p=top_p, precision=precision,
                   tokens_per_step=tokens_per_step, block_length=block_length, inner=inner)
    if output is not None:
        check_writable_folder(Path(output).expanduser().parent, f"--output {output}")
    from mdlm_kit.io import load_checkpoint

    model, dm = load_checkpoint(checkpoint, kind="diffusion")
    if dm.tokenizer is None:
        dm.prepare()
    samples = generate_samples(model, dm.tokenizer, sampler, num_samples, length, seed, steps, prompt,
                               temperature, top_p, precision, tokens_per_step, batch_size, progress=True,
                               block_length=block_length, inner=inner)
    lines = "".join(json.dumps(s) + "\n" for s in samples)
    if output is None:
        sys.stdout.write(lines)
    else:
        try:
            atomic_write_text(Path(output).expanduser(), lines)
        except OSError as e:
            raise UserError(f"--output {output}: cannot write ({e.strerror})") from None
