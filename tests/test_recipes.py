"""Dataset recipes on small local samples in the hub's formats, the token cache, and ``mdlm-kit data prepare``."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from helpers import CONFIGS, DDP, ROOT, run_cli, run_main, write_corpus
from mdlm_kit.data import TextDataModule
from mdlm_kit.data.cache import Blocks, Packing, build_split
from mdlm_kit.data.recipes import lm1b_detokenize, load_recipe_splits, ptb_detokenize, wikitext_detokenize
from mdlm_kit.data.tokenizers import load_gpt2
from mdlm_kit.errors import UserError

datasets = pytest.importorskip("datasets")

OWT_DOCS = [f"Document {i} talks about topic {i % 3}. " + "It goes on for a while, then stops. " * (9 + 3 * (i % 4))
            for i in range(12)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, cache_root):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def owt_disk(tmp_path_factory):
    """OpenWebText's layout: one ``train`` split with a ``text`` field, as ``save_to_disk`` writes it."""
    path = tmp_path_factory.mktemp("owt") / "openwebtext"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": OWT_DOCS})}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BERT-style uncased WordPiece tokenizer saved with ``save_pretrained`` (what bert-base-uncased is)."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    words = ["the", "cat", "sat", "on", "mat", "said", "he", "a", "dog", "ran", "home", "it", "'", "s", ",", ".", "?"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *[f"##{c}" for c in letters]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(str(folder / "tok"))
    return folder / "tok"


def _gpt2_ids(texts):
    return load_gpt2().encode_batch(texts)


def test_openwebtext_recipe_wraps_gpt2_tokens_like_mdlm_and_holds_out_the_last_documents(owt_disk, monkeypatch):
    dm = TextDataModule(corpus="openwebtext", path=str(owt_disk), tokenizer="gpt2", packing="wrap", seq_len=16,
                        val_docs=3, batch_size=2)
    dm.prepare()
    eot = 50256
    for split, docs in (("train", OWT_DOCS[:9]), ("val", OWT_DOCS[9:])):
        # MDLM's wrap, computed independently: doc [EOS] doc [EOS] ..., pieces of L - 2, each [BOS] piece [EOS]
        stream = [t for ids in _gpt2_ids(docs) for t in [*ids, eot]]
        n = len(stream) // 14
        expected = np.array([[eot, *stream[i * 14 : (i + 1) * 14], eot] for i in range(n)])
        np.testing.assert_array_equal(dm.blocks(split)[:], expected)
    assert dm.model_vocab_size == 50258  # GPT-2's 50,257 tokens and the mask as the last id

    # The hub path: the same loading code with datasets.load_dataset answering for the hub
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.load_from_disk(str(owt_disk))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = TextDataModule(corpus="openwebtext", tokenizer="gpt2", packing="wrap", seq_len=16, val_docs=3)
    hub.prepare()
    assert calls == [("Skylion007/openwebtext", None)]
    for split in ("train", "val"):
        np.testing.assert_array_equal(hub.blocks(split)[:], dm.blocks(split)[:])


def test_openwebtext_from_parquet_files_named_like_the_hub_gives_the_same_blocks(owt_disk, tmp_path):
    folder = tmp_path / "owt_parquet"
    folder.mkdir()
    datasets.load_from_disk(str(owt_disk))["train"].to_parquet(str(folder / "train-00000-of-00001.parquet"))
    kw = dict(corpus="openwebtext", tokenizer="gpt2", packing="wrap", seq_len=16, val_docs=3)
    a, b = TextDataModule(path=str(folder), **kw), TextDataModule(path=str(owt_disk), **kw)
    for split in ("train", "val"):
        np.testing.assert_array_equal(a.blocks(split)[:], b.blocks(split)[:])
    with pytest.raises(UserError, match="not more than the 12 held out"):
        TextDataModule(path=str(folder), **{**kw, "val_docs": 12}).prepare()


def test_lm1b_recipe_pads_bert_tokens_like_mdlm_and_padding_is_not_scored(bert_dir, tmp_path):
    from transformers import AutoTokenizer

    train = ["the cat sat on the mat .", "he said , the dog ran home .", "it ' s a cat ?", "the dog sat ."] * 3
    test = ["the cat ran home .", "a dog said it sat on the mat , the cat sat on the dog ."]
    path = tmp_path / "lm1b"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "test": datasets.Dataset.from_dict({"text": test})}).save_to_disk(str(path))
    L = 12
    dm = TextDataModule(corpus="lm1b", path=str(path), tokenizer=str(bert_dir), packing="pad", seq_len=L,
                        batch_size=4)
    dm.prepare()
    # MDLM's call for LM1B: the detokenized text through the BERT tokenizer, padded/truncated to L
    hf = AutoTokenizer.from_pretrained(str(bert_dir))
    for split, texts in (("train", train), ("val", test)):
        ref = hf([lm1b_detokenize(t) for t in texts], max_length=L, padding="max_length", truncation=True)
        blocks = dm.blocks(split)
        np.testing.assert_array_equal(blocks[:], np.array(ref["input_ids"]))
        np.testing.assert_array_equal(blocks.lengths(slice(None)), np.array(ref["attention_mask"]).sum(1))
    assert len(dm.blocks("val")[1]) == L and dm.blocks("val").lengths([1])[0] == L  # the long one: truncated
    batch = next(iter(dm.train_dataloader()))
    np.testing.assert_array_equal(batch["valid"].sum(1).numpy(), dm.blocks("train").lengths(batch["index"].numpy()))
    # the tokenizer travels with the checkpoint state and decodes offline
    again = TextDataModule(corpus="lm1b", path=str(path), tokenizer=str(bert_dir), packing="pad", seq_len=L)
    again.load_state_dict(dm.state_dict())
    assert again.tokenizer.decode(dm.blocks("val")[0].tolist()).startswith("the cat ran home")


