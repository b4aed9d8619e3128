"""The Hugging Face export read back into the toolkit (``load_export``). Importing this module registers the export's
classes with the Auto classes, so in this process an export loads without ``trust_remote_code``."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from mdlm_kit.errors import UserError
from mdlm_kit.io.ckpt import check_kind, known_kwargs, load_weights
from mdlm_kit.io.configuration_mdlm_kit import MdlmKitConfig
from mdlm_kit.io.modeling_mdlm_kit import MdlmKitForCausalLM, MdlmKitForMaskedLM

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
AUTO_CLASSES = {"diffusion": (AutoModelForMaskedLM, MdlmKitForMaskedLM),
                "autoregressive": (AutoModelForCausalLM, MdlmKitForCausalLM)}

# exist_ok: a second import (importlib.reload, a notebook re-running cells) re-registers instead of failing
AutoConfig.register(MdlmKitConfig.model_type, MdlmKitConfig, exist_ok=True)
for _auto, _cls in AUTO_CLASSES.values():
    _auto.register(MdlmKitConfig, _cls, exist_ok=True)


def _read_weights(folder: Path, device: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = folder / WEIGHTS_INDEX
    if index.is_file():  # sharded: save_pretrained splits files above max_shard_size
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        raise UserError(f"{folder} has no {WEIGHTS}; the export is incomplete")
    state = {}
    for name in shards:
        try:
            state.update(load_file(folder / name, device=device))
        except Exception as e:
            raise UserError(f"{folder / name} is not a readable safetensors file ({type(e).__name__}); it may be "
                            "truncated or corrupt") from None
    return state


def load_export(path: str | Path, map_location: str = "cpu", kind: str | None = None):
    """``mdlm_kit.io.load_checkpoint`` for a folder written by ``export``: the ``LanguageModel`` of config.json's DiT,
    kind, schedule and ``num_steps`` (constructor defaults for the training settings) and the data module."""
    from mdlm_kit.data import TextDataModule
    from mdlm_kit.families import FAMILIES, MaskedDiffusion
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.models import Backbone, DiTConfig

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} is a folder but not an mdlm-kit export (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_file} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != MdlmKitConfig.model_type:
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise UserError(f"{path} is a folder but not an mdlm-kit export (config.json has model_type {found!r})")
    family, dit = FAMILIES.get(cfg.get("kind", "diffusion")), cfg.get("dit_config")
    if family is None or not isinstance(dit, dict) or not isinstance(cfg.get("data"), dict):
        raise UserError(f"{cfg_file}: no model kind, dit_config and data that mdlm-kit knows; re-export the checkpoint")
    check_kind(path, family.kind, kind)
    family = (MaskedDiffusion(cfg.get("schedule"), cfg.get("num_steps"), time_conditioning=bool(dit.get(
        "time_conditioning"))) if family is MaskedDiffusion else family())
    config = DiTConfig(**{k: v for k, v in dit.items() if k in DiTConfig.__dataclass_fields__})
    model = LanguageModel(config.vocab_size, Backbone.of(config), family)
    state = _read_weights(path, map_location)
    if outside := [k for k in state if not k.startswith("backbone.")]:
        raise UserError(f"{path}: weights outside the backbone ({outside[0]})")
    load_weights(path, model.backbone, {k.removeprefix("backbone."): v for k, v in state.items()})
    model.eval()
    dm = TextDataModule(**known_kwargs(TextDataModule, cfg["data"]))
    if cfg.get("tokenizer_spec") is not None:
        dm.load_state_dict({"tokenizer": cfg["tokenizer_spec"]})
    return model, dm
