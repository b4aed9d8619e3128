"""The one LightningModule: a backbone, a family (what the loss is), an optimizer and a learning-rate schedule,
as typed objects for LightningCLI. Non-finite handling, compile and FSDP2 sharding are in ``callbacks``, checkpoint
formats in ``io``."""

from __future__ import annotations

import functools
import math
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import SumMetric

from mdlm_kit import rng
from mdlm_kit.errors import UserError
from mdlm_kit.families import Family, make_family
from mdlm_kit.models import Backbone, DiT
from mdlm_kit.objective import NelboTerms


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` of the learning rate over
    ``decay_steps`` (None: constant after warmup)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, decay_steps: int | None = None,
                 min_lr_ratio: float = 0.1):
        if warmup_steps < 0 or (decay_steps is not None and decay_steps < 1) or not 0 <= min_lr_ratio <= 1:
            raise UserError("model.lr_scheduler: warmup_steps must be >= 0, decay_steps >= 1 or null and "
                            "min_lr_ratio in [0, 1]")
        self.warmup_steps, self.decay_steps, self.min_lr_ratio = warmup_steps, decay_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _ByReference(functools.partial):
    """A callable a deep copy of the module shares instead of copying: EMA (``WeightAveraging``) deep-copies the
    LightningModule, and LightningCLI's optimizer callables hold the whole CLI (its trainer, process group, locks)."""

    def __deepcopy__(self, memo):
        return self


def _spec(value):
    """A constructor argument as checkpoints store it: a config entry (``class_path``/``init_args``), never an
    object (checkpoints load with ``weights_only``)."""
    if value is None or isinstance(value, (dict, bool, int, float, str)):
        return value
    if isinstance(value, Backbone):
        return {k: getattr(value, k) for k in Backbone.__dataclass_fields__}
    if isinstance(value, Family):
        return value.spec()
    func, kwargs = getattr(value, "func", value), dict(getattr(value, "keywords", None) or {})
    if isinstance(func, type):  # a class, or functools.partial of one: what OptimizerCallable configs give
        return {"class_path": f"{func.__module__}.{func.__qualname__}", "init_args": kwargs}
    return None  # a plain function: not stored (evaluation never needs it; a resumed run takes the config's)


class LanguageModel(L.LightningModule):
    """A language model on a DiT backbone: masked diffusion, or the autoregressive baseline.

    Args:
        vocab_size: model vocabulary including the mask token (the last id); linked from the data.
        backbone: the DiT's shape (a named size, fields overridden): ``--model.backbone.size small``.
        family: the model and its loss: ``MaskedDiffusion`` (default; schedule, estimator, ...) or ``Autoregressive``.
        optimizer: called with the parameter groups (weights decay, embeddings and 1-d parameters do not);
            default AdamW at 3e-4 without weight decay.
        lr_scheduler: called with the optimizer, stepped every optimizer step (``WarmupCosine``); default none.
        unigram_bias: start the output bias at the training split's log token frequencies (``fit`` only; resumed or
            ``--checkpoint`` weights replace it): no unigram plateau before context is used (BENCHMARKS.md).
    """

    # set by io.load_checkpoint on a model read from a .ckpt: steps, max_steps, stopped_early, stop_reason
    run_info: dict | None = None

    def __init__(
        self,
        vocab_size: int = 0,
        backbone: Backbone = Backbone(),
        family: Family | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        unigram_bias: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("backbone", backbone), ("family", family), ("optimizer", optimizer),
                            ("lr_scheduler", lr_scheduler)):
            self.hparams[name] = _spec(self.hparams.get(name, value))
        backbone = Backbone(**backbone) if isinstance(backbone, dict) else backbone
        if vocab_size < 2:
            raise UserError(
                f"model.vocab_size must be >= 2 (set it or let the data module supply it), got {vocab_size}")
        family = make_family(family)
        try:
            self.config = backbone.config(vocab_size, time_conditioning=family.time_conditioning)
        except ValueError as e:  # models/ is plain torch: its checks raise ValueError
            raise UserError(str(e)) from None
        self.backbone = DiT(self.config, causal=family.causal)
        self.family = family.bind(self.config.mask_id)
        self.optimizer = _ByReference(optimizer) if optimizer else None
        self.lr_scheduler = _ByReference(lr_scheduler) if lr_scheduler else None
        self.val_nelbo_sum = SumMetric().set_dtype(torch.float64)
        self.val_tokens = SumMetric().set_dtype(torch.float64)
        self._t_last: float | None = None
        self._rng_resume: dict | None = None
        self.last_loss: torch.Tensor | None = None  # read by callbacks.NonFiniteGuard

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def metric(self) -> str:
        return self.family.metric

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def forward(self, input_ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(input_ids, cond)

    def configure_model(self) -> None:
        # ModelParallelStrategy requires this hook (lightning_gaps.py); FSDP2Sharding.setup, which runs before it,
        # shards: a mesh without it would train unsynchronized
        if self.device_mesh is not None and not getattr(self.backbone, "sharded", False):
            raise UserError("ModelParallelStrategy needs the mdlm_kit.callbacks.FSDP2Sharding callback, which "
                            "shards the blocks (mdlm-kit fit adds it)")

    def loss_terms(self, x0: torch.Tensor, keys: torch.Tensor, stream: int,
                   valid: torch.Tensor | None = None) -> NelboTerms:
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
        """The output bias at the training split's add-1/2 smoothed log token frequencies (the mask's at 0: SUBS
        never predicts it). Learned through the zero-initialized output layer, the frequencies take a direction of
        every masked position's features, where the model can sit for hundreds of steps (BENCHMARKS.md)."""
        if not hasattr(dm, "token_counts"):
            raise UserError("model.unigram_bias needs a data module with token_counts() (the kit's TextDataModule)")
        try:
            counts = dm.token_counts("train")
        except UserError as err:
            raise UserError(f"model.unigram_bias counts the training split's tokens: {err}") from None
        bias = self.backbone.final.linear.bias
        if bias is None or counts.shape[0] != bias.shape[0]:
            raise UserError("model.unigram_bias needs an output layer with a bias over the data's vocabulary")
        log_freq = torch.from_numpy(np.log((counts.astype(np.float64) + 0.5) / (counts.sum() + 0.5 * len(counts))))
        log_freq[self.mask_id] = 0.0
        value = log_freq.to(dtype=bias.dtype)
        if hasattr(bias, "placements"):  # sharded by FSDP2Sharding (its setup runs first): a DTensor like it
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(bias.device_mesh.device_type), bias.device_mesh, bias.placements)
        with torch.no_grad():
            bias.copy_(value.to(bias.device))

    def check_data(self, dm) -> None:
        """The data module's blocks fit this model: sequence length and vocabulary (a UserError if not)."""
        seq_len = getattr(getattr(dm, "hparams", None), "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise UserError(f"data.seq_len={seq_len} is above the model's maximum sequence length "
                            f"{self.config.max_seq_len}; lower data.seq_len or raise model.backbone.max_seq_len")
        if hasattr(dm, "model_vocab_size") and dm.model_vocab_size != self.config.vocab_size:
            raise UserError(f"the data's vocabulary ({dm.model_vocab_size} with the mask) does not match the model's "
                            f"({self.config.vocab_size}); use the tokenizer the model was trained with")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # each sample's noise is keyed by its position in the global stream (global batch n, then rank r's slice of
        # it, as the data module shards it): the same however the batch is split over processes
        n, bsz = self.trainer.fit_loop.epoch_loop.total_batch_idx, batch["input_ids"].shape[0]
        keys = (n * self.trainer.world_size + self.trainer.global_rank) * bsz + torch.arange(bsz, device=self.device)
        terms = self.loss_terms(batch["input_ids"], keys, rng.STREAM_TRAIN, batch.get("valid"))
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

    def check_optimization(self) -> None:
        """Build the optimizer and schedule on a stand-in parameter: bad settings (a negative learning rate) are one
        line before a run writes anything."""
        p = torch.nn.Parameter(torch.zeros(1))
        try:
            opt = self.optimizer([{"params": [p]}]) if self.optimizer else torch.optim.SGD([p], lr=1.0)
            if self.lr_scheduler:
                self.lr_scheduler(opt)
        except UserError:
            raise
        except (ValueError, TypeError) as e:  # torch's own checks (Invalid learning rate: -1.0)
            raise UserError(f"model.optimizer / model.lr_scheduler: {e}") from None

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = self.optimizer(groups) if self.optimizer else torch.optim.AdamW(groups, lr=3e-4, weight_decay=0.0)
        if self.lr_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler(opt), "interval": "step"}}
