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

import lightning as L
import numpy as np
import torch
from torchmetrics import SumMetric

from mdlm_kit import rng
from mdlm_kit.errors import UserError
from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.objective import ESTIMATORS, NelboTerms, autoregressive_nll, nelbo_from_keys
from mdlm_kit.schedules import make_schedule

log = logging.getLogger(__name__)
NONFINITE = ("stop", "skip")
MAX_CONSECUTIVE_SKIPS = 10  # a run that only produces non-finite losses has broken weights: stop it


class LanguageModel(L.LightningModule):
    """What both models share: a DiT backbone, AdamW with warmup and cosine decay, float64 validation.

    Subclasses set ``kind`` and implement ``loss_terms``.
    """

    kind: str = ""
    causal: bool = False
    metric: str = "nelbo"  # what the logged loss is: a bound (nelbo) or the exact likelihood (nll)
    # set by checkpoint.load_checkpoint on a model read from a .ckpt: steps, max_steps, stopped_early, stop_reason
    run_info: dict | None = None

    def _build(
        self, vocab_size: int, size: str, lr: float, warmup_steps: int, decay_steps: int | None,
        on_nonfinite: str = "stop", **backbone
    ) -> None:
        if vocab_size < 2:
            raise UserError(
                f"model.vocab_size must be >= 2 (set it or let the data module supply it), got {vocab_size}"
            )
        if lr <= 0 or warmup_steps < 0 or (decay_steps is not None and decay_steps < 1):
            raise UserError("model.lr must be > 0, warmup_steps >= 0 and decay_steps >= 1 or null")
        if on_nonfinite not in NONFINITE:
            raise UserError(f"model.on_nonfinite must be stop or skip, got {on_nonfinite!r}")
        self.config = DiTConfig.from_name(size, vocab_size, **backbone)
        self.backbone = DiT(self.config, causal=self.causal)
        self.mask_id = self.config.mask_id
        self.val_nelbo_sum = SumMetric().set_dtype(torch.float64)
        self.val_tokens = SumMetric().set_dtype(torch.float64)
        self._t_last: float | None = None
        self._rng_resume: dict | None = None
        self._skips = 0  # consecutive steps skipped for a non-finite loss or gradient
        self._skip_update = False

    def forward(self, input_ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(input_ids, cond)

    def configure_model(self) -> None:
        mesh = self.device_mesh if self._trainer is not None else None
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
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            for block in self.backbone.blocks:  # the blocks hold the work; the head is the fused loss's
                block.compile()
            self._compiled = True

    def loss_terms(self, x0: torch.Tensor, keys: torch.Tensor, stream: int,
                   valid: torch.Tensor | None = None) -> NelboTerms:
        """Per-sequence loss (nats, float64) of clean blocks ``x0`` whose noise (if any) is keyed by ``keys``;
        ``valid`` marks the real tokens of padded blocks."""
        raise NotImplementedError

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

    def _nonfinite(self, what: str) -> None:
        """A non-finite loss or gradient at this step: skip the step (``on_nonfinite: skip``) or stop the run."""
        from mdlm_kit.callbacks import last_good_checkpoint

        step = self.trainer.global_step
        self._skips += 1
        if self.hparams.on_nonfinite == "skip" and self._skips <= MAX_CONSECUTIVE_SKIPS:
            if self.trainer.is_global_zero:
                log.warning("non-finite %s at step %d: step skipped (model.on_nonfinite: skip)", what, step)
            self.log("train/skipped_steps", float(self._skips), reduce_fx="max")
            return
        saved = last_good_checkpoint(self.trainer)
        for cb in self.trainer.checkpoint_callbacks:  # nothing is saved past this point (save_on_exception)
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = step
        kept = f"the last good checkpoint is {saved[0]} (step {saved[1]})" if saved else "no checkpoint was written"
        fix = ("lower model.lr or set trainer.gradient_clip_val, then resume with --ckpt_path last"
               if self.hparams.on_nonfinite == "stop" else
               f"{self._skips} steps in a row were non-finite, so the weights are broken: resume from it with a "
               "lower model.lr")
        raise UserError(f"non-finite {what} at step {step}; training stopped without saving; {kept}; {fix}"
                        + ("; or set model.on_nonfinite: skip to skip such steps"
                           if self.hparams.on_nonfinite == "stop" else ""))

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_update:  # the loss was non-finite and skipped: no update from this window
            self._skip_update = False
            for p in self.parameters():  # AdamW leaves parameters without a gradient untouched
                p.grad = None
            return
        # the loss may be finite while a gradient overflows, and one such step makes every weight NaN; under
        # 16-bit mixed precision the gradient scaler already skips those steps (and lowers the scale)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: each rank's shard
        bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad > 0:
            self._nonfinite("gradient")
            for p in self.parameters():  # AdamW leaves parameters without a gradient untouched
                p.grad = None
        else:
            self._skips = 0

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.check_data(dm)
        if stage == "fit" and self.hparams.get("unigram_bias") and dm is not None and not self.hparams.get("init_from"):
            self.init_unigram_bias(dm)  # a resumed run's checkpoint replaces it; init_from's weights would too
        self.load_init_weights()

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

    def load_init_weights(self, resuming: bool = False) -> None:
        """Start from the weights of ``init_from`` (an mdlm-kit ``.ckpt``, an ``mdlm-kit export`` folder or an
        MDLM reference checkpoint): fine-tuning, or ``validate`` on an exported model. Once, and not when the
        run resumes from a checkpoint (``--ckpt_path``; the CLI says so), whose weights win (``init_from`` may be
        gone by then)."""
        path = self.hparams.get("init_from")
        if not path or getattr(self, "_init_loaded", False):
            return
        if resuming:
            self._init_loaded = True  # setup() must not load it either
            return
        from mdlm_kit.checkpoint import load_checkpoint

        source, source_dm = load_checkpoint(path, kind=self.kind)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            same = (source_dm.tokenizer.fingerprint() == dm.tokenizer.fingerprint() if source_dm.tokenizer is not None
                    else source_dm.hparams.tokenizer == dm.hparams.tokenizer)
            if not same:
                raise UserError(f"model.init_from {path} was trained with another tokenizer than this run's data "
                                f"({source_dm.hparams.tokenizer!r} on its corpus); set data.tokenizer and "
                                "data.corpus as in the run that made it")
        theirs, ours = source.config.to_dict(), self.config.to_dict()
        differ = [f"{k}={theirs[k]!r} (here {ours[k]!r})" for k in ours if k != "dropout" and theirs.get(k) != ours[k]]
        if differ:
            raise UserError(f"model.init_from {path} holds another architecture: {', '.join(differ)}; set these "
                            "model options (model.size, n_layers, d_model, ..., layout) to match it")
        self.backbone.load_state_dict(source.backbone.state_dict())
        self._init_loaded = True

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
        local_bad = (~torch.isfinite(loss.detach())).float()
        bad = local_bad
        if self.trainer.world_size > 1:  # every process must take the same branch, or DDP waits forever
            bad = self.trainer.strategy.reduce(local_bad.clone(), reduce_op="sum")
        if bad > 0:
            self._nonfinite(f"training loss ({loss.item()})" if local_bad > 0 else
                            "training loss (in another process)")
            # skip: a zero loss still tied to every parameter (DDP needs a backward on every process; Lightning
            # refuses a None from training_step under DDP), then no update (on_before_optimizer_step)
            self._skip_update = True
            return sum(p.nan_to_num(0.0, 0.0, 0.0).sum() for p in self.parameters() if p.requires_grad) * 0.0
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
        trainer = self._trainer
        mixed = trainer is not None and "mixed" in str(trainer.precision)
        clipping = trainer is not None and bool(trainer.gradient_clip_val)
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
        schedule: noise schedule name (``loglinear``, ``linear``, ``cosine``, ``polynomial``, ``geometric``).
        schedule_kwargs: arguments of the schedule, e.g. ``{eps: 1e-3}`` or ``{power: 2}``.
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
            good checkpoint, or ``skip``s the step (the run still stops after 10 in a row).
        init_from: start from these weights: an mdlm-kit ``.ckpt``, an ``mdlm-kit export`` folder or an MDLM
            reference checkpoint, of the same architecture (fine-tuning; ``validate`` on an export).
        unigram_bias: start the output layer's bias at the log token frequencies of the training split
            (``fit`` only; not when resuming or with ``init_from``): the model predicts the unigram
            distribution from step 0 and starts on context at once (BENCHMARKS.md, the unigram plateau).
    """

    kind = "diffusion"

    def __init__(
        self,
        vocab_size: int = 0,
        size: str = "tiny",
        n_layers: int | None = None,
        d_model: int | None = None,
        n_heads: int | None = None,
        cond_dim: int | None = None,
        max_seq_len: int | None = None,
        dropout: float = 0.0,
        conv_kernel: int = 0,
        time_conditioning: bool = False,
        layout: str = "kit",
        schedule: str = "loglinear",
        schedule_kwargs: dict | None = None,
        num_steps: int | None = None,
        estimator: str = "auto",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 2500,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        masked_only: bool = True,
        ce_kernel: str = "auto",
        compile: bool = False,
        fused_adamw: bool | None = None,
        on_nonfinite: str = "stop",
        init_from: str | None = None,
        unigram_bias: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if ce_kernel not in ("auto", "always", "never"):
            raise UserError(f"model.ce_kernel must be auto, always or never, got {ce_kernel!r}")
        if num_steps is not None and num_steps < 1:
            raise UserError(f"model.num_steps must be >= 1 or null (continuous time), got {num_steps}")
        self.schedule = make_schedule(schedule, **(schedule_kwargs or {}))
        count_ok = not time_conditioning and num_steps is None
        if estimator == "auto":
            estimator = "count" if count_ok else "time"
        if estimator not in ESTIMATORS:
            raise UserError(f"model.estimator: unknown estimator {estimator!r}; choose auto, {', '.join(ESTIMATORS)}")
        if estimator == "count" and not count_ok:
            raise UserError("model.estimator=count needs a time-agnostic model in continuous time (num_steps: null)")
        self.estimator = estimator
        self._build(
            vocab_size, size, lr, warmup_steps, decay_steps, on_nonfinite,
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, cond_dim=cond_dim, max_seq_len=max_seq_len,
            dropout=dropout, time_conditioning=time_conditioning, layout=layout, conv_kernel=conv_kernel,
        )

    def loss_terms(self, x0: torch.Tensor, keys: torch.Tensor, stream: int,
                   valid: torch.Tensor | None = None) -> NelboTerms:
        return nelbo_from_keys(
            self.backbone,
            x0,
            keys,
            self.schedule,
            self.mask_id,
            seed=self.hparams.seed,
            stream=stream,
            num_steps=self.hparams.num_steps,
            time_conditioning=self.config.time_conditioning,
            estimator=self.estimator,
            # sharded (FSDP2) parameters are gathered by forward(), which the masked-only head bypasses
            masked_only=self.hparams.masked_only and not getattr(self, "_sharded", False),
            kernel=self.hparams.ce_kernel,
            valid=valid,
        )


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
        on_nonfinite, init_from: as for ``MaskedDiffusionLM``.
    """

    kind = "autoregressive"
    causal = True
    metric = "nll"

    def __init__(
        self,
        vocab_size: int = 0,
        size: str = "tiny",
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
        on_nonfinite: str = "stop",
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._build(
            vocab_size, size, lr, warmup_steps, decay_steps, on_nonfinite,
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, dropout=dropout,
            conv_kernel=conv_kernel,
        )

    def loss_terms(self, x0: torch.Tensor, keys: torch.Tensor, stream: int,
                   valid: torch.Tensor | None = None) -> NelboTerms:
        return autoregressive_nll(self.backbone, x0, start_id=self.mask_id, valid=valid)


MODELS = {cls.kind: cls for cls in (MaskedDiffusionLM, AutoregressiveLM)}
