"""Packing and the token cache: a corpus tokenized once, stored as memory-mapped shards, cut into blocks on read.

A split is ``<cache>/tokens/<key>/<split>/``: ``shard-00000.bin ...`` (the token stream with the packing's
separators, so a block is one slice; raw uint16, or uint32 above 65,536 ids), ``doc_ends.npy`` (int64 end of each
document) and ``index.json`` (dtype, shard sizes, counts, the options it was built with). It is built in a
temporary folder renamed into place in one step: a preparation killed part-way leaves no half-written split."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mdlm_kit.utils import fsync_path, host_tag, process_gone

log = logging.getLogger(__name__)

PACKINGS = ("stream", "wrap", "concat", "pad")  # checked by the data module
SHARD_TOKENS = 1 << 27  # 256 MB of uint16 per shard
MAP_BATCH = 1000  # documents per batch of Dataset.map
EMPTY = np.zeros(0, np.int64)


class TokenStream:
    """Documents' tokens back to back across shards (memory-mapped or in memory), and each document's end."""

    def __init__(self, shards: list[np.ndarray], doc_ends: np.ndarray):
        self.shards, self.doc_ends = shards, doc_ends
        self.starts = np.cumsum([0] + [len(s) for s in shards])

    @classmethod
    def open(cls, folder: Path) -> TokenStream:
        index = json.loads((folder / "index.json").read_text())
        dtype = np.dtype(index["dtype"])
        shards = [np.memmap(folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)) if s["tokens"]
                  else np.zeros(0, dtype) for s in index["shards"]]
        return cls(shards, np.load(folder / "doc_ends.npy", mmap_mode="r"))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) as int64, across shard boundaries."""
        parts = [s[max(lo - a, 0) : hi - a] for s, a, b in zip(self.shards, self.starts, self.starts[1:])
                 if a < hi and lo < b]
        return np.concatenate([EMPTY, *parts])


class Packing:
    """The one packer (``data.packing``) of the cache, the streaming reader and evaluation, for block length L:

    - ``stream``: [BOS] doc [EOS] [BOS] doc [EOS] ... cut into blocks of L (every token scored).
    - ``wrap``: MDLM's: doc [EOS] doc [EOS] ... (``insert_eos=False``: no EOS between documents) cut into
      pieces of L - 2, each block [BOS] piece [EOS].
    - ``concat``: documents back to back, no separators (text8: blocks of L characters).
    - ``pad``: one document per block, [BOS] doc[:L-2] [EOS] then padding, which the loss ignores (LM1B).
    """

    def __init__(self, kind: str, seq_len: int, bos_id: int, eos_id: int, pad_id: int, insert_eos: bool = True):
        self.kind, self.seq_len, self.bos_id, self.eos_id, self.pad_id = kind, seq_len, bos_id, eos_id, pad_id
        self.pre = [bos_id] if kind == "stream" else []  # stored around each document in the stream
        self.post = [eos_id] if kind == "stream" or (kind == "wrap" and insert_eos) else []
        self.step = seq_len - 2 if kind == "wrap" else seq_len  # stream tokens per block (not under pad)

    def stream(self, docs: list[list[int]], head: np.ndarray = EMPTY) -> TokenStream:
        """``head`` then the documents with their separators, in memory."""
        pre, post = np.asarray(self.pre, dtype=np.int64), np.asarray(self.post, dtype=np.int64)
        pieces = [head, *(np.concatenate([pre, np.asarray(d, dtype=np.int64), post]) for d in docs)]
        return TokenStream([np.concatenate(pieces)], np.cumsum([len(p) for p in pieces])[1:])


class Blocks:
    """The blocks of a token stream, packed on read: ``blocks[i]`` / ``blocks[a:b]`` / ``blocks[list]``."""

    def __init__(self, stream: TokenStream, packing: Packing):
        self.stream, self.packing, self.seq_len = stream, packing, packing.seq_len
        self.padded = packing.kind == "pad"
        self.n = len(stream.doc_ends) if self.padded else len(stream) // packing.step

    def __len__(self) -> int:
        return self.n

    def _ids(self, idx) -> np.ndarray:
        return np.arange(self.n)[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64).reshape(-1)

    def _doc_starts(self, ids: np.ndarray) -> np.ndarray:
        ends = self.stream.doc_ends  # memory-mapped: read only the entries needed
        return np.where(ids > 0, np.asarray(ends[np.maximum(ids - 1, 0)], dtype=np.int64), 0)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            if not -self.n <= idx < self.n:
                raise IndexError(idx)
            return self[[idx % self.n]][0]
        ids, p = self._ids(idx), self.packing
        if self.padded:
            out = np.full((len(ids), self.seq_len), p.pad_id, dtype=np.int64)
            for row, lo, n in zip(out, self._doc_starts(ids), self.lengths(ids)):
                row[0], row[1 : n - 1], row[n - 1] = p.bos_id, self.stream.read(lo, lo + n - 2), p.eos_id
            return out
        if len(ids) and np.all(np.diff(ids) == 1):  # one read
            out = self.stream.read(int(ids[0]) * p.step, (int(ids[-1]) + 1) * p.step).reshape(-1, p.step)
        else:
            out = np.array([self.stream.read(i * p.step, (i + 1) * p.step) for i in ids], np.int64).reshape(-1, p.step)
        if p.kind == "wrap":
            out = np.pad(out, ((0, 0), (1, 1)), constant_values=((0, 0), (p.bos_id, p.eos_id)))
        return out

    def lengths(self, idx) -> np.ndarray:
        """Real (non-padding) tokens of blocks ``idx``: L except under ``pad``."""
        ids = self._ids(idx)
        if not self.padded:
            return np.full(len(ids), self.seq_len, dtype=np.int64)
        ends = np.asarray(self.stream.doc_ends[ids], dtype=np.int64)
        return np.minimum(ends - self._doc_starts(ids), self.seq_len - 2) + 2

    def rest(self) -> np.ndarray:
        """The stream's tokens after the last whole block (none under ``pad``)."""
        return EMPTY if self.padded else self.stream.read(self.n * self.packing.step, len(self.stream))

    def head(self, n: int) -> Blocks:
        out = copy.copy(self)
        out.n = min(n, self.n)
        return out


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    tokens.tofile(path)
    fsync_path(path)


