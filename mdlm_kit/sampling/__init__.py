"""Samplers: one module per sampler, one registry, resolved once by name.

Every sampler has the signature ``sampler(ctx, template, sample_keys, opts, progress=None) -> tokens``:
``template`` (B, L) holds given tokens and the mask id where tokens are to be generated (a
prompt is a template whose first tokens are given; infilling is any other pattern); given
tokens never change. ``sample_keys`` (B,) index each sequence's noise, so a sample is the same
whatever batch it is generated in.
"""

from __future__ import annotations

from collections.abc import Callable

from mdlm_kit.errors import UserError
from mdlm_kit.sampling.ancestral import ancestral, ancestral_cache
from mdlm_kit.sampling.base import SamplerOptions, SamplingContext
from mdlm_kit.sampling.categorical import sample_categorical
from mdlm_kit.sampling.confidence import confidence
from mdlm_kit.sampling.fhs import fhs
from mdlm_kit.sampling.semi_ar import semi_ar

SAMPLERS: dict[str, Callable] = {
    "ancestral": ancestral,
    "ancestral_cache": ancestral_cache,
    "fhs": fhs,
    "semi_ar": semi_ar,
    "confidence": confidence,
}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "SamplerOptions", "SamplingContext", "get_sampler", "sample_categorical"]