def test_text8_recipe_is_character_level_with_the_standard_split(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    text = "".join(rng.choice(alphabet, 20_000))
    (tmp_path / "text8").write_text(text)
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", text)
    dm = TextDataModule(corpus="text8", path=str(tmp_path / "text8"), tokenizer="char", packing="concat", seq_len=256)
    train, val = dm.blocks("train"), dm.blocks("val")
    assert dm.tokenizer.vocab_size == 27 + 3  # the 27 symbols, BOS, EOS, UNK
    assert len(train) == 18_000 // 256 and len(val) == 1_000 // 256  # 90% / 5% (/ 5% test) of the characters
    for i in (0, 7, len(train) - 1):
        assert dm.tokenizer.decode(train[i].tolist()) == text[i * 256 : (i + 1) * 256]
    assert dm.tokenizer.decode(val[0].tolist()) == text[18_000 : 18_256]
    zipped = TextDataModule(corpus="text8", path=str(tmp_path / "text8.zip"), tokenizer="char", packing="concat",
                            seq_len=256)
    np.testing.assert_array_equal(zipped.blocks("train")[:], train[:])
    test = load_recipe_splits("text8", str(tmp_path / "text8"), eval_split="test")["val"]
    assert test["text"] == [text[19_000:]]


def test_wikitext_recipe_joins_lines_into_articles_and_detokenizes(tmp_path):
    lines = ["", " = Valkyria Chronicles = \n", "", " Senjō no Valkyria 3 @-@ is a game , made in 2011 . \n",
             " = = Gameplay = = \n", " It has 1 @,@ 000 units ( or 1 @.@ 5 k ) . \n", " = Other = \n",
             " The \" text \" is here ; yes . \n"]
    path = tmp_path / "wt"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": lines}) for s in ("train", "validation", "test")}
                         ).save_to_disk(str(path))
    docs = load_recipe_splits("wikitext103", str(path))["train"]["text"]
    assert len(docs) == 2  # two articles; "= = Gameplay = =" is a section of the first
    assert "3-is a game, made in 2011." in docs[0] and "==Gameplay==" not in docs[0] and "== Gameplay ==" in docs[0]
    assert "1,000 units (or 1.5 k)." in docs[0] and docs[1].startswith(" = Other =")
    assert '"text"' in docs[1]
    dm = TextDataModule(corpus="wikitext103", path=str(path), tokenizer="char", seq_len=16)
    assert len(dm.blocks("train")) > 0 and len(dm.blocks("val")) == len(dm.blocks("train"))


