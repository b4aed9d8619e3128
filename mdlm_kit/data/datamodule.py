"""The LightningDataModule: corpus -> tokenizer -> token cache -> fixed-length blocks -> batches.

Sources (``data.corpus``): the embedded Shakespeare, local text/JSONL files, or a dataset recipe
(``openwebtext``, ``lm1b``, ``text8``, ``wikitext103``, ..., ``hf:NAME``; see ``mdlm_kit.data.recipes``)
loaded through Hugging Face ``datasets`` from the hub or from a local copy (``data.path``).

Batches are made by ``EpochBatchSampler``: a permutation of the blocks per epoch from (seed, epoch),
cut into global batches; rank r of W processes takes the r-th contiguous slice of each global batch.
A sample's position in the global stream (which keys its corruption noise) is therefore the same
with one process or many, and a run resumed from a checkpoint continues from the batch after the
last one it trained on (the position is saved in the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mdlm_kit.data.cache import (
    PACKINGS,
    SHARD_TOKENS,
    ArrayStream,
    Blocks,
    BuildStats,
    build_split,
    pad_block,
    separators,
)
from mdlm_kit.data.corpora import Corpus, load_corpus
from mdlm_kit.data.recipes import is_dataset_name, load_recipe_splits
from mdlm_kit.data.tokenizers import Tokenizer, build_tokenizer, check_tokenizer_name, tokenizer_from_dict
from mdlm_kit.errors import UserError
from mdlm_kit.utils import cache_dir

log = logging.getLogger(__name__)


def wrap_stream(docs: list[list[int]], bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """One stream [BOS] doc [EOS] [BOS] doc [EOS] ... (no separators where the ids are None)."""
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


class BlockDataset(Dataset):
    """Fixed-length blocks; each item carries its index (and, under padding, which tokens are real)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        weight = 1.0
        if i < 0:  # a filler entry of the validation sampler: block -1 - i, counted with weight 0
            i, weight = -1 - i, 0.0
        item = {"input_ids": torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64)), "index": i,
                "weight": weight}
        if getattr(self.blocks, "padded", False):
            n = int(self.blocks.lengths([i])[0])
            item["valid"] = torch.arange(self.blocks.seq_len) < n
        return item


