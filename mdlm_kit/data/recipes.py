"""Dataset recipes: the papers' corpora, loaded through Hugging Face ``datasets``.

A recipe says where a corpus lives on the hub, which field holds the text, how its training and
validation splits are made, and how its text is cleaned (the detokenizers MDLM and SEDD apply to
corpora that were distributed pre-tokenized). Users online load by name; offline, ``path`` points at
a local copy in the hub's format: a folder written by ``save_to_disk``, a folder of data files named
by split (``train-*.parquet``, ``validation.jsonl``, ...) or a single file (all of it one split).

| recipe | hub | text | splits (train / validation) |
|---|---|---|---|
| openwebtext | Skylion007/openwebtext | text | train minus its last 100,000 documents / those documents |
| lm1b | dvruette/lm1b | text | train / test |
| text8 | mattmahoney.net text8.zip | characters | first 90M / next 5M (test: last 5M) |
| wikitext103, wikitext2 | Salesforce/wikitext | text (lines -> articles) | train / validation |
| ptb | ptb-text-only/ptb_text_only | sentence | train / validation |
| lambada | EleutherAI/lambada_openai | text | - / test |
| ag_news | fancyzhx/ag_news | text | train / test |
| pubmed, arxiv | armanc/scientific_papers | article | train / validation |

Splits and detokenizers follow the MDLM reference code (``dataloader.py``), which is how the
papers' zero-shot numbers were produced.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mdlm_kit.errors import UserError

# ---- detokenizers: undo the tokenization corpora were distributed with ----


def wikitext_detokenize(s: str) -> str:
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" \u00b0 ", "\u00b0").replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def ptb_detokenize(s: str) -> str:
    s = s.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't").replace(" \n ", "\n")
    s = s.replace("\\/", "/")
    for _ in range(10):  # " N N " overlaps: one pass replaces every other N
        s = s.replace(" N ", " 1 ")
    return s.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detokenize(s: str) -> str:
    s = s.replace("http : / / ", "http://").replace("https : / / ", "https://")
    s = re.sub(r" '(\w+)", r"'\1", s)
    s = re.sub(r" (\w+) \. ", r" \1. ", s)
    s = re.sub(r" (\w+) \.$", r" \1.", s)
    s = s.replace(" ? ", "? ")
    s = re.sub(r" \?$", "?", s)
    s = s.replace(" ! ", "! ")
    s = re.sub(r" \!$", "!", s)
    s = s.replace(" , ", ", ").replace(" : ", ": ").replace(" ; ", "; ").replace(" / ", "/")
    s = re.sub(r"\" ([^\"]+) \"", r'"\1"', s)
    s = re.sub(r"' ([^']+) '", r"'\1'", s)
    s = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", s)
    s = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", s)
    return s.replace("$ ", "$").replace("\u00a3 ", "\u00a3")


def lambada_detokenize(s: str) -> str:
    return "\n" + s.replace("\u201c", '"').replace("\u201d", '"').strip()


def papers_detokenize(s: str) -> str:
    return lm1b_detokenize(wikitext_detokenize(s))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize,
    "papers": papers_detokenize,
}

_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText rows are lines; an article starts at a top-level heading line `` = Title = ``."""
    articles: list[list[str]] = []
    for line in lines:
        if _WIKI_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


# ---- recipes ----

TEXT8_URL = "https://mattmahoney.net/dc/text8.zip"
TEXT8_SPLITS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}  # 90M / 5M / 5M of 100M


