"""Dataset recipes: the papers' corpora through Hugging Face ``datasets``, from the hub or a local copy in its format.
Splits and detokenizers follow the MDLM reference code (``dataloader.py``), which produced the papers' numbers."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mdlm_kit.errors import UserError


def wikitext_detokenize(s: str) -> str:
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    for o, c in ("()", "[]", "{}", '""', "''"):  # no spaces just inside brackets and quotes
        s = re.sub(rf"{re.escape(o)}\s*([^{re.escape(c)}]*?)\s*{re.escape(c)}", rf"{o}\1{c}", s)
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


def wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText rows are lines; an article starts at a top-level heading line `` = Title = ``."""
    articles: list[list[str]] = []
    for line in lines:
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


TEXT8_SPLITS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}  # 90M / 5M / 5M of 100M


@dataclass(frozen=True)
class Recipe:
    """Where a corpus lives and how its splits are made. ``val_docs``: the validation split is the last
    ``val_docs`` documents of ``train_split`` (one-split corpora). ``lines``: rows are lines, joined into articles."""

    name: str
    hub: str
    config: str | None = None
    text_key: str = "text"
    train_split: str | None = "train"
    val_split: str = "validation"
    val_docs: int | None = None
    detokenize: Callable[[str], str] | None = None
    lines: bool = False


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("openwebtext", "Skylion007/openwebtext", val_split="train", val_docs=100_000),
        Recipe("lm1b", "dvruette/lm1b", val_split="test", detokenize=lm1b_detokenize),
        Recipe("text8", "https://mattmahoney.net/dc/text8.zip"),
        Recipe("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1", detokenize=wikitext_detokenize, lines=True),
        Recipe("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", detokenize=wikitext_detokenize, lines=True),
        Recipe("ptb", "ptb-text-only/ptb_text_only", "penn_treebank", "sentence", detokenize=ptb_detokenize),
        Recipe("lambada", "EleutherAI/lambada_openai", train_split=None, val_split="test",
               detokenize=lambada_detokenize),
        Recipe("ag_news", "fancyzhx/ag_news", val_split="test"),
        Recipe("pubmed", "armanc/scientific_papers", "pubmed", "article", detokenize=papers_detokenize),
        Recipe("arxiv", "armanc/scientific_papers", "arxiv", "article", detokenize=papers_detokenize),
    )
}


def is_dataset_name(name: str) -> bool:
    return name in RECIPES or name.startswith("hf:")


