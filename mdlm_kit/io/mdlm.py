"""Checkpoints of the MDLM reference code (kuleshov-group/mdlm): its Lightning ``.ckpt`` (EMA weights, an omegaconf
config read without omegaconf), a plain state dict, or its Hugging Face folder. Its DiT is ``DiT`` with
``layout="mdlm"`` under other parameter names. ``.ckpt`` files are pickles: load only those you trust."""

from __future__ import annotations

import json
import logging
import pickle
import re
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mdlm_kit.errors import UserError
from mdlm_kit.schedules import LogLinear

__all__ = ["convert_mdlm_state_dict", "is_mdlm_checkpoint", "load_mdlm_checkpoint", "mdlm_parameter_names"]

log = logging.getLogger(__name__)

GPT2_VOCAB = 50258  # GPT-2's 50,257 tokens + the mask as the last id (MDLM on OpenWebText)
FREQ_DIM = 256  # MDLM's TimestepEmbedder frequency_embedding_size
ROPE_BASE = 10000.0
_INV_FREQ = "rotary_emb.inv_freq"  # a buffer: checked, not loaded (our rotary tables are computed)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _parameters(n_layers: int, vocab: int = 0, d: int = 0, cond: int = 0, hidden: int = 0) -> dict[str, tuple]:
    """Reference name -> (our name, shape), in the order the reference registers its parameters (which MDLM's
    EMA shadow params follow)."""
    block = {
        "norm1.weight": ("norm1.weight", (d,)),
        "attn_qkv.weight": ("attn.qkv.weight", (3 * d, d)),
        "attn_out.weight": ("attn.out.weight", (d, d)),
        "norm2.weight": ("norm2.weight", (d,)),
        "mlp.0.weight": ("mlp.fc.weight", (hidden, d)),
        "mlp.0.bias": ("mlp.fc.bias", (hidden,)),
        "mlp.2.weight": ("mlp.proj.weight", (d, hidden)),
        "mlp.2.bias": ("mlp.proj.bias", (d,)),
        "adaLN_modulation.weight": ("adaLN.weight", (6 * d, cond)),
        "adaLN_modulation.bias": ("adaLN.bias", (6 * d,)),
    }
    return {
        "vocab_embed.embedding": ("embed.weight", (vocab, d)),
        "sigma_map.mlp.0.weight": ("time_embed.mlp.0.weight", (cond, FREQ_DIM)),
        "sigma_map.mlp.0.bias": ("time_embed.mlp.0.bias", (cond,)),
        "sigma_map.mlp.2.weight": ("time_embed.mlp.2.weight", (cond, cond)),
        "sigma_map.mlp.2.bias": ("time_embed.mlp.2.bias", (cond,)),
        **{f"blocks.{i}.{k}": (f"blocks.{i}.{name}", shape) for i in range(n_layers) for k, (name, shape) in
           block.items()},
        "output_layer.norm_final.weight": ("final.norm.weight", (d,)),
        "output_layer.linear.weight": ("final.linear.weight", (vocab, d)),
        "output_layer.linear.bias": ("final.linear.bias", (vocab,)),
        "output_layer.adaLN_modulation.weight": ("final.adaLN.weight", (2 * d, cond)),
        "output_layer.adaLN_modulation.bias": ("final.adaLN.bias", (2 * d,)),
    }


def mdlm_parameter_names(n_layers: int) -> list[str]:
    """The reference DiT's parameter names in ``backbone.parameters()`` order (buffers excluded)."""
    return list(_parameters(n_layers))


def _reference_keys(sd: Mapping) -> dict[str, Tensor]:
    """The backbone's entries under the reference's names: no ``backbone.``/``_orig_mod.`` prefix, no ``noise.*``
    (MDLM's schedule), ``adaLN_modulation.1`` (DiT's Sequential(SiLU, Linear)) read as ``adaLN_modulation``."""
    out = {}
    for key, value in sd.items():
        key = str(key)
        if not key.startswith("noise."):
            key = key.removeprefix("backbone.").removeprefix("_orig_mod.")
            out[key.replace("adaLN_modulation.1.", "adaLN_modulation.")] = value
    return out


