"""Crash-safe checkpoints, the non-finite guard, the step progress bar, compile and FSDP2 sharding. ``mdlm-kit fit``
installs them; from Python: ``Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True),
FinalCheckpoint()])``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, RichProgressBar, Timer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mdlm_kit.errors import UserError
from mdlm_kit.utils import atomic_write, remove_stale_temps

log = logging.getLogger(__name__)
RUN_KEY = "mdlm_kit_run"  # written into every .ckpt by FinalCheckpoint: max_steps, why the run stopped


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, synced to disk, then renamed over it: a process killed
    part-way leaves the previous checkpoint intact. (Lightning's own save goes through fsspec, whose "transaction"
    stages the file in the system temp folder and copies it over when that folder is on another disk.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        remove_stale_temps(path)  # of processes that died on this machine
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp), durable=True)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the step against ``max_steps`` beside the metrics, and "Epoch N" without
    the "/-2" Lightning prints when ``max_epochs`` is unbounded (-1)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        return items if trainer.max_steps == -1 else {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.retitle(trainer)

    def retitle(self, trainer: L.Trainer) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            of = f"/{trainer.max_epochs - 1}" if trainer.max_epochs not in (None, -1) else ""
            self.progress.update(self.train_progress_bar_id, description=f"Epoch {trainer.current_epoch}{of}")


def _epochs_done(trainer: L.Trainer) -> bool:
    max_epochs = trainer.max_epochs
    return max_epochs not in (None, -1) and trainer.fit_loop.epoch_progress.current.processed >= max_epochs


class FinalCheckpoint(Checkpoint):
    """Saves every ``ModelCheckpoint(save_last=True)``'s last checkpoint after a run's last step and on SIGTERM, so a
    run ending between two periodic saves (``max_time``, preemption) keeps its steps. It saves at the end of the
    optimizer step like ``ModelCheckpoint`` (``on_train_end`` would record the epoch as complete), after the other
    callbacks (EMA has averaged the step); a stop inside a gradient-accumulation window waits for that window's step.
    Lightning's SIGTERM handler stops mid-window and broadcasts inside the handler (a collective mismatch); this one
    only notes the signal, and the processes agree at the step's end, save, and raise ``SIGTERMException``."""

    def __init__(self) -> None:
        self._sigterm = False
        self._held_stop = False
        self._previous_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_sigterm", True))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        max_steps = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        flags = [float(max_steps or trainer.should_stop or self._held_stop), float(self._sigterm)]
        if trainer.world_size > 1:  # a signal reaches the processes at different times: all must agree
            flags = trainer.strategy.reduce(torch.tensor(flags, device=pl_module.device), reduce_op="sum").tolist()
        if not any(flags):
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        final = progress.is_last_batch or progress.current.ready == trainer.num_training_batches
        if progress.current.ready % trainer.accumulate_grad_batches != 0 and not final:  # finish the window first
            if trainer.should_stop:
                trainer.should_stop, self._held_stop = False, True
            return
        if self._held_stop:
            trainer.should_stop, self._held_stop = True, False
        self._save(trainer)
        if flags[1] > 0 and not max_steps:
            raise SIGTERMException()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.should_stop or _epochs_done(trainer):
            self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # what `mdlm-kit report` needs to tell a finished run from one cut short
        checkpoint[RUN_KEY] = {"max_steps": trainer.max_steps, "stop_reason": stop_reason(trainer, self._sigterm)}

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last:
                path = cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
                cb.last_model_path = path  # before the save: it is part of the state saved
                trainer.save_checkpoint(path)
                if trainer.is_global_zero:
                    log.info("saved %s at step %d", path, trainer.global_step)