def _load(recipe: Recipe, path: str | None, streaming: bool) -> dict:
    """{split: Dataset} from the hub, or from ``path``, a local copy in the hub's format."""
    import datasets

    if path and not Path(path).expanduser().exists():
        raise UserError(f"data.path: no such file or folder: {path} (a local copy of {recipe.name})")
    try:
        p = Path(path).expanduser() if path else None
        only = recipe.train_split or recipe.val_split  # the split a lone file or Dataset is
        if p and p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
            return dict(ds) if isinstance(ds, datasets.DatasetDict) else {only: ds}
        if recipe.name == "text8":
            return _text8_splits(p or Path(datasets.DownloadManager().download_and_extract(recipe.hub)))
        if not p:
            return dict(datasets.load_dataset(recipe.hub, recipe.config, streaming=streaming))
        if p.is_dir():
            return dict(datasets.load_dataset(str(p)))
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
        kwargs = {"sample_by": "document"} if p.suffix not in builder else {}
        return dict(datasets.load_dataset(builder.get(p.suffix, "text"), data_files={only: str(p)}, **kwargs))
    except UserError:
        raise
    except Exception as e:
        if not path:
            raise UserError(f"could not load {recipe.hub!r} from the Hugging Face hub ({type(e).__name__}: "
                            f"{str(e)[:200]}); offline, pass a local copy with data.path") from None
        raise UserError(f"data.path {path}: could not read it as a copy of {recipe.name} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None


def _text8_splits(p: Path) -> dict:
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
    return {split: datasets.Dataset.from_dict({"text": [text[int(lo * n) : int(hi * n)]]})
            for split, (lo, hi) in TEXT8_SPLITS.items()}


def load_recipe_splits(name: str, path: str | None = None, text_key: str | None = None, val_docs: int | None = None,
                       streaming: bool = False, eval_split: str | None = None) -> dict:
    """{"train": Dataset | None, "val": Dataset} with one string column ``text``, cleaned as the recipe says;
    ``eval_split`` is read as "val". Streamed, "train" is an ``IterableDataset`` and "val" still a ``Dataset``."""
    import datasets

    if not is_dataset_name(name):
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(RECIPES)}, or hf:NAME[:CONFIG]")
    hub, _, config = name[3:].partition(":")  # hf:NAME[:CONFIG]: any hub dataset, its text in data.text_key
    recipe = RECIPES.get(name) or Recipe(name, hub, config or None)
    where = f"data.path {path}" if path else f"the hub dataset {recipe.hub}"
    splits = _load(recipe, path, streaming)
    n_val = val_docs if val_docs is not None else recipe.val_docs
    if streaming and path:  # a local copy read as a stream: the same code path as the hub's
        for k, v in list(splits.items()):
            splits[k] = v.to_iterable_dataset(num_shards=max(1, min(len(v), 64)))
            splits[k]._mdlm_kit_len = len(v)

    def pick(split: str):
        if split not in splits:
            raise UserError(f"{where} has no split {split!r} (has: {', '.join(splits)}); {recipe.name} needs it")
        return splits[split]

    def materialize(ds):  # a stream read into an in-memory Dataset
        return datasets.Dataset.from_list(list(ds)) if isinstance(ds, datasets.IterableDataset) else ds

    if eval_split is not None:
        out = {"train": None, "val": materialize(pick(eval_split))}
    elif n_val is not None and recipe.val_split == recipe.train_split:
        full = pick(recipe.train_split)
        if streaming:
            info = (getattr(getattr(full, "info", None), "splits", None) or {}).get(recipe.train_split)
            n = getattr(info, "num_examples", None) or getattr(full, "_mdlm_kit_len", None)
            if n is None or n <= n_val:
                raise UserError(f"{where}: streaming with {n_val} held-out documents needs the stream's length "
                                f"(dataset info says {n}); set data.streaming false or data.val_docs lower")
            out = {"train": full.take(n - n_val), "val": materialize(full.skip(n - n_val))}
            out["train"]._mdlm_kit_cut = True  # split over processes by example: shards would cross the cut
        elif len(full) <= n_val:
            raise UserError(f"{where} has {len(full)} documents, not more than the {n_val} held out for validation; "
                            "set data.val_docs lower")
        else:
            cut = len(full) - n_val
            out = {"train": full.select(range(cut)), "val": full.select(range(cut, len(full)))}
    else:
        out = {"train": pick(recipe.train_split) if recipe.train_split else None,
               "val": materialize(pick(recipe.val_split))}
    for split, ds in out.items():
        key = text_key or recipe.text_key
        if ds is not None and ds.column_names is not None and key not in ds.column_names:
            raise UserError(f"{where} has no text field {key!r} (fields: {', '.join(ds.column_names)}); "
                            "set data.text_key")
        out[split] = ds if ds is None else _clean(ds, recipe, key)
    return out


def _clean(ds, recipe: Recipe, key: str):
    """One ``text`` column: lines grouped into documents, detokenized."""
    stream = hasattr(ds, "n_shards")
    if recipe.lines and not stream:
        import datasets

        ds, key = datasets.Dataset.from_dict({"text": wikitext_articles(ds[key])}), "text"
    detok = recipe.detokenize
    drop = [c for c in (ds.column_names or []) if c != "text"]
    if detok is None and key == "text" and not drop:
        return ds
    out = ds.map(lambda batch: {"text": [detok(t) for t in batch[key]] if detok else batch[key]}, batched=True,
                 remove_columns=drop or None, **({} if stream else {"desc": f"{recipe.name}: cleaning"}))
    if hasattr(ds, "_mdlm_kit_cut"):  # a stream maps lazily: its mark goes with it
        out._mdlm_kit_cut = ds._mdlm_kit_cut
    return out
