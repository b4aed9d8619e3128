"""The toolkit's own ``.ckpt`` files: reading them (memory-mapped, one line when broken), what the run that wrote
one got to, the checks before resuming from one, and the model and data module it holds."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from mdlm_kit.callbacks import RUN_KEY
from mdlm_kit.errors import UserError
from mdlm_kit.schedules import make_schedule


def known_kwargs(cls, kwargs: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


EXPORT_MODEL_TYPE = "mdlm_kit"  # config.json's model_type in a folder written by `mdlm-kit export`


def run_info(ckpt: dict) -> dict:
    """How far the run that wrote a ``.ckpt`` got: ``steps``, ``max_steps``, ``stopped_early`` and ``stop_reason``
    (``None`` where a checkpoint of an older version does not say)."""
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
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == EXPORT_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


BACKBONE_KEYS = ("size", "n_layers", "d_model", "n_heads", "cond_dim", "max_seq_len", "dropout", "conv_kernel",
                 "layout")
DIFFUSION_KEYS = ("num_steps", "estimator", "time_conditioning", "seed", "masked_only")


def is_flat(hparams: dict) -> bool:
    """Whether a checkpoint's ``hyper_parameters`` are the flat settings of the classes before ``LanguageModel``."""
    return "family" not in hparams and "backbone" not in hparams


def model_hparams(hparams: dict, kind: str | None = None) -> dict:
    """``LanguageModel``'s known arguments from a checkpoint's ``hyper_parameters``: this version's, or the flat
    settings of ``MaskedDiffusionLM``/``AutoregressiveLM`` before it (``kind`` or the class path says which)."""
    from mdlm_kit.lightning import LanguageModel

    h = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if not is_flat(h):
        return known_kwargs(LanguageModel, h)
    if kind == "autoregressive" or (kind is None and str(hparams.get("_class_path", "")).endswith("AutoregressiveLM")):
        family = {"class_path": "mdlm_kit.families.Autoregressive"}
    else:
        args = {k: h[k] for k in DIFFUSION_KEYS if k in h}
        if "ce_kernel" in h:
            args["kernel"] = h["ce_kernel"]
        schedule = h.get("schedule")
        if isinstance(schedule, str) or h.get("schedule_kwargs"):  # before schedules were class_path objects
            schedule = make_schedule(schedule, **dict(h.get("schedule_kwargs") or {})).spec()
        family = {"class_path": "mdlm_kit.families.MaskedDiffusion", "init_args": {**args, "schedule": schedule}}
    return {
        "vocab_size": h.get("vocab_size", 0),
        "backbone": {k: h[k] for k in BACKBONE_KEYS if k in h},
        "family": family,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {
            "lr": h.get("lr", 3e-4), "weight_decay": h.get("weight_decay", 0.0),
            "betas": list(h.get("betas", (0.9, 0.999)))}},
        "lr_scheduler": {"class_path": "mdlm_kit.lightning.WarmupCosine", "init_args": {
            "warmup_steps": h.get("warmup_steps", 2500), "decay_steps": h.get("decay_steps"),
            "min_lr_ratio": h.get("min_lr_ratio", 0.1)}},
        "unigram_bias": h.get("unigram_bias", False),
    }


# flat settings of the classes before LanguageModel that are set elsewhere now: (their default, where)
MOVED = {"compile": (False, "the mdlm_kit.callbacks.CompileBlocks callback"),
         "fused_adamw": (None, "--model.optimizer.init_args.fused true"),
         "on_nonfinite": ("stop", "fit --on_nonfinite")}


def moved_settings(hparams: dict) -> list[str]:
    """An older checkpoint's non-default settings that moved out of the model: ``name=value (where it is set now)``."""
    if not is_flat(hparams):
        return []
    return [f"{k}={hparams[k]!r} ({where})" for k, (default, where) in MOVED.items()
            if k in hparams and hparams[k] != default]


def build_model(ckpt: dict):
    """The ``LanguageModel`` a checkpoint describes (without its optimizer: for evaluation and fine-tuning)."""
    from mdlm_kit.lightning import LanguageModel

    h = model_hparams(ckpt["hyper_parameters"], ckpt.get("mdlm_kit_model"))
    return LanguageModel(h["vocab_size"], h.get("backbone") or {}, h.get("family"),
                         unigram_bias=h.get("unigram_bias", False))


