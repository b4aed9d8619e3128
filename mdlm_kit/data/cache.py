"""Token cache: a corpus tokenized once, stored as memory-mapped shards, packed into blocks on read.

Layout of one split (``<cache>/tokens/<key>/<split>/``)::

    shard-00000.bin ...   the token stream, raw uint16 (vocabularies up to 65,536) or uint32
    doc_ends.npy          int64 end offset of each document in the stream
    index.json            dtype, shard sizes, token and document counts, the options it was built with

The stream is stored as the packing needs it (separators included), so reading a block is one slice.
A split is built in a temporary folder and renamed into place in one step: a preparation killed
part-way leaves no folder under the final name, so no half-written shard is ever read; the next run
starts over (and removes the leftovers of dead runs).

Packings (``data.packing``), for block length L:

- ``stream``: [BOS] doc [EOS] [BOS] doc [EOS] ... cut into blocks of L (every token scored).
- ``wrap``: MDLM's: doc [EOS] doc [EOS] ... (``insert_eos=False``: no EOS between documents) cut
  into pieces of L - 2, each block [BOS] piece [EOS].
- ``concat``: documents back to back, no separators (text8: blocks of L characters).
- ``pad``: one document per block, [BOS] doc[:L-2] [EOS] then padding, which the loss ignores (LM1B).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdlm_kit.errors import UserError
from mdlm_kit.utils import fsync_path, host_tag, process_gone

log = logging.getLogger(__name__)

PACKINGS = ("stream", "wrap", "concat", "pad")
SHARD_TOKENS = 1 << 27  # 256 MB of uint16 per shard
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def separators(packing: str, bos_id: int, eos_id: int, insert_eos: bool = True) -> tuple[list[int], list[int]]:
    """Ids put before and after each document in the cached stream."""
    if packing == "stream":
        return [bos_id], [eos_id]
    if packing == "wrap":
        return [], [eos_id] if insert_eos else []
    if packing in ("concat", "pad"):
        return [], []
    raise UserError(f"data.packing: unknown packing {packing!r}; choose one of: {', '.join(PACKINGS)}")


class TokenStream:
    """A cached split: the token stream across its shards (memory-mapped) and its document ends."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = json.loads((folder / "index.json").read_text())
        self.dtype = np.dtype(self.index["dtype"])
        self._shards = [np.memmap(folder / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))
                        if s["tokens"] else np.zeros(0, self.dtype) for s in self.index["shards"]]
        self._starts = np.cumsum([0] + [s["tokens"] for s in self.index["shards"]])
        self.doc_ends = np.load(folder / "doc_ends.npy", mmap_mode="r")

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_docs(self) -> int:
        return len(self.doc_ends)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) as int64, across shard boundaries."""
        out = np.empty(hi - lo, dtype=np.int64)
        i = int(np.searchsorted(self._starts, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            s0 = self._starts[i]
            take = min(hi, self._starts[i + 1]) - pos
            out[pos - lo : pos - lo + take] = self._shards[i][pos - s0 : pos - s0 + take]
            pos += take
            i += 1
        return out

    def doc(self, i: int) -> np.ndarray:
        lo = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.read(lo, int(self.doc_ends[i]))


class ArrayStream(TokenStream):
    """A token stream held in memory (text packed on the fly, e.g. an evaluation set), same interface."""

    def __init__(self, docs: list[list[int]], pre: list[int], post: list[int]):
        pieces = [np.asarray([*pre, *d, *post], dtype=np.int64) for d in docs]
        self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        self.doc_ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.tokens[lo:hi].astype(np.int64)


class _ShardWriter:
    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.shards: list[dict] = []
        self.total = 0

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids)
        self.n_buf += len(ids)
        self.total += len(ids)
        while self.n_buf >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.buf, self.n_buf = ([rest] if len(rest) else []), len(rest)

    def _write(self, arr: np.ndarray) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        with open(self.folder / name, "wb") as f:
            arr.astype(self.dtype).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"file": name, "tokens": int(len(arr))})

    def close(self) -> None:
        if self.n_buf or not self.shards:
            self._write(np.concatenate(self.buf) if self.buf else np.zeros(0, np.int64))
        self.buf, self.n_buf = [], 0


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary folders left by preparations on this machine that died (their process is gone).

    Folders of other machines sharing the cache are left alone: their processes cannot be seen from here.
    """
    for tmp in parent.glob(f".{name}.tmp-{host_tag()}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if process_gone(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _open_complete(folder: Path) -> TokenStream | None:
    """The cached split in ``folder``, or None (and the folder cleared away) if it cannot be read."""
    try:
        return TokenStream(folder)
    except (OSError, ValueError, KeyError) as e:
        log.warning("token cache %s is unreadable (%s); rebuilding it", folder, e)
        trash = folder.parent / f".{folder.name}.broken-{host_tag()}-{os.getpid()}"
        try:
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            pass
        return None


@dataclass
class BuildStats:
    tokens: int
    docs: int
    shards: int
    seconds: float
    cached: bool

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def build_split(
    folder: Path,
    dataset,
    encode_batch,
    vocab_size: int,
    pre: list[int],
    post: list[int],
    meta: dict,
    num_proc: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = False,
) -> tuple[TokenStream, BuildStats]:
    """Tokenize ``dataset`` (a ``datasets.Dataset`` with a ``text`` column) into ``folder``, unless it is there.

    ``encode_batch(list[str]) -> list[list[int]]`` runs under ``Dataset.map(batched=True, num_proc=...)``.
    """
    if (folder / "index.json").exists():
        stream = _open_complete(folder)
        if stream is not None:
            return stream, BuildStats(0, 0, 0, 0.0, cached=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder.parent, folder.name)
    tmp = folder.parent / f".{folder.name}.tmp-{host_tag()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        dtype = token_dtype(vocab_size)
        work = tmp / "_map"  # map's Arrow output stays in the build folder and goes with it
        work.mkdir()
        tokenized = dataset.map(
            lambda batch: {"ids": encode_batch(batch["text"])},
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= 2 * num_proc else None,
            remove_columns=dataset.column_names,
            desc=f"tokenizing {folder.name}",
            load_from_cache_file=False,
            cache_file_name=str(work / "tokenized.arrow"),
        )
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        pre_a, post_a = np.asarray(pre, np.int64), np.asarray(post, np.int64)
        ends: list[int] = []
        bar = _progress(len(tokenized), f"writing {folder.name}", progress)
        for batch in tokenized.iter(batch_size=1000):
            pieces = []
            for ids in batch["ids"]:
                pieces += [pre_a, np.asarray(ids, np.int64), post_a]
                ends.append(writer.total + sum(len(p) for p in pieces))
            writer.add(np.concatenate(pieces) if pieces else np.zeros(0, np.int64))
            bar.update(len(batch["ids"]))
        bar.close()
        writer.close()
        del tokenized
        shutil.rmtree(work, ignore_errors=True)
        np.save(tmp / "doc_ends.npy", np.asarray(ends, dtype=np.int64))
        seconds = time.perf_counter() - t0
        index = {
            "format": FORMAT_VERSION, "dtype": dtype.name, "shards": writer.shards, "num_tokens": writer.total,
            "num_docs": len(ends), "seconds": round(seconds, 3), **meta,
        }
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
    return TokenStream(folder), BuildStats(writer.total, len(ends), len(writer.shards), seconds, cached=False)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, leave=False)