def test_detokenizers_undo_the_corpora_tokenization():
    assert ptb_detokenize("he did n't say N dollars , the company 's \\/ <unk>") == \
        "he didn't say 1 dollars , the company's / ?"
    assert lm1b_detokenize('He said , " yes " ( maybe ) , ok .') == 'He said, "yes" (maybe), ok.'
    assert wikitext_detokenize("a @-@ b , c ( d )") == "a-b, c (d)"


def test_unknown_dataset_and_missing_local_copy_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        load_recipe_splits("openwebtxt")
    with pytest.raises(UserError, match="no such file or folder"):
        TextDataModule(corpus="lm1b", path=str(tmp_path / "nope")).prepare()
    with pytest.raises(UserError, match="data.path is for dataset recipes"):
        TextDataModule(corpus="shakespeare", path=str(tmp_path))
    path = tmp_path / "lm1b"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["a b"]})}).save_to_disk(str(path))
    with pytest.raises(UserError, match="no split 'test'"):
        load_recipe_splits("lm1b", str(path))


# ---- the token cache ----


def test_second_run_reads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c", seed=7)  # text no other test uses: not in the session's cache yet
    first = TextDataModule(corpus=str(corpus), tokenizer="char", seq_len=32)
    first.prepare()
    assert not first.stats["train"]["cached"] and first.stats["train"]["tokens"] > 0
    from mdlm_kit.data import tokenizers

    def boom(self, texts):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenizers.Tokenizer, "encode_batch", boom)
    second = TextDataModule(corpus=str(corpus), tokenizer="char", seq_len=32)
    second.prepare()
    assert second.stats["train"]["cached"] and second.stats["val"]["cached"]
    np.testing.assert_array_equal(second.blocks("train")[:], first.blocks("train")[:])
    # another packing of the same text is another cache entry (and tokenizes)
    with pytest.raises(AssertionError, match="tokenized again"):
        TextDataModule(corpus=str(corpus), tokenizer="char", seq_len=32, packing="concat").prepare()