def map_processes(num_proc: int | None, n_docs: int) -> int | None:
    """At most ``num_proc``, and one per full batch of MAP_BATCH documents (a pool for a few documents costs more
    to start than it saves, and forks the calling process); ``None`` (no pool) for one."""
    n = min(num_proc or 1, n_docs // MAP_BATCH)
    return n if n > 1 else None


def build_split(folder: Path, dataset, encode_batch, vocab_size: int, packing: Packing, meta: dict,
                num_proc: int | None = None, shard_tokens: int = SHARD_TOKENS,
                progress: bool = False) -> tuple[TokenStream, dict]:
    """Tokenize ``dataset``'s ``text`` column into ``folder`` (``encode_batch`` under ``Dataset.map``) unless it is
    there; also returns the build's tokens, shards, seconds and whether it was ``cached``."""
    if (folder / "index.json").exists():
        try:
            return TokenStream.open(folder), {"tokens": 0, "shards": 0, "seconds": 0.0, "cached": True}
        except (OSError, ValueError, KeyError) as e:
            log.warning("token cache %s is unreadable (%s); rebuilding it", folder, e)
            trash = folder.parent / f".{folder.name}.broken-{host_tag()}-{os.getpid()}"
            with contextlib.suppress(OSError):
                os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{folder.name}.tmp-{host_tag()}-"
    for old in folder.parent.glob(tmp_prefix + "*"):  # left by dead runs on this machine (others' can't be seen)
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and process_gone(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = folder.parent / f"{tmp_prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "_map").mkdir(parents=True)  # map's Arrow output stays in the build folder and goes with it
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm

        tokenized = dataset.map(
            lambda batch: {"ids": encode_batch(batch["text"])}, batched=True, batch_size=MAP_BATCH,
            num_proc=map_processes(num_proc, len(dataset)),
            remove_columns=dataset.column_names, desc=f"tokenizing {folder.name}", load_from_cache_file=False,
            cache_file_name=str(tmp / "_map" / "tokenized.arrow"),
        )
        dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
        shards, ends, pending, total = [], [EMPTY], [EMPTY], 0

        def write(tokens: np.ndarray) -> None:
            shards.append({"file": f"shard-{len(shards):05d}.bin", "tokens": len(tokens)})
            _write_shard(tmp / shards[-1]["file"], tokens.astype(dtype))

        with tqdm(total=len(tokenized), desc=f"writing {folder.name}", unit="doc", disable=not progress,
                  leave=False) as bar:
            for batch in tokenized.iter(batch_size=MAP_BATCH):
                part = packing.stream(batch["ids"])
                ends.append(part.doc_ends + total)
                pending.append(part.shards[0])
                total += len(part)
                while sum(map(len, pending)) >= shard_tokens:
                    flat = np.concatenate(pending)
                    write(flat[:shard_tokens])
                    pending = [flat[shard_tokens:]]
                bar.update(len(batch["ids"]))
        if sum(map(len, pending)) or not shards:
            write(np.concatenate(pending))
        del tokenized
        shutil.rmtree(tmp / "_map", ignore_errors=True)
        ends = np.concatenate(ends)
        np.save(tmp / "doc_ends.npy", ends)
        seconds = time.perf_counter() - t0
        index = {"format": 1, "dtype": dtype.name, "shards": shards, "num_tokens": total, "num_docs": len(ends),
                 "seconds": round(seconds, 3), **meta}
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        for name in ("doc_ends.npy", "index.json", "."):  # on disk before the rename makes them visible
            fsync_path(tmp / name)
        try:
            os.replace(tmp, folder)  # the whole split appears at once, or not at all
            fsync_path(folder.parent)
        except OSError:
            if not (folder / "index.json").exists():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStream.open(folder), {"tokens": total, "shards": len(shards), "seconds": seconds, "cached": False}
