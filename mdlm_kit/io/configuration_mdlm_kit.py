"""The configuration of an mdlm-kit export (config.json, ``model_type: mdlm_kit``). Copied into every export folder
as remote code (``..models.`` imports made folder-relative): it may import only transformers and the DiT's config."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..models.config import DiTConfig


class MdlmKitConfig(PreTrainedConfig):
    """An mdlm-kit model: ``kind``, ``dit_config`` (``DiTConfig``'s fields), a diffusion's ``schedule`` (``class_path``)
    and ``num_steps`` (null: continuous time), ``tokenizer_spec`` and the ``data`` settings that rebuild the validation
    split; ``vocab_size`` ... ``mask_token_id`` repeat ``dit_config`` under Hugging Face's names."""

    model_type = "mdlm_kit"

    kind: str = "diffusion"
    dit_config: dict | None = None
    schedule: dict | None = None
    num_steps: int | None = None
    tokenizer_spec: dict | None = None
    data: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # the output layer is its own matrix (MDLM's DiT): nothing is tied, on save or on load
    tie_word_embeddings: bool = False
    use_cache: bool = False  # the DiT keeps no key/value cache: generate() recomputes the prefix

    def __post_init__(self, **kwargs):
        if self.kind not in ("diffusion", "autoregressive"):
            raise ValueError(f"kind must be diffusion or autoregressive, got {self.kind!r}")
        if self.dit_config is not None:
            dit = self.dit()
            self.vocab_size, self.hidden_size = dit.vocab_size, dit.d_model
            self.num_hidden_layers, self.num_attention_heads = dit.n_layers, dit.n_heads
            self.max_position_embeddings, self.mask_token_id = dit.max_seq_len, dit.mask_id
        super().__post_init__(**kwargs)

    def dit(self) -> DiTConfig:
        return DiTConfig(**self.dit_config)
