"""Packing into fixed-length blocks and the LightningDataModule that ties the data together."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mdlm_kit.data.corpora import Corpus, load_corpus
from mdlm_kit.data.tokenizers import TOKENIZERS, Tokenizer, build_tokenizer, tokenizer_from_dict
from mdlm_kit.errors import UserError
from mdlm_kit.utils import atomic_write, cache_dir

log = logging.getLogger(__name__)


def wrap_stream(docs: list[list[int]], bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """MDLM's "wrap": one stream [BOS] doc [EOS] [BOS] doc [EOS] ... (no separators where the ids are None)."""
    pre = [] if bos_id is None else [bos_id]
    post = [] if eos_id is None else [eos_id]
    pieces = [np.asarray([*pre, *ids, *post], dtype=np.int64) for ids in docs]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def to_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, seq_len) view of a token stream; the tail shorter than a block is dropped."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def pack_wrap(docs: list[list[int]], bos_id: int, eos_id: int, seq_len: int) -> np.ndarray:
    """Documents wrapped with BOS/EOS, concatenated and cut into (N, seq_len) blocks."""
    return to_blocks(wrap_stream(docs, bos_id, eos_id), seq_len)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, write)


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class BlockDataset(Dataset):
    """Fixed-length blocks; each item carries its index, which keys its corruption noise."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.from_numpy(self.blocks[i].astype(np.int64)), "index": i}


class TextDataModule(L.LightningDataModule):
    """Text corpus -> tokenizer -> packed blocks of ``seq_len`` tokens.

    Args:
        corpus: ``shakespeare`` (the embedded default) or a path to a text file, a JSONL file or a folder.
        tokenizer: ``char``, ``bpe`` (byte-level BPE trained on the training split) or ``gpt2``.
        bpe_vocab_size: vocabulary size of the trained BPE (specials included).
        seq_len: tokens per block.
        batch_size: training sequences per batch and process.
        eval_batch_size: validation sequences per batch (default: batch_size).
        val_fraction: share of documents held out when the corpus has no fixed split.
        text_key: field holding the text in JSONL records.
        num_workers: DataLoader workers.
        separators: put BOS/EOS around each document before packing (MDLM's wrap); false concatenates
            documents as they are (e.g. segments of one stream, as the likelihood checks write them).
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        tokenizer: str = "bpe",
        bpe_vocab_size: int = 2048,
        seq_len: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        text_key: str = "text",
        num_workers: int = 0,
        separators: bool = True,
    ):
        super().__init__()
        if tokenizer not in TOKENIZERS:
            raise UserError(f"data.tokenizer: unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
        if seq_len < 2:
            raise UserError(f"data.seq_len must be >= 2, got {seq_len}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UserError("data.batch_size and data.eval_batch_size must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self._blocks: dict[str, np.ndarray] = {}
        self._restored_tokenizer: dict | None = None

    # ---- preparation (idempotent, cached) ----

    def _cache_key(self, corpus: Corpus) -> str:
        h = self.hparams
        return f"{corpus.fingerprint()}-{h.tokenizer}-{h.bpe_vocab_size if h.tokenizer == 'bpe' else 0}"

    def prepare(self) -> None:
        """Load the corpus, build the tokenizer, tokenize and pack both splits (cached on disk)."""
        if self._blocks:
            return
        h = self.hparams
        corpus = load_corpus(h.corpus, h.val_fraction, h.text_key)
        key = self._cache_key(corpus)
        root = cache_dir() / "tokens" / key
        if self._restored_tokenizer is not None:
            self.tokenizer = tokenizer_from_dict(self._restored_tokenizer)
        else:
            self.tokenizer = build_tokenizer(h.tokenizer, corpus.train, h.bpe_vocab_size, root / "tokenizer.json")
        tok_hash = self.tokenizer.fingerprint()
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            path = root / f"{split}-{tok_hash}{'' if h.separators else '-nosep'}.npy"
            if path.exists():
                stream = np.load(path, allow_pickle=False)
            else:
                stream = self.encode_stream(docs)
                stream = stream.astype(_token_dtype(self.tokenizer.vocab_size))
                _save_npy(path, stream)
            blocks = to_blocks(stream, h.seq_len)
            if len(blocks) == 0:
                raise UserError(
                    f"the {split} split of {h.corpus} has {len(stream)} tokens, fewer than one block of "
                    f"data.seq_len={h.seq_len}; use more text or a shorter seq_len"
                )
            self._blocks[split] = blocks
        self._val_chars = sum(len(self.tokenizer.decode(b.tolist())) for b in self._blocks["val"])

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str) -> None:
        self.prepare()

    def encode_stream(self, docs: list[str]) -> np.ndarray:
        """Documents as one token stream with this module's tokenizer and separators (``prepare`` first)."""
        encoded = self.tokenizer.encode_batch(docs)
        if self.hparams.separators:
            return wrap_stream(encoded, self.tokenizer.bos_id, self.tokenizer.eos_id)
        return wrap_stream(encoded, None, None)

    # ---- what the model and the metrics need ----

    @property
    def model_vocab_size(self) -> int:
        """Tokenizer vocabulary plus one: the mask token is the last id."""
        self.prepare()
        return self.tokenizer.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.model_vocab_size - 1

    def blocks(self, split: str) -> np.ndarray:
        self.prepare()
        return self._blocks[split]

    @property
    def val_num_chars(self) -> int:
        """Characters of text covered by the validation blocks (BOS/EOS excluded): the bits-per-character unit."""
        self.prepare()
        return self._val_chars

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's own token frequencies: the best a model that learned
        nothing beyond token frequencies could score on it."""
        counts = np.bincount(self.blocks(split).reshape(-1).astype(np.int64))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    # ---- loaders ----

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            BlockDataset(self.blocks("train")),
            batch_size=h.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            BlockDataset(self.blocks("val")),
            batch_size=h.eval_batch_size or h.batch_size,
            shuffle=False,
            num_workers=h.num_workers,
        )

    # ---- checkpoint state: the tokenizer travels with the checkpoint ----

    def state_dict(self) -> dict:
        self.prepare()
        return {"tokenizer": self.tokenizer.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_tokenizer = state_dict.get("tokenizer")
        if self._restored_tokenizer is not None:  # usable at once: generation needs no corpus
            self.tokenizer = tokenizer_from_dict(self._restored_tokenizer)


def token_counts_summary(dm: TextDataModule) -> dict:
    """Sizes of the prepared splits, for logs and reports."""
    out = {}
    for split in ("train", "val"):
        b = dm.blocks(split)
        out[f"{split}_blocks"] = int(b.shape[0])
        out[f"{split}_tokens"] = int(b.size)
    out["vocab_size"] = dm.model_vocab_size
    return out


