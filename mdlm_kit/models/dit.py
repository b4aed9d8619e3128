"""A bidirectional diffusion transformer after MDLM's DiT, in build order.

Layouts (``DiTConfig.layout``): ``kit`` has plain pre-norm blocks when time-agnostic (the default: the optimal
denoiser does not need t) and adaLN on the mask rate x 1000 when time-conditioned; ``mdlm`` is exactly the MDLM
reference DiT (kuleshov-group/mdlm ``models/dit.py``), adaLN on sigma = -log(1 - mask rate) in every block, sigma = 0
when time-agnostic (the conditioning is then silu(embed(0)), not zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DiTConfig


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale) + shift


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding (halves rotated, not interleaved) over the full head dimension."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (S, hd)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        seq_len = x.shape[-2]  # x: (B, H, S, hd)
        cos, sin = self.cos[:seq_len].to(x.dtype), self.sin[:seq_len].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def layer_norm(cfg: DiTConfig) -> nn.LayerNorm:
    if cfg.layout == "mdlm":  # MDLM's LayerNorm: a weight and no bias (adaLN's shift stands in for it)
        return nn.LayerNorm(cfg.d_model, bias=False)
    # kit: under adaLN the modulation supplies the affine part, as in MDLM
    return nn.LayerNorm(cfg.d_model, elementwise_affine=not cfg.time_conditioning)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level followed by an MLP (DiT / MDLM)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, level: Tensor) -> Tensor:
        # level: (B,); kit: the mask rate in [0, 1], scaled by 1000 so the sinusoids resolve it as DiT resolves
        # t in [0, 1000]; mdlm: sigma, unscaled (scale 1)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=level.device, dtype=torch.float32) / half)
        args = (level.float() * self.scale)[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, cond_dim)


class LocalConv(nn.Module):
    """Depthwise Conv1d over the ``conv_kernel`` nearest positions: a masked position sees its neighbours from the first
    step, which takes the model off the unigram plateau early (BENCHMARKS.md). Causal models look back only."""

    def __init__(self, cfg: DiTConfig, causal: bool):
        super().__init__()
        k = cfg.conv_kernel
        self.pad = (k - 1, 0) if causal else ((k - 1) // 2, k // 2)  # (left, right) zero padding
        self.norm = layer_norm(cfg)
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, k, groups=cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, S, D) -> (B, S, D); position i mixes positions i - pad[0] .. i + pad[1]
        return self.conv(F.pad(self.norm(x).transpose(1, 2), self.pad)).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig, causal: bool):
        super().__init__()
        self.n_heads, self.causal = cfg.n_heads, causal
        # MDLM's DiT drops out only after the attention and MLP outputs (flash attention is called with p=0)
        self.dropout = 0.0 if cfg.layout == "mdlm" else cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, rotary: Rotary) -> Tensor:
        B, S, D = x.shape
        # MDLM's packing: 'b s (three h d) -> three b h s d'
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B,H,S,hd)
        q, k = rotary(q), rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, S, hd)
        return self.out(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden)
        self.proj = nn.Linear(hidden, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; with time conditioning, adaLN shift/scale/gate (DiT)."""

    def __init__(self, cfg: DiTConfig, causal: bool):
        super().__init__()
        self.norm1 = layer_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.norm2 = layer_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if cfg.adaptive else None
        self.local = LocalConv(cfg, causal) if cfg.conv_kernel else None

    def forward(self, x: Tensor, rotary: Rotary, c: Tensor | None) -> Tensor:
        if self.local is not None:
            x = x + self.local(x)
        if self.adaLN is None:
            x = x + self.drop(self.attn(self.norm1(x), rotary))
            return x + self.drop(self.mlp(self.norm2(x)))
        # c: (B, cond_dim) -> six (B, 1, D) modulation vectors
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1), rotary))
        return x + gate2 * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = layer_norm(cfg)
        self.linear = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.adaLN = nn.Linear(cfg.cond_dim, 2 * cfg.d_model) if cfg.adaptive else None

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        """What the output projection ``linear`` sees: (B, S, D)."""
        if self.adaLN is None:
            return self.norm(x)
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class DiT(nn.Module):
    """Bidirectional (or, with ``causal=True``, autoregressive) transformer: ``forward(input_ids (B, S), cond (B,) |
    None) -> logits (B, S, vocab_size)``, the mask token's column included (the objective applies SUBS)."""

    def __init__(self, cfg: DiTConfig, causal: bool = False):
        super().__init__()
        self.config, self.causal = cfg, causal
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        scale = 1.0 if cfg.layout == "mdlm" else 1000.0
        self.time_embed = TimestepEmbedder(cfg.cond_dim, scale=scale) if cfg.adaptive else None
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layers))
        self.final = FinalLayer(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default initialization (as MDLM; faster here than GPT-2's std 0.02: on the quickstart, val NELBO
        5.61 vs 5.93 nats/token after 200 steps), with the output layer (uniform predictions) and adaLN at zero."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv1d)):
                m.reset_parameters()
        for m in [self.final.linear, self.final.adaLN] + [b.adaLN for b in self.blocks]:
            if m is not None:  # adaLN as in DiT: modulation starts at zero, gates closed
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.head(self.features(input_ids, cond))  # (B, S, V)

    @property
    def head(self) -> nn.Linear:
        """The output projection: ``forward(x, c) == head(features(x, c))``."""
        return self.final.linear

    def features(self, input_ids: Tensor, cond: Tensor | None = None) -> Tensor:
        """Hidden states before the output projection: (B, S, D). The loss projects only the masked rows itself
        (``mdlm_kit.kernels.weighted_ce``)."""
        B, S = input_ids.shape
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds the model's max_seq_len {self.config.max_seq_len}")
        c = self.conditioning(cond, B)  # (B, cond_dim) or None
        x = self.embed(input_ids)  # (B, S, D)
        for block in self.blocks:
            x = block(x, self.rotary, c)
        return self.final(x, c)  # (B, S, D)

    def conditioning(self, cond: Tensor | None, batch: int) -> Tensor | None:
        """adaLN's c (batch, cond_dim) from the mask rate ``cond`` (batch,); None without adaLN."""
        if self.time_embed is None:
            return None
        cfg = self.config
        if cfg.layout == "mdlm" and not cfg.time_conditioning:
            # MDLM zeroes sigma for time-agnostic models (Diffusion._process_sigma) but still embeds it
            level = torch.zeros(batch, device=self.embed.weight.device)
        elif cond is None:
            raise ValueError("this model is time-conditioned: pass cond (the mask rate per sequence)")
        elif cfg.layout == "mdlm":
            # MDLM's total noise sigma = -log(alpha_t) = -log(1 - r), whatever the schedule; the clamp keeps the
            # all-masked input (r = 1, the NELBO's endpoint) finite
            level = -torch.log1p(-cond.float().clamp(0.0, 1.0 - 1e-6))
        else:
            level = cond
        return F.silu(self.time_embed(level))  # (batch, cond_dim)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
