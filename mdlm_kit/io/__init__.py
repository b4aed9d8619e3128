"""Every on-disk format of a model (``ckpt``: the toolkit's ``.ckpt``; ``hf``: its Hugging Face export; ``mdlm``: the
MDLM reference code's checkpoints), ``load_checkpoint`` that reads any of them, and ``InitWeights``."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from mdlm_kit.errors import UserError
from mdlm_kit.io.ckpt import load_ckpt
from mdlm_kit.io.hf import load_export
from mdlm_kit.io.mdlm import is_mdlm_checkpoint, load_mdlm_checkpoint


def load_checkpoint(path: str | Path, map_location: str = "cpu", kind: str | None = None):
    """(``LanguageModel`` in eval mode, TextDataModule with the checkpoint's tokenizer) from a ``.ckpt``, an export
    folder or an MDLM checkpoint; ``kind`` (``diffusion`` or ``autoregressive``) makes any other kind an error."""
    path = Path(path)
    if is_mdlm_checkpoint(path):  # the MDLM reference code's .ckpt, state dict or Hugging Face folder
        if kind == "autoregressive":
            raise UserError(f"{path} is an MDLM (masked diffusion) checkpoint; this command needs an "
                            "autoregressive model")
        return load_mdlm_checkpoint(path, map_location=map_location)
    if path.is_dir():  # an export: every command that takes --checkpoint takes one
        return load_export(path, map_location, kind)
    return load_ckpt(path, map_location, kind)


class InitWeights(L.Callback):
    """Start ``fit`` or ``validate`` from the weights of ``path`` (any ``load_checkpoint`` reads) of the same
    architecture and tokenizer, unless the run resumes from ``--ckpt_path``, whose weights win."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loaded = False
        self._source = self._source_dm = None

    def check(self, model, dm=None):
        """Read the weights (once) and check that they fit ``model`` and, given, ``dm``'s tokenizer: a UserError
        naming what differs. The CLI calls it before anything is written; ``setup`` again with the data."""
        if self._source is None:
            self._source, self._source_dm = load_checkpoint(self.path, kind=model.kind)
        source, source_dm = self._source, self._source_dm
        theirs, ours = source.config.to_dict(), model.config.to_dict()
        differ = [f"{k}={theirs[k]!r} (here {ours[k]!r})" for k in ours if k != "dropout" and theirs.get(k) != ours[k]]
        if differ:
            raise UserError(f"--checkpoint {self.path} holds another architecture: {', '.join(differ)}; set these "
                            "model options (model.size, n_layers, d_model, ..., layout) to match it")
        if getattr(dm, "tokenizer", None) is not None:
            same = (source_dm.tokenizer.fingerprint() == dm.tokenizer.fingerprint() if source_dm.tokenizer is not None
                    else source_dm.hparams.tokenizer == dm.hparams.tokenizer)
            if not same:
                raise UserError(f"--checkpoint {self.path} was trained with another tokenizer than this run's data "
                                f"({source_dm.hparams.tokenizer!r} on its corpus); set data.tokenizer and "
                                "data.corpus as in the run that made it")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.loaded:  # Lightning sets trainer.ckpt_path after setup: a resumed run is told at load time
            self.check(pl_module, trainer.datamodule)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._source is not None and not self.loaded and trainer.ckpt_path is None:
            pl_module.backbone.load_state_dict(self._source.backbone.state_dict())
            self._source = self._source_dm = None
            self.loaded = True

    on_validation_start = on_fit_start  # validate runs no fit hooks
