"""Counter-based random numbers: noise that depends only on (seed, stream, key), never on the batch or the number of
processes, so a loss or a bound does not change with batch or world size. splitmix64 in int64 arithmetic gives the
same bits on every device."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from torch import Tensor

# (sqrt(5) - 1) / 2: the additive recurrence frac(c + n g) is the lowest-discrepancy
# one-dimensional Kronecker sequence, so any run of consecutive keys is stratified.
_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0

STREAM_TRAIN, STREAM_VAL, STREAM_EVAL, STREAM_SAMPLE = 1, 2, 3, 4


def _signed(x: int) -> int:
    x &= 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= (1 << 63) else x


# splitmix64's constants as int64 (two's complement)
_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 finalizer on int64 tensors (two's-complement wrap-around)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def bits_to_uniform(z: Tensor) -> Tensor:
    """Top 52 bits -> float64 uniform in (0, 1) on the grid (m + 1/2) 2^-52, extremes 2^-53 and 1 - 2^-53. Not 53
    bits: m + 1/2 must be exact in a 53-bit mantissa, or the largest m rounds to u = 1 (-log(-log u) = inf)."""
    return (_shr(z, 12).to(torch.float64) + 0.5) * (2.0**-52)


def _base(seed: int, stream: int, device) -> Tensor:
    s = torch.tensor([_signed(seed * 0x100000001B3 + stream)], dtype=torch.int64, device=device)
    return splitmix64(splitmix64(s))


def row_hash(seed: int, stream: int, keys: Tensor) -> Tensor:
    """(B,) int64 state of each key's stream: uniform j of key b is derived from h[b] and j alone."""
    keys = keys.to(torch.int64)
    return splitmix64(_base(seed, stream, keys.device) ^ splitmix64(keys))


def hash_uniforms(h: Tensor, length: int) -> Tensor:
    """(B, length) float64 uniforms from the row states ``h`` (B,): uniform j is splitmix64(h + (j + 1) golden)."""
    pos = torch.arange(1, length + 1, dtype=torch.int64, device=h.device) * _GOLDEN
    return bits_to_uniform(splitmix64(h[:, None] + pos[None, :]))


def token_uniforms(seed: int, stream: int, keys: Tensor, length: int) -> Tensor:
    """(B, length) float64 uniforms for the samples with integer ``keys`` (B,)."""
    return hash_uniforms(row_hash(seed, stream, keys), length)


def stratified_times(seed: int, stream: int, keys: Tensor) -> Tensor:
    """t in (0, 1] for each key: t = 1 - frac(c + key * g), with a seed-dependent offset c. Each t is uniform;
    consecutive keys spread evenly over (0, 1] (stratified across a batch, as MDLM's antithetic times)."""
    keys = keys.to(torch.int64)
    c = bits_to_uniform(splitmix64(_base(seed, stream, keys.device) + 0x5151))
    # key * g in float64 is exact to ~1e-16 * key: far below any useful resolution for key < 2^40
    return 1.0 - torch.remainder(c + keys.to(torch.float64) * _GOLDEN_FRACTION, 1.0)


def combine(*parts: Tensor | int) -> Tensor:
    """One int64 key from several integer indices (broadcast), by chained splitmix64."""
    hashed = [splitmix64(torch.as_tensor(p, dtype=torch.int64)) for p in parts]
    return functools.reduce(lambda acc, h: splitmix64(acc ^ h), hashed)


def global_states() -> dict:
    """The global generators (Python, NumPy, torch CPU, this process's CUDA device) that dropout draws from, saved in
    checkpoints so a resumed run draws what it would have."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers only, so the checkpoint still loads with torch.load(weights_only=True)
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: under DDP each rank drives its own device's generator, and seeded alike
        # they all hold rank 0's state; restoring all devices from rank 0 would give rank r a stale cuda:r
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_global_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and torch.is_tensor(states["cuda"]):
        torch.cuda.set_rng_state(states["cuda"].cpu())
