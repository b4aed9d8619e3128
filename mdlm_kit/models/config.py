"""Backbone configuration: a typed dataclass and a registry of named sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

# Named sizes. `small` and `medium` are MDLM's (Sahoo et al. 2024, table 9).
SIZES: dict[str, dict] = {
    "debug": dict(n_layers=2, d_model=32, n_heads=2, cond_dim=32, max_seq_len=256),
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, cond_dim=64, max_seq_len=512),
    "small": dict(n_layers=12, d_model=768, n_heads=12, cond_dim=128, max_seq_len=1024),
    "medium": dict(n_layers=24, d_model=1024, n_heads=16, cond_dim=128, max_seq_len=1024),
}


@dataclass
class DiTConfig:
    vocab_size: int  # including the mask token, which is the last id
    n_layers: int
    d_model: int
    n_heads: int
    cond_dim: int = 128
    mlp_ratio: int = 4
    max_seq_len: int = 1024
    dropout: float = 0.0
    time_conditioning: bool = False
    rope_base: float = 10000.0
    conv_kernel: int = 0  # width of the depthwise convolution over positions in every block (dit.LocalConv)
    layout: str = "kit"  # "kit" or "mdlm" (the MDLM reference DiT, for its checkpoints): see dit.py

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "cond_dim", "mlp_ratio", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model: {name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"model: vocab_size must be >= 2 (tokens plus the mask), got {self.vocab_size}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model: d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of "
                             "even size")
        if self.layout not in ("kit", "mdlm"):
            raise ValueError(f"model: layout must be kit or mdlm, got {self.layout!r}")
        if self.conv_kernel < 0:
            raise ValueError(f"model: conv_kernel must be >= 0 (0: no convolution), got {self.conv_kernel}")
        if self.conv_kernel and self.layout == "mdlm":
            raise ValueError("model: conv_kernel must be 0 with layout mdlm (the MDLM reference DiT has none)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model: dropout must be in [0, 1), got {self.dropout}")

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    @property
    def adaptive(self) -> bool:
        """Whether the blocks carry adaLN and a time embedding (every MDLM-layout model: MDLM feeds sigma = 0)."""
        return self.time_conditioning or self.layout == "mdlm"

    @classmethod
    def from_name(cls, name: str, vocab_size: int, **overrides) -> DiTConfig:
        if name not in SIZES:
            raise ValueError(f"unknown model size {name!r}; choose one of: {', '.join(SIZES)}")
        kwargs = {**SIZES[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(vocab_size=vocab_size, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Backbone:
    """A DiT's shape as a config names it: a named size (``SIZES``), any of its fields overridden.

    Args:
        size: ``debug``, ``tiny``, ``small`` (MDLM's 12 x 768) or ``medium``.
        n_layers, d_model, n_heads, cond_dim, max_seq_len: override the named size (None: the size's).
        dropout: dropout in the blocks.
        conv_kernel: width of a depthwise convolution over positions in every block (0: none; kit layout only).
        layout: ``kit`` (this toolkit's blocks) or ``mdlm`` (the MDLM reference DiT's layout, for its checkpoints).
    """

    size: Literal["debug", "tiny", "small", "medium"] = "tiny"
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    cond_dim: int | None = None
    max_seq_len: int | None = None
    dropout: float = 0.0
    conv_kernel: int = 0
    layout: Literal["kit", "mdlm"] = "kit"

    def config(self, vocab_size: int, time_conditioning: bool = False) -> DiTConfig:
        shape = {k: v for k, v in asdict(self).items() if k != "size"}
        return DiTConfig.from_name(self.size, vocab_size, time_conditioning=time_conditioning, **shape)

    @classmethod
    def of(cls, config: DiTConfig) -> Backbone:
        """The shape of ``config`` (every size field explicit)."""
        size = next((n for n, s in SIZES.items() if all(getattr(config, k) == v for k, v in s.items())), "tiny")
        return cls(size=size, **{f.name: getattr(config, f.name) for f in fields(cls) if f.name != "size"})