def check_kind(path, found: str, wanted: str | None) -> None:
    if wanted is not None and found != wanted:
        need = {"diffusion": "a masked diffusion model", "autoregressive": "an autoregressive model"}[wanted]
        raise UserError(f"{path} holds a {found} model; this command needs {need}")


def load_weights(path, module, state: dict) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model described in it ({str(e).splitlines()[0]})") from None


def resolve_last(dirpaths: list[str]) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` in the checkpoint folders, as
    Lightning picks it (None if there is none; Lightning then starts afresh)."""
    found = [p for d in dirpaths if Path(d).is_dir() for p in Path(d).glob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint as Lightning reads it (``weights_only``), memory-mapped where the file system allows (cheap
    for any size); a UserError if it is truncated or corrupt."""
    for mmap in (True, False):  # some file systems cannot map files: read it whole before calling it broken
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else type(e).__name__
    raise UserError(f"--ckpt_path {path} is truncated or corrupt ({reason}); resume from another checkpoint "
                    "(the step checkpoints beside it) or start afresh without --ckpt_path")


def check_resume(path: str | Path, model, training: bool = True) -> None:
    """One line, before anything is written, if a run cannot start from ``path`` (missing, broken, another model's,
    or for training weights only). A sharded one (FSDP2's folder) is Lightning's to check."""
    path = Path(path).expanduser()
    if path.is_dir() and ((path / ".metadata").is_file() or (path / "meta.pt").is_file()):
        return
    if is_export(path):
        raise UserError(f"--ckpt_path {path} is a model folder (an export), not a training checkpoint; start from "
                        f"its weights with --checkpoint {path}")
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such checkpoint; give a .ckpt file, or 'last' to resume from the "
                        "newest last.ckpt of trainer.default_root_dir")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"--ckpt_path {path} is not a Lightning training checkpoint (no state_dict)")
    if training and ("optimizer_states" not in ckpt or "loops" not in ckpt):
        raise UserError(f"--ckpt_path {path} holds weights only (no optimizer or loop state) and cannot resume "
                        "training; use it with generate or ppl")
    kind = ckpt.get("mdlm_kit_model")
    if kind not in (None, model.kind):
        raise UserError(f"--ckpt_path {path} holds a {kind} model; this run trains a {model.kind} model "
                        "(set model.family as in the run that wrote it)")
    ours, theirs = model.state_dict(), ckpt["state_dict"]
    embed = "backbone.embed.weight"
    if embed in ours and embed in theirs and ours[embed].shape[0] != theirs[embed].shape[0]:
        raise UserError(f"--ckpt_path {path} was trained with a vocabulary of {theirs[embed].shape[0]} ids (with "
                        f"the mask), this run's data gives {ours[embed].shape[0]}: resume with the corpus and "
                        "tokenizer of the run that wrote it")
    for name, value in ours.items():
        if name not in theirs or tuple(theirs[name].shape) != tuple(value.shape):
            have = "missing" if name not in theirs else f"shape {tuple(theirs[name].shape)}"
            raise UserError(f"--ckpt_path {path} holds another model ({name}: {have} in the checkpoint, "
                            f"{tuple(value.shape)} here): resume with the model settings of the run that wrote it")


def load_ckpt(path: Path, map_location: str = "cpu", kind: str | None = None):
    """(model in eval mode, its TextDataModule) from a ``.ckpt`` written by ``mdlm-kit fit``."""
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

    model = build_model(ckpt)
    check_kind(path, model.kind, kind)
    load_weights(path, model, ckpt["state_dict"])
    model.eval()
    model.run_info = run_info(ckpt)
    dm_hparams = dict(ckpt.get("datamodule_hyper_parameters", {}))
    if "separators" in dm_hparams and "packing" not in dm_hparams:  # checkpoints from before data.packing
        dm_hparams["packing"] = "stream" if dm_hparams.pop("separators") else "concat"
    dm = TextDataModule(**known_kwargs(TextDataModule, dm_hparams))
    if (state := ckpt.get(TextDataModule.__qualname__)) is not None:
        dm.load_state_dict(state)
    return model, dm
