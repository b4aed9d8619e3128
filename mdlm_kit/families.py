"""Diffusion families: the extension point of the toolkit.

A family says, in one place, how a clean block is corrupted, what its loss is (a bound, or the exact NLL), and
how a sampler calls the network. The LightningModule, evaluation (``mdlm-kit ppl``) and generation only talk to
a family, so adding one (block diffusion next) touches this registry, the family's own code, a config and tests.

- ``MaskedDiffusion``: absorbing-state diffusion on the Rao-Blackwellized NELBO (``objective.nelbo``).
- ``Autoregressive``: the same backbone, causal, on next-token NLL (``objective.autoregressive_nll``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from mdlm_kit.objective import NelboTerms, autoregressive_nll, nelbo_from_keys
from mdlm_kit.sampling import SamplingContext
from mdlm_kit.schedules import LogLinear, Schedule


@dataclass
class MaskedDiffusion:
    """Masked (absorbing-state) diffusion: SUBS parameterization, continuous time or T discrete steps.

    ``estimator`` is ``time`` or ``count`` (resolved by the caller; see ``objective``); ``seed`` keys the
    corruption noise; ``masked_only`` projects only the masked rows (same loss and gradients).
    """

    mask_id: int
    schedule: Schedule = field(default_factory=LogLinear)
    num_steps: int | None = None
    estimator: Literal["time", "count"] = "time"
    time_conditioning: bool = False
    seed: int = 0
    masked_only: bool = True
    kernel: Literal["auto", "always", "never"] = "auto"

    kind = "diffusion"
    metric = "nelbo"  # the logged loss is a bound
    causal = False

    def loss(self, backbone: nn.Module, x0: Tensor, keys: Tensor, stream: int,
             valid: Tensor | None = None) -> NelboTerms:
        """Per-sequence NELBO (float64 nats) of clean blocks ``x0``, their noise keyed by (seed, stream, keys)."""
        masked_only = self.masked_only and hasattr(backbone, "head")
        return nelbo_from_keys(
            backbone.features if masked_only else backbone, x0, keys, self.schedule, self.mask_id, seed=self.seed,
            stream=stream, num_steps=self.num_steps, time_conditioning=self.time_conditioning,
            estimator=self.estimator, head=backbone.head if masked_only else None, kernel=self.kernel, valid=valid,
        )

    def sampling_context(self, backbone: nn.Module, max_len: int | None = None) -> SamplingContext:
        return SamplingContext(backbone, self.schedule, self.mask_id, self.time_conditioning, max_len=max_len)


@dataclass
class Autoregressive:
    """Next-token prediction with causal attention; every token of a block is scored, the first from a start
    token (the mask id, which never occurs in data), so it covers the tokens the diffusion bound covers."""

    mask_id: int

    kind = "autoregressive"
    metric = "nll"  # the exact likelihood
    causal = True

    def loss(self, backbone: nn.Module, x0: Tensor, keys: Tensor, stream: int,
             valid: Tensor | None = None) -> NelboTerms:
        return autoregressive_nll(backbone, x0, start_id=self.mask_id, valid=valid)


Family = MaskedDiffusion | Autoregressive
FAMILIES: dict[str, type] = {cls.kind: cls for cls in (MaskedDiffusion, Autoregressive)}
