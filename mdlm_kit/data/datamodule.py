"""The LightningDataModule: corpus -> tokenizer -> token cache -> fixed-length blocks -> batches."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mdlm_kit.data.cache import EMPTY, PACKINGS, SHARD_TOKENS, Blocks, Packing, build_split
from mdlm_kit.data.corpora import load_corpus
from mdlm_kit.data.recipes import is_dataset_name, load_recipe_splits
from mdlm_kit.data.tokenizers import TOKENIZERS, Tokenizer, build_tokenizer, tokenizer_from_dict
from mdlm_kit.errors import UserError
from mdlm_kit.lightning_gaps import uses_distributed_sampler
from mdlm_kit.utils import cache_dir


class BlockDataset(Dataset):
    """Fixed-length blocks; each item carries its index (and, under padding, which tokens are real)."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        # index -1 - i: a filler entry of the validation sampler, block i counted with weight 0
        i, weight = (i, 1.0) if i >= 0 else (-1 - i, 0.0)
        item = {"input_ids": torch.from_numpy(self.blocks[i]), "index": i, "weight": weight}
        if self.blocks.padded:
            item["valid"] = torch.arange(self.blocks.seq_len) < int(self.blocks.lengths([i])[0])
        return item


class EpochBatchSampler:
    """Global batch n of epoch e: entries [n B, (n + 1) B) of a permutation drawn from (seed, e), B = batch_size *
    world_size, rank r taking the r-th batch_size of them, so a sample's position in the global stream (which keys
    its corruption noise) is the same with one process or many. A resumed run leaves out the first ``skip``
    batches of ``epoch``. ``epoch_fn``: Lightning tells samplers the epoch, not batch samplers."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, epoch_fn=None):
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.epoch, self.skip, self.epoch_fn = seed, 0, 0, epoch_fn
        self.batches_per_epoch = num_samples // (batch_size * world_size)

    def __iter__(self):
        epoch = self.epoch if self.epoch_fn is None else int(self.epoch_fn())
        if epoch != self.epoch:  # the resumed position applies to the epoch it was saved in only
            self.epoch, self.skip = epoch, 0
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch)).numpy()
        B, b = self.batch_size * self.world_size, self.batch_size
        skip, self.skip = self.skip, 0
        for n in range(skip, self.batches_per_epoch):
            yield perm[n * B + self.rank * b : n * B + (self.rank + 1) * b].tolist()

    def __len__(self) -> int:
        # the full epoch even when resuming: Lightning sizes every later epoch from this length, and its
        # restored batch counter already accounts for the skipped batches
        return self.batches_per_epoch


def _val_batches(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Validation: rank r of W takes blocks r, r + W, ...; every rank the same number of batches (FSDP gathers
    weights in each forward: a rank with an extra batch would wait forever), topped up with fillers ``-1 - i``."""
    idx = list(range(rank, num_samples, world_size))
    idx += [-1 - idx[0] if idx else -1] * (-(-num_samples // world_size) - len(idx))
    return [idx[lo : lo + batch_size] for lo in range(0, len(idx), batch_size)]


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks packed on the fly from ``data.streaming``'s documents. Endless (each pass reshuffles): processes that run
    out at different times never wait in a collective. Each process and worker reads its own part (by example
    where a held-out tail was cut off, so none reads past the cut); a resumed run drops what was delivered."""

    def __init__(self, stream, dm: TextDataModule, world: int, rank: int):
        self.stream, self.world, self.rank, self.encode = stream, world, rank, dm.tokenizer.encode_batch
        self.packing, self.batch_size = dm.packer(), dm.hparams.batch_size
        self.seed, self.buffer = dm.seed, dm.hparams.shuffle_buffer
        self.skip_batches = 0  # batches the DataLoader already delivered (a resumed run)

    def blocks(self, workers: int = 1, wid: int = 0, epochs: int | None = None):
        """(block, number of real tokens), pass after pass over this worker's part of the stream."""
        from datasets.distributed import split_dataset_by_node

        mine = self.stream
        if self.world * workers > 1:
            mine = split_dataset_by_node(mine, rank=self.rank * workers + wid, world_size=self.world * workers,
                                         strategy="examples" if getattr(mine, "_mdlm_kit_cut", False) else "auto")
        for epoch in itertools.count() if epochs is None else range(epochs):
            ds = mine.shuffle(seed=self.seed, buffer_size=self.buffer) if self.buffer > 1 else mine
            if self.buffer > 1:
                ds.set_epoch(epoch)
            rest, batch = EMPTY, None
            for batch in ds.iter(batch_size=256):
                blocks = Blocks(self.packing.stream(self.encode(batch["text"]), rest), self.packing)
                yield from zip(blocks[:], blocks.lengths(slice(None)))
                rest = blocks.rest()
            if batch is None:
                raise UserError("the training stream holds no documents for this process; use fewer processes "
                                "or workers, or more data")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        # Batch j came from worker j mod K, and a new DataLoader starts again at worker 0: worker w takes the
        # part of the stream of the worker that delivered batch (skip + w), which had delivered
        # ceil((skip - part) / K) of the first skip batches.
        part = (wid + self.skip_batches) % workers
        skip = max(0, -(-(self.skip_batches - part) // workers)) * self.batch_size
        for i, (block, n) in itertools.islice(enumerate(self.blocks(workers, part)), skip, None):
            item = {"input_ids": torch.from_numpy(block), "index": i}
            if self.packing.kind == "pad":
                item["valid"] = torch.arange(len(block)) < int(n)
            yield item


class TextDataModule(L.LightningDataModule):
    """Text -> tokenizer -> token cache -> blocks of ``seq_len`` tokens -> batches.

    Args:
        corpus: ``shakespeare`` (embedded), a text/JSONL file or folder, or a recipe (``openwebtext``, ``lm1b``, ...).
        path: a local copy of a recipe's dataset (``save_to_disk`` folder, data files named by split, or one file).
        tokenizer: ``char``, ``bpe`` (trained on the training split), ``gpt2``, or a Hugging Face name or folder.
        bpe_vocab_size: vocabulary size of the trained BPE (specials included).
        seq_len: tokens per block.
        batch_size: training sequences per batch and process (the global batch is this times the processes).
        eval_batch_size: validation sequences per batch (default: batch_size).
        packing: ``stream`` ([BOS] doc [EOS] ... cut into blocks), ``wrap`` (MDLM's: each block [BOS] piece [EOS]),
            ``concat`` (no separators) or ``pad`` (a document a block, padding not scored).
        insert_eos: ``wrap`` only: put EOS between documents.
        val_fraction: share of documents held out when a local corpus has no fixed split.
        val_docs: one-split recipes (OpenWebText): documents held out at its end (default: the recipe's, 100,000).
        text_key: field holding the text (JSONL records, datasets); default ``text`` or the recipe's.
        num_workers: DataLoader workers.
        num_proc: tokenization processes (``Dataset.map``); default: the CPUs, at most one per 1,000 documents.
        shuffle_seed: seed of the batch order (default: the one given to ``seed_everything``, else 0).
        shard_tokens: tokens per shard file of the token cache.
        streaming: tokenize a recipe's training split on the fly, storing nothing; needs a pretrained tokenizer.
        shuffle_buffer: documents in the streaming shuffle buffer (0 or 1: stream order).
    """

    def __init__(self, corpus: str = "shakespeare", path: str | None = None, tokenizer: str = "bpe",
                 bpe_vocab_size: int = 2048, seq_len: int = 256, batch_size: int = 32,
                 eval_batch_size: int | None = None, packing: Literal["stream", "wrap", "concat", "pad"] = "stream",
                 insert_eos: bool = True, val_fraction: float = 0.05, val_docs: int | None = None,
                 text_key: str | None = None, num_workers: int = 0, num_proc: int | None = None,
                 shuffle_seed: int | None = None, shard_tokens: int = SHARD_TOKENS, streaming: bool = False,
                 shuffle_buffer: int = 10_000):
        super().__init__()
        if not isinstance(tokenizer, str) or not tokenizer.strip():
            raise UserError(f"data.tokenizer must be one of {', '.join(TOKENIZERS)} or a Hugging Face tokenizer name")
        if packing not in PACKINGS:
            raise UserError(f"data.packing: unknown packing {packing!r}; choose one of: {', '.join(PACKINGS)}")
        for name, value, least in (("seq_len", seq_len, 4 if packing in ("wrap", "pad") else 2),
                                   ("shard_tokens", shard_tokens, 1), ("val_docs", val_docs, 1)):
            if value is not None and value < least:
                raise UserError(f"data.{name} must be >= {least}, got {value}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UserError("data.batch_size and data.eval_batch_size must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if streaming and (not is_dataset_name(corpus) or tokenizer in ("char", "bpe")):
            raise UserError("data.streaming needs a dataset recipe (openwebtext, ...) and a pretrained tokenizer "
                            "(gpt2 or a Hugging Face name): char and bpe are trained on the whole training split")
        if path is not None and not is_dataset_name(corpus):
            raise UserError(f"data.path is for dataset recipes (openwebtext, lm1b, ...); data.corpus={corpus!r} "
                            "is read directly: give the file as data.corpus")
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None  # set by prepare, or at once by load_state_dict
        self._blocks: dict[str, Blocks] = {}
        self.stats: dict[str, dict] = {}  # per split: what building its token cache took
        self._resume: dict | None = None
        self.cache_folder = self._stream = None

    def _splits(self):
        """({"train": Dataset, "val": Dataset} with a ``text`` column, an id of the data for cache keys)."""
        import datasets

        h = self.hparams
        if is_dataset_name(h.corpus):
            splits = load_recipe_splits(h.corpus, h.path, h.text_key, h.val_docs, streaming=h.streaming)
            where = os.path.abspath(os.path.expanduser(h.path)) if h.path else "hub"
            ident = [h.corpus, where, h.text_key] + [getattr(splits[s], "_fingerprint", "stream")
                                                     for s in ("train", "val")]
            return splits, hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        corpus = load_corpus(h.corpus, h.val_fraction, h.text_key or "text")
        return {"train": datasets.Dataset.from_dict({"text": corpus.train}),
                "val": datasets.Dataset.from_dict({"text": corpus.val})}, corpus.fingerprint()

    def packer(self, seq_len: int | None = None, insert_eos: bool | None = None) -> Packing:
        h, tok = self.hparams, self.tokenizer
        return Packing(h.packing, seq_len or h.seq_len, tok.bos_id, tok.eos_id, tok.pad_id,
                       h.insert_eos if insert_eos is None else insert_eos)

    def prepare(self, progress: bool = False) -> None:
        """Load the data, build the tokenizer, tokenize the splits into the token cache (once)."""
        if self._blocks:
            return
        import datasets

        h = self.hparams
        if not progress:
            datasets.disable_progress_bars()
        splits, data_id = self._splits()
        if self.tokenizer is None:
            texts = (t for batch in splits["train"].iter(batch_size=1000) for t in batch["text"])
            name = f"{data_id}-{h.tokenizer.replace('/', '_')}-{h.bpe_vocab_size}"
            self.tokenizer = build_tokenizer(h.tokenizer, texts, h.bpe_vocab_size,
                                             cache_dir() / "tokens" / name / "tokenizer.json")
        tok, packing = self.tokenizer, self.packer()
        opts = {"data": data_id, "tokenizer": tok.fingerprint(), "pre": packing.pre, "post": packing.post}
        self.cache_folder = cache_dir() / "tokens" / hashlib.sha256(json.dumps(opts).encode()).hexdigest()[:16]
        self._stream = splits["train"] if h.streaming else None
        for split in ("val",) if h.streaming else ("train", "val"):
            stream, self.stats[split] = build_split(
                self.cache_folder / split, splits[split], tok.encode_batch, tok.vocab_size, packing,
                meta={"corpus": h.corpus, "split": split, **opts}, shard_tokens=h.shard_tokens, progress=progress,
                num_proc=h.num_proc if h.num_proc is not None else (len(os.sched_getaffinity(0)) or 1),
            )
            blocks = Blocks(stream, packing)
            if len(blocks) == 0:
                raise UserError(f"the {split} split of {h.corpus} has {len(stream)} tokens, fewer than one block of "
                                f"data.seq_len={h.seq_len}; use more text or a shorter seq_len")
            self._blocks[split] = blocks

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str) -> None:
        self.prepare()

    def _tok(self) -> Tokenizer:  # from the checkpoint state (no corpus needed), else by preparing the data
        if self.tokenizer is None:
            self.prepare()
        return self.tokenizer

    def pack(self, texts: list[str], seq_len: int | None = None, insert_eos: bool | None = None) -> Blocks:
        """Texts tokenized and packed into blocks as this module packs its data (in memory, not cached)."""
        tok, packing = self._tok(), self.packer(seq_len, insert_eos)
        return Blocks(packing.stream(tok.encode_batch(texts)), packing)

    @property
    def model_vocab_size(self) -> int:
        """Tokenizer vocabulary plus one: the mask token is the last id."""
        return self._tok().vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.model_vocab_size - 1

    def blocks(self, split: str) -> Blocks:
        self.prepare()
        if split not in self._blocks:
            raise UserError(f"the {split} split is streamed (data.streaming), not stored as blocks")
        return self._blocks[split]

    def _chunks(self, split: str, size: int):
        blocks = self.blocks(split)
        for lo in range(0, len(blocks), size):
            yield blocks[lo : lo + size], blocks.lengths(slice(lo, lo + size))

    @functools.cached_property
    def val_num_chars(self) -> int:
        """Characters of text in the validation blocks (BOS/EOS/padding excluded): the bits-per-character unit."""
        return sum(len(self.tokenizer.decode(b[:n].tolist())) for chunk, lens in self._chunks("val", 256)
                   for b, n in zip(chunk, lens))

    def token_counts(self, split: str = "train") -> np.ndarray:
        """(model_vocab_size,) counts of each id in the split's real tokens (BOS/EOS included, padding not)."""
        counts = np.zeros(self.model_vocab_size, dtype=np.int64)
        for chunk, lens in self._chunks(split, 4096):
            counts += np.bincount(chunk[np.arange(chunk.shape[1]) < lens[:, None]], minlength=len(counts))
        return counts

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's token frequencies: the score of a model that learned only those."""
        counts = self.token_counts(split)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _world(self) -> tuple[int, int]:
        return (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)

    @property
    def seed(self) -> int:
        s = self.hparams.shuffle_seed
        return s if s is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_batch_sampler(self) -> EpochBatchSampler:
        (world, rank), n, trainer = self._world(), len(self.blocks("train")), self.trainer
        if world > 1 and uses_distributed_sampler(trainer):
            raise UserError("the data module shards batches itself: set trainer.use_distributed_sampler: false "
                            "(the mdlm-kit command does)")
        sampler = EpochBatchSampler(n, self.hparams.batch_size, world, rank, self.seed,
                                    epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None)
        if sampler.batches_per_epoch == 0:
            raise UserError(f"the training split has {n} blocks, fewer than one global batch of "
                            f"{self.hparams.batch_size} x {world} processes; lower data.batch_size")
        if self._resume is not None:
            if self._resume["global_batch"] != sampler.batch_size * world:
                raise UserError(f"the checkpoint was trained with a global batch of {self._resume['global_batch']} "
                                f"sequences, this run has {sampler.batch_size * world}; resume with the same "
                                "data.batch_size x processes")
            # Lightning's own counters (they follow accumulate_grad_batches and limit_train_batches); a position
            # at the end of an epoch is dropped when Lightning starts the next epoch
            sampler.epoch, sampler.skip = self._resume["epoch"], self._resume["epoch_batches"]
            self._resume = None
        return sampler

    def _loader_generator(self) -> torch.Generator:
        """The workers' base seed (the global generator's would make a resumed run's dropout depend on timing)."""
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if h.streaming:
            self.prepare()
            data = StreamingBlocks(self._stream, self, *self._world())
            if self._resume is not None:  # the stream is one endless epoch: skip what it delivered
                data.skip_batches = self._resume["epoch_batches"]
                self._resume = None
            return DataLoader(data, batch_size=h.batch_size, drop_last=True, num_workers=h.num_workers,
                              generator=self._loader_generator())
        return DataLoader(BlockDataset(self.blocks("train")), batch_sampler=self.train_batch_sampler(),
                          num_workers=h.num_workers, persistent_workers=h.num_workers > 0,
                          generator=self._loader_generator())

    def val_dataloader(self) -> DataLoader:
        h, blocks = self.hparams, self.blocks("val")
        return DataLoader(BlockDataset(blocks), num_workers=h.num_workers, generator=self._loader_generator(),
                          batch_sampler=_val_batches(len(blocks), h.eval_batch_size or h.batch_size, *self._world()))

    # ---- checkpoint state: the tokenizer and the data position travel with the checkpoint ----

    def state_dict(self) -> dict:
        state = {"tokenizer": self._tok().to_dict()}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            state["global_batch"] = self.hparams.batch_size * self._world()[0]
            state["epoch"] = int(trainer.current_epoch)  # the data position: batches into this epoch
            state["epoch_batches"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("tokenizer") is not None:  # usable at once: generation needs no corpus
            self.tokenizer = tokenizer_from_dict(state_dict["tokenizer"])
        if "epoch_batches" in state_dict:
            self._resume = {k: state_dict[k] for k in ("global_batch", "epoch", "epoch_batches")}
