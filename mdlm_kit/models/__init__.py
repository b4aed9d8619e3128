"""Backbones: the bidirectional DiT (and, with ``causal=True``, the AR baseline), and the MDLM checkpoint importer."""

from mdlm_kit.models.config import SIZES, DiTConfig
from mdlm_kit.models.dit import DiT
from mdlm_kit.models.mdlm_import import convert_mdlm_state_dict, is_mdlm_checkpoint, load_mdlm_checkpoint

__all__ = ["DiT", "DiTConfig", "SIZES", "convert_mdlm_state_dict", "is_mdlm_checkpoint", "load_mdlm_checkpoint"]
