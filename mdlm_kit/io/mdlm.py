"""Importing checkpoints of the MDLM reference implementation (kuleshov-group/mdlm) into this toolkit.

The reference DiT maps one to one onto ``DiT`` with ``layout="mdlm"`` (see ``mdlm_kit.models.dit``); only
the parameter names differ. Three formats are read:

- an MDLM Lightning ``.ckpt``: ``state_dict`` with ``backbone.*`` (and maybe ``noise.*``) keys, the EMA
  weights MDLM evaluates with under ``ema.shadow_params``, and ``hyper_parameters.config`` (an omegaconf
  ``DictConfig``, read without omegaconf installed);
- a plain state dict file, or a dict holding one under ``state_dict``;
- a Hugging Face folder (``kuleshov-group/mdlm-owt``): ``model.safetensors`` and an optional ``config.json``.

Only load checkpoints you trust: ``.ckpt`` files are pickles.
"""

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

# reference name -> ours, in the order the reference registers its parameters (EMA shadow params follow it)
_TOP = {
    "vocab_embed.embedding": "embed.weight",
    "sigma_map.mlp.0.weight": "time_embed.mlp.0.weight",
    "sigma_map.mlp.0.bias": "time_embed.mlp.0.bias",
    "sigma_map.mlp.2.weight": "time_embed.mlp.2.weight",
    "sigma_map.mlp.2.bias": "time_embed.mlp.2.bias",
}
_BLOCK = {
    "norm1.weight": "norm1.weight",
    "attn_qkv.weight": "attn.qkv.weight",
    "attn_out.weight": "attn.out.weight",
    "norm2.weight": "norm2.weight",
    "mlp.0.weight": "mlp.fc.weight",
    "mlp.0.bias": "mlp.fc.bias",
    "mlp.2.weight": "mlp.proj.weight",
    "mlp.2.bias": "mlp.proj.bias",
    "adaLN_modulation.weight": "adaLN.weight",
    "adaLN_modulation.bias": "adaLN.bias",
}
_FINAL = {
    "output_layer.norm_final.weight": "final.norm.weight",
    "output_layer.linear.weight": "final.linear.weight",
    "output_layer.linear.bias": "final.linear.bias",
    "output_layer.adaLN_modulation.weight": "final.adaLN.weight",
    "output_layer.adaLN_modulation.bias": "final.adaLN.bias",
}
_INV_FREQ = "rotary_emb.inv_freq"  # a buffer: checked, not loaded (our rotary tables are computed)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def mdlm_parameter_names(n_layers: int) -> list[str]:
    """The reference DiT's parameter names in ``backbone.parameters()`` order (buffers excluded)."""
    blocks = [f"blocks.{i}.{k}" for i in range(n_layers) for k in _BLOCK]
    return [*_TOP, *blocks, *_FINAL]