def stop_reason(trainer: L.Trainer, sigterm: bool = False) -> str | None:
    """Why the run stops before ``max_steps`` at the current step; None when it has reached them or goes on."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return None
    if sigterm:
        return "SIGTERM"
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    if timer is not None and (remaining := timer.time_remaining("train")) is not None and remaining <= 0:
        return f"trainer.max_time reached after {timer.time_elapsed('train'):.0f} s of training"
    if _epochs_done(trainer):
        return f"max_epochs ({trainer.max_epochs}) reached"
    return "a callback stopped it (trainer.should_stop)" if trainer.should_stop else None


class NonFiniteGuard(L.Callback):
    """A non-finite loss (the module's ``last_loss``) or gradient stops the run before the optimizer step, nothing
    saved after it; ``action="skip"`` skips the step (``max_consecutive`` in a row still stop). 16-bit's gradient scaler
    skips such steps itself. Flags are all-reduced; put it after the callbacks that change gradients."""

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise UserError(f"on_nonfinite must be stop or skip, got {action!r}")
        self.action, self.max_consecutive = action, max_consecutive
        self.skips = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: each rank's shard
        loss, zero = getattr(pl_module, "last_loss", None), torch.zeros((), device=pl_module.device)
        bad_grads = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float() if grads else zero
        flags = torch.stack([zero if loss is None else (~torch.isfinite(loss)).float(), bad_grads])
        local_loss = bool(flags[0])  # the one host synchronization of the check
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        if not bool(flags.sum() > 0):
            self.skips = 0
            return
        what = (f"training loss ({float(loss)})" if local_loss else "training loss (in another process)"
                if flags[0] > 0 else "gradient")
        step = trainer.global_step
        self.skips += 1
        if self.action == "skip" and self.skips <= self.max_consecutive:
            if trainer.is_global_zero:
                log.warning("non-finite %s at step %d: step skipped (--on_nonfinite skip)", what, step)
            pl_module.log("train/skipped_steps", float(self.skips), reduce_fx="max")
            for p in pl_module.parameters():  # AdamW leaves parameters without a gradient untouched
                p.grad = None
            return
        paths = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.save_on_exception = False  # nothing is saved past this point
                paths += [Path(p) for p in (cb.last_model_path, cb.best_model_path) if p and Path(p).is_file()]
        kept = (f"the last good checkpoint is {max(paths, key=lambda p: p.stat().st_mtime)} (step {self.saved_step})"
                if paths and self.saved_step is not None else "no checkpoint was written")
        fix = ("lower the learning rate or set trainer.gradient_clip_val, then resume with --ckpt_path last; or "
               "add --on_nonfinite skip to skip such steps" if self.action == "stop" else
               f"{self.skips} steps in a row were non-finite, so the weights are broken: resume from it with a "
               "lower learning rate")
        raise UserError(f"non-finite {what} at step {step}; training stopped without saving; {kept}; {fix}")


class CompileBlocks(L.Callback):
    """``torch.compile`` each transformer block of the backbone (the blocks hold the work; the head is the fused
    loss's): ``--trainer.callbacks+=mdlm_kit.callbacks.CompileBlocks``."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not getattr(pl_module.backbone, "compiled", False):
            for block in pl_module.backbone.blocks:
                block.compile()
            pl_module.backbone.compiled = True


class FSDP2Sharding(L.Callback):
    """FSDP2 under Lightning's ``ModelParallelStrategy``: each transformer block its own unit, the rest in the
    root's. ``mdlm-kit fit`` adds it when the strategy is a ``ModelParallelStrategy`` (configs/fsdp.yaml)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.callbacks import WeightAveraging
        from torch.distributed.fsdp import fully_shard

        mesh, backbone = pl_module.device_mesh, pl_module.backbone
        if mesh is None or getattr(backbone, "sharded", False):
            return
        if any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
            raise UserError("EMA (EMAWeightAveraging) does not work with FSDP2 (ModelParallelStrategy): "
                            "Lightning's weight averaging copies the whole model; train with DDP for EMA, "
                            "or remove the callback")
        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for block in backbone.blocks:
            fully_shard(block, mesh=dp)
        fully_shard(backbone, mesh=dp)
        backbone.sharded = True
        if hasattr(pl_module.family, "masked_only"):  # forward() gathers the shards; the masked-only head would not
            pl_module.family.masked_only = False
