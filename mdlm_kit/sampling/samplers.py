"""Samplers as typed objects with their own options, what ``mdlm-kit generate --sampler`` takes: ``--sampler
FirstHitting --sampler.tokens_per_step 2``, or a registered name (``--sampler fhs``) for the class's defaults."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mdlm_kit.errors import UserError
from mdlm_kit.kernels import Kernel
from mdlm_kit.sampling.base import SAMPLERS, SamplerOptions, SamplingContext
from mdlm_kit.specs import init_args


class Sampler:
    """Options every sampler has.

    Args:
        temperature: softmax temperature (> 0).
        top_p: nucleus sampling mass in (0, 1].
        precision: Gumbel noise precision, ``float64`` (default) or ``float32`` (truncates the tail).
        kernel: the fused Triton categorical sampler: on CUDA (``auto``), ``always`` or ``never``.
    """

    name = ""  # the registered sampler function

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0,
                 precision: Literal["float64", "float32"] = "float64", kernel: Kernel = "auto"):
        self.temperature, self.top_p, self.precision, self.kernel = temperature, top_p, precision, kernel
        self.options()  # checked now, before any model is loaded

    def options(self, seed: int = 0) -> SamplerOptions:
        return SamplerOptions(seed=seed, **init_args(self))

    def __call__(self, ctx: SamplingContext, template: Tensor, sample_keys: Tensor, seed: int = 0,
                 progress=None) -> Tensor:
        return SAMPLERS[self.name](ctx, template, sample_keys, self.options(seed), progress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in init_args(self).items())})"


class FirstHitting(Sampler):
    """``fhs``: the first-hitting sampler (Zheng et al. 2024), exact, one network call per revealed token.

    Args:
        tokens_per_step: tokens revealed per network call (> 1 is approximate).
    """

    name = "fhs"

    def __init__(self, tokens_per_step: int = 1, **kwargs):
        self.tokens_per_step = tokens_per_step
        super().__init__(**kwargs)


class Ancestral(Sampler):
    """``ancestral``: MDLM's ancestral sampler on a grid of time steps.

    Args:
        steps: time steps (MDLM's 1000 by default).
    """

    name = "ancestral"

    def __init__(self, steps: int = 1000, **kwargs):
        self.steps = steps
        super().__init__(**kwargs)


class AncestralCache(Ancestral):
    """``ancestral_cache``: ancestral, skipping the network when no token changed (time-agnostic models only)."""

    name = "ancestral_cache"


class SemiAutoregressive(Sampler):
    """``semi_ar``: blocks left to right, each sampled by an inner sampler given the text before it; any length.

    Args:
        block_length: tokens per block (default half the model's window).
        inner: the sampler inside each block.
        steps: time steps of an ancestral inner sampler (default 1000).
        tokens_per_step: of the ``fhs`` inner sampler.
    """

    name = "semi_ar"

    def __init__(self, block_length: int | None = None, inner: Literal["fhs", "ancestral", "ancestral_cache"] = "fhs",
                 steps: int | None = None, tokens_per_step: int = 1, **kwargs):
        self.block_length, self.inner, self.steps, self.tokens_per_step = block_length, inner, steps, tokens_per_step
        super().__init__(**kwargs)


class Confidence(Sampler):
    """``confidence``: MaskGIT/LLaDA-style, the most confident masked positions first (approximate).

    Args:
        steps: network calls in all (default: one per token).
        block_length: tokens per block, left to right (default: the whole sequence).
    """

    name = "confidence"

    def __init__(self, steps: int | None = None, block_length: int | None = None, **kwargs):
        self.steps, self.block_length = steps, block_length
        super().__init__(**kwargs)


CLASSES: dict[str, type[Sampler]] = {cls.name: cls for cls in (FirstHitting, Ancestral, AncestralCache,
                                                                 SemiAutoregressive, Confidence)}


def sampler_class(name: str) -> type[Sampler]:
    """The class a registered name (``fhs``) or a class name (``FirstHitting``) stands for."""
    cls = CLASSES.get(name) or next((c for c in CLASSES.values() if name.rsplit(".", 1)[-1] == c.__name__), None)
    if cls is None:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(CLASSES)} (or their classes: "
                        f"{', '.join(c.__name__ for c in CLASSES.values())})")
    return cls


def make_sampler(spec: Sampler | str | None = None) -> Sampler:
    """A sampler from an instance, a registered name (``fhs``) or a class name (``FirstHitting``) with its defaults."""
    if type(spec) is Sampler:  # the common options alone (--sampler.temperature 0.9): the default sampler's
        return FirstHitting(**init_args(spec))
    if isinstance(spec, Sampler):
        return spec
    return sampler_class(spec or "fhs")()
