"""Absorbing-state noise schedules: alpha(t), t in [0, 1], is the probability that a token is still clean; alpha(0)
= 1. Where alpha(1) > 0 (loglinear with eps, geometric) ``objective.nelbo`` adds an exact endpoint term."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from mdlm_kit.errors import UserError
from mdlm_kit.specs import init_args, spec


class Schedule(ABC):
    name: str = ""

    @abstractmethod
    def mask_rate(self, t: Tensor) -> Tensor:
        """1 - alpha(t), computed directly so it stays accurate where alpha is close to 1."""

    @abstractmethod
    def dalpha(self, t: Tensor) -> Tensor:
        """alpha'(t) (non-positive)."""

    @abstractmethod
    def inverse(self, alpha: Tensor) -> Tensor:
        """The t with alpha(t) = ``alpha`` (the first-hitting sampler draws unmasking times through it)."""

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - self.mask_rate(t)

    def spec(self) -> dict:
        """This schedule as a config entry (``class_path``, ``init_args``): what configs and checkpoints hold."""
        return spec(self)

    def weight(self, t: Tensor) -> Tensor:
        """-alpha'(t) / (1 - alpha(t)): the continuous-time NELBO weight of a masked token."""
        return -self.dalpha(t) / self.mask_rate(t)

    @property
    def alpha_at_one(self) -> float:
        return float(self.alpha(torch.ones((), dtype=torch.float64)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in init_args(self).items())})"


class LogLinear(Schedule):
    """MDLM's schedule: alpha(t) = 1 - (1 - eps) t, i.e. sigma(t) = -log(1 - (1 - eps) t); the weight is 1/t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise UserError(f"loglinear schedule: eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def mask_rate(self, t: Tensor) -> Tensor:
        return (1.0 - self.eps) * t

    def dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def inverse(self, alpha: Tensor) -> Tensor:
        return (1.0 - alpha) / (1.0 - self.eps)

    def weight(self, t: Tensor) -> Tensor:
        return 1.0 / t


class Linear(LogLinear):
    """alpha(t) = 1 - t (MD4's linear schedule; loglinear with eps = 0)."""

    name = "linear"

    def __init__(self):
        super().__init__(eps=0.0)


class Cosine(Schedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)) (MD4)."""

    name = "cosine"

    def mask_rate(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * (1.0 - t))

    def dalpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def inverse(self, alpha: Tensor) -> Tensor:
        return 1.0 - (2.0 / math.pi) * torch.arccos(1.0 - alpha)

    def weight(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * (1.0 - t))


class Polynomial(Schedule):
    """alpha(t) = 1 - t^w (MD4's polynomial schedule); w = 1 is linear."""

    name = "polynomial"

    def __init__(self, power: float = 2.0):
        if not power > 0:
            raise UserError(f"polynomial schedule: power must be > 0, got {power}")
        self.power = float(power)

    def mask_rate(self, t: Tensor) -> Tensor:
        return t**self.power

    def dalpha(self, t: Tensor) -> Tensor:
        return -self.power * t ** (self.power - 1.0)

    def inverse(self, alpha: Tensor) -> Tensor:
        return (1.0 - alpha) ** (1.0 / self.power)

    def weight(self, t: Tensor) -> Tensor:
        return self.power / t


class Geometric(Schedule):
    """alpha(t) = exp(-sigma(t)) with SEDD/MD4's geometric sigma shifted so that alpha(0) = 1:
    sigma(t) = sigma_min^(1-t) sigma_max^t - sigma_min, so alpha(1) = exp(-(sigma_max - sigma_min))."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if not 0.0 < sigma_min < sigma_max:
            raise UserError(f"geometric schedule: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.expm1(t * self._log_ratio)

    def mask_rate(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.sigma(t))

    def dalpha(self, t: Tensor) -> Tensor:
        sigma = self.sigma(t)
        return -torch.exp(-sigma) * ((sigma + self.sigma_min) * self._log_ratio)

    def inverse(self, alpha: Tensor) -> Tensor:
        return torch.log1p(-torch.log(alpha) / self.sigma_min) / self._log_ratio

    def weight(self, t: Tensor) -> Tensor:
        sigma = self.sigma(t)
        return (sigma + self.sigma_min) * self._log_ratio / torch.expm1(sigma)


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (LogLinear, Linear, Cosine, Polynomial, Geometric)}


def make_schedule(spec: Schedule | str | dict | None = None, **kwargs) -> Schedule:
    """A schedule from an instance, a name (``loglinear``, ``linear``, ``cosine``, ``polynomial``, ``geometric``)
    with its arguments, or a config entry ``{class_path, init_args}`` (``Schedule.spec``); None is loglinear."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, dict):
        name = str(spec.get("class_path", "")).rsplit(".", 1)[-1]
        kwargs = {**dict(spec.get("init_args") or {}), **kwargs}
        cls = next((c for c in SCHEDULES.values() if c.__name__ == name), None)
    else:
        name = spec or "loglinear"
        cls = SCHEDULES.get(name)
    if cls is None:
        raise UserError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"bad arguments for schedule {name!r}: {e}") from None
