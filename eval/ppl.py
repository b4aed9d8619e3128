"""``mdlm-kit ppl``: the perplexity benchmark of a checkpoint as one JSON object that names its protocol (README,
"Perplexity"): the NELBO of diffusion models, endpoint term included, or the exact NLL of autoregressive ones."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from mdlm_kit.errors import UserError
from mdlm_kit.eval.likelihood import evaluate_likelihood
from mdlm_kit.objective import Estimator

SPLITS = ("val", "train", "all")
Device = Literal["auto", "cpu", "cuda"]


def resolve_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: choose auto, cpu or cuda (cuda needs a GPU)")
    return device


def _blocks(dm, data: str | None, split: str, seq_len: int, text_key: str | None, path: str | None,
            insert_eos: bool | None):
    """Blocks of the requested data, packed the way the checkpoint was trained."""
    from mdlm_kit.data.corpora import load_corpus, load_documents
    from mdlm_kit.data.recipes import is_dataset_name, load_recipe_splits

    h = dm.hparams
    if data is None and split in ("val", "train") and seq_len == h.seq_len and insert_eos is None:
        return dm.blocks(split)
    source = data or h.corpus
    if is_dataset_name(source):  # a recipe: the zero-shot sets, or the checkpoint's own dataset
        own = data is None  # the checkpoint's own dataset: its local copy, text field and held-out documents
        splits = load_recipe_splits(source, h.path if own else path, text_key or (h.text_key if own else None),
                                    val_docs=h.val_docs if own else None,
                                    eval_split=None if split in SPLITS else split)
        parts = ["train", "val"] if split == "all" else ["train" if split == "train" else "val"]
        docs = [t for p in parts if splits.get(p) is not None for t in splits[p]["text"]]
    elif split == "all" and source != "shakespeare":
        docs = load_documents(source, text_key or "text")  # every document, a single file not cut in two
    else:
        corpus = load_corpus(source, h.val_fraction, text_key or h.text_key or "text")
        docs = {"train": corpus.train, "val": corpus.val, "all": corpus.train + corpus.val}[split]
    blocks = dm.pack(docs, seq_len, insert_eos)
    if len(blocks) == 0:
        raise UserError(f"{source} ({split}) holds {len(blocks.stream)} tokens, fewer than one block of {seq_len}; "
                        "give more text or a smaller --seq_len")
    return blocks


def evaluate(model, blocks, estimator: Estimator = "time", num_t_samples: int = 1, num_steps: int | None = None,
             batch_size: int = 32, seed: int = 0, num_buckets: int = 20, progress: bool = False) -> dict:
    """``mdlm-kit ppl``'s numbers for ``model`` on ``blocks`` and the protocol that produced them."""
    if len(blocks) < 2:
        raise UserError(f"only {len(blocks)} block of {blocks.seq_len} tokens to evaluate; a standard error needs two")
    res = evaluate_likelihood(model, blocks, batch_size=batch_size, seed=seed, num_steps=num_steps,
                              num_t_samples=num_t_samples, estimator=estimator, progress=progress)
    out = {**res.summary(), "model": model.kind}
    if model.kind != "diffusion":
        return {**out, "bound": "exact -log p(x) per token (autoregressive)",
                "protocol": {"estimator": "exact", "first_token": "scored from the start token"}}
    protocol = {"estimator": estimator, "num_t_samples": num_t_samples,
                "time": "continuous" if num_steps is None else f"discrete, T={num_steps}",
                "time_sampling": "stratified per sequence (golden-ratio sequence over keys i*K+k)",
                "schedule": model.family.schedule.spec(), "seed": seed}
    return {**out, "bound": "NELBO: an upper bound on -log p(x) per token",
            "endpoint_nats_per_token": res.endpoint / float(res.num_tokens.sum()), "protocol": protocol,
            "buckets": [round(b, 6) for b in res.buckets(num_buckets)]}


