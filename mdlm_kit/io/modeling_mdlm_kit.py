"""The models of an mdlm-kit export: the DiT under Hugging Face's ``PreTrainedModel``. Copied into every export
folder as remote code: it may import only torch, transformers, ``configuration_mdlm_kit`` and the DiT."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from ..models.dit import DiT, Rotary
from .configuration_mdlm_kit import MdlmKitConfig


class MdlmKitPreTrainedModel(PreTrainedModel):
    """The DiT under ``backbone``, with the same parameter names as the LightningModule's state_dict."""

    config_class = MdlmKitConfig
    config: MdlmKitConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["Block"]
    # transformers 5 reads a {target: source} dict; empty, with tie_word_embeddings=False, so nothing is tied
    _tied_weights_keys: dict[str, str] = {}
    causal = False

    def __init__(self, config: MdlmKitConfig):
        super().__init__(config)
        self.backbone = DiT(config.dit(), causal=self.causal)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.backbone.final.linear

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The DiT's own initialization, not transformers' normal(0.02). ``from_pretrained`` runs it after loading,
        under a guard that skips every loaded tensor: only what the file lacks is set, such as the rotary tables
        (the DiT's only non-persistent buffers, empty after meta-device construction)."""
        with hf_init.guard_torch_init_functions():
            self.backbone.reset_parameters()
        for module in self.modules():
            if isinstance(module, Rotary):
                self._init_weights(module)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Rotary):
            head_dim, max_len = module.cos.shape[-1], module.cos.shape[0]
            with torch.device("cpu"):  # from_pretrained builds under a meta-device context
                fresh = Rotary(head_dim, max_len, self.config.dit().rope_base)
            hf_init.copy_(module.cos, fresh.cos.to(module.cos.device))
            hf_init.copy_(module.sin, fresh.sin.to(module.sin.device))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()  # PyTorch's default, as DiT.reset_parameters (e.g. a resized embedding)


class MdlmKitForMaskedLM(MdlmKitPreTrainedModel):
    """A masked diffusion model: the DiT's raw scores, with the mask's column (the last id); mdlm-kit never
    predicts the mask (SUBS) and carries unmasked tokens over."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cond: Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> MaskedLMOutput | tuple[Tensor]:
        """``input_ids``: (B, S), ``config.mask_token_id`` where masked; ``attention_mask`` is ignored (as in training,
        every position is attended to); ``cond``: (B,) mask rate 1 - alpha(t), for time-conditioned models only."""
        logits = self.backbone(input_ids, cond)  # (B, S, V)
        return (logits,) if return_dict is False else MaskedLMOutput(logits=logits)


class MdlmKitForCausalLM(MdlmKitPreTrainedModel, GenerationMixin):
    """The autoregressive baseline, position l predicting l+1. Sequences start with the mask id
    (``config.bos_token_id``), which is never predicted; no key/value cache: ``generate`` recomputes the prefix."""

    causal = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutput | tuple[Tensor]:
        """``attention_mask`` is ignored (causal attention over every position; pad on the right)."""
        logits = self.backbone(input_ids, None)  # (B, S, V)
        return (logits,) if return_dict is False else CausalLMOutput(logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}