@dataclass(frozen=True)
class Recipe:
    """Where a corpus lives and how its splits are made.

    ``val_docs``: the validation split is the last ``val_docs`` documents of ``train_split`` (for
    corpora the hub ships as one split). ``group``: rows are lines to be joined into documents.
    """

    name: str
    hub: str
    config: str | None = None
    text_key: str = "text"
    train_split: str | None = "train"
    val_split: str = "validation"
    val_docs: int | None = None
    detokenizer: str | None = None
    group: str | None = None
    splits: tuple[str, ...] = field(default=("train", "validation", "test"))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("openwebtext", "Skylion007/openwebtext", val_split="train", val_docs=100_000, splits=("train",)),
        Recipe("lm1b", "dvruette/lm1b", val_split="test", detokenizer="lm1b", splits=("train", "test")),
        Recipe("text8", TEXT8_URL),
        Recipe("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1", detokenizer="wikitext", group="wikitext"),
        Recipe("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", detokenizer="wikitext", group="wikitext"),
        Recipe("ptb", "ptb-text-only/ptb_text_only", "penn_treebank", "sentence", detokenizer="ptb"),
        Recipe("lambada", "EleutherAI/lambada_openai", train_split=None, val_split="test", detokenizer="lambada",
               splits=("test",)),
        Recipe("ag_news", "fancyzhx/ag_news", val_split="test", splits=("train", "test")),
        Recipe("pubmed", "armanc/scientific_papers", "pubmed", "article", detokenizer="papers"),
        Recipe("arxiv", "armanc/scientific_papers", "arxiv", "article", detokenizer="papers"),
    )
}
ZERO_SHOT = ("ptb", "wikitext2", "wikitext103", "lm1b", "lambada", "ag_news", "pubmed", "arxiv")


def get_recipe(name: str) -> Recipe:
    if name.startswith("hf:"):  # any hub dataset: hf:NAME or hf:NAME:CONFIG, text in data.text_key
        hub, _, config = name[3:].partition(":")
        return Recipe(name, hub, config or None)
    if name not in RECIPES:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(RECIPES)}, or hf:NAME[:CONFIG]")
    return RECIPES[name]


def is_dataset_name(name: str) -> bool:
    return name in RECIPES or name.startswith("hf:")


# ---- loading: hub or a local copy, as datasets.Dataset objects ----


