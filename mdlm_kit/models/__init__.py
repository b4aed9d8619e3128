"""Backbones: the bidirectional DiT (and, with ``causal=True``, the AR baseline). Imports only torch and itself."""

from .config import SIZES, Backbone, DiTConfig
from .dit import DiT

__all__ = ["Backbone", "DiT", "DiTConfig", "SIZES"]