def test_token_cache_stores_uint32_above_65536_ids_and_spans_shards(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a" * n for n in (5, 17, 3, 40, 9)]})
    for vocab_size, dtype in ((65_536, np.uint16), (65_537, np.uint32)):  # uint16 holds ids up to 65,535
        small, _ = build_split(tmp_path / str(vocab_size), ds, lambda texts: [[65_535] * len(t) for t in texts],
                               vocab_size, Packing("concat", 4, 0, 0, 0), meta={})
        assert small.shards[0].dtype == dtype and small.read(0, len(small)).max() == 65_535

    def encode(texts):
        return [[70_000 + 13 * i + len(t) for i in range(len(t))] for t in texts]

    stream, stats = build_split(tmp_path / "s", ds, encode, 80_000, Packing("stream", 4, 1, 2, 2), meta={},
                                shard_tokens=16)
    assert stream.shards[0].dtype == np.uint32 and stats["shards"] == len(stream.shards) == -(-(74 + 10) // 16)
    expected = np.concatenate([[1, *ids, 2] for ids in encode(ds["text"])])
    np.testing.assert_array_equal(stream.read(0, len(stream)), expected)
    np.testing.assert_array_equal(stream.read(13, 50), expected[13:50])  # across shard boundaries
    assert stream.doc_ends.tolist() == np.cumsum([7, 19, 5, 42, 11]).tolist()  # [1] ids [2] per document


_KILL_SCRIPT = """
import sys, time
from mdlm_kit.data import TextDataModule
from mdlm_kit.data import cache

write = cache._write_shard
def slow_write(path, tokens):
    write(path, tokens)
    print("shard", flush=True)
    time.sleep(0.5)
cache._write_shard = slow_write
TextDataModule(corpus=sys.argv[1], tokenizer="char", seq_len=32, shard_tokens=2000).prepare()
print("done", flush=True)
"""


def test_a_killed_preparation_leaves_no_partial_cache_and_the_next_run_rebuilds_it(tmp_path, cache_root):
    corpus = write_corpus(tmp_path / "c")
    env = {**os.environ, "MDLM_KIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(corpus)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "shard"  # one shard written, more to come
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    tokens = tmp_path / "cache" / "tokens"
    partial = [p for p in tokens.rglob("shard-*.bin")]
    assert partial and all(".tmp-" in str(p) for p in partial)  # shards exist only in the temporary folder
    assert not list(tokens.rglob("index.json"))
    os.environ["MDLM_KIT_CACHE"] = str(tmp_path / "cache")
    try:
        dm = TextDataModule(corpus=str(corpus), tokenizer="char", seq_len=32, shard_tokens=2000)
        dm.prepare()
        assert not dm.stats["train"]["cached"] and dm.stats["train"]["shards"] > 1
        assert not [p for p in tokens.rglob("*") if ".tmp-" in p.name]  # the dead run's leftovers are gone
        os.environ["MDLM_KIT_CACHE"] = str(tmp_path / "fresh")
        clean = TextDataModule(corpus=str(corpus), tokenizer="char", seq_len=32)
        np.testing.assert_array_equal(dm.blocks("train")[:], clean.blocks("train")[:])
    finally:
        os.environ["MDLM_KIT_CACHE"] = str(cache_root)


# ---- mdlm-kit data prepare ----


def test_data_prepare_reports_tokens_shards_and_throughput(tmp_path, monkeypatch, capfd):
    # a cache of its own: the first preparation must tokenize, whatever earlier tests of the session cached
    monkeypatch.setenv("MDLM_KIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(400)))
    args = ["data", "prepare", "--config", str(CONFIGS / "debug.yaml"), "--no_progress"]
    for extra in (["--data.corpus", str(text)], []):  # a local text file, then the embedded corpus
        t0 = time.perf_counter()
        proc = run_main(capfd, *args, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["packing"] == "stream" and out["splits"]["train"]["dtype"] == "uint16"
        for split in ("train", "val"):
            s = out["splits"][split]
            assert s["tokens"] > 0 and s["shards"] >= 1 and not s["cached"] and s["tokens_per_second"] > 0
            assert s["documents"] >= 1 and s["blocks"] == s["tokens"] // 64
        assert out["tokenized_tokens_per_second"] > 0 and out["seconds"] < time.perf_counter() - t0
        again = json.loads(run_main(capfd, *args, *extra).stdout.strip().splitlines()[-1])
        assert all(again["splits"][s]["cached"] for s in ("train", "val"))
        assert again["splits"]["train"]["tokens"] == out["splits"]["train"]["tokens"]
    assert out["corpus"] == "shakespeare" and out["splits"]["train"]["tokens"] > 4_000_000


@pytest.mark.parametrize(
    "args, match",
    [
        (["--config", "no/such.yaml"], "no such file"),
        (["--data.corpus", "/no/such/corpus"], "no such file or folder"),
        (["--data.corpus", "openwebtext", "--data.path", "/no/copy"], "no such file or folder: /no/copy"),
        (["--data.packing", "zip"], "data.packing: Expected a typing.Literal['stream', 'wrap', 'concat', 'pad']"),
        (["--data.corpus", "lm1b", "--data.path", "{tmp}"], "could not read it as a copy of lm1b"),
        (["--data.corpus", "text8", "--data.path", "{tmp}/bad.zip"], "has no member 'text8'"),
        (["--data.corpus", "text8"], "could not load"),
    ],
)
def test_data_prepare_bad_input_is_one_line(args, match, tmp_path, capfd):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("other", "abc")
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path / "empty") if a == "{tmp}" else str(tmp_path)) for a in args]
    proc = run_main(capfd, "data", "prepare", *args)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("mdlm-kit: error: ") and match in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_padded_batches_train_and_validate(bert_dir, tmp_path):
    """A training step on padded blocks: the loss covers the real tokens only (validation counts them)."""
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.models import Backbone

    path = tmp_path / "lm1b"
    texts = ["the cat sat on the mat .", "he said , the dog ran home .", "it ' s a cat ?"] * 4
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": texts}) for s in ("train", "test")}
                         ).save_to_disk(str(path))
    dm = TextDataModule(corpus="lm1b", path=str(path), tokenizer=str(bert_dir), packing="pad", seq_len=16,
                        batch_size=4)
    dm.prepare()
    model = LanguageModel(vocab_size=dm.model_vocab_size, backbone=Backbone("debug", max_seq_len=16))
    batch = next(iter(dm.val_dataloader()))
    terms = model.loss_terms(batch["input_ids"], batch["index"], 1, batch["valid"])
    np.testing.assert_array_equal(terms.num_tokens.numpy(), batch["valid"].sum(1).numpy())
    assert torch.isfinite(terms.per_token()) and (batch["valid"].sum(1) < 16).all()


# ---- each recipe end to end: its config, a local sample, a few CPU steps, then ppl ----

CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
       "--trainer.precision", "32-true", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
       "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--model.backbone.size", "debug",
       "--model.backbone.dropout", "0.0", "--data.batch_size", "2", "--data.eval_batch_size", "4",
       "--data.num_workers", "0"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory, owt_disk, bert_dir):
    root = tmp_path_factory.mktemp("samples")
    lm1b = ["the cat sat on the mat .", "he said , the dog ran home .", "it ' s a cat ?", "the dog sat ."] * 4
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": lm1b}) for s in ("train", "test")}
                         ).save_to_disk(str(root / "lm1b"))
    rng = np.random.default_rng(1)
    (root / "text8").write_text("".join(rng.choice(np.array(list("abcdefghijklmnopqrstuvwxyz ")), 40_000)))
    wiki = [f" = Article {i} = \n" if i % 6 == 0 else f" Line {i} of the text , with 1 @,@ 000 words . \n"
            for i in range(60)]
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": wiki}) for s in ("train", "validation", "test")}
                         ).save_to_disk(str(root / "wikitext103"))
    return {"openwebtext": (owt_disk, ["--data.val_docs", "3"]),
            "lm1b": (root / "lm1b", ["--data.tokenizer", str(bert_dir)]),
            "text8": (root / "text8", []),
            "wikitext103": (root / "wikitext103", [])}