def plot_buckets(out: dict, title: str, path: Path) -> None:
    """Bar chart of each noise-level bucket's share of the NELBO, written atomically as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry to clean up

    from mdlm_kit.utils import atomic_write

    n, endpoint = len(out["buckets"]), out["endpoint_nats_per_token"]
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    ax.bar([b / n for b in range(n)], out["buckets"], width=1 / n, align="edge", edgecolor="black", linewidth=0.4)
    ax.set(xlabel="t (time)" if out["protocol"]["estimator"] == "time" else "k/L (fraction of tokens masked)",
           ylabel="contribution to the NELBO (nats/token)", xlim=(0, 1))
    note = f"NELBO {out['nelbo']:.4f} nats/token" + (f"\nendpoint term (t = 1) {endpoint:.4f}" if endpoint > 0 else "")
    ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def perplexity(checkpoint: str, data: str | None = None, split: str | None = None, seq_len: int | None = None,
               text_key: str | None = None, path: str | None = None, insert_eos: bool | None = None,
               estimator: Estimator = "time", num_t_samples: int = 1, num_steps: int | None = None,
               batch_size: int = 32, seed: int = 0, max_sequences: int | None = None, plot: str | None = None,
               num_buckets: int = 20, progress: bool = True, device: Device = "auto") -> dict:
    """Perplexity (bound) of a checkpoint, as the dict ``mdlm-kit ppl`` prints.

    Args:
        checkpoint: a ``.ckpt`` written by ``mdlm-kit fit``, a folder written by ``mdlm-kit export``,
            or a checkpoint of the MDLM reference code (masked diffusion or autoregressive).
        data: corpus (default: the checkpoint's): ``shakespeare``, a .txt/.jsonl file or folder, or a dataset such as
            ``ptb``, ``wikitext2``, ``wikitext103``, ``lm1b``, ``lambada``, ``ag_news``, ``pubmed``, ``arxiv``.
        split: ``val`` (default; MDLM's), ``train``, ``all`` (default for a file) or a dataset's split (``test``).
        seq_len: tokens per block (default: the training block length; at most the model's maximum).
        text_key: field holding the text (JSONL records, datasets); default ``text`` or the dataset's.
        path: local copy of the dataset named by ``--data`` (offline).
        insert_eos: with ``wrap`` packing, EOS between documents (MDLM's) or not; default: as in training.
        estimator: ``time`` (MDLM's: stratified t) or ``count`` (t integrated out; time-agnostic, continuous time).
        num_t_samples: time samples per sequence, averaged (K); 1 is the papers' protocol.
        num_steps: discrete-time bound with T steps; default continuous time.
        batch_size: sequences per forward pass (the result does not depend on it).
        seed: seed of the times and masks.
        max_sequences: evaluate only the first N blocks (quick checks).
        plot: write a PNG of the per-noise-level contribution to the NELBO to this file.
        num_buckets: buckets of the plot and of ``buckets`` in the output.
        progress: show a progress bar (on a terminal).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    from mdlm_kit.data.recipes import is_dataset_name
    from mdlm_kit.io import load_checkpoint
    from mdlm_kit.utils import check_writable_folder

    named = is_dataset_name(data or "")
    split = split or ("all" if data and not named else "val")
    if split not in SPLITS and not named:
        raise UserError(f"--split: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if path is not None and not named:
        raise UserError("--path is the local copy of a dataset named by --data (e.g. --data ptb --path ./ptb)")
    if min(num_t_samples, batch_size, num_buckets) < 1:
        raise UserError("--num_t_samples, --batch_size and --num_buckets must be >= 1")
    if num_steps is not None and num_steps < 1:
        raise UserError(f"--num_steps must be >= 1 (or omitted for continuous time), got {num_steps}")
    if max_sequences is not None and max_sequences < 2:
        raise UserError(f"--max_sequences must be >= 2 (a standard error needs two sequences), got {max_sequences}")
    if plot:
        check_writable_folder(Path(plot).expanduser().parent, f"--plot {plot}")
    device = resolve_device(device)

    model, dm = load_checkpoint(checkpoint)
    diffusion = model.kind == "diffusion"
    if diffusion and estimator == "count" and (num_steps is not None or model.config.time_conditioning):
        raise UserError("--estimator count needs continuous time (no --num_steps) and a time-agnostic model")
    if plot and not diffusion:
        raise UserError("--plot draws the NELBO's time buckets; an autoregressive checkpoint has none")
    seq_len = seq_len or dm.hparams.seq_len
    if not 2 <= seq_len <= model.config.max_seq_len:
        raise UserError(f"--seq_len {seq_len} does not fit the model (2 to {model.config.max_seq_len} tokens); "
                        "lower --seq_len")
    if insert_eos is not None and dm.hparams.packing != "wrap":
        raise UserError(f"--insert_eos applies to the wrap packing; this checkpoint packs with {dm.hparams.packing!r}")
    blocks = _blocks(dm, data, split, seq_len, text_key, path, insert_eos)
    if max_sequences is not None:
        blocks = blocks.head(max_sequences)

    out = evaluate(model.to(device), blocks, estimator, num_t_samples, num_steps, batch_size, seed, num_buckets,
                   progress)
    out["data"] = {"corpus": data or dm.hparams.corpus, "split": split, "seq_len": seq_len,
                   "packing": dm.hparams.packing,
                   "insert_eos": dm.hparams.insert_eos if insert_eos is None else insert_eos}
    out["checkpoint"] = str(checkpoint)
    if plot:
        out["plot"] = str(Path(plot).expanduser())
        title = f"{Path(checkpoint).name}: {out['data']['corpus']} ({split}), {len(blocks)} sequences"
        plot_buckets(out, title, Path(out["plot"]))
    return out
