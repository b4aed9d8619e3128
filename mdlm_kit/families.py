"""Diffusion families, the extension point: how a clean block is corrupted, its loss (a bound, or the exact NLL),
and how a sampler calls the network. In a config: ``model.family: MaskedDiffusion`` (a ``class_path`` object)."""

from __future__ import annotations

import copy
from typing import Literal

from torch import Tensor, nn

from mdlm_kit.errors import UserError
from mdlm_kit.objective import ESTIMATORS, NelboTerms, autoregressive_nll, nelbo_from_keys
from mdlm_kit.sampling import SamplingContext
from mdlm_kit.schedules import Schedule, make_schedule
from mdlm_kit.specs import init_args, spec


class Family:
    """What corrupts a clean block, its loss, and how a sampler calls the backbone. ``mask_id`` (the backbone's last
    id: mask, or start token) is the backbone's: ``LanguageModel`` binds it."""

    kind: str = ""  # diffusion | autoregressive: what checkpoints and exports record
    metric: str = "nelbo"  # the logged loss: a bound (nelbo) or the exact likelihood (nll)
    causal: bool = False  # the backbone's attention
    time_conditioning: bool = False  # the backbone gets the noise level (adaLN)
    mask_id: int = -1

    def bind(self, mask_id: int) -> Family:
        out = copy.copy(self)
        out.mask_id = int(mask_id)
        return out

    def replace(self, **changes) -> Family:
        """A copy with other arguments, checked as the constructor checks them."""
        return type(self)(**{**init_args(self), **changes}).bind(self.mask_id)

    def spec(self) -> dict:
        """This family as a config entry (``class_path``, ``init_args``): what checkpoints hold."""
        return spec(self, **{k: v.spec() for k, v in init_args(self).items() if isinstance(v, Schedule)})

    def loss(self, backbone: nn.Module, x0: Tensor, keys: Tensor, stream: int,
             valid: Tensor | None = None) -> NelboTerms:
        """Per-sequence loss (float64 nats) of clean blocks ``x0`` whose noise (if any) is keyed by
        (seed, ``stream``, ``keys``); ``valid`` marks the real tokens of padded blocks."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in init_args(self).items())})"


class MaskedDiffusion(Family):
    """Masked (absorbing-state) diffusion: SUBS parameterization, continuous time or T discrete steps.

    Args:
        schedule: the noise schedule (default ``LogLinear``), e.g. ``--model.family.schedule Polynomial``.
        num_steps: None for the continuous-time NELBO, else the number T of discrete steps.
        estimator: ``time`` (sample t), ``count`` (t integrated out: same expectation, far lower variance;
            time-agnostic continuous-time models only) or ``auto`` (``count`` where it applies, else ``time``).
        time_conditioning: feed the noise level to the backbone (adaLN); off by default (time-agnostic).
        seed: seed of the corruption noise (times and masks), independent of the data order.
        masked_only: logits only at masked positions (fused weighted cross-entropy): same loss and gradients.
        kernel: the fused cross-entropy's row step: ``auto`` (Triton on CUDA), ``always``, ``never``.
    """

    kind = "diffusion"

    def __init__(self, schedule: Schedule | None = None, num_steps: int | None = None,
                 estimator: Literal["auto", "time", "count"] = "auto", time_conditioning: bool = False, seed: int = 0,
                 masked_only: bool = True, kernel: Literal["auto", "always", "never"] = "auto"):
        if num_steps is not None and num_steps < 1:
            raise UserError(f"model.family.num_steps must be >= 1 or null (continuous time), got {num_steps}")
        count_ok = not time_conditioning and num_steps is None
        if estimator == "auto":
            estimator = "count" if count_ok else "time"
        if estimator not in ESTIMATORS:
            raise UserError(f"model.family.estimator: unknown estimator {estimator!r}; choose auto, "
                            f"{', '.join(ESTIMATORS)}")
        if estimator == "count" and not count_ok:
            raise UserError("model.family.estimator=count needs a time-agnostic model in continuous time "
                            "(num_steps: null, time_conditioning: false)")
        self.schedule = make_schedule(schedule)
        self.num_steps, self.estimator, self.time_conditioning = num_steps, estimator, bool(time_conditioning)
        self.seed, self.masked_only, self.kernel = int(seed), bool(masked_only), kernel

    def loss(self, backbone: nn.Module, x0: Tensor, keys: Tensor, stream: int,
             valid: Tensor | None = None) -> NelboTerms:
        masked_only = self.masked_only and hasattr(backbone, "head")
        return nelbo_from_keys(backbone.features if masked_only else backbone, x0, keys, self.schedule, self.mask_id,
                               seed=self.seed, stream=stream, num_steps=self.num_steps, valid=valid,
                               time_conditioning=self.time_conditioning, estimator=self.estimator,
                               head=backbone.head if masked_only else None, kernel=self.kernel)

    def sampling_context(self, backbone: nn.Module, max_len: int | None = None) -> SamplingContext:
        return SamplingContext(backbone, self.schedule, self.mask_id, self.time_conditioning, max_len=max_len)


class Autoregressive(Family):
    """Next-token prediction with causal attention; every token of a block is scored, the first from a start
    token (the mask id, which never occurs in data), so it covers the tokens the diffusion bound covers."""

    kind = "autoregressive"
    metric = "nll"
    causal = True

    def loss(self, backbone: nn.Module, x0: Tensor, keys: Tensor, stream: int,
             valid: Tensor | None = None) -> NelboTerms:
        return autoregressive_nll(backbone, x0, start_id=self.mask_id, valid=valid)


FAMILIES: dict[str, type[Family]] = {cls.kind: cls for cls in (MaskedDiffusion, Autoregressive)}


def make_family(spec: Family | dict | str | None) -> Family:
    """A family from an instance, a config entry (``class_path`` + ``init_args``, a checkpoint's) or a kind."""
    if isinstance(spec, Family):
        return spec
    if spec is None or isinstance(spec, str):
        spec = {"class_path": "MaskedDiffusion" if spec is None else spec}
    path = str(spec.get("class_path", ""))
    cls = FAMILIES.get(path) or {c.__name__: c for c in FAMILIES.values()}.get(path.rsplit(".", 1)[-1])
    if cls is None:
        names = ", ".join(c.__name__ for c in FAMILIES.values())
        raise UserError(f"unknown model family {path!r}; choose one of: {names}")
    return cls(**dict(spec.get("init_args") or {}))
