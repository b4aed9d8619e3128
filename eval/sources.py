"""Stationary Markov chains over characters (i.i.d.: all rows equal) of known entropy: L consecutive symbols have
H(pi) + (L - 1) h, pi the stationary distribution, h = -sum_i pi_i sum_j P_ij log P_ij (Cover & Thomas, thm. 4.2.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Source = Literal["markov", "iid"]


@dataclass
class MarkovSource:
    alphabet: str
    transition: np.ndarray  # (A, A), rows sum to 1

    def __post_init__(self):
        # stationary distribution: the left eigenvector of P for eigenvalue 1
        w, v = np.linalg.eig(self.transition.T)
        pi = np.real(v[:, np.argmin(np.abs(w - 1.0))])
        self.stationary = pi / pi.sum()

    @property
    def stationary_entropy(self) -> float:
        p = self.stationary[self.stationary > 0]
        return float(-(p * np.log(p)).sum())

    @property
    def entropy_rate(self) -> float:
        P = self.transition
        logP = np.log(np.where(P > 0, P, 1.0))
        return float(-(self.stationary[:, None] * P * logP).sum())

    def block_entropy(self, length: int) -> float:
        """Exact entropy (nats) of ``length`` consecutive symbols of the stationary chain."""
        return self.stationary_entropy + (length - 1) * self.entropy_rate

    def sample(self, n: int, rng: np.random.Generator) -> str:
        """n symbols of the chain started from its stationary distribution."""
        cum, row, out = np.cumsum(self.transition, axis=1), np.cumsum(self.stationary), []
        for u in rng.random(n):  # inverse CDF of the row of the previous symbol
            out.append(min(int(np.searchsorted(row, u, side="right")), len(self.alphabet) - 1))
            row = cum[out[-1]]
        return "".join(self.alphabet[i] for i in out)

    def nll(self, text: str) -> float:
        """-log p(text) (nats) with the first symbol drawn from the stationary distribution."""
        idx = [self.alphabet.index(c) for c in text]
        total = -math.log(self.stationary[idx[0]])
        for a, b in zip(idx, idx[1:]):
            total -= math.log(self.transition[a, b])
        return total


def make_source(name: Source, seed: int = 0) -> MarkovSource:
    """``iid``: 8 symbols with Zipf-like frequencies. ``markov``: a 6-symbol chain whose rows each put
    most of their mass on two or three successors (entropy rate well below the symbol entropy)."""
    if name == "iid":
        p = np.array([1.0 / (k + 1) for k in range(8)])
        return MarkovSource("abcdefgh", np.tile(p / p.sum(), (8, 1)))
    if name == "markov":
        P = 0.85 * np.random.default_rng(seed).dirichlet(np.full(6, 0.3), size=6) + 0.15 / 6
        return MarkovSource("abcdef", P / P.sum(1, keepdims=True))
    raise ValueError(f"unknown source {name!r}; choose iid or markov")

