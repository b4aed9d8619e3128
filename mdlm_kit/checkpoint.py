"""Loading a trained checkpoint with its data module (and so its tokenizer)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from mdlm_kit.errors import UserError


def _known_kwargs(cls, kwargs: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def load_checkpoint(path: str | Path, map_location: str = "cpu"):
    """(MaskedDiffusionLM in eval mode, TextDataModule with the checkpoint's tokenizer) from a ``.ckpt`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or corrupt")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not an mdlm-kit checkpoint (no state_dict/hyper_parameters)")
    from mdlm_kit.data import TextDataModule
    from mdlm_kit.lightning import MaskedDiffusionLM

    model = MaskedDiffusionLM(**_known_kwargs(MaskedDiffusionLM, ckpt["hyper_parameters"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model described in it ({str(e).splitlines()[0]})") from None
    model.eval()
    dm_kwargs = _known_kwargs(TextDataModule, ckpt.get("datamodule_hyper_parameters", {}))
    dm = TextDataModule(**dm_kwargs)
    state = ckpt.get(TextDataModule.__qualname__)
    if state is not None:
        dm.load_state_dict(state)
    return model, dm
