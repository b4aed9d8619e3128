"""Samplers: one module per sampler, one registry (``base.SAMPLERS``), typed objects for ``generate --sampler``. A
sampler's ``template`` (B, L) holds given tokens (prompt, infilling), which stay, and the mask id where tokens are to
be generated; ``sample_keys`` (B,) key each sequence's noise, so a sample does not depend on its batch."""

from __future__ import annotations

from mdlm_kit.sampling import ancestral, confidence, fhs, semi_ar  # noqa: F401  (each registers its samplers)
from mdlm_kit.sampling.base import SAMPLERS, SamplerOptions, SamplingContext, get_sampler
from mdlm_kit.sampling.categorical import sample_categorical
from mdlm_kit.sampling.samplers import (
    Ancestral,
    AncestralCache,
    Confidence,
    FirstHitting,
    Sampler,
    SemiAutoregressive,
    make_sampler,
    sampler_class,
)

__all__ = ["SAMPLERS", "Ancestral", "AncestralCache", "Confidence", "FirstHitting", "Sampler", "SamplerOptions",
           "SamplingContext", "SemiAutoregressive", "get_sampler", "make_sampler", "sample_categorical",
           "sampler_class"]