def pad_block(doc, seq_len: int, bos_id: int, eos_id: int, pad_id: int) -> np.ndarray:
    """``pad`` packing of one document: [BOS] doc[:L-2] [EOS], then padding up to L."""
    doc = doc[: seq_len - 2]
    out = np.full(seq_len, pad_id, dtype=np.int64)
    out[0], out[1 : 1 + len(doc)], out[1 + len(doc)] = bos_id, doc, eos_id
    return out


class Blocks:
    """Fixed-length blocks of a cached split, packed on read; ``blocks[i]`` / ``blocks[a:b]`` -> int64 arrays.

    For ``pad`` packing, ``lengths(idx)`` gives the number of real tokens of each block (the rest is padding).
    """

    def __init__(self, stream: TokenStream, seq_len: int, packing: str, bos_id: int, eos_id: int, pad_id: int):
        self.stream, self.seq_len, self.packing = stream, seq_len, packing
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        if packing == "pad":
            self._n = stream.num_docs
        elif packing == "wrap":
            self._n = len(stream) // (seq_len - 2)
        else:
            self._n = len(stream) // seq_len

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self.seq_len)

    def _one(self, i: int) -> np.ndarray:
        L = self.seq_len
        if self.packing == "wrap":
            piece = self.stream.read(i * (L - 2), (i + 1) * (L - 2))
            return np.concatenate([[self.bos_id], piece, [self.eos_id]]).astype(np.int64)
        if self.packing == "pad":
            return pad_block(self.stream.doc(i), L, self.bos_id, self.eos_id, self.pad_id)
        return self.stream.read(i * L, (i + 1) * L)

    def _indices(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            return np.arange(self._n)[idx]
        return np.asarray(idx, dtype=np.int64).reshape(-1)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            if not -self._n <= idx < self._n:
                raise IndexError(idx)
            return self._one(int(idx) % self._n)
        ids = self._indices(idx)
        if self.packing in ("stream", "concat") and len(ids) and np.all(np.diff(ids) == 1):
            L = self.seq_len
            return self.stream.read(int(ids[0]) * L, (int(ids[-1]) + 1) * L).reshape(len(ids), L)
        return np.stack([self._one(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.seq_len), np.int64)

    def lengths(self, idx) -> np.ndarray:
        """Real (non-padding) tokens of each block in ``idx``: seq_len except under ``pad`` packing."""
        ids = np.arange(self._n)[idx] if isinstance(idx, slice) else np.asarray(idx, np.int64).reshape(-1)
        if self.packing != "pad":
            return np.full(len(ids), self.seq_len, dtype=np.int64)
        ends = self.stream.doc_ends  # memory-mapped: read only the entries needed
        hi = np.asarray(ends[ids], dtype=np.int64)
        lo = np.where(ids > 0, np.asarray(ends[np.maximum(ids - 1, 0)], dtype=np.int64), 0)
        return np.minimum(hi - lo, self.seq_len - 2) + 2

    def head(self, n: int) -> Blocks:
        """The first ``n`` blocks (same packing, lazily)."""
        import copy

        out = copy.copy(self)
        out._n = min(n, self._n)
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr

    @property
    def padded(self) -> bool:
        return self.packing == "pad"
