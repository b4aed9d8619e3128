"""The configuration of an mdlm-kit export (config.json, ``model_type: mdlm_kit``).

``mdlm-kit export`` copies this file into the folder beside ``modeling_mdlm_kit.py``, ``config.py`` and ``dit.py``
(its ``..models.`` imports made folder-relative), so the folder loads with ``trust_remote_code=True`` where mdlm-kit
is not installed: it may import only transformers and the DiT.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..models.config import DiTConfig


class MdlmKitConfig(PreTrainedConfig):
    """An mdlm-kit model: its DiT, its kind, and what scores text as in training (``load_export`` reads them).

    Args:
        kind: ``diffusion`` (``MdlmKitForMaskedLM``) or ``autoregressive`` (``MdlmKitForCausalLM``).
        dit_config: the fields of the DiT's ``DiTConfig``.
        schedule: the noise schedule as a config entry (``class_path``, ``init_args``); diffusion only.
        num_steps: the diffusion's number of time steps (null: continuous time).
        tokenizer_spec: the tokenizer as mdlm-kit stores it (``mdlm_kit.data.tokenizers.tokenizer_from_dict``).
        data: the data settings (corpus, split, tokenizer and packing) that rebuild the training run's validation
            split and pack text as the model was trained on.
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings, mask_token_id:
            ``dit_config``'s values under Hugging Face's names, for tools that read them.
    """

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