def _reference_keys(sd: Mapping) -> dict[str, Tensor]:
    """The backbone's entries under the reference's own names: ``backbone.`` / ``_orig_mod.`` prefixes
    dropped, ``noise.*`` (MDLM's noise schedule, no backbone weights) left out, and the
    ``adaLN_modulation.1`` spelling (DiT's Sequential(SiLU, Linear)) read as ``adaLN_modulation``."""
    out = {}
    for key, value in sd.items():
        key = str(key)
        if key.startswith("noise."):
            continue
        for prefix in ("backbone.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key.replace("adaLN_modulation.1.", "adaLN_modulation.")] = value
    return out


def _n_layers(keys) -> int:
    indices = {int(m.group(1)) for k in keys if (m := _BLOCK_KEY.fullmatch(k))}
    return max(indices) + 1 if indices else 0


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def convert_mdlm_state_dict(sd: Mapping, n_heads: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """(state dict for ``DiT`` with ``layout="mdlm"``, ``DiTConfig`` keyword arguments) from a reference state dict.

    Keys may carry the ``backbone.`` prefix of MDLM's Lightning checkpoints and Hugging Face files.
    ``vocab_size``, ``n_layers``, ``d_model``, ``cond_dim`` and ``mlp_ratio`` come from the shapes. The number of
    heads does not change any shape: it comes from ``n_heads``, else from ``rotary_emb.inv_freq`` (head_dim / 2
    frequencies) when present, else ``d_model // 64`` (MDLM's small and medium); an ``n_heads`` that contradicts
    ``inv_freq`` is an error. ``max_seq_len`` is not in the weights; the caller sets it.
    """
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
    shapes = {
        "sigma_map.mlp.0.bias": (cond_dim,), "sigma_map.mlp.2.weight": (cond_dim, cond_dim),
        "sigma_map.mlp.2.bias": (cond_dim,), "output_layer.norm_final.weight": (d_model,),
        "output_layer.linear.weight": (vocab_size, d_model), "output_layer.linear.bias": (vocab_size,),
        "output_layer.adaLN_modulation.weight": (2 * d_model, cond_dim),
        "output_layer.adaLN_modulation.bias": (2 * d_model,),
    }
    block_shapes = {
        "norm1.weight": (d_model,), "attn_qkv.weight": (3 * d_model, d_model), "attn_out.weight": (d_model, d_model),
        "norm2.weight": (d_model,), "mlp.0.weight": (hidden, d_model), "mlp.0.bias": (hidden,),
        "mlp.2.weight": (d_model, hidden), "mlp.2.bias": (d_model,),
        "adaLN_modulation.weight": (6 * d_model, cond_dim), "adaLN_modulation.bias": (6 * d_model,),
    }
    shapes.update({f"blocks.{i}.{k}": s for i in range(n_layers) for k, s in block_shapes.items()})
    for key, shape in shapes.items():
        if tuple(ref[key].shape) != shape:
            raise UserError(f"MDLM state dict: {key} has shape {tuple(ref[key].shape)}, expected {shape} "
                            f"(vocab {vocab_size}, width {d_model}, cond {cond_dim})")

    n_heads = _heads(ref.get(_INV_FREQ), d_model, n_heads)
    ours = {"embed.weight": ref["vocab_embed.embedding"]}
    ours.update({dst: ref[src] for src, dst in (_TOP | _FINAL).items()})
    for i in range(n_layers):
        ours.update({f"blocks.{i}.{dst}": ref[f"blocks.{i}.{src}"] for src, dst in _BLOCK.items()})
    config = dict(vocab_size=int(vocab_size), n_layers=n_layers, d_model=int(d_model), n_heads=n_heads,
                  cond_dim=int(cond_dim), mlp_ratio=hidden // d_model, layout="mdlm")
    return ours, config


def _heads(inv_freq: Tensor | None, d_model: int, n_heads: int | None) -> int:
    """The number of heads: given, else from the rotary frequencies, else MDLM's 64-wide heads."""
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


# ---- reading MDLM's pickles without omegaconf, lightning or transformers ----


class _StandIn(dict):
    """What an object of a class outside the allowed modules unpickles to: its arguments and state, for reading.

    A dict subclass, so pickled dict subclasses (Lightning's ``AttributeDict``) keep their items.
    """

    origin = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.list_items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.list_items.append(item)

    def extend(self, items) -> None:
        self.list_items.extend(items)


# Modules whose classes are really imported: tensors, containers, numpy scalars. Everything else (omegaconf's
# DictConfig, Lightning and transformers objects in hyper_parameters, ...) becomes a stand-in, so a checkpoint
# loads whatever is installed, and loading it constructs nothing beyond tensors and containers.
_REAL_MODULES = ("torch", "collections", "numpy", "_codecs")
_REAL_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "str", "int", "float",
                  "bool", "list", "dict", "tuple", "object"}


class _PermissiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        root = module.split(".")[0]
        if root in _REAL_MODULES or (module == "builtins" and name in _REAL_BUILTINS):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        return type(name, (_StandIn,), {"origin": f"{module}.{name}", "__module__": __name__})


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
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (__dict__, slots)
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return _plain(state["_content"], depth + 1)
            if "_val" in state:  # omegaconf value node
                return _plain(state["_val"], depth + 1)
            return {**_plain(dict(obj), depth + 1), **{k: _plain(v, depth + 1) for k, v in state.items()}}
        if len(obj):
            return _plain(dict(obj), depth + 1)
        if obj.list_items:
            return [_plain(v, depth + 1) for v in obj.list_items]
        return None
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
        if node is None or (isinstance(node, str) and ("${" in node or node == "???")):
            continue
        return node
    return None


def _settings(cfg) -> dict:
    """What the importer reads from a config: MDLM's Hydra config (nested) or its Hugging Face config (flat)."""
    cfg = cfg if isinstance(cfg, dict) else {}
    noise_type = _get(cfg, "noise.type")
    return {
        "n_heads": _get(cfg, "model.n_heads", "n_heads"),
        "d_model": _get(cfg, "model.hidden_size", "hidden_dim", "hidden_size"),
        "cond_dim": _get(cfg, "model.cond_dim", "cond_dim"),
        "n_layers": _get(cfg, "model.n_blocks", "n_blocks"),
        "vocab_size": _get(cfg, "vocab_size"),
        "length": _get(cfg, "model.length", "model_length", "length"),
        "time_conditioning": _get(cfg, "time_conditioning"),
        "eps": _get(cfg, "noise.eps", "eps") if noise_type in (None, "loglinear") else None,
        "dropout": _get(cfg, "model.dropout", "dropout"),
        "data": _get(cfg, "data.train"),
        "wrap": _get(cfg, "data.wrap"),
        "tokenizer": _get(cfg, "data.tokenizer_name_or_path"),
        "parameterization": _get(cfg, "parameterization"),
        "change_of_variables": _get(cfg, "training.change_of_variables", "change_of_variables"),
    }


def _read_pickle(path: Path, map_location) -> object:
    mmap = zipfile.is_zipfile(path)  # a multi-GB Lightning checkpoint: map it, copy only the backbone
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap,
                          pickle_module=_permissive_pickle)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or corrupt")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__})")


