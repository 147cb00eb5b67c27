"""Scaling laws: the Chinchilla loss form L(N, D) = E + A / N^alpha + B / D^beta, its
compute-optimal split of C = 6ND, fits of it to finished runs, and power laws (optimal learning
rate or batch size against model size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOKENS_PER_PARAM_RULE = 20  # Hoffmann et al. (2022), approaches 1 and 2: ~20 tokens per parameter


@dataclass(frozen=True)
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising the loss subject to 6ND = compute.

        Setting dL/dN = 0 along D = C / 6N gives alpha A N^-alpha = beta B D^-beta, hence
        N = G (C/6)^(beta / (alpha + beta)) with G = (alpha A / (beta B))^(1 / (alpha + beta)).
        """
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n = g * (compute / 6) ** (self.beta / s)
        return n, compute / (6 * n)


# Hoffmann et al. (2022) approach 3, and Besiroglu et al. (2024)'s refit of the same data.
HOFFMANN_2022 = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU_2024 = ChinchillaLaw(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def compute_optimal(compute: float, tokens_per_param: float = TOKENS_PER_PARAM_RULE):
    """(N, D) with D = r N and 6ND = compute: N = sqrt(C / 6r)."""
    n = math.sqrt(compute / (6 * tokens_per_param))
    return n, tokens_per_param * n


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Fit:
    law: ChinchillaLaw
    rms_log_error: float  # root mean square of log(predicted) - log(observed)
    max_abs_error: float  # in loss units
    n_points: int


def _solve_linear(n, d, y, alpha: float, beta: float) -> tuple[float, np.ndarray]:
    """For fixed exponents L is linear in (E, A, B): weighted least squares (weights 1/L, so the
    residuals are relative errors). Returns (sum of squared relative errors, [E, A, B])."""
    x = np.stack([np.ones_like(n), n**-alpha, d**-beta], axis=1) / y[:, None]
    coef, *_ = np.linalg.lstsq(x, np.ones_like(y), rcond=None)
    if np.any(coef < 0):  # E, A and B must be non-negative for the law to mean anything
        return float("inf"), coef
    return float(np.sum((x @ coef - 1) ** 2)), coef


def fit_chinchilla(params: list[float], tokens: list[float], losses: list[float]) -> Fit:
    """Fit E, A, B, alpha, beta by variable projection: the exponents by a grid search refined
    by a shrinking pattern search, E, A, B by the exact linear solve at each step. Needs at least
    5 runs spanning several N and D."""
    n, d, y = (np.asarray(v, dtype=np.float64) for v in (params, tokens, losses))
    if len(y) < 5:
        raise ValueError(f"a Chinchilla fit has 5 parameters and needs >= 5 runs (got {len(y)})")
    if np.any(y <= 0) or np.any(n <= 0) or np.any(d <= 0):
        raise ValueError("params, tokens and losses must all be positive")
    grid = np.linspace(0.05, 1.0, 20)
    err, a, b = min((_solve_linear(n, d, y, a, b)[0], a, b) for a in grid for b in grid)
    step = grid[1] - grid[0]
    while step > 1e-9:  # pattern search: move to a better neighbour, else halve the step
        moves = [(a + da, b + db) for da, db in ((step, 0), (-step, 0), (0, step), (0, -step))]
        cand = min((_solve_linear(n, d, y, ma, mb)[0], ma, mb) for ma, mb in moves if ma > 0 < mb)
        if cand[0] < err:
            err, a, b = cand
        else:
            step /= 2
    _, (e, big_a, big_b) = _solve_linear(n, d, y, a, b)
    law = ChinchillaLaw(float(e), float(big_a), float(big_b), float(a), float(b))
    pred = np.array([law.loss(ni, di) for ni, di in zip(n, d)])
    rms = float(np.sqrt(np.mean((np.log(pred) - np.log(y)) ** 2)))
    return Fit(law, rms, float(np.max(np.abs(pred - y))), len(y))


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient x x^exponent, fitted by least squares in log-log space."""

    coefficient: float
    exponent: float
    rms_log_error: float
    n_points: int

    def __call__(self, x: float) -> float:
        return self.coefficient * x**self.exponent


def fit_power_law(x: list[float], y: list[float]) -> PowerLaw:
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(set(lx.tolist())) < 2:
        raise ValueError("a power law needs runs at two or more distinct x values")
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (intercept + slope * lx)
    return PowerLaw(math.exp(intercept), float(slope), float(np.sqrt(np.mean(resid**2))), len(lx))


def best_per_group(keys: list[float], values: list[float], losses: list[float]):
    """For each distinct key (e.g. model size), the value (e.g. LR) of its lowest-loss run."""
    best: dict[float, tuple[float, float]] = {}
    for k, v, loss in zip(keys, values, losses):
        if k not in best or loss < best[k][1]:
            best[k] = (v, loss)
    ks = sorted(best)
    return ks, [best[k][0] for k in ks]
