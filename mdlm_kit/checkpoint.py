"""Loading a trained checkpoint with its data module (and so its tokenizer)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from mdlm_kit.errors import UserError


def known_kwargs(cls, kwargs: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


EXPORT_MODEL_TYPE = "mdlm_kit"  # config.json's model_type in a folder written by `mdlm-kit export`


RUN_KEY = "mdlm_kit_run"  # written into every .ckpt by callbacks.FinalCheckpoint: max_steps, why the run stopped


def run_info(ckpt: dict) -> dict:
    """How far the run that wrote a ``.ckpt`` got: ``steps``, ``max_steps``, ``stopped_early`` and ``stop_reason``.

    A checkpoint written before ``max_steps`` is reported as stopped early: with the reason the run recorded
    when it stopped (``max_time``, SIGTERM, ...), or as a checkpoint from the middle of a run. Checkpoints of
    versions that did not record it give ``None`` for what they do not say.
    """
    steps = int(ckpt.get("global_step", 0))
    record = ckpt.get(RUN_KEY)
    if record is None:
        return {"steps": steps, "max_steps": None, "stopped_early": None, "stop_reason": None}
    max_steps = record.get("max_steps")
    max_steps = None if max_steps in (None, -1) else int(max_steps)
    reason = record.get("stop_reason")
    if reason is None and max_steps is not None and steps < max_steps:
        reason = (f"the checkpoint was written at step {steps} of {max_steps}, before the run ended (a checkpoint "
                  "from the middle of the run, or the run was killed)")
    return {"steps": steps, "max_steps": max_steps, "stopped_early": reason is not None, "stop_reason": reason}


def is_export(path: str | Path) -> bool:
    """A folder written by ``mdlm-kit export`` (read without importing transformers)."""
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == EXPORT_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _model_class(ckpt: dict):
    """The LightningModule class that wrote ``ckpt``: recorded by the model, else by the CLI's class path."""
    from mdlm_kit.lightning import MODELS, MaskedDiffusionLM

    kind = ckpt.get("mdlm_kit_model")
    if kind is None:
        class_path = str(ckpt["hyper_parameters"].get("_class_path", ""))
        kind = next((k for k, cls in MODELS.items() if class_path.endswith("." + cls.__name__)), None)
    return MODELS.get(kind, MaskedDiffusionLM)


def load_checkpoint(path: str | Path, map_location: str = "cpu", kind: str | None = None):
    """(model in eval mode, TextDataModule with the checkpoint's tokenizer) from a ``.ckpt`` file, a folder
    written by ``mdlm-kit export`` (``mdlm_kit.hf.load_export``), or a checkpoint of the MDLM reference
    code (``mdlm_kit.models.mdlm_import``).

    The model is a ``MaskedDiffusionLM`` or an ``AutoregressiveLM``, whichever wrote the checkpoint;
    ``kind`` (``diffusion`` or ``autoregressive``) makes any other kind an error.
    """
    path = Path(path)
    from mdlm_kit.models.mdlm_import import is_mdlm_checkpoint, load_mdlm_checkpoint

    if is_mdlm_checkpoint(path):  # the MDLM reference code's .ckpt, state dict or Hugging Face folder
        if kind == "autoregressive":
            raise UserError(f"{path} is an MDLM (masked diffusion) checkpoint; this command needs an "
                            "autoregressive model")
        return load_mdlm_checkpoint(path, map_location=map_location)
    if path.is_dir():  # a Hugging Face export: every command that takes --checkpoint takes one
        from mdlm_kit.hf import load_export

        return load_export(path, map_location, kind)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; give a .ckpt file (DIR/checkpoints/last.ckpt) or an "
                        "mdlm-kit export folder")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or corrupt: "
                        "use another one (the step checkpoints beside it)") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not an mdlm-kit checkpoint (no state_dict/hyper_parameters)")
    from mdlm_kit.data import TextDataModule

    cls = _model_class(ckpt)
    if kind is not None and cls.kind != kind:
        need = {"diffusion": "a masked diffusion model", "autoregressive": "an autoregressive model"}[kind]
        raise UserError(f"{path} holds the {cls.kind} model {cls.__name__}; this command needs {need}")
    model = cls(**known_kwargs(cls, ckpt["hyper_parameters"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model described in it ({str(e).splitlines()[0]})") from None
    model.eval()
    model.run_info = run_info(ckpt)
    dm_hparams = dict(ckpt.get("datamodule_hyper_parameters", {}))
    if "separators" in dm_hparams and "packing" not in dm_hparams:  # checkpoints from before data.packing
        dm_hparams["packing"] = "stream" if dm_hparams.pop("separators") else "concat"
    dm_kwargs = known_kwargs(TextDataModule, dm_hparams)
    dm = TextDataModule(**dm_kwargs)
    state = ckpt.get(TextDataModule.__qualname__)
    if state is not None:
        dm.load_state_dict(state)
    return model, dm
