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
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, RichProgressBar, Timer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mdlm_kit.checkpoint import RUN_KEY
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


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar for runs counted in steps: the step against ``max_steps`` beside the
    metrics, and "Epoch N" without the "/-2" Lightning prints when ``max_epochs`` is unbounded (-1)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if trainer.max_steps != -1:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's (private) title of the training bar appends f"/{max_epochs - 1}" whenever max_epochs is set
        title = f"Epoch {current_epoch}"
        if self.trainer.max_epochs not in (None, -1):
            title += f"/{self.trainer.max_epochs - 1}"
        return f"{title:{len(self.validation_description)}}"


def _checkpoint_callbacks(trainer: L.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]


class FinalCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after the last step of a run, and after the current step on SIGTERM.

    Lightning's ``ModelCheckpoint`` saves every N steps (or at validation), so a run ending between two
    saves (``max_steps`` not a multiple of N, ``max_time``) would lose its last steps, and a cluster's
    SIGTERM (preemption, the end of a time limit) everything since the last save. This saves the last
    checkpoint of every ``ModelCheckpoint(save_last=True)`` at the end of the optimizer step that ends the
    run, the point ``ModelCheckpoint`` itself saves at, so resuming from it continues exactly (a save in
    ``on_train_end`` would record the interrupted epoch as complete). As a ``Checkpoint`` it runs after the
    other callbacks (EMA has averaged this step; a timer has asked to stop).

    - Gradient accumulation: a stop asked for in the middle of an accumulation window waits for the window's
      optimizer step (the gradients accumulated so far are in no checkpoint).
    - SIGTERM: during training this replaces Lightning's handler, which stops mid-validation or mid-window
      and, with several processes, broadcasts from inside the signal handler (a collective mismatch). The
      signal is only noted; the processes agree on it at the next optimizer step's end, save, and stop with
      Lightning's ``SIGTERMException`` (``mdlm-kit fit`` exits with status 143).
    - A save at the step that ends the run must not stop ``ModelCheckpoint`` from saving at that step's
      validation (it skips steps already saved): its validation-end save is run again after ours.
    """

    def __init__(self) -> None:
        self._sigterm = False
        self._held_stop = False
        self._previous_handler = None
        self._saved_before_validation: list[tuple[ModelCheckpoint, int]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        loop = trainer.fit_loop
        max_steps = loop.max_steps != -1 and trainer.global_step >= loop.max_steps
        flags = [float(max_steps or trainer.should_stop or self._held_stop), float(self._sigterm)]
        if trainer.world_size > 1:  # a signal reaches the processes at different times: all must agree
            flags = trainer.strategy.reduce(torch.tensor(flags, device=pl_module.device), reduce_op="sum").tolist()
        stopping, sigterm = flags[0] > 0, flags[1] > 0
        if not (stopping or sigterm):
            return
        if loop.epoch_loop._should_accumulate():  # mid-window: finish the window first
            if trainer.should_stop:
                trainer.should_stop, self._held_stop = False, True
            return
        if self._held_stop:
            trainer.should_stop, self._held_stop = True, False
        self._save(trainer)
        if sigterm and not max_steps:
            raise SIGTERMException()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb, step in self._saved_before_validation:
            if step == trainer.global_step and cb._last_global_step_saved == step:
                cb._last_global_step_saved = -1  # as if this step were not saved: its own logic decides
                cb.on_validation_end(trainer, pl_module)
                if cb._last_global_step_saved == -1:
                    cb._last_global_step_saved = step
        self._saved_before_validation = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if trainer.should_stop or (loop.max_epochs not in (None, -1)
                                   and loop.epoch_progress.current.processed >= loop.max_epochs):
            self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # what `mdlm-kit report` needs to tell a finished run from one cut short
        checkpoint[RUN_KEY] = {"max_steps": trainer.max_steps, "stop_reason": stop_reason(trainer, self._sigterm)}

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        for cb in _checkpoint_callbacks(trainer):
            if cb._last_global_step_saved != trainer.global_step or not cb.last_model_path:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                self._saved_before_validation.append((cb, trainer.global_step))
                if trainer.is_global_zero:
                    log.info("saved %s at step %d", cb.last_model_path, trainer.global_step)


def stop_reason(trainer: L.Trainer, sigterm: bool = False) -> str | None:
    """Why the run stops before ``max_steps`` at the current step (``max_time``, SIGTERM, ``max_epochs``, a callback);
    None when it has reached ``max_steps`` or goes on."""
    step, max_steps = trainer.global_step, trainer.max_steps
    if max_steps != -1 and step >= max_steps:
        return None
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    if sigterm:
        return "SIGTERM"
    if remaining is not None and remaining <= 0:
        return f"trainer.max_time reached after {timer.time_elapsed('train'):.0f} s of training"
    max_epochs = trainer.max_epochs
    if max_epochs not in (None, -1) and trainer.fit_loop.epoch_progress.current.processed >= max_epochs:
        return f"max_epochs ({max_epochs}) reached"
    if trainer.should_stop:
        return "a callback stopped it (trainer.should_stop)"
    return None


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

    reason = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else type(e).__name__
    return UserError(f"--ckpt_path {path} is truncated or corrupt ({reason}); resume from another checkpoint "
                     "(the step checkpoints beside it) or start afresh without --ckpt_path")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint as Lightning reads it (``weights_only``), memory-mapped where the file system allows (cheap
    for any size); a UserError if it is truncated or corrupt."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        pass  # some file systems cannot map files: read it whole before calling it broken
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable_checkpoint(path, e) from None


def check_resume(path: str | Path, model: L.LightningModule, training: bool = True) -> None:
    """Fail with one line, before anything is written, if a run cannot start from ``path``.

    A missing, truncated or corrupt file, one of another model (another vocabulary, size or kind) is
    refused, and for training (``fit``) one written with weights only. A sharded checkpoint (a folder,
    FSDP2's distributed format) is left to Lightning.
    """
    from mdlm_kit.errors import UserError

    path = Path(path).expanduser()
    if path.is_dir() and ((path / ".metadata").is_file() or (path / "meta.pt").is_file()):
        return
    from mdlm_kit.checkpoint import is_export

    if is_export(path):
        raise UserError(f"--ckpt_path {path} is a model folder (an export), not a training checkpoint; start from "
                        f"its weights with --model.init_from {path}")
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
