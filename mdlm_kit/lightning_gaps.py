"""Every private Lightning name the toolkit touches, each with the smallest workaround (tests/test_layers.py fails on
one anywhere else):
1. ``LightningCLI._parse_ckpt_path`` puts ``--ckpt_path``'s model settings over the config's: a truncated file or
   another version's setting is a traceback there, and no public hook runs in between.
2. The Trainer keeps ``use_distributed_sampler`` nowhere public; the data module, which shards itself, must refuse it.
No private name: ``ModelParallelStrategy`` needs a ``configure_model`` override; ``FSDP2Sharding`` is what shards."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from mdlm_kit.errors import UserError


class CheckpointHparamsCLI(LightningCLI):
    """LightningCLI whose ``--ckpt_path`` model settings come from ``checkpoint_hparams`` (gap 1)."""

    def checkpoint_hparams(self, path: str) -> dict | None:
        """The model settings of the checkpoint at ``path`` as a config entry; None keeps the config's."""
        return None

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        hparams = self.checkpoint_hparams(path) if path and Path(path).is_file() else None
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