class EpochBatchSampler:
    """Global batches from a per-epoch permutation, each process taking its slice; resumable mid-epoch.

    Epoch e uses the permutation drawn from (seed, e). Global batch n holds permutation entries
    [n B, (n + 1) B) with B = batch_size * world_size; rank r takes entries [n B + r b, n B + (r + 1) b).
    A resumed run leaves out the first ``skip`` batches of epoch ``epoch``. ``epoch_fn`` (the trainer's
    current epoch) is read at the start of each pass; Lightning calls ``set_epoch`` on samplers, not
    on batch samplers.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, skip: int = 0, epoch: int = 0, epoch_fn=None):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.epoch, self.skip, self.epoch_fn = epoch, skip, epoch_fn

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # the resumed position applies to the epoch it was saved in only
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).numpy()

    def __iter__(self):
        if self.epoch_fn is not None:
            self.set_epoch(int(self.epoch_fn()))
        perm = self.order(self.epoch)
        B, b = self.batch_size * self.world_size, self.batch_size
        skip, self.skip = self.skip, 0
        for n in range(skip, self.batches_per_epoch):
            lo = n * B + self.rank * b
            yield perm[lo : lo + b].tolist()

    def __len__(self) -> int:
        # the full epoch even when resuming: Lightning sizes every later epoch from this length, and its
        # restored batch counter already accounts for the skipped batches
        return self.batches_per_epoch


class _ShardSampler:
    """Validation: rank r of W takes blocks r, r + W, ... in order.

    Every rank gets the same number of batches (FSDP gathers weights in each forward, so a rank with an
    extra batch would wait forever): short ranks are topped up with entries ``-1 - i`` (block i again,
    with weight 0), which ``BlockDataset`` marks so the metrics leave them out.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int):
        self.idx = list(range(rank, num_samples, world_size))
        per_rank = -(-num_samples // world_size)
        self.idx += [-1 - self.idx[0] if self.idx else -1] * (per_rank - len(self.idx))
        self.batch_size = batch_size

    def __iter__(self):
        for lo in range(0, len(self.idx), self.batch_size):
            yield self.idx[lo : lo + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.idx) // self.batch_size)


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks packed on the fly from a stream of documents (``data.streaming``: nothing stored on disk).

    The stream is endless: when the documents run out, the next pass starts with the shuffle buffer
    reseeded (``set_epoch``), so processes that run out at different times never leave the others waiting
    in a collective; training length is ``trainer.max_steps`` and validation goes by steps. Process r of
    W (and DataLoader worker w of K) reads its own part of the stream
    (``datasets.distributed.split_dataset_by_node``; by example where a held-out tail was cut off the
    stream, so no process reads past the cut). Which batch a sample lands in depends on the number of
    processes, unlike the cached path. A resumed run replays the stream and drops, in each worker, the
    batches that worker already delivered (the DataLoader takes batches from its workers in turn).
    """

    def __init__(self, stream, dm: TextDataModule, world: int, rank: int):
        self.stream, self.world, self.rank = stream, world, rank
        h = dm.hparams
        tok = dm.tokenizer
        self.encode = tok.encode_batch
        self.pre, self.post = separators(h.packing, tok.bos_id, tok.eos_id, h.insert_eos)
        self.packing, self.seq_len, self.batch_size = h.packing, h.seq_len, h.batch_size
        self.bos, self.eos, self.pad = tok.bos_id, tok.eos_id, tok.pad_id
        self.seed, self.buffer = dm.seed, h.shuffle_buffer
        self.skip_batches = 0  # batches the DataLoader already delivered (a resumed run)

    def _documents(self, workers: int, wid: int, epoch: int):
        from datasets.distributed import split_dataset_by_node

        ds = self.stream
        if self.world * workers > 1:
            strategy = "examples" if getattr(ds, "_mdlm_kit_cut", False) else "auto"
            ds = split_dataset_by_node(ds, rank=self.rank * workers + wid, world_size=self.world * workers,
                                       strategy=strategy)
        if self.buffer > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(epoch)
        for batch in ds.iter(batch_size=256):
            yield from self.encode(batch["text"])

    def blocks(self, workers: int = 1, wid: int = 0, epochs: int | None = None):
        """(block, number of real tokens), pass after pass over this worker's part of the stream."""
        L = self.seq_len
        piece = L - 2 if self.packing == "wrap" else L
        epoch = 0
        while epochs is None or epoch < epochs:
            n_before = 0
            buf: list[int] = []
            for ids in self._documents(workers, wid, epoch):
                n_before += 1
                if self.packing == "pad":
                    yield pad_block(ids, L, self.bos, self.eos, self.pad), min(len(ids), L - 2) + 2
                    continue
                buf.extend([*self.pre, *ids, *self.post])
                while len(buf) >= piece:
                    chunk, buf = buf[:piece], buf[piece:]
                    if self.packing == "wrap":
                        chunk = [self.bos, *chunk, self.eos]
                    yield np.asarray(chunk, dtype=np.int64), L
            if n_before == 0:
                raise UserError("the training stream holds no documents for this process; use fewer processes "
                                "or workers, or more data")
            epoch += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        # Batch j came from worker j mod K, and a new DataLoader starts again at worker 0: worker w takes the
        # part of the stream of the worker that delivered batch (skip + w), which had delivered
        # ceil((skip - part) / K) of the first skip batches.
        part = (wid + self.skip_batches) % workers
        mine = max(0, -(-(self.skip_batches - part) // workers))
        skip = mine * self.batch_size
        for i, (block, n) in enumerate(self.blocks(workers, part)):
            if i < skip:
                continue
            item = {"input_ids": torch.from_numpy(block), "index": i}
            if self.packing == "pad":
                item["valid"] = torch.arange(self.seq_len) < n
            yield item


class TextDataModule(L.LightningDataModule):
    """Text -> tokenizer -> token cache -> blocks of ``seq_len`` tokens -> batches.

    Args:
        corpus: ``shakespeare`` (embedded default), a path to a text/JSONL file or folder, or a dataset recipe:
            ``openwebtext``, ``lm1b``, ``text8``, ``wikitext103``, ``wikitext2``, ``ptb``, ``ag_news``,
            ``pubmed``, ``arxiv``, ``lambada`` or ``hf:NAME[:CONFIG]`` (loaded with Hugging Face datasets).
        path: a local copy of a recipe's dataset (``save_to_disk`` folder, data files named by split, or one file);
            default: the hub.
        tokenizer: ``char``, ``bpe`` (byte-level BPE trained on the training split), ``gpt2`` (offline from the
            packaged files if the hub is unreachable), or a Hugging Face tokenizer name or folder
            (e.g. ``bert-base-uncased``).
        bpe_vocab_size: vocabulary size of the trained BPE (specials included).
        seq_len: tokens per block.
        batch_size: training sequences per batch and process (the global batch is this times the processes).
        eval_batch_size: validation sequences per batch (default: batch_size).
        packing: ``stream`` ([BOS] doc [EOS] ... cut into blocks), ``wrap`` (MDLM: doc [EOS] doc [EOS] ... cut into
            seq_len - 2, each block [BOS] piece [EOS]), ``concat`` (no separators) or ``pad`` (one document per
            block, padded; padding is excluded from the loss).
        insert_eos: ``wrap`` only: put EOS between documents.
        val_fraction: share of documents held out when a local corpus has no fixed split.
        val_docs: recipes made of one split (OpenWebText): documents at its end held out for validation
            (default: the recipe's, 100,000 for OpenWebText).
        text_key: field holding the text (JSONL records, datasets); default ``text`` or the recipe's.
        num_workers: DataLoader workers.
        num_proc: processes for tokenization (``Dataset.map``); default: the CPUs available.
        shuffle_seed: seed of the batch order (default: the one given to ``seed_everything``, else 0).
        shard_tokens: tokens per shard file of the token cache.
        streaming: read a recipe's training split as a stream (tokenized and packed on the fly, nothing stored)
            for corpora that do not fit on disk; needs a pretrained tokenizer (``gpt2`` or a Hugging Face one).
        shuffle_buffer: documents in the streaming shuffle buffer (0 or 1: stream order).
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        path: str | None = None,
        tokenizer: str = "bpe",
        bpe_vocab_size: int = 2048,
        seq_len: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        packing: str = "stream",
        insert_eos: bool = True,
        val_fraction: float = 0.05,
        val_docs: int | None = None,
        text_key: str | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        shuffle_seed: int | None = None,
        shard_tokens: int = SHARD_TOKENS,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
    ):
        super().__init__()
        check_tokenizer_name(tokenizer)
        if packing not in PACKINGS:
            raise UserError(f"data.packing: unknown packing {packing!r}; choose one of: {', '.join(PACKINGS)}")
        if seq_len < (4 if packing in ("wrap", "pad") else 2):
            raise UserError(f"data.seq_len must be >= {4 if packing in ('wrap', 'pad') else 2}, got {seq_len}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UserError("data.batch_size and data.eval_batch_size must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if shard_tokens < 1:
            raise UserError(f"data.shard_tokens must be >= 1, got {shard_tokens}")
        if val_docs is not None and val_docs < 1:
            raise UserError(f"data.val_docs must be >= 1, got {val_docs}")
        if streaming and (not is_dataset_name(corpus) or tokenizer in ("char", "bpe")):
            raise UserError("data.streaming needs a dataset recipe (openwebtext, ...) and a pretrained tokenizer "
                            "(gpt2 or a Hugging Face name): char and bpe are trained on the whole training split")
        if path is not None and not is_dataset_name(corpus):
            raise UserError(f"data.path is for dataset recipes (openwebtext, lm1b, ...); data.corpus={corpus!r} "
                            "is read directly: give the file as data.corpus")
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self._blocks: dict[str, Blocks] = {}
        self._restored_tokenizer: dict | None = None
        self._resume: dict | None = None
        self.stats: dict[str, BuildStats] = {}
        self.cache_folder = None
        self._stream = None

    # ---- preparation (idempotent, cached) ----

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
        corpus: Corpus = load_corpus(h.corpus, h.val_fraction, h.text_key or "text")
        splits = {s: datasets.Dataset.from_dict({"text": docs}) for s, docs in (("train", corpus.train),
                                                                                 ("val", corpus.val))}
        return splits, corpus.fingerprint()

    def prepare(self, progress: bool = False) -> None:
        """Load the data, build the tokenizer, tokenize both splits into the token cache (once)."""
        if self._blocks:
            return
        import datasets

        h = self.hparams
        if not progress:
            datasets.disable_progress_bars()
        splits, data_id = self._splits()
        tok_dir = cache_dir() / "tokens" / f"{data_id}-{h.tokenizer.replace('/', '_')}-{h.bpe_vocab_size}"
        if self._restored_tokenizer is not None:
            self.tokenizer = tokenizer_from_dict(self._restored_tokenizer)
        else:
            train_texts = (t for batch in splits["train"].iter(batch_size=1000) for t in batch["text"])
            self.tokenizer = build_tokenizer(h.tokenizer, train_texts, h.bpe_vocab_size, tok_dir / "tokenizer.json")
        tok = self.tokenizer
        pre, post = separators(h.packing, tok.bos_id, tok.eos_id, h.insert_eos)
        stream_opts = {"data": data_id, "tokenizer": tok.fingerprint(), "pre": pre, "post": post}
        key = hashlib.sha256(json.dumps(stream_opts).encode()).hexdigest()[:16]
        self.cache_folder = cache_dir() / "tokens" / key
        num_proc = h.num_proc if h.num_proc is not None else (len(os.sched_getaffinity(0)) or 1)
        for split in ("train", "val"):
            if h.streaming and split == "train":
                self._stream = splits["train"]
                continue
            stream, stats = build_split(
                self.cache_folder / split, splits[split], tok.encode_batch, tok.vocab_size, pre, post,
                meta={"corpus": h.corpus, "split": split, **stream_opts}, num_proc=num_proc,
                shard_tokens=h.shard_tokens, progress=progress,
            )
            self.stats[split] = stats
            blocks = Blocks(stream, h.seq_len, h.packing, tok.bos_id, tok.eos_id, tok.pad_id)
            if len(blocks) == 0:
                raise UserError(
                    f"the {split} split of {h.corpus} has {len(stream)} tokens, fewer than one block of "
                    f"data.seq_len={h.seq_len}; use more text or a shorter seq_len"
                )
            self._blocks[split] = blocks
        self._val_chars = None

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str) -> None:
        self.prepare()

    def pack(self, texts: list[str], seq_len: int | None = None, insert_eos: bool | None = None) -> Blocks:
        """Texts tokenized and packed into blocks as this module packs its data (in memory, not cached)."""
        h = self.hparams
        if self.tokenizer is None:
            self.prepare()
        tok = self.tokenizer
        pre, post = separators(h.packing, tok.bos_id, tok.eos_id, h.insert_eos if insert_eos is None else insert_eos)
        stream = ArrayStream(tok.encode_batch(texts), pre, post)
        return Blocks(stream, seq_len or h.seq_len, h.packing, tok.bos_id, tok.eos_id, tok.pad_id)

    def encode_stream(self, docs: list[str]) -> np.ndarray:
        """Documents as one token stream with this module's separators (``prepare`` first)."""
        pre, post = separators(self.hparams.packing, self.tokenizer.bos_id, self.tokenizer.eos_id,
                               self.hparams.insert_eos)
        return wrap_stream(self.tokenizer.encode_batch(docs), pre[0] if pre else None, post[0] if post else None)

    # ---- what the model and the metrics need ----

    @property
    def model_vocab_size(self) -> int:
        """Tokenizer vocabulary plus one: the mask token is the last id."""
        if self.tokenizer is None:
            self.prepare()
        return self.tokenizer.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.model_vocab_size - 1

    def blocks(self, split: str) -> Blocks:
        self.prepare()
        if split not in self._blocks:
            raise UserError(f"the {split} split is streamed (data.streaming), not stored as blocks")
        return self._blocks[split]

    @property
    def val_num_chars(self) -> int:
        """Characters of text covered by the validation blocks (BOS/EOS/padding excluded): the bits-per-character
        unit."""
        self.prepare()
        if self._val_chars is None:
            blocks, total = self._blocks["val"], 0
            for lo in range(0, len(blocks), 256):
                chunk, lens = blocks[lo : lo + 256], blocks.lengths(slice(lo, lo + 256))
                total += sum(len(self.tokenizer.decode(b[:n].tolist())) for b, n in zip(chunk, lens))
            self._val_chars = total
        return self._val_chars

    def token_counts(self, split: str = "train") -> np.ndarray:
        """How often each id of the model's vocabulary (mask included, never counted) occurs in the split's
        real tokens (BOS/EOS included, padding not): (model_vocab_size,) int64."""
        blocks = self.blocks(split)
        counts = np.zeros(self.model_vocab_size, dtype=np.int64)
        for lo in range(0, len(blocks), 4096):
            chunk, lens = blocks[lo : lo + 4096], blocks.lengths(slice(lo, lo + 4096))
            real = np.arange(blocks.seq_len)[None, :] < lens[:, None]
            counts += np.bincount(chunk[real], minlength=len(counts))
        return counts

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's own token frequencies: the best a model that learned
        nothing beyond token frequencies could score on it."""
        counts = self.token_counts(split)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    # ---- loaders ----

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    @property
    def seed(self) -> int:
        if self.hparams.shuffle_seed is not None:
            return self.hparams.shuffle_seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_batch_sampler(self) -> EpochBatchSampler:
        world, rank = self._world()
        n = len(self.blocks("train"))
        trainer = self.trainer
        if world > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise UserError("the data module shards batches itself: set trainer.use_distributed_sampler: false "
                            "(the mdlm-kit command does)")
        sampler = EpochBatchSampler(n, self.hparams.batch_size, world, rank, self.seed,
                                    epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None)
        if sampler.batches_per_epoch == 0:
            raise UserError(f"the training split has {n} blocks, fewer than one global batch of "
                            f"{self.hparams.batch_size} x {world} processes; lower data.batch_size")
        if self._resume is not None and "epoch" in self._resume:
            if self._resume.get("global_batch") != sampler.batch_size * world:
                raise UserError(f"the checkpoint was trained with a global batch of {self._resume.get('global_batch')} "
                                f"sequences, this run has {sampler.batch_size * world}; resume with the same "
                                "data.batch_size x processes")
            # Lightning's own counters (they follow accumulate_grad_batches and limit_train_batches); a position
            # at the end of an epoch is dropped when Lightning starts the next epoch (set_epoch)
            sampler.epoch, sampler.skip = self._resume["epoch"], self._resume["epoch_batches"]
            self._resume = None
        return sampler

    def _loader_generator(self) -> torch.Generator:
        """A DataLoader draws its workers' base seed from this instead of the global generator, which would
        make the dropout noise of a resumed run depend on when its loaders were created."""
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if h.streaming:
            self.prepare()
            world, rank = self._world()
            data = StreamingBlocks(self._stream, self, world, rank)
            if self._resume is not None:  # the stream is one endless epoch: skip what it delivered
                data.skip_batches = self._resume.get("epoch_batches", 0)
                self._resume = None
            return DataLoader(data, batch_size=h.batch_size, drop_last=True, num_workers=h.num_workers,
                              generator=self._loader_generator())
        return DataLoader(
            BlockDataset(self.blocks("train")),
            batch_sampler=self.train_batch_sampler(),
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
            generator=self._loader_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        world, rank = self._world()
        blocks = self.blocks("val")
        return DataLoader(
            BlockDataset(blocks),
            batch_sampler=_ShardSampler(len(blocks), h.eval_batch_size or h.batch_size, world, rank),
            num_workers=h.num_workers,
            generator=self._loader_generator(),
        )

    # ---- checkpoint state: the tokenizer and the data position travel with the checkpoint ----

    def state_dict(self) -> dict:
        if self.tokenizer is None:
            self.prepare()
        state = {"tokenizer": self.tokenizer.to_dict()}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            world, _ = self._world()
            state["global_batch"] = self.hparams.batch_size * world
            state["epoch"] = int(trainer.current_epoch)  # the data position: batches into this epoch
            state["epoch_batches"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_tokenizer = state_dict.get("tokenizer")
        if self._restored_tokenizer is not None:  # usable at once: generation needs no corpus
            self.tokenizer = tokenizer_from_dict(self._restored_tokenizer)
        if "epoch_batches" in state_dict:
            self._resume = {k: state_dict[k] for k in ("global_batch", "epoch", "epoch_batches")}


def token_counts_summary(dm: TextDataModule) -> dict:
    """Sizes of the prepared splits, for logs and reports."""
    out = {}
    for split in ("train", "val"):
        if split not in dm._blocks and dm.hparams.streaming:
            continue
        b = dm.blocks(split)
        out[f"{split}_blocks"] = len(b)
        out[f"{split}_tokens"] = int(b.lengths(slice(None)).sum())
    out["vocab_size"] = dm.model_vocab_size
    return out