def _read(path: Path, map_location, use_ema: bool) -> tuple[dict[str, Tensor], dict, bool]:
    """(reference state dict, config settings, whether EMA weights were applied) from any supported format."""
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path} is a folder without model.safetensors; expected an MDLM Hugging Face folder")
        cfg = {}
        if (path / "config.json").is_file():
            try:
                cfg = json.loads((path / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path / 'config.json'} is not valid JSON ({e.msg})") from None
        return _reference_keys(_read_safetensors(weights)), _settings(cfg), False
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _reference_keys(_read_safetensors(path)), _settings({}), False
    obj = _read_pickle(path, map_location)
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict or an MDLM checkpoint")
    if isinstance(obj.get("state_dict"), Mapping):
        sd = _reference_keys(obj["state_dict"])
        hp = obj.get("hyper_parameters")
        cfg = _plain(hp.get("config")) if isinstance(hp, Mapping) else _plain(obj.get("config"))
        ema = obj.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
        used = bool(use_ema and shadow)
        if used:
            sd = _with_ema(sd, list(shadow), path)
        return sd, _settings(cfg), used
    return _reference_keys(obj), _settings({}), False


def _with_ema(sd: dict[str, Tensor], shadow: list, path: Path) -> dict[str, Tensor]:
    """The state dict with MDLM's EMA weights, which follow chain(backbone.parameters(), noise.parameters())."""
    names = mdlm_parameter_names(_n_layers(sd))
    if len(shadow) < len(names):
        raise UserError(f"{path}: the EMA holds {len(shadow)} tensors, fewer than the backbone's {len(names)} "
                        "parameters; load with use_ema=False for the raw weights")
    out = dict(sd)
    for name, value in zip(names, shadow):  # extra entries: the noise schedule's parameters
        if name in sd and tuple(sd[name].shape) != tuple(value.shape):
            raise UserError(f"{path}: EMA entry for {name} has shape {tuple(value.shape)}, the weight "
                            f"{tuple(sd[name].shape)}; load with use_ema=False for the raw weights")
        out[name] = value
    return out


def _corpus(name) -> str | None:
    """MDLM's data config name (``openwebtext-split``, ``lm1b-wrap``, ...) as one of this toolkit's recipes."""
    from mdlm_kit.data.recipes import is_dataset_name

    if not isinstance(name, str):
        return None
    name = {"scientific_papers_pubmed": "pubmed", "scientific_papers_arxiv": "arxiv"}.get(name, name)
    for candidate in (name, name.split("-")[0]):
        if is_dataset_name(candidate):
            return candidate
    return None


def _data_module(vocab_size: int, tokenizer, settings: dict, seq_len: int):
    """A TextDataModule with a tokenizer giving ``vocab_size`` ids with the mask (no corpus is read)."""
    from mdlm_kit.data import TextDataModule
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
    corpus = _corpus(settings.get("data")) or ("openwebtext" if vocab_size == GPT2_VOCAB else "shakespeare")
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
    """(``LanguageModel`` in eval mode, ``TextDataModule``) from an MDLM checkpoint.

    Args:
        path: an MDLM Lightning ``.ckpt``, a state dict file (or a dict with ``state_dict``), a ``.safetensors``
            file, or a Hugging Face folder with ``model.safetensors`` and optionally ``config.json``.
        tokenizer: ``gpt2`` (the default for GPT-2's vocabulary of 50,258 ids with the mask), a Hugging Face
            tokenizer name or folder, or a ``mdlm_kit.data.tokenizers.Tokenizer``; its vocabulary plus the
            mask must equal the model's.
        n_heads: number of attention heads (default: the checkpoint's config, else from the rotary
            frequencies, else width // 64).
        use_ema: use the EMA weights of a Lightning checkpoint when it has them (MDLM evaluates with them).
        map_location: where tensors are loaded.
    """
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
    # MDLM's default (and its OpenWebText model) is time-agnostic. The conditioning is sigma = -log(alpha_t)
    # whatever MDLM's noise type was, so the loglinear schedule serves any checkpoint
    time_conditioning = bool(settings["time_conditioning"] or False)
    backbone = Backbone(
        size="small", n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"],
        cond_dim=cfg["cond_dim"], max_seq_len=seq_len, layout="mdlm",
        dropout=float(settings["dropout"] or 0.0),  # MDLM's training dropout, for fine-tuning (eval mode ignores it)
    )
    family = MaskedDiffusion(LogLinear(eps), time_conditioning=time_conditioning)
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
    """Whether ``obj_or_path`` (a loaded dict, a file or a folder) is an MDLM checkpoint this module reads.

    Cheap for files: a safetensors header, or the pickle of a zip-format torch file scanned for the reference's
    parameter names without loading any tensor. Never raises.
    """
    try:
        if isinstance(obj_or_path, Mapping):
            if "mdlm_kit_model" in obj_or_path:
                return False
            sd = obj_or_path.get("state_dict")
            return _looks_like_mdlm((sd if isinstance(sd, Mapping) else obj_or_path).keys())
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
                pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
                if pkl is None:
                    return False
                data = z.read(pkl)
            return b"vocab_embed.embedding" in data and b"sigma_map.mlp." in data and b"mdlm_kit_model" not in data
        return is_mdlm_checkpoint(torch.load(path, map_location="cpu", weights_only=False,
                                             pickle_module=_permissive_pickle))
    except Exception:
        return False
