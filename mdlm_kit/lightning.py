"""Thin Lightning glue: the training step calls the objective, validation accumulates it in float64.

Two models share the backbone, the optimizer and the bookkeeping: ``MaskedDiffusionLM`` (the
bidirectional DiT on the NELBO) and ``AutoregressiveLM`` (the same DiT with causal attention on the
next-token loss), so the two are compared on equal terms. The CLI picks one with ``model.class_path``
(``MaskedDiffusionLM`` by default).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import lightning as L
import numpy as np
import torch
from torchmetrics import SumMetric

from mdlm_kit import rng
from mdlm_kit.errors import UserError
from mdlm_kit.families import Autoregressive, MaskedDiffusion
from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.objective import ESTIMATORS, NelboTerms
from mdlm_kit.schedules import Schedule, make_schedule

log = logging.getLogger(__name__)
Size = Literal["debug", "tiny", "small", "medium"]  # models.SIZES


class LanguageModel(L.LightningModule):
    """What both models share: a DiT backbone, AdamW with warmup and cosine decay, float64 validation.

    Subclasses set ``kind`` and implement ``loss_terms``.
    """

    family_class: type = MaskedDiffusion
    kind: str = ""  # the family's: diffusion or autoregressive
    metric: str = "nelbo"  # what the logged loss is: a bound (nelbo) or the exact likelihood (nll)
    # set by checkpoint.load_checkpoint on a model read from a .ckpt: steps, max_steps, stopped_early, stop_reason
    run_info: dict | None = None

    def _build(
        self, vocab_size: int, size: str, lr: float, warmup_steps: int, decay_steps: int | None,
        **backbone
    ) -> None:
        if vocab_size < 2:
            raise UserError(
                f"model.vocab_size must be >= 2 (set it or let the data module supply it), got {vocab_size}"
            )
        if lr <= 0 or warmup_steps < 0 or (decay_steps is not None and decay_steps < 1):
            raise UserError("model.lr must be > 0, warmup_steps >= 0 and decay_steps >= 1 or null")
        try:
            self.config = DiTConfig.from_name(size, vocab_size, **backbone)
        except ValueError as e:  # models/ is plain torch: its checks raise ValueError
            raise UserError(str(e)) from None
        self.backbone = DiT(self.config, causal=self.family_class.causal)
        self.mask_id = self.config.mask_id
        self.val_nelbo_sum = SumMetric().set_dtype(torch.float64)
        self.val_tokens = SumMetric().set_dtype(torch.float64)
        self._t_last: float | None = None
        self._rng_resume: dict | None = None
        self.last_loss: torch.Tensor | None = None  # read by callbacks.NonFiniteGuard

    def forward(self, input_ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(input_ids, cond)

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is not None and not getattr(self, "_sharded", False):
            # FSDP2 under Lightning's ModelParallelStrategy: each block its own unit, the rest in the root's
            from lightning.pytorch.callbacks import WeightAveraging
            from torch.distributed.fsdp import fully_shard

            if any(isinstance(cb, WeightAveraging) for cb in self.trainer.callbacks):
                raise UserError("EMA (EMAWeightAveraging) does not work with FSDP2 (ModelParallelStrategy): "
                                "Lightning's weight averaging copies the whole model; train with DDP for EMA, "
                                "or remove the callback")
            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            for block in self.backbone.blocks:
                fully_shard(block, mesh=dp)
            fully_shard(self.backbone, mesh=dp)
            self._sharded = True
            if isinstance(self.family, MaskedDiffusion):  # forward() gathers the shards; the masked-only head would not
                self.family.masked_only = False
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            for block in self.backbone.blocks:  # the blocks hold the work; the head is the fused loss's
                block.compile()
            self._compiled = True

    def loss_terms(self, x0: torch.Tensor, keys: torch.Tensor, stream: int,
                   valid: torch.Tensor | None = None) -> NelboTerms:
        """Per-sequence loss (nats, float64) of clean blocks ``x0`` whose noise (if any) is keyed by ``keys``;
        ``valid`` marks the real tokens of padded blocks."""
        return self.family.loss(self.backbone, x0, keys, stream, valid)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mdlm_kit_model"] = self.kind
        # rank 0's generators: seed_everything gives every rank the same ones, and they draw alike
        checkpoint["rng_states"] = rng.global_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_resume = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # restored here, not in on_load_checkpoint: Lightning builds the loop and the dataloaders in between
        if self._rng_resume is not None:
            rng.set_global_states(self._rng_resume)
            self._rng_resume = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.check_data(dm)
        if stage == "fit" and self.hparams.get("unigram_bias") and dm is not None:
            self.init_unigram_bias(dm)  # a resumed run's checkpoint replaces it, as would --checkpoint's weights

    def init_unigram_bias(self, dm) -> None:
        """Set the output layer's bias to the log frequencies of the training split's tokens (add-1/2
        smoothed; the mask's column, which the SUBS parameterization never uses, at 0), so that the
        model predicts the unigram distribution from step 0. Learning the frequencies through the
        zero-initialized output layer otherwise takes a direction of every masked position's features,
        on which the model can sit for hundreds of steps before it uses context (BENCHMARKS.md)."""
        if not hasattr(dm, "token_counts"):
            raise UserError("model.unigram_bias needs a data module with token_counts() (the kit's TextDataModule)")
        try:
            counts = dm.token_counts("train")
        except UserError as err:
            raise UserError(f"model.unigram_bias counts the training split's tokens: {err}") from None
        bias = self.backbone.final.linear.bias
        if bias is None or counts.shape[0] != bias.shape[0]:
            raise UserError("model.unigram_bias needs an output layer with a bias over the data's vocabulary")
        freq = (counts.astype(np.float64) + 0.5) / (counts.sum() + 0.5 * counts.shape[0])
        log_freq = torch.from_numpy(np.log(freq))
        log_freq[self.mask_id] = 0.0
        with torch.no_grad():
            bias.copy_(log_freq.to(bias))

    def check_data(self, dm) -> None:
        """The data module's blocks fit this model: sequence length and vocabulary (a UserError if not)."""
        seq_len = getattr(getattr(dm, "hparams", None), "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise UserError(
                f"data.seq_len={seq_len} is above the model's maximum sequence length {self.config.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        if dm is not None and hasattr(dm, "model_vocab_size") and dm.model_vocab_size != self.config.vocab_size:
            raise UserError(
                f"the data's vocabulary ({dm.model_vocab_size} with the mask) does not match the model's "
                f"({self.config.vocab_size}); use the tokenizer the model was trained with"
            )

    def _train_keys(self, batch: dict) -> torch.Tensor:
        """Position of each sample in the global training stream: global batch n, then rank r's slice of it.

        The data module gives rank r the r-th contiguous slice of each global batch, so these keys (and
        the noise they draw) are the same whether the global batch is split over processes or not.
        """
        n = self.trainer.fit_loop.epoch_loop.total_batch_idx
        bsz = batch["input_ids"].shape[0]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        slot = torch.arange(bsz, device=self.device, dtype=torch.int64)
        return (n * world + rank) * bsz + slot

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch["input_ids"], self._train_keys(batch), rng.STREAM_TRAIN, batch.get("valid"))
        loss = terms.per_token()
        self.last_loss = loss.detach()
        if batch.get("valid") is not None and self.trainer.world_size > 1:
            # padded blocks: ranks hold different numbers of real tokens; scale so that the gradient the
            # processes average is the gradient of the global per-token loss, as with one process
            local = terms.num_tokens.sum()
            total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
            loss = loss * (local * self.trainer.world_size / total)
        self.log(f"train/{self.metric}", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tokens_per_s", batch["input_ids"].numel() * self.trainer.world_size / (now - self._t_last))
        self._t_last = now
        return loss.float()

    def on_validation_epoch_start(self) -> None:
        self._t_last = None  # validation time is not training throughput

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        terms = self.loss_terms(batch["input_ids"], batch["index"], rng.STREAM_VAL, batch.get("valid"))
        w = batch.get("weight")  # 0 for the filler entries that even out batch counts across ranks
        w = torch.ones_like(terms.per_seq) if w is None else w.to(terms.per_seq)
        self.val_nelbo_sum.update(terms.per_seq * w)
        self.val_tokens.update(terms.num_tokens * w)

    def on_validation_epoch_end(self) -> None:
        total = self.val_tokens.compute()
        if total > 0:
            nelbo = self.val_nelbo_sum.compute() / total
            self.log(f"val/{self.metric}", nelbo.float(), prog_bar=True, sync_dist=True)  # equal on all ranks
            self.log("val/ppl", torch.exp(nelbo).float(), sync_dist=True)
        self.val_nelbo_sum.reset()
        self.val_tokens.reset()

    def configure_optimizers(self):
        h = self.hparams
        decay, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = h.get("fused_adamw")
        # Lightning cannot clip gradients of a fused optimizer under mixed precision (it unscales inside)
        trainer = self.trainer
        mixed = "mixed" in str(trainer.precision)
        clipping = bool(trainer.gradient_clip_val)
        if fused is None:  # measured on 2 CPU cores: +2-4% tokens/s (bench/train.py --fused_adamw on|off)
            fused = self.device.type in ("cuda", "cpu") and not (mixed and clipping)
        elif fused and mixed and clipping:
            raise UserError(
                "model.fused_adamw=true cannot be combined with mixed precision and trainer.gradient_clip_val; "
                "set model.fused_adamw to null (automatic) or false, or turn clipping off"
            )
        opt = torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas), fused=bool(fused))

        def lr_lambda(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            if h.decay_steps is None:
                return 1.0
            progress = min(1.0, (step - h.warmup_steps) / h.decay_steps)
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MaskedDiffusionLM(LanguageModel):
    """A masked diffusion language model trained on the Rao-Blackwellized NELBO.

    Args:
        vocab_size: model vocabulary including the mask token (the last id); linked from the data.
        size: named backbone size (``debug``, ``tiny``, ``small``, ``medium``).
        n_layers, d_model, n_heads, cond_dim, max_seq_len: override the named size.
        dropout: dropout in the blocks.
        conv_kernel: width of the depthwise convolution over positions in every block (0: none; kit layout).
            Lets a masked position see its neighbours from the first step, which takes the model off the unigram
            plateau early (BENCHMARKS.md); the quickstart's recipes use 3.
        time_conditioning: feed the noise level to the backbone (adaLN); off by default (time-agnostic).
        layout: ``kit`` (this toolkit's blocks) or ``mdlm`` (the MDLM reference DiT's layout, for its
            checkpoints; see ``mdlm_kit.models.dit``).
        schedule: the noise schedule, a ``mdlm_kit.schedules`` class with its arguments (``LogLinear`` by default;
            ``--model.schedule Polynomial --model.schedule.power 2``).
        num_steps: None for the continuous-time NELBO, else the number T of discrete steps.
        estimator: ``time`` (sample t, mask tokens independently), ``count`` (t integrated out in closed
            form; same expectation, far lower variance; time-agnostic continuous-time models only) or
            ``auto`` (``count`` where it applies, else ``time``). See ``mdlm_kit.objective``.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear learning-rate warmup.
        decay_steps: cosine decay to ``min_lr_ratio * lr`` over this many steps after warmup (None: constant).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        seed: seed of the corruption noise (times and masks), independent of the data order.
        masked_only: compute logits only at masked positions (the loss is exactly 0 elsewhere), through
            the fused weighted cross-entropy; same loss and gradients, less time and memory.
        ce_kernel: the fused cross-entropy's row step: ``auto`` (Triton on CUDA), ``always``, ``never``.
        compile: ``torch.compile`` the backbone's blocks.
        fused_adamw: AdamW's fused implementation (None: on CUDA and CPU).
        on_nonfinite: a non-finite loss or gradient ``stop``s the run with a message, keeping the last
            good checkpoint, or ``skip``s the step (the run still stops after 10 in a row;
            ``callbacks.NonFiniteGuard``, which ``mdlm-kit fit`` installs).
        unigram_bias: start the output layer's bias at the log token frequencies of the training split
            (``fit`` only; a resumed run's weights or ``--checkpoint``'s replace it): the model predicts the unigram
            distribution from step 0 and starts on context at once (BENCHMARKS.md, the unigram plateau).
    """

    family_class = MaskedDiffusion
    kind = MaskedDiffusion.kind

    @property
    def estimator(self) -> str:
        """The resolved estimator (``auto`` made ``time`` or ``count``): the family's."""
        return self.family.estimator

    def __init__(
        self,
        vocab_size: int = 0,
        size: Size = "tiny",
        n_layers: int | None = None,
        d_model: int | None = None,
        n_heads: int | None = None,
        cond_dim: int | None = None,
        max_seq_len: int | None = None,
        dropout: float = 0.0,
        conv_kernel: int = 0,
        time_conditioning: bool = False,
        layout: Literal["kit", "mdlm"] = "kit",
        schedule: Schedule | None = None,
        num_steps: int | None = None,
        estimator: Literal["auto", "time", "count"] = "auto",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 2500,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        masked_only: bool = True,
        ce_kernel: Literal["auto", "always", "never"] = "auto",
        compile: bool = False,
        fused_adamw: bool | None = None,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        unigram_bias: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if num_steps is not None and num_steps < 1:
            raise UserError(f"model.num_steps must be >= 1 or null (continuous time), got {num_steps}")
        self.schedule = make_schedule(schedule)
        self.hparams["schedule"] = self.schedule.spec()  # a config entry, not an object, in checkpoints
        count_ok = not time_conditioning and num_steps is None
        if estimator == "auto":
            estimator = "count" if count_ok else "time"
        if estimator not in ESTIMATORS:
            raise UserError(f"model.estimator: unknown estimator {estimator!r}; choose auto, {', '.join(ESTIMATORS)}")
        if estimator == "count" and not count_ok:
            raise UserError("model.estimator=count needs a time-agnostic model in continuous time (num_steps: null)")
        self._build(
            vocab_size, size, lr, warmup_steps, decay_steps,
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, cond_dim=cond_dim, max_seq_len=max_seq_len,
            dropout=dropout, time_conditioning=time_conditioning, layout=layout, conv_kernel=conv_kernel,
        )
        self.family = MaskedDiffusion(self.mask_id, self.schedule, num_steps, estimator, time_conditioning, seed,
                                      masked_only, ce_kernel)


class AutoregressiveLM(LanguageModel):
    """The autoregressive baseline: the same DiT with causal attention, trained on next-token NLL.

    Every token of a block is scored, the first one given only a start token (the mask id, which
    never occurs in data), so its loss covers exactly the tokens the diffusion NELBO covers.

    Args:
        vocab_size: model vocabulary including the mask/start token (the last id); linked from the data.
        size: named backbone size (``debug``, ``tiny``, ``small``, ``medium``).
        n_layers, d_model, n_heads, max_seq_len: override the named size.
        dropout: dropout in the blocks.
        conv_kernel: as for ``MaskedDiffusionLM``, looking back only (a causal convolution).
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear learning-rate warmup.
        decay_steps: cosine decay to ``min_lr_ratio * lr`` over this many steps after warmup (None: constant).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        seed: kept for symmetry with the diffusion model (the loss uses no noise).
        on_nonfinite: as for ``MaskedDiffusionLM``.
    """

    family_class = Autoregressive
    kind = Autoregressive.kind
    metric = Autoregressive.metric

    def __init__(
        self,
        vocab_size: int = 0,
        size: Size = "tiny",
        n_layers: int | None = None,
        d_model: int | None = None,
        n_heads: int | None = None,
        max_seq_len: int | None = None,
        dropout: float = 0.0,
        conv_kernel: int = 0,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 2500,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ):
        super().__init__()
        self.save_hyperparameters()
        self._build(
            vocab_size, size, lr, warmup_steps, decay_steps,
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, dropout=dropout,
            conv_kernel=conv_kernel,
        )
        self.family = Autoregressive(self.mask_id)


MODELS = {cls.kind: cls for cls in (MaskedDiffusionLM, AutoregressiveLM)}
