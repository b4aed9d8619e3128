"""Where Lightning has no public hook for what mdlm-kit needs: the smallest workaround for each, in this one module.

Every private Lightning name the toolkit touches is here (tests/test_layers.py fails on one anywhere else), so a
Lightning release that renames one breaks this file only.

1. ``LightningCLI._parse_ckpt_path``: with ``--ckpt_path``, LightningCLI replaces the config's model settings with
   the checkpoint's in this private method, and a truncated file or a setting another version wrote is a
   traceback there. No public hook runs between parsing and that step, so ``CheckpointHparamsCLI`` overrides it
   and asks the public ``checkpoint_hparams`` what to apply.
2. ``Trainer._accelerator_connector.use_distributed_sampler``: the Trainer keeps its
   ``use_distributed_sampler`` argument nowhere public; the data module, which shards batches itself, must refuse
   to run under Lightning's sampler.

One gap needs no private name, only a method: ``ModelParallelStrategy.setup`` refuses a LightningModule that does
not override ``configure_model``, where Lightning expects the parallelization. The sharding is the
``callbacks.FSDP2Sharding`` callback's (its ``setup`` runs before that hook), so ``LanguageModel.configure_model``
only refuses a device mesh the callback has not sharded.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from mdlm_kit.errors import UserError


class CheckpointHparamsCLI(LightningCLI):
    """LightningCLI whose ``--ckpt_path`` model settings come from ``checkpoint_hparams`` (gap 1)."""

    def checkpoint_hparams(self, path: str) -> dict | None:
        """The model settings of the checkpoint at ``path`` as a config entry; None (here) keeps the config's."""
        return None

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        hparams = self.checkpoint_hparams(path)
        if not hparams:
            return
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except (ArgumentError, SystemExit) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--ckpt_path {path}: its model settings do not fit this version ({first})") from None


def uses_distributed_sampler(trainer) -> bool:
    """The Trainer's ``use_distributed_sampler`` argument (gap 2)."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)
