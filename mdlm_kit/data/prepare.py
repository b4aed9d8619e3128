"""``mdlm-kit data prepare``: tokenize a config's data into the token cache ahead of training."""

from __future__ import annotations

import time
from pathlib import Path

from mdlm_kit.errors import UserError


def prepare(argv: list[str]) -> dict:
    """Parse ``[--config F.yaml ...] [--data.KEY VALUE ...] [--no_progress]``, build the cache, report it; the
    ``data:`` sections of the training configs are the defaults, later files overriding earlier ones."""
    import yaml
    from jsonargparse import ArgumentParser

    from mdlm_kit.data import TextDataModule

    defaults, rest, args = {}, [], iter(argv)
    for a in args:
        if a != "--config" and not a.startswith("--config="):
            rest.append(a)
            continue
        p = a.split("=", 1)[1] if "=" in a else next(args, "")
        if not Path(p).is_file():
            raise UserError(f"--config: no such file: {p}")
        try:
            cfg = yaml.safe_load(Path(p).read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        section = cfg.get("data", {}) if isinstance(cfg, dict) else {}
        defaults.update((section.get("init_args", section) if isinstance(section, dict) else section) or {})
    parser = ArgumentParser(prog="mdlm-kit data prepare", exit_on_error=False,
                            description="Tokenize the data of a training config into the token cache.")
    parser.add_class_arguments(TextDataModule, "data")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    try:
        parser.set_defaults({f"data.{k}": v for k, v in defaults.items()})
    except KeyError as e:
        raise UserError(f"--config: data.{e.args[0]} is not an option of the data module") from None
    parsed = parser.parse_args(rest)
    dm = TextDataModule(**parsed.data.as_dict())
    t0 = time.perf_counter()
    dm.prepare(progress=not parsed.no_progress)
    out = {"corpus": dm.hparams.corpus, "tokenizer": dm.hparams.tokenizer, "packing": dm.hparams.packing,
           "vocab_size": dm.tokenizer.vocab_size, "cache": str(dm.cache_folder), "splits": {}}
    for split, st in dm.stats.items():
        blocks = dm.blocks(split)
        out["splits"][split] = {
            "tokens": len(blocks.stream), "documents": len(blocks.stream.doc_ends), "shards": len(blocks.stream.shards),
            "dtype": blocks.stream.shards[0].dtype.name, "blocks": len(blocks), "cached": st["cached"],
            "seconds": round(st["seconds"], 3),
            "tokens_per_second": None if st["cached"] else round(st["tokens"] / st["seconds"]),
        }
    built = [s for s in dm.stats.values() if not s["cached"]]
    out["tokenized_tokens_per_second"] = (round(sum(s["tokens"] for s in built) / sum(s["seconds"] for s in built))
                                          if built else None)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
