"""Crash-safe checkpointing: atomic checkpoint files, and a checkpoint at the end of every run.

``mdlm-kit fit`` installs both; with the Python API pass them to the ``Trainer`` yourself::

    Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True), FinalCheckpoint()])

What a checkpoint holds: model, optimizer, learning-rate scheduler, EMA weights (Lightning's
``EMAWeightAveraging``), the data position (``TextDataModule.state_dict``) and the global random
number generators (``LanguageModel.on_save_checkpoint``), so ``--ckpt_path last`` continues a killed
run with the same per-step losses an uninterrupted run has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mdlm_kit.utils import atomic_write, remove_stale_temps

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, synced to disk, then renamed over it.

    A process killed part-way (SIGKILL, out of memory, a node failure) leaves the previous checkpoint
    intact, never a truncated ``last.ckpt``. Lightning's own save buffers the whole checkpoint in memory
    and writes it through fsspec, whose local "transaction" stages the file in the system temp folder and
    moves it: a copy, not a rename, when that folder is on another disk. Temporary files of processes
    that died on this machine are removed at the next save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        remove_stale_temps(path)
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp), durable=True)


def _checkpoint_callbacks(trainer: L.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]


class FinalCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after the last step of a run, and after the current step on SIGTERM.

    Lightning's ``ModelCheckpoint`` saves every N steps (or at validation), so a run ending between two
    saves (``max_steps`` not a multiple of N, ``max_time``) would lose its last steps, and a cluster's
    SIGTERM (preemption, the end of a time limit) everything since the last save. This saves the last
    checkpoint of every ``ModelCheckpoint(save_last=True)`` at the end of the step that ends the run, the
    point ``ModelCheckpoint`` itself saves at, so resuming from it continues exactly (a save in
    ``on_train_end`` would record the interrupted epoch as complete). As a ``Checkpoint`` it runs after
    the other callbacks (EMA has averaged this step; a timer has asked to stop).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        loop = trainer.fit_loop
        ending = (
            (loop.max_steps != -1 and trainer.global_step >= loop.max_steps)
            or trainer.should_stop
            or trainer.received_sigterm  # Lightning raises SIGTERMException once this step is done
        )
        if trainer.world_size > 1:  # a signal may reach the processes at different steps; all must save
            ending = trainer.strategy.reduce_boolean_decision(bool(ending), all=False)
        if ending:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if trainer.should_stop or (loop.max_epochs not in (None, -1)
                                   and loop.epoch_progress.current.processed >= loop.max_epochs):
            self._save(trainer)

    @staticmethod
    def _save(trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        for cb in _checkpoint_callbacks(trainer):
            if cb._last_global_step_saved != trainer.global_step or not cb.last_model_path:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                if trainer.is_global_zero:
                    log.info("saved %s at step %d", cb.last_model_path, trainer.global_step)


def last_good_checkpoint(trainer: L.Trainer) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint this run wrote, if any."""
    best = None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb._last_checkpoint_saved:
            if best is None or cb._last_global_step_saved > best[1]:
                path = cb.last_model_path or cb._last_checkpoint_saved
                best = (path, cb._last_global_step_saved)
    return best


def resolve_last(dirpaths: list[str]) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` in the checkpoint folders, as
    Lightning picks it (None if there is none; Lightning then starts afresh)."""
    found = [p for d in dirpaths if Path(d).is_dir() for p in Path(d).glob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def unreadable_checkpoint(path: str | Path, e: Exception) -> Exception:
    from mdlm_kit.errors import UserError

    reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    return UserError(f"--ckpt_path {path} is truncated or corrupt ({reason}); resume from another checkpoint "
                     "(the step checkpoints beside it) or start afresh without --ckpt_path")


def check_resume(path: str | Path, model: L.LightningModule) -> None:
    """Fail with one line, before anything is written, if training cannot resume from ``path``.

    Reads the checkpoint memory-mapped (cheap for any size): a missing, truncated or corrupt file, one
    written with weights only, or one of another model (another vocabulary, size or kind) is refused.
    """
    from mdlm_kit.errors import UserError

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such checkpoint; give a .ckpt file, or 'last' to resume from the "
                        "newest last.ckpt of trainer.default_root_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise unreadable_checkpoint(path, e) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"--ckpt_path {path} is not a Lightning training checkpoint (no state_dict)")
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise UserError(f"--ckpt_path {path} holds weights only (no optimizer or loop state) and cannot resume "
                        "training; use it with generate or ppl")
    kind = ckpt.get("mdlm_kit_model")
    if kind is not None and kind != getattr(model, "kind", kind):
        raise UserError(f"--ckpt_path {path} holds a {kind} model; this run trains a {model.kind} model "
                        "(set model.class_path as in the run that wrote it)")
    ours = model.state_dict()
    theirs = ckpt["state_dict"]
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
