"""Backbones: the bidirectional DiT (and, with ``causal=True``, the AR baseline)."""

from mdlm_kit.models.config import SIZES, DiTConfig
from mdlm_kit.models.dit import DiT

__all__ = ["DiT", "DiTConfig", "SIZES"]
