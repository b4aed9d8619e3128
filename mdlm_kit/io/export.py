"""``mdlm-kit export``: any checkpoint the toolkit reads, written as a Hugging Face model folder that carries its
modeling code (it loads with ``trust_remote_code=True`` where mdlm-kit is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from mdlm_kit.errors import UserError
from mdlm_kit.io import configuration_mdlm_kit, load_checkpoint, modeling_mdlm_kit
from mdlm_kit.io.ckpt import is_export
from mdlm_kit.io.hf import AUTO_CLASSES, MdlmKitConfig
from mdlm_kit.io.mdlm import is_mdlm_checkpoint, load_mdlm_checkpoint
from mdlm_kit.models import config as dit_config
from mdlm_kit.models import dit
from mdlm_kit.utils import current_umask

MASK_TOKEN = "<|mdlm_mask|>"
# the data settings config.json keeps (the validation split, the tokenizer, the packing), not batch sizes or workers
DATA_FACTS = ("corpus", "path", "text_key", "val_fraction", "val_docs", "streaming", "tokenizer", "bpe_vocab_size",
              "seq_len", "packing", "insert_eos")
REMOTE_CODE = (configuration_mdlm_kit, modeling_mdlm_kit, dit_config, dit)  # copied into the folder under their names


def hf_tokenizer(tok, mask_id: int, max_len: int | None = None) -> PreTrainedTokenizerFast:
    """``tok`` with the same ids and the mask token added as ``mask_id`` (a ValueError where the vocabulary does not
    end right before it). Unlike the toolkit's char tokenizer, it encodes special tokens' text typed in the input."""
    from tokenizers import Tokenizer

    from mdlm_kit.data.tokenizers import UNK

    backend = Tokenizer.from_str(tok.tok.to_str())  # a copy: adding the mask must not touch the toolkit's tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    if backend.token_to_id(MASK_TOKEN) is not None or size != mask_id:
        raise ValueError(f"the tokenizer's vocabulary ({size} ids) does not end right before the model's mask id "
                         f"{mask_id}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tok.bos, eos_token=tok.eos, pad_token=tok.pad or tok.eos,
        mask_token=MASK_TOKEN, clean_up_tokenization_spaces=False, model_max_length=max_len or int(1e30),
        **({"unk_token": UNK} if tok.kind == "char" else {}),
    )
    if fast.mask_token_id != mask_id:
        raise ValueError(f"the mask token went to id {fast.mask_token_id}, not the model's mask id {mask_id}")
    return fast


def _checkpoint_weights(path: Path, model, ema: bool) -> str:
    """Load the weights to export into ``model``: ``ema`` or ``raw``. Lightning's ``EMAWeightAveraging`` saves the
    averaged weights as ``state_dict`` and the trained ones as ``current_model_state``."""
    try:  # memory-mapped: the second read of a large checkpoint costs little
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    averaged = "current_model_state" in ckpt
    averaging = averaged or any("WeightAveraging" in str(k) for k in ckpt.get("callbacks", {}))
    if ema:
        return "ema" if averaging else "raw"
    if averaging and not averaged:
        raise UserError(f"{path} holds only the averaged weights (saved after training); export them with --ema true")
    if averaged:
        model.load_state_dict(ckpt["current_model_state"])
    return "raw"


def _check_out(out: Path, overwrite: bool) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {parent} (permission denied); choose a folder you can write")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty; pass --overwrite true to replace it, or choose "
                            "another folder")
        if not is_export(out):  # --overwrite replaces an earlier export, never a folder of something else
            raise UserError(f"--out {out} exists and is not an mdlm-kit export; --overwrite only replaces an "
                            "earlier export: choose another folder")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, so that ``out`` is always either the old folder or the new one."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "x")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "x", out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_hf_model(model, dm):
    """The Hugging Face model of a loaded LightningModule (``load_checkpoint``'s pair), weights copied bit-exactly;
    its config holds the model, schedule, tokenizer and data facts (``load_export`` reads them back)."""
    if dm.tokenizer is None:
        raise UserError("the checkpoint holds no tokenizer; it was not written by mdlm-kit fit")
    auto, cls = AUTO_CLASSES[model.kind]
    diffusion = model.kind == "diffusion"
    facts = {"dit_config": model.config.to_dict(), "schedule": model.family.schedule.spec() if diffusion else None,
             "num_steps": model.family.num_steps if diffusion else None, "tokenizer_spec": dm.tokenizer.to_dict(),
             "data": {k: dm.hparams[k] for k in DATA_FACTS}}
    try:  # as it will read back from config.json (tuples become lists), and a clear error for what JSON cannot hold
        facts = json.loads(json.dumps(facts))
    except (TypeError, ValueError) as e:
        raise UserError(f"the checkpoint's settings cannot be written as JSON ({e})") from None
    config = MdlmKitConfig(
        kind=model.kind, **facts,
        auto_map={"AutoConfig": f"configuration_mdlm_kit.{MdlmKitConfig.__name__}",
                  auto.__name__: f"modeling_mdlm_kit.{cls.__name__}"},
        eos_token_id=dm.tokenizer.eos_id, pad_token_id=dm.tokenizer.pad_id,
        bos_token_id=dm.tokenizer.bos_id if diffusion else model.mask_id,
    )
    hf = cls(config)
    hf.backbone.load_state_dict(model.backbone.state_dict())
    if not diffusion:
        g = hf.generation_config
        g.bos_token_id, g.eos_token_id, g.pad_token_id = model.mask_id, dm.tokenizer.eos_id, dm.tokenizer.pad_id
        g.suppress_tokens, g.use_cache = [model.mask_id], False
    return hf.eval()


def export(checkpoint: str, out: str, ema: bool = True, overwrite: bool = False) -> dict:
    """Write a checkpoint as a Hugging Face model folder (config.json, model.safetensors, the modeling code, the
    tokenizer) that loads with ``AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)``
    (``AutoModelForCausalLM`` for the autoregressive baseline), ``AutoTokenizer`` and every ``--checkpoint``.
    It is written beside ``out`` and renamed into place: ``out`` is never left half-written.

    Args:
        checkpoint: a ``.ckpt`` written by ``mdlm-kit fit``, a folder written by ``mdlm-kit export``, or a
            checkpoint of the MDLM reference code.
        out: the folder to write (its parent must exist).
        ema: the EMA weights of a run trained with ``EMAWeightAveraging`` (what every command uses); ``false``: the
            trained weights Lightning saved beside them. Without EMA, both are the trained weights.
        overwrite: replace an existing non-empty ``out``.

    Returns:
        ``out``, the ``files`` written, ``num_parameters``, ``vocab_size`` (with the mask), ``kind``, ``weights``
        (``ema``, ``raw``, or ``export`` for an export folder) and ``auto_tokenizer`` (tokenizer files written).
    """
    out_path = Path(out).expanduser().absolute()
    _check_out(out_path, overwrite)
    ckpt_path = Path(checkpoint)
    if ckpt_path.expanduser().absolute().is_relative_to(out_path):
        raise UserError(f"--checkpoint {ckpt_path} lies inside --out {out_path}; export to another folder")
    if is_mdlm_checkpoint(ckpt_path):  # the MDLM reference code's: its EMA weights unless ema is false
        model, dm = load_mdlm_checkpoint(ckpt_path, use_ema=ema)
        weights = model.imported_weights
    elif ckpt_path.is_dir() and not ema:  # an earlier export (written again: a newer layout, another place)
        raise UserError(f"{ckpt_path} is an export and holds one set of weights; --ema false needs the .ckpt")
    else:
        model, dm = load_checkpoint(ckpt_path)
        weights = "export" if ckpt_path.is_dir() else _checkpoint_weights(ckpt_path, model, ema)
    hf = build_hf_model(model, dm)
    try:
        tokenizer, note = hf_tokenizer(dm.tokenizer, model.mask_id, model.config.max_seq_len), {}
    except ValueError as e:  # the toolkit loads the export without it (config.json's tokenizer_spec)
        tokenizer, note = None, {"note": f"no AutoTokenizer files: {e}"}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    except PermissionError:
        raise UserError(f"--out {out_path}: cannot write in {out_path.parent} (permission denied)") from None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command prints one JSON object; a one-shard progress bar is noise
    try:
        hf.save_pretrained(tmp)
        for module in REMOTE_CODE:  # as the toolkit runs it, the imports of mdlm_kit.models made folder-relative
            source = Path(module.__file__)
            (tmp / source.name).write_text(source.read_text().replace("from ..models.", "from ."))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        # mkdtemp's folder and the weights written through a temporary file are private (0700/0600): make the
        # export an ordinary folder, readable as the user's umask says
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        _move_into_place(tmp, out_path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out_path), "files": files, "num_parameters": hf.backbone.num_parameters(),
            "vocab_size": model.config.vocab_size, "kind": model.kind, "weights": weights,
            "auto_tokenizer": tokenizer is not None, **note}