@pytest.mark.slow
@pytest.mark.parametrize("recipe, config, seq_len", [("openwebtext", "owt_mdlm_small", 64), ("lm1b", "lm1b_mdlm", 16),
                                                     ("text8", "text8", 64), ("wikitext103", "wikitext103", 64)])
def test_recipe_config_trains_and_evaluates_on_a_local_sample(tmp_path, samples, recipe, config, seq_len, capfd):
    path, extra = samples[recipe]
    out = tmp_path / recipe
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / f"{config}.yaml"), *CPU, "--data.path", str(path),
                   "--data.seq_len", str(seq_len), "--model.backbone.max_seq_len", str(seq_len),
                   "--trainer.default_root_dir", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "last.ckpt"
    res = run_main(capfd, "ppl", "--checkpoint", str(ckpt), "--max_sequences", "4", "--num_t_samples", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    ppl = json.loads(res.stdout)
    assert ppl["data"]["corpus"] == recipe and ppl["num_sequences"] == 4 and np.isfinite(ppl["nelbo"])
    if recipe == "lm1b":  # padding is not counted: fewer tokens than 4 blocks of 16
        assert ppl["num_tokens"] < 4 * seq_len
    else:
        assert ppl["num_tokens"] == 4 * seq_len
    if recipe == "openwebtext":  # other block lengths re-pack the run's own validation documents (val_docs)
        res = run_main(capfd, "ppl", "--checkpoint", str(ckpt), "--seq_len", "32")
        assert res.returncode == 0, res.stderr[-2000:]
        stream = sum(len(ids) + 1 for ids in _gpt2_ids(OWT_DOCS[-3:]))
        assert json.loads(res.stdout)["num_tokens"] == stream // 30 * 32
    gen = run_main(capfd, "generate", "--checkpoint", str(ckpt), "--sampler", "fhs", "--num_samples", "1", "--length",
                  str(seq_len), "--seed", "0")
    assert gen.returncode == 0 and len(json.loads(gen.stdout)["tokens"]) == seq_len, gen.stderr[-2000:]


@pytest.mark.slow
def test_zero_shot_sets_with_and_without_eos_between_sequences(tmp_path, samples, capfd):
    """``ppl --data ptb|lambada --path`` on an OpenWebText-style (GPT-2, wrap) checkpoint; token counts checked."""
    path, extra = samples["openwebtext"]
    out = tmp_path / "owt"
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "owt_mdlm_small.yaml"), *CPU, "--data.path", str(path),
                   "--data.seq_len", "32", "--model.backbone.max_seq_len", "32", "--trainer.default_root_dir", str(out),
                   *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = str(out / "checkpoints" / "last.ckpt")
    sentences = [f"the company 's shares rose N % to $ N , he said ; it did n't last {i} ." for i in range(40)]
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"sentence": sentences}) for s in ("train", "validation",
                                                                                             "test")}
                         ).save_to_disk(str(tmp_path / "ptb"))
    lambada = [f"\u201cShe opened the door {i},\u201d he said, and then she " + "walked in" for i in range(30)]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": lambada})}).save_to_disk(
        str(tmp_path / "lambada"))
    from mdlm_kit.data.recipes import lambada_detokenize

    for name, texts in (("ptb", [ptb_detokenize(s) for s in sentences]),
                        ("lambada", [lambada_detokenize(t) for t in lambada])):
        ids = _gpt2_ids(texts)
        for eos, flag in ((True, "true"), (False, "false")):
            res = run_main(capfd, "ppl", "--checkpoint", ckpt, "--data", name, "--path", str(tmp_path / name),
                          "--insert_eos", flag, "--batch_size", "64")
            assert res.returncode == 0, res.stderr[-2000:]
            out_ = json.loads(res.stdout)
            n_stream = sum(len(x) + eos for x in ids)  # MDLM's wrap: [BOS] 30 tokens [EOS] per block
            assert out_["num_tokens"] == (n_stream // 30) * 32, (name, eos)
            assert out_["data"] == {"corpus": name, "split": "val", "seq_len": 32, "packing": "wrap",
                                    "insert_eos": eos}
    bad = run_main(capfd, "ppl", "--checkpoint", ckpt, "--data", "ptb", "--path", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr.strip().splitlines()[-1]


# ---- streaming: the training split read as a stream, packed on the fly ----


def test_streaming_gives_the_cached_blocks_in_stream_order(owt_disk):
    kw = dict(corpus="openwebtext", path=str(owt_disk), tokenizer="gpt2", packing="wrap", seq_len=16, val_docs=3,
              batch_size=2)
    cached = TextDataModule(**kw)
    streamed = TextDataModule(**kw, streaming=True, shuffle_buffer=0)
    streamed.prepare()
    from mdlm_kit.data.datamodule import StreamingBlocks

    blocks = np.stack([b for b, _ in StreamingBlocks(streamed._stream, streamed, 1, 0).blocks(epochs=1)])
    np.testing.assert_array_equal(blocks, cached.blocks("train")[:])
    np.testing.assert_array_equal(streamed.blocks("val")[:], cached.blocks("val")[:])
    with pytest.raises(UserError, match="streamed"):
        streamed.blocks("train")
    # the stream is endless: the second pass follows the first
    from itertools import islice

    two = [item["input_ids"].numpy() for item in islice(StreamingBlocks(streamed._stream, streamed, 1, 0),
                                                         2 * len(blocks))]
    np.testing.assert_array_equal(np.stack(two), np.concatenate([blocks, blocks]))
    # a resumed run drops the batches it already trained on, with or without DataLoader workers
    from torch.utils.data import DataLoader

    for workers in (0, 2):
        data = StreamingBlocks(streamed._stream, streamed, 1, 0)
        ref = [b["input_ids"].numpy() for b in islice(DataLoader(data, batch_size=2, num_workers=workers), 12)]
        data.skip_batches = 3
        rest = [b["input_ids"].numpy() for b in islice(DataLoader(data, batch_size=2, num_workers=workers), 9)]
        np.testing.assert_array_equal(np.stack(rest), np.stack(ref[3:]))


def test_streaming_splits_documents_over_processes_and_workers_without_overlap(owt_disk):

    from mdlm_kit.data.datamodule import StreamingBlocks

    kw = dict(corpus="openwebtext", path=str(owt_disk), tokenizer="gpt2", packing="pad", seq_len=256, val_docs=3,
              streaming=True, shuffle_buffer=4, batch_size=1)
    dm = TextDataModule(**kw)
    dm.prepare()
    everything = sorted(tuple(ids) for ids in _gpt2_ids(OWT_DOCS[:9]))

    def docs(items):
        return sorted(tuple(x["input_ids"][0, 1 : int(x["valid"].sum()) - 1].tolist()) for x in items)

    def one_pass(world, rank, workers=1):
        data = StreamingBlocks(dm._stream, dm, world, rank)
        return [{"input_ids": torch.from_numpy(b)[None], "valid": (torch.arange(256) < n)[None]}
                for w in range(workers) for b, n in data.blocks(workers, w, epochs=1)]

    per_rank = [docs(one_pass(2, r)) for r in (0, 1)]
    assert per_rank[0] and per_rank[1] and sorted(per_rank[0] + per_rank[1]) == everything
    assert docs(one_pass(1, 0, workers=3)) == everything
    with pytest.raises(UserError, match="pretrained tokenizer"):
        TextDataModule(**{**kw, "tokenizer": "bpe"})


@pytest.mark.slow
def test_streaming_recipe_trains_end_to_end(tmp_path, samples, capfd):
    path, extra = samples["openwebtext"]
    out = tmp_path / "stream"
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "owt_mdlm_small.yaml"), *CPU, "--data.path", str(path),
                   "--data.seq_len", "32", "--model.backbone.max_seq_len", "32", "--data.streaming", "true",
                   "--data.shuffle_buffer", "8", "--trainer.max_steps", "5", "--trainer.default_root_dir", str(out),
                   *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5 and ckpt["TextDataModule"]["epoch_batches"] == 5


@pytest.mark.parametrize("recipe, hub, config", [("lm1b", "dvruette/lm1b", None),
                                                 ("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1"),
                                                 ("ptb", "ptb-text-only/ptb_text_only", "penn_treebank")])
def test_hub_and_local_copy_give_the_same_blocks(tmp_path, monkeypatch, recipe, hub, config):
    """The hub path (``datasets.load_dataset(name, config)``) and ``data.path`` run the same pipeline."""
    key = "sentence" if recipe == "ptb" else "text"
    rows = [" = A = \n", " the cat sat , he said . \n", " = B = \n", " it ' s a dog @-@ like cat . \n"] * 5
    splits = ("train", "test") if recipe == "lm1b" else ("train", "validation", "test")
    path = tmp_path / recipe
    datasets.DatasetDict({s: datasets.Dataset.from_dict({key: rows}) for s in splits}).save_to_disk(str(path))
    local = TextDataModule(corpus=recipe, path=str(path), tokenizer="char", seq_len=16)
    calls = []

    def fake_load_dataset(name, cfg=None, **kwargs):
        calls.append((name, cfg))
        return datasets.load_from_disk(str(path))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub_dm = TextDataModule(corpus=recipe, tokenizer="char", seq_len=16)
    for split in ("train", "val"):
        np.testing.assert_array_equal(hub_dm.blocks(split)[:], local.blocks(split)[:])
    assert calls == [(hub, config)]



def test_validation_batches_are_even_across_ranks_and_fillers_weigh_nothing():
    from mdlm_kit.data.datamodule import BlockDataset, _val_batches

    packing = Packing("concat", 4, 0, 0, 0)
    blocks = Blocks(packing.stream([list(range(10 * 4))]), packing)
    seen = []
    for rank in range(4):
        batches = _val_batches(10, 2, 4, rank)
        assert len(batches) == 2  # 10 blocks over 4 ranks: every rank 2 batches (3 entries, the last a filler)
        items = [BlockDataset(blocks)[i] for b in batches for i in b]
        seen += [it["index"] for it in items if it["weight"] == 1.0]
        assert sum(it["weight"] == 0.0 for it in items) == 3 - len(range(rank, 10, 4))  # ranks 2, 3: one filler
        np.testing.assert_array_equal(items[-1]["input_ids"].numpy(), blocks[items[-1]["index"]])
    assert sorted(seen) == list(range(10))  # each real block once


def test_unreadable_index_is_rebuilt_and_map_leaves_nothing_in_the_dataset_folder(owt_disk, tmp_path):
    before = sorted(p.name for p in owt_disk.rglob("*"))
    kw = dict(corpus="openwebtext", path=str(owt_disk), tokenizer="gpt2", packing="wrap", seq_len=16, val_docs=3)
    dm = TextDataModule(**kw)
    dm.prepare()
    assert sorted(p.name for p in owt_disk.rglob("*")) == before  # no cache-*.arrow left beside the user's data
    assert not list(dm.cache_folder.rglob("*.arrow"))
    (dm.cache_folder / "train" / "index.json").write_text('{"dtype": "uint1')  # a truncated write
    again = TextDataModule(**kw)
    again.prepare()
    assert not again.stats["train"]["cached"] and again.stats["val"]["cached"]
    np.testing.assert_array_equal(again.blocks("train")[:], dm.blocks("train")[:])



@pytest.mark.slow
@DDP
def test_ddp_on_padded_blocks_matches_one_process(tmp_path, samples):
    """Ranks hold different numbers of real tokens; the scaled loss gives the one-process gradient."""
    from helpers import read_records

    path, extra = samples["lm1b"]
    common = ["fit", "--config", str(CONFIGS / "lm1b_mdlm.yaml"), *CPU, "--data.path", str(path),
              "--data.seq_len", "16", "--model.backbone.max_seq_len", "16", "--trainer.max_steps", "4",
              "--trainer.log_every_n_steps", "1", "--trainer.callbacks+=helpers.RecordBatches", *extra]
    env = {"PYTHONPATH": str(ROOT / "tests")}
    for name, more in (("one", ["--data.batch_size", "4"]),
                       ("two", ["--data.batch_size", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        proc = run_cli(*common, *more, "--trainer.default_root_dir", str(tmp_path / name),
                       "--trainer.callbacks.path", str(tmp_path / f"{name}.rec"), timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_records(tmp_path / "one.rec"), read_records(tmp_path / "two.rec", world_size=2)
    assert [r["index"] for r in one] == [r["index"] for r in two]
    for a, b in zip(one, two):
        assert abs(np.mean(b["loss"]) - a["loss"][0]) < 2e-5, (a, b)
    # and the ranks did hold different token counts (otherwise the scaling would not be tested)
    dm = TextDataModule(corpus="lm1b", path=str(path), tokenizer=extra[1], packing="pad", seq_len=16)
    lengths = [dm.blocks("train").lengths(r["index"]) for r in one]
    assert any(x[:2].sum() != x[2:].sum() for x in lengths)
