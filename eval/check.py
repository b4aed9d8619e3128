"""``mdlm-kit check-likelihood`` (README, "Likelihood checks"): independent stationary chains, each a whole number of
blocks long, packed without separators, so every block has the exact entropy H(pi) + (L - 1) h; a valid bound stays
above it. ``source_nll`` (the source's NLL on the same blocks) gives the paired gap, free of the between-block spread.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mdlm_kit.errors import UserError
from mdlm_kit.eval.likelihood import evaluate_likelihood, ratio_stderr
from mdlm_kit.eval.sources import Source, make_source
from mdlm_kit.objective import Estimator
from mdlm_kit.utils import atomic_write_text

Size = Literal["debug", "tiny", "small", "medium"]  # mdlm_kit.models.SIZES


def train_on_source(corpus: Path, source: Source, steps: int, size: Size = "debug", seq_len: int = 64,
                    batch_size: int = 32, lr: float = 3e-3, schedule: str = "loglinear", num_docs: int = 400,
                    blocks_per_doc: int = 8, seed: int = 0, progress: bool = False):
    """Write the source's corpus to ``corpus`` and train a model on it: (model, datamodule, source)."""
    import lightning as L

    from mdlm_kit.data import TextDataModule
    from mdlm_kit.families import MaskedDiffusion
    from mdlm_kit.lightning import LanguageModel, WarmupCosine
    from mdlm_kit.models import Backbone

    src, gen = make_source(source, seed), np.random.default_rng(seed + 1)
    docs = (json.dumps({"text": src.sample(seq_len * blocks_per_doc, gen)}) for _ in range(num_docs))
    corpus.write_text("".join(doc + "\n" for doc in docs), encoding="utf-8")
    L.seed_everything(seed, verbose=False)
    dm = TextDataModule(str(corpus), tokenizer="char", seq_len=seq_len, batch_size=batch_size,
                        eval_batch_size=128, val_fraction=0.1, packing="concat")
    warmup = min(100, steps // 10)
    model = LanguageModel(dm.model_vocab_size, Backbone(size), MaskedDiffusion(schedule, seed=seed),
                          optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
                          lr_scheduler=partial(WarmupCosine, warmup_steps=warmup, decay_steps=max(1, steps - warmup)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, gradient_clip_val=1.0,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return model.eval(), dm, src


def compare_with_truth(model, dm, src, eval_blocks: int = 512, estimator: Estimator = "count", num_t_samples: int = 4,
                       seed: int = 0) -> dict:
    """The model's NELBO on held-out blocks against the source's exact entropy (and its NLL on those blocks)."""
    blocks = dm.blocks("val")[:eval_blocks]
    seq_len = blocks.shape[1]
    res = evaluate_likelihood(model, blocks, batch_size=128, seed=seed, num_t_samples=num_t_samples,
                              estimator=estimator)
    src_nll = torch.tensor([src.nll(dm.tokenizer.decode(b.tolist())) for b in blocks], dtype=torch.float64)
    truth, nelbo, se = src.block_entropy(seq_len) / seq_len, res.nelbo, res.stderr
    gap, tokens = res.per_seq - src_nll, float(res.num_tokens.sum())
    return {"entropy_rate": src.entropy_rate, "symbol_entropy": src.stationary_entropy, "true_entropy": truth,
            "nelbo": nelbo, "stderr": se, "gap_rel": (nelbo - truth) / truth,
            "source_nll": float(src_nll.sum()) / tokens, "paired_gap": float(gap.sum()) / tokens,
            "paired_gap_stderr": ratio_stderr(gap, res.num_tokens), "bound_respected": bool(nelbo >= truth - 3 * se),
            "within_5pct": bool(abs(nelbo - truth) <= 0.05 * truth), "num_blocks": len(blocks), "seq_len": seq_len,
            "estimator": estimator, "num_t_samples": num_t_samples}


def likelihood_check(source: Source = "markov", steps: int = 1500, size: Size = "debug", seq_len: int = 64,
                     batch_size: int = 32, lr: float = 3e-3, schedule: str = "loglinear",
                     estimator: Estimator = "count", num_t_samples: int = 4, num_docs: int = 400,
                     blocks_per_doc: int = 8, eval_blocks: int = 512, seed: int = 0, out: str | None = None,
                     progress: bool = True) -> dict:
    """Train a model on a source of known entropy; compare its NELBO with the exact entropy.

    Args:
        source: ``markov`` (6 symbols, first-order chain) or ``iid`` (8 symbols).
        steps: training steps (1,500 on the debug model takes a few minutes on 2 CPU cores).
        lr: peak learning rate (warmup, then cosine decay to 10%).
        schedule: noise schedule of training and evaluation.
        estimator: NELBO estimator of the evaluation.
        num_t_samples: time samples per evaluated block.
        num_docs: documents (independent chains) written; a tenth is held out.
        blocks_per_doc: length of each document in blocks.
        eval_blocks: held-out blocks evaluated.
        seed: seed of the source, the corpus, the model and the noise.
        out: folder for the corpus and the result (default: a temporary folder).
    """
    if steps < 1 or seq_len < 2 or num_docs < 10 or blocks_per_doc < 1 or eval_blocks < 2:
        raise UserError("--steps >= 1, --seq_len >= 2, --num_docs >= 10, --blocks_per_doc >= 1, --eval_blocks >= 2")
    if out is not None and not Path(out).expanduser().parent.is_dir():
        raise UserError(f"--out: folder {Path(out).expanduser().parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="mdlm-kit-check-") if out is None else nullcontext(out) as where:
        folder = Path(where).expanduser()
        folder.mkdir(exist_ok=True)
        start = time.perf_counter()
        model, dm, src = train_on_source(folder / "corpus.jsonl", source, steps, size, seq_len, batch_size, lr,
                                         schedule, num_docs, blocks_per_doc, seed, progress)
        result = compare_with_truth(model, dm, src, eval_blocks, estimator, num_t_samples, seed)
        result.update(source=source, steps=steps, size=size, train_seconds=time.perf_counter() - start)
        if out is not None:
            atomic_write_text(folder / "result.json", json.dumps(result, indent=2) + "\n")
        return result
