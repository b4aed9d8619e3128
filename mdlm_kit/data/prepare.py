"""``mdlm-kit data prepare``: tokenize a config's data into the token cache ahead of training."""

from __future__ import annotations

import time
from pathlib import Path

from mdlm_kit.errors import UserError


def _config_data(paths: list[str]) -> dict:
    """The ``data:`` sections of the given LightningCLI config files, later files overriding earlier ones."""
    import yaml

    data: dict = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"--config: no such file: {p}")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        section = cfg.get("data", {}) if isinstance(cfg, dict) else {}
        if isinstance(section, dict) and "init_args" in section:
            section = section["init_args"]
        data.update(section or {})
    return data


def prepare(argv: list[str]) -> dict:
    """Parse ``[--config F.yaml ...] [--data.KEY VALUE ...] [--no_progress]``, build the cache, report it."""
    from jsonargparse import ArgumentParser

    from mdlm_kit.data import TextDataModule

    configs, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            configs.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            configs.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    parser = ArgumentParser(prog="mdlm-kit data prepare", exit_on_error=False,
                            description="Tokenize the data of a training config into the token cache.")
    parser.add_class_arguments(TextDataModule, "data")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--config", help="a training config (its data: section is used); may repeat")
    defaults = _config_data(configs)
    try:
        parser.set_defaults({f"data.{k}": v for k, v in defaults.items()})
    except KeyError as e:
        raise UserError(f"--config: data.{e.args[0]} is not an option of the data module") from None
    args = parser.parse_args(rest)
    dm = TextDataModule(**args.data.as_dict())
    t0 = time.perf_counter()
    dm.prepare(progress=not args.no_progress)
    out = {"corpus": dm.hparams.corpus, "tokenizer": dm.hparams.tokenizer, "packing": dm.hparams.packing,
           "vocab_size": dm.tokenizer.vocab_size, "cache": str(dm.cache_folder), "splits": {}}
    for split, st in dm.stats.items():
        stream = dm.blocks(split).stream
        out["splits"][split] = {
            "tokens": len(stream), "documents": stream.num_docs, "shards": len(stream.index["shards"]),
            "dtype": stream.index["dtype"], "blocks": len(dm.blocks(split)), "cached": st.cached,
            "seconds": round(st.seconds, 3),
            "tokens_per_second": None if st.cached else round(st.tokens_per_second),
        }
    built = [s for s in dm.stats.values() if not s.cached]
    out["tokenized_tokens_per_second"] = (round(sum(s.tokens for s in built) / sum(s.seconds for s in built))
                                          if built else None)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
