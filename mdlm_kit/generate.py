"""``mdlm-kit generate``: samples from a trained checkpoint as JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mdlm_kit.errors import UserError
from mdlm_kit.sampling import Sampler, make_sampler
from mdlm_kit.utils import atomic_write_text, check_writable_folder


def generate_samples(model, tokenizer, sampler: Sampler | str = "fhs", num_samples: int = 4, length: int = 128,
                     seed: int = 0, prompt: str | None = None, batch_size: int = 16,
                     progress: bool = False) -> list[dict]:
    """Samples from a diffusion ``LanguageModel``: dicts with ``text`` and ``tokens`` (BOS/EOS dropped from text).
    ``sampler`` is a ``mdlm_kit.sampling.Sampler`` (``FirstHitting(tokens_per_step=2)``) or a registered name."""
    sampler = make_sampler(sampler)
    if num_samples < 1 or length < 1 or batch_size < 1:
        raise UserError("num_samples, length and batch_size must be >= 1")
    max_len = model.config.max_seq_len
    if length > max_len and sampler.name != "semi_ar":
        raise UserError(f"--length {length} is above the model's maximum sequence length {max_len} "
                        "(--sampler semi_ar generates longer text)")
    given = [tokenizer.bos_id] + (tokenizer.encode(prompt) if prompt else [])
    if len(given) > length:
        raise UserError(f"the prompt is {len(given) - 1} tokens (plus BOS), longer than --length {length}")
    from tqdm import tqdm

    ctx = model.family.sampling_context(model.backbone, max_len=max_len)
    device, tok_id, out = model.device, tokenizer.fingerprint(), []
    with tqdm(total=num_samples, desc=sampler.name, unit="sample", file=sys.stderr, disable=not progress) as bar:
        for lo in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - lo)
            template = torch.full((n, length), model.mask_id, dtype=torch.long, device=device)
            template[:, : len(given)] = torch.tensor(given, device=device)
            tokens = sampler(ctx, template, torch.arange(lo, lo + n, device=device), seed)
            out += [{"index": lo + i, "text": tokenizer.decode(row), "tokens": row, "sampler": sampler.name,
                     "seed": seed, "prompt": prompt or "", "completion": tokenizer.decode(row[len(given):]),
                     "prompt_tokens": len(given), "tokenizer": tok_id, "precision": sampler.precision}
                    for i, row in enumerate(tokens.tolist())]
            bar.update(n)
    return out


def generate(checkpoint: str, sampler: Sampler | None = None, num_samples: int = 4, length: int = 128, seed: int = 0,
             prompt: str | None = None, output: str | None = None, batch_size: int = 16) -> None:
    """Generate samples from a checkpoint; one JSON object per sample (``text``, ``tokens``, ...).

    Args:
        checkpoint: a ``.ckpt`` written by ``mdlm-kit fit``, a folder written by ``mdlm-kit export``,
            or a checkpoint of the MDLM reference code.
        sampler: ``fhs`` (``FirstHitting``: exact, one network call per token; the default), ``ancestral``
            (``Ancestral``), ``ancestral_cache`` (``AncestralCache``), ``semi_ar`` (``SemiAutoregressive``: any length)
            or ``confidence`` (``Confidence``: approximate), then options: ``--sampler ancestral --sampler.steps 500``.
        num_samples: how many sequences.
        length: tokens per sequence, BOS and prompt included.
        seed: noise seed; sample i depends only on (seed, i).
        prompt: text the samples continue.
        output: a ``.jsonl`` file written atomically (default: standard output).
        batch_size: sequences generated together.
    """
    sampler = make_sampler(sampler)
    if output is not None:
        check_writable_folder(Path(output).expanduser().parent, f"--output {output}")
    from mdlm_kit.io import load_checkpoint

    model, dm = load_checkpoint(checkpoint, kind="diffusion")
    if dm.tokenizer is None:
        dm.prepare()
    samples = generate_samples(model, dm.tokenizer, sampler, num_samples, length, seed, prompt, batch_size,
                               progress=True)
    lines = "".join(json.dumps(s) + "\n" for s in samples)
    if output is None:
        sys.stdout.write(lines)
    else:
        try:
            atomic_write_text(Path(output).expanduser(), lines)
        except OSError as e:
            raise UserError(f"--output {output}: cannot write ({e.strerror})") from None