def _load_local(path: str, recipe: Recipe):
    """A local copy in the hub's format, as {split: Dataset}."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data.path: no such file or folder: {path} (a local copy of {recipe.name})")
    try:
        return _read_local(p, recipe)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"data.path {path}: could not read it as a copy of {recipe.name} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None


def _read_local(p: Path, recipe: Recipe):
    import datasets

    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        return dict(ds) if isinstance(ds, datasets.DatasetDict) else {recipe.splits[0]: ds}
    if recipe.name == "text8":
        return _text8_splits(p)
    if p.is_dir():
        ds = datasets.load_dataset(str(p))
        return dict(ds)
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}.get(
        p.suffix, "text"
    )
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files={recipe.splits[0]: str(p)}, **kwargs)
    return dict(ds)


def _text8_splits(p: Path):
    """text8 (the file or its zip) cut at 90% / 95% of its characters: 90M / 5M / 5M for the real one."""
    import zipfile

    import datasets

    if p.is_dir():  # the extracted archive
        p = p / "text8"
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            if "text8" not in z.namelist():
                raise UserError(f"{p} has no member 'text8'; is it text8.zip?")
            text = z.read("text8").decode("utf-8")
    else:
        text = p.read_text(encoding="utf-8")
    n = len(text)
    return {
        split: datasets.Dataset.from_dict({"text": [text[int(lo * n) : int(hi * n)]]})
        for split, (lo, hi) in TEXT8_SPLITS.items()
    }


def _load_hub(recipe: Recipe, streaming: bool):
    import datasets

    try:
        if recipe.name == "text8":
            return _text8_splits(Path(datasets.DownloadManager().download_and_extract(TEXT8_URL)))
        ds = datasets.load_dataset(recipe.hub, recipe.config, streaming=streaming)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"could not load {recipe.hub!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}); "
            "offline, pass a local copy with data.path"
        ) from None
    return dict(ds)


def _text_column(ds, recipe: Recipe, text_key: str | None, where: str):
    key = text_key or recipe.text_key
    cols = ds.column_names
    if cols is not None and key not in cols:
        raise UserError(f"{where} has no text field {key!r} (fields: {', '.join(cols)}); set data.text_key")
    return key


def _pick(splits: dict, name: str, recipe: Recipe, where: str):
    if name not in splits:
        raise UserError(f"{where} has no split {name!r} (has: {', '.join(splits)}); {recipe.name} needs it")
    return splits[name]


def load_recipe_splits(
    name: str,
    path: str | None = None,
    text_key: str | None = None,
    val_docs: int | None = None,
    streaming: bool = False,
    eval_split: str | None = None,
) -> dict:
    """{"train": Dataset | None, "val": Dataset} with one string column ``text``, cleaned as the recipe says.

    ``eval_split`` picks another split for evaluation (e.g. ``test``); ``val_docs`` overrides how
    many trailing documents the validation split takes where the hub has no validation split.
    ``streaming``: the training split is a ``datasets.IterableDataset`` read as it is used (corpora that
    do not fit on disk); the validation split is still a ``Dataset`` (for OpenWebText-style recipes, the
    stream's last ``val_docs`` documents, which takes one pass over the stream the first time).
    """
    recipe = get_recipe(name)
    where = f"data.path {path}" if path else f"the hub dataset {recipe.hub}"
    splits = _load_local(path, recipe) if path else _load_hub(recipe, streaming)
    n_val = val_docs if val_docs is not None else recipe.val_docs
    out = {}
    if streaming and path:  # a local copy read as a stream: the same code path as the hub's
        local = splits
        splits = {k: v.to_iterable_dataset(num_shards=max(1, min(len(v), 64))) for k, v in local.items()}
        for k, v in splits.items():
            v._mdlm_kit_len = len(local[k])
    if eval_split is not None:
        out["train"], out["val"] = None, _materialize(_pick(splits, eval_split, recipe, where))
    elif n_val is not None and recipe.val_split == recipe.train_split:
        full = _pick(splits, recipe.train_split, recipe, where)
        if streaming:
            n = _num_examples(full, recipe.train_split)
            if n is None or n <= n_val:
                raise UserError(f"{where}: streaming with {n_val} held-out documents needs the stream's length "
                                f"(dataset info says {n}); set data.streaming false or data.val_docs lower")
            out["train"], out["val"] = full.take(n - n_val), _materialize(full.skip(n - n_val))
            out["train"]._mdlm_kit_cut = True  # split over processes by example: shards would cross the cut
        elif len(full) <= n_val:
            raise UserError(f"{where} has {len(full)} documents, not more than the {n_val} held out for validation; "
                            "set data.val_docs lower")
        else:
            out["train"] = full.select(range(len(full) - n_val))
            out["val"] = full.select(range(len(full) - n_val, len(full)))
    else:
        out["train"] = _pick(splits, recipe.train_split, recipe, where) if recipe.train_split else None
        out["val"] = _materialize(_pick(splits, recipe.val_split, recipe, where))
    for split, ds in list(out.items()):
        if ds is not None:
            out[split] = _clean(ds, recipe, _text_column(ds, recipe, text_key, where))
    return out


def _num_examples(ds, split: str) -> int | None:
    info = getattr(ds, "info", None)
    splits = getattr(info, "splits", None) or {}
    if split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    return getattr(ds, "_mdlm_kit_len", None)


def _materialize(ds):
    """A stream (IterableDataset) read into an in-memory Dataset; a Dataset as it is."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return datasets.Dataset.from_list(list(ds))
    return ds


def _clean(ds, recipe: Recipe, key: str):
    """One ``text`` column: lines grouped into documents, detokenized."""
    detok = DETOKENIZERS[recipe.detokenizer] if recipe.detokenizer else None
    if recipe.group == "wikitext" and not hasattr(ds, "n_shards"):  # a map-style Dataset
        import datasets

        ds = datasets.Dataset.from_dict({"text": wikitext_articles(ds[key])})
        key = "text"

    def fn(batch):
        texts = batch[key]
        return {"text": [detok(t) for t in texts] if detok else texts}

    drop = [c for c in (ds.column_names or []) if c != "text"]
    if detok is None and key == "text" and not drop:
        return ds
    kwargs = {} if hasattr(ds, "n_shards") else {"desc": f"{recipe.name}: cleaning"}  # a stream maps lazily
    out = ds.map(fn, batched=True, remove_columns=drop or None, **kwargs)
    for attr in ("_mdlm_kit_len", "_mdlm_kit_cut"):
        if hasattr(ds, attr):
            setattr(out, attr, getattr(ds, attr))
    return out