def _n_layers(keys) -> int:
    return max((int(m.group(1)) + 1 for k in keys if (m := _BLOCK_KEY.fullmatch(k))), default=0)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def convert_mdlm_state_dict(sd: Mapping, n_heads: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """(state dict for ``DiT`` with ``layout="mdlm"``, ``DiTConfig`` arguments but ``max_seq_len``) from a reference
    state dict. The sizes come from the shapes, but the number of heads changes none: ``n_heads``, else
    ``rotary_emb.inv_freq`` (head_dim / 2 frequencies; must agree with ``n_heads``), else ``d_model // 64``."""
    ref = _reference_keys(sd)
    n_layers = _n_layers(ref)
    expected = mdlm_parameter_names(n_layers)
    missing = [k for k in expected if k not in ref]
    unknown = [k for k in ref if k not in expected and k != _INV_FREQ]
    if unknown:
        raise UserError(f"not an MDLM DiT state dict: unknown keys {_few(unknown)}")
    if missing:
        raise UserError(f"MDLM state dict is incomplete: missing {_few(missing)}")
    if n_layers == 0:
        raise UserError("MDLM state dict has no blocks")

    vocab_size, d_model = ref["vocab_embed.embedding"].shape
    cond_dim, freq_dim = ref["sigma_map.mlp.0.weight"].shape
    hidden = ref["blocks.0.mlp.0.weight"].shape[0]
    if freq_dim != FREQ_DIM or hidden % d_model:
        raise UserError(f"MDLM state dict: unexpected shapes (time features {freq_dim}, MLP {hidden} for width "
                        f"{d_model}); this importer reads MDLM's DiT with 256 time features")
    table = _parameters(n_layers, vocab_size, d_model, cond_dim, hidden)
    for key, (_, shape) in table.items():
        if tuple(ref[key].shape) != shape:
            raise UserError(f"MDLM state dict: {key} has shape {tuple(ref[key].shape)}, expected {shape} "
                            f"(vocab {vocab_size}, width {d_model}, cond {cond_dim})")
    config = dict(vocab_size=int(vocab_size), n_layers=n_layers, d_model=int(d_model),
                  n_heads=_heads(ref.get(_INV_FREQ), d_model, n_heads), cond_dim=int(cond_dim),
                  mlp_ratio=hidden // d_model, layout="mdlm")
    return {name: ref[key] for key, (name, _) in table.items()}, config


def _heads(inv_freq: Tensor | None, d_model: int, n_heads: int | None) -> int:
    if inv_freq is not None:
        head_dim = 2 * inv_freq.numel()
        if d_model % head_dim:
            raise UserError(f"MDLM state dict: rotary_emb.inv_freq has {inv_freq.numel()} frequencies (head size "
                            f"{head_dim}), which does not divide the width {d_model}")
        if n_heads is not None and n_heads * head_dim != d_model:
            raise UserError(f"n_heads={n_heads} gives heads of size {d_model // n_heads}, but the checkpoint's "
                            f"rotary_emb.inv_freq is for heads of size {head_dim} ({d_model // head_dim} heads)")
        expected = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        if not torch.allclose(inv_freq.float().cpu(), expected, rtol=1e-4, atol=0.0):
            raise UserError("MDLM state dict: rotary_emb.inv_freq is not GPT-NeoX rotary with base 10000")
        return d_model // head_dim
    if n_heads is None:
        if d_model % 64:
            raise UserError(f"cannot tell the number of heads of a {d_model}-wide MDLM model without "
                            "rotary_emb.inv_freq or a config: pass n_heads")
        n_heads = d_model // 64
    if n_heads < 1 or d_model % n_heads or (d_model // n_heads) % 2:
        raise UserError(f"n_heads={n_heads} does not split the width {d_model} into heads of even size")
    return n_heads


class _StandIn(dict):
    """What an object of a class outside ``_REAL_MODULES`` unpickles to: a dict of its items (Lightning's
    ``AttributeDict``) and attributes, or its list items."""

    list_items = ()

    def __init__(self, *args, **kwargs):  # the arguments a pickle calls the class with are not needed
        super().__init__()

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (__dict__, slots)
        if isinstance(state, dict):
            self.update(state)

    def append(self, item) -> None:  # pickle's APPENDS falls back to append where there is no extend
        self.list_items = [*self.list_items, item]


# Only tensors, containers and numpy scalars are really imported; everything else (omegaconf, Lightning objects, ...)
# becomes a stand-in: a checkpoint loads whatever is installed and constructs nothing else.
_REAL_MODULES = ("torch", "collections", "numpy", "_codecs")
_REAL_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "str", "int", "float",
                  "bool", "list", "dict", "tuple", "object"}


class _PermissiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in _REAL_MODULES or (module == "builtins" and name in _REAL_BUILTINS):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        return type(name, (_StandIn,), {"__module__": __name__})


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load
_permissive_pickle = types.SimpleNamespace(
    __name__="mdlm_kit_permissive_pickle",
    Unpickler=_PermissiveUnpickler,
    load=lambda f, **kw: _PermissiveUnpickler(f, **kw).load(),
)


def _plain(obj, depth: int = 0):
    """Stand-ins and containers as plain dicts and lists; omegaconf nodes as their contents and values."""
    if depth > 50:
        return None
    if isinstance(obj, _StandIn):
        for key in ("_content", "_val"):  # omegaconf: a DictConfig's or ListConfig's nodes, a value node's value
            if key in obj:
                return _plain(obj[key], depth + 1)
        return _plain(dict(obj) or obj.list_items or None, depth + 1)
    if isinstance(obj, Mapping):
        return {k: _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    return obj


def _get(cfg: dict, *paths: str):
    """The first of ``paths`` (dotted) set in ``cfg``; unresolved interpolations and MISSING count as unset."""
    for path in paths:
        node = cfg
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not (isinstance(node, str) and ("${" in node or node == "???")):
            return node
    return None


def _settings(cfg) -> dict:
    """What the importer reads from a config: MDLM's Hydra config (nested) or its Hugging Face config (flat)."""
    cfg = cfg if isinstance(cfg, dict) else {}
    return {
        "n_heads": _get(cfg, "model.n_heads", "n_heads"),
        "d_model": _get(cfg, "model.hidden_size", "hidden_dim", "hidden_size"),
        "cond_dim": _get(cfg, "model.cond_dim", "cond_dim"),
        "n_layers": _get(cfg, "model.n_blocks", "n_blocks"),
        "vocab_size": _get(cfg, "vocab_size"),
        "length": _get(cfg, "model.length", "model_length", "length"),
        "time_conditioning": _get(cfg, "time_conditioning"),
        "eps": _get(cfg, "noise.eps", "eps") if _get(cfg, "noise.type") in (None, "loglinear") else None,
        "dropout": _get(cfg, "model.dropout", "dropout"),
        "data": _get(cfg, "data.train"),
        "wrap": _get(cfg, "data.wrap"),
        "tokenizer": _get(cfg, "data.tokenizer_name_or_path"),
        "parameterization": _get(cfg, "parameterization"),
        "change_of_variables": _get(cfg, "training.change_of_variables", "change_of_variables"),
    }


def _read(path: Path, map_location, use_ema: bool) -> tuple[dict[str, Tensor], dict, bool]:
    """(reference state dict, config settings, whether EMA weights were applied) from any supported format."""
    from safetensors.torch import load_file

    cfg, shadow = {}, None
    weights = path / "model.safetensors" if path.is_dir() else path
    if path.is_dir():
        if not weights.is_file():
            raise UserError(f"{path} is a folder without model.safetensors; expected an MDLM Hugging Face folder")
        if (path / "config.json").is_file():
            try:
                cfg = json.loads((path / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path / 'config.json'} is not valid JSON ({e.msg})") from None
    elif not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if weights.suffix == ".safetensors":
        try:
            sd = load_file(str(weights), device="cpu")
        except Exception as e:
            raise UserError(f"{weights} is not a readable safetensors file ({type(e).__name__})")
    else:
        try:  # mmap: a multi-GB Lightning checkpoint is mapped and only the backbone copied
            sd = torch.load(path, map_location=map_location, weights_only=False, mmap=zipfile.is_zipfile(path),
                            pickle_module=_permissive_pickle)
        except Exception as e:
            raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or corrupt")
        if not isinstance(sd, Mapping):
            raise UserError(f"{path} holds a {type(sd).__name__}, not a state dict or an MDLM checkpoint")
        if isinstance(sd.get("state_dict"), Mapping):
            hp, ema = sd.get("hyper_parameters"), sd.get("ema")
            cfg = _plain(hp.get("config")) if isinstance(hp, Mapping) else _plain(sd.get("config"))
            shadow = ema.get("shadow_params") if use_ema and isinstance(ema, Mapping) else None
            sd = sd["state_dict"]
    sd = _reference_keys(sd)
    return (_with_ema(sd, list(shadow), path) if shadow else sd), _settings(cfg), bool(shadow)


def _with_ema(sd: dict[str, Tensor], shadow: list, path: Path) -> dict[str, Tensor]:
    """The state dict with MDLM's EMA weights, which follow chain(backbone.parameters(), noise.parameters())."""
    names = mdlm_parameter_names(_n_layers(sd))
    if len(shadow) < len(names):
        raise UserError(f"{path}: the EMA holds {len(shadow)} tensors, fewer than the backbone's {len(names)} "
                        "parameters; load with use_ema=False for the raw weights")
    for name, value in zip(names, shadow):  # extra entries: the noise schedule's parameters
        if name in sd and tuple(sd[name].shape) != tuple(value.shape):
            raise UserError(f"{path}: EMA entry for {name} has shape {tuple(value.shape)}, the weight "
                            f"{tuple(sd[name].shape)}; load with use_ema=False for the raw weights")
    return sd | dict(zip(names, shadow))


def _data_module(vocab_size: int, tokenizer, settings: dict, seq_len: int):
    """A TextDataModule with a tokenizer giving ``vocab_size`` ids with the mask (no corpus is read)."""
    from mdlm_kit.data import TextDataModule
    from mdlm_kit.data.recipes import is_dataset_name
    from mdlm_kit.data.tokenizers import Tokenizer, load_hf_tokenizer

    if tokenizer is None:
        if vocab_size != GPT2_VOCAB:
            named = f" (its config names {settings['tokenizer']!r})" if settings.get("tokenizer") else ""
            raise UserError(f"the MDLM model has a vocabulary of {vocab_size} ids, not GPT-2's {GPT2_VOCAB}: "
                            f"pass the tokenizer it was trained with{named}")
        tokenizer = "gpt2"
    if isinstance(tokenizer, Tokenizer):
        name, tok_state = getattr(tokenizer, "name", None) or tokenizer.kind, tokenizer.to_dict()
    elif tokenizer == "gpt2":
        name, tok_state = "gpt2", {"kind": "gpt2"}
    elif tokenizer in ("char", "bpe"):
        raise UserError(f"tokenizer {tokenizer!r} is trained on a corpus; for an imported model give gpt2, a "
                        "Hugging Face tokenizer name or folder, or a Tokenizer object")
    else:
        name, tok_state = tokenizer, load_hf_tokenizer(tokenizer).to_dict()
    # MDLM's data config name (openwebtext-split, lm1b-wrap, ...) as one of this toolkit's recipes
    data = settings.get("data") if isinstance(settings.get("data"), str) else ""
    data = {"scientific_papers_pubmed": "pubmed", "scientific_papers_arxiv": "arxiv"}.get(data, data)
    corpus = next((c for c in (data, data.split("-")[0]) if c and is_dataset_name(c)),
                  "openwebtext" if vocab_size == GPT2_VOCAB else "shakespeare")
    # MDLM's OpenWebText blocks: documents joined with EOS, each block [BOS] ... [EOS] (data.wrap)
    packing = "pad" if settings.get("wrap") is False else "wrap"
    dm = TextDataModule(corpus=corpus, tokenizer=name, seq_len=seq_len, packing=packing)
    dm.load_state_dict({"tokenizer": tok_state})  # the tokenizer now, without preparing the corpus
    if dm.model_vocab_size != vocab_size:
        raise UserError(
            f"tokenizer {name!r} gives {dm.model_vocab_size - 1} tokens + the mask = {dm.model_vocab_size} ids, but "
            f"the MDLM model has {vocab_size}; (MDLM models whose tokenizer has its own mask token, such as "
            "BERT's for LM1B, keep the mask inside the vocabulary, which this toolkit does not support)"
        )
    return dm


def load_mdlm_checkpoint(path: str | Path, tokenizer=None, n_heads: int | None = None, use_ema: bool = True,
                         map_location: str = "cpu"):
    """(``LanguageModel`` in eval mode, ``TextDataModule``) from an MDLM Lightning ``.ckpt``, a state dict file, a
    ``.safetensors`` file, or a folder with ``model.safetensors`` (and optionally ``config.json``). ``tokenizer``:
    ``gpt2`` (the default for GPT-2's 50,258 ids with the mask), a Hugging Face name or folder, or a ``Tokenizer``;
    ``n_heads``: default the config's, else ``convert_mdlm_state_dict``'s; ``use_ema``: as MDLM evaluates."""
    from mdlm_kit.families import MaskedDiffusion
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.models import Backbone

    path = Path(path)
    ref, settings, used_ema = _read(path, map_location, use_ema)
    if settings["parameterization"] not in (None, "subs"):
        raise UserError(f"{path} was trained with MDLM's {settings['parameterization']!r} parameterization; only "
                        "'subs' (masked diffusion) models can be imported")
    if settings["change_of_variables"]:
        raise UserError(f"{path} was trained with change_of_variables (the backbone is conditioned on t, not "
                        "sigma); only the default sigma conditioning can be imported")
    heads = n_heads if n_heads is not None else settings["n_heads"]
    sd, cfg = convert_mdlm_state_dict(ref, int(heads) if heads is not None else None)
    for key, what in (("d_model", "width (hidden_size / hidden_dim)"), ("cond_dim", "cond_dim"),
                      ("n_layers", "number of blocks (n_blocks)"), ("vocab_size", "vocab_size")):
        if settings[key] is not None and int(settings[key]) != cfg[key]:
            raise UserError(f"{path}: the config gives {what} {settings[key]} but the weights have {cfg[key]}")
    if cfg["mlp_ratio"] != 4:
        raise UserError(f"{path}: MLP width {cfg['mlp_ratio']}x the model width; the toolkit's DiT builds 4x (MDLM's)")
    seq_len = int(settings["length"] or 1024)
    eps = float(settings["eps"]) if settings["eps"] is not None else 1e-3
    backbone = Backbone(
        size="small", n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"],
        cond_dim=cfg["cond_dim"], max_seq_len=seq_len, layout="mdlm",
        dropout=float(settings["dropout"] or 0.0),  # MDLM's training dropout, for fine-tuning (eval mode ignores it)
    )
    # MDLM's default (and its OpenWebText model) is time-agnostic. The conditioning is sigma = -log(alpha_t)
    # whatever MDLM's noise type was, so the loglinear schedule serves any checkpoint
    family = MaskedDiffusion(LogLinear(eps), time_conditioning=bool(settings["time_conditioning"] or False))
    model = LanguageModel(cfg["vocab_size"], backbone, family)
    model.backbone.load_state_dict(sd)
    model.eval()
    model.imported_weights = "ema" if used_ema else "raw"  # what `mdlm-kit export` reports
    log.info("imported MDLM model from %s (%s weights, %d heads)", path, "EMA" if used_ema else "raw",
             cfg["n_heads"])
    return model, _data_module(cfg["vocab_size"], tokenizer, settings, seq_len)


def _looks_like_mdlm(keys) -> bool:
    keys = [str(k) for k in keys]
    return any(k.endswith("vocab_embed.embedding") for k in keys) and any("sigma_map.mlp." in k for k in keys)


def is_mdlm_checkpoint(obj_or_path) -> bool:
    """Whether ``obj_or_path`` (a loaded dict, a file or a folder) is an MDLM checkpoint; never raises. Cheap for
    files: a safetensors header, or a zip-format torch file's pickle scanned for the reference's parameter names."""
    try:
        if isinstance(obj_or_path, Mapping):
            sd = obj_or_path.get("state_dict")
            sd = sd if isinstance(sd, Mapping) else obj_or_path
            return "mdlm_kit_model" not in obj_or_path and _looks_like_mdlm(sd)
        path = Path(obj_or_path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            return False
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return _looks_like_mdlm(f.keys())
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
            return b"vocab_embed.embedding" in data and b"sigma_map.mlp." in data and b"mdlm_kit_model" not in data
        return is_mdlm_checkpoint(torch.load(path, map_location="cpu", weights_only=False,
                                             pickle_module=_permissive_pickle))
    except Exception:
        return False
