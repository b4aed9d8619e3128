"""What every sampler shares: options, the template, per-sample noise keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from mdlm_kit import rng
from mdlm_kit.errors import UserError
from mdlm_kit.kernels import Kernel
from mdlm_kit.sampling.categorical import PRECISIONS, sample_categorical
from mdlm_kit.schedules import Schedule

# model(z, cond) -> logits (B, L, V); cond is the mask rate per sequence, or None for time-agnostic models
Denoiser = Callable[[Tensor, "Tensor | None"], Tensor]
# name -> sampler(ctx, template, sample_keys, opts, progress=None) -> tokens; each sampler module registers itself
SAMPLERS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        SAMPLERS[name] = fn
        return fn

    return add


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@dataclass
class SamplerOptions:
    """Options of every sampler, validated on construction."""

    steps: int | None = None  # time steps (ancestral); None: the sampler's default
    temperature: float = 1.0
    top_p: float = 1.0
    precision: str = "float64"  # Gumbel noise precision: float64 (default) or float32 (truncates the tail)
    seed: int = 0
    tokens_per_step: int = 1  # fhs: >1 reveals several tokens per network call (approximate)
    block_length: int | None = None  # semi_ar / confidence: tokens per block (None: semi_ar half the window)
    inner: str = "fhs"  # semi_ar: the diffusion sampler run inside each block
    kernel: Kernel = "auto"  # the fused Triton categorical sampler: on CUDA (auto), always or never

    def __post_init__(self):
        for name in ("steps", "tokens_per_step", "block_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class SamplingContext:
    """A model and how to call it."""

    model: Denoiser
    schedule: Schedule
    mask_id: int
    time_conditioning: bool = False
    max_len: int | None = None  # the model's maximum sequence length (semi_ar windows)
    calls: int = 0  # network evaluations so far

    def logits(self, z: Tensor, mask_rate: Tensor) -> Tensor:
        self.calls += 1
        return self.model(z, mask_rate.float() if self.time_conditioning else None)


def draw_tokens(ctx: SamplingContext, opts: SamplerOptions, logits: Tensor, rows: Tensor, cols: Tensor,
                sample_keys: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """Sample the tokens at (rows, cols) from ``logits`` (B, L, V), noise keyed by (sample key, step, position):
    (tokens, their log-probabilities)."""
    keys = rng.combine(sample_keys[rows], step, 0, cols)  # 4 parts: never equal to a decision key (3 parts)
    return sample_categorical(logits.reshape(-1, logits.shape[-1]), keys, opts.seed, ctx.mask_id, opts.temperature,
                              opts.top_p, opts.precision, rows=rows * logits.shape[1] + cols, kernel=opts.kernel)


def step_uniforms(opts: SamplerOptions, sample_keys: Tensor, step: int, length: int, salt: int) -> Tensor:
    """(B, L) float64 uniforms for one step's reveal decisions, per sample key."""
    return rng.token_uniforms(opts.seed, rng.STREAM_SAMPLE, rng.combine(sample_keys, step, salt), length)


def check_template(template: Tensor) -> Tensor:
    if template.dim() != 2:
        raise UserError(f"template must be (batch, length), got shape {tuple(template.shape)}")
    return template.clone()
