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
