"""Across-seed statistics of an ablation: mean, std, t-based CI, paired t-test and a verdict.

scipy is not a dependency, so the Student t distribution is computed here from the regularised
incomplete beta function (continued fraction), and its quantile by bisection on the CDF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    front = math.exp(log_front)
    # The continued fraction converges fast only on one side of the mean; use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_two_sided_p(t: float, df: float) -> float:
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p, by bisection on the CDF (monotone, so always converges)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile probability {p} must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """One arm's metric across seeds; the CI is for the mean (nan with a single seed)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def summarize(values: list[float], confidence: float = 0.95) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    n = len(values)
    mean, std = _mean_std(values)
    if n < 2:
        return Summary(n, mean, std, math.nan, math.nan)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def lower_is_better(metric: str) -> bool:
    """Losses, bits-per-byte and perplexities go down; accuracies and scores go up."""
    name = metric.lower().rsplit("/", 1)[-1]
    return any(k in name for k in ("loss", "bpb", "ppl", "perplexity", "error"))


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline on one metric, paired by seed."""

    metric: str
    diff: Summary  # of variant - baseline per seed
    t: float
    p: float
    verdict: str  # better / worse / within noise / n/a


def paired_test(
    metric: str,
    baseline: list[float],
    variant: list[float],
    alpha: float = ALPHA,
    lower_better: bool | None = None,
) -> Comparison:
    """Paired t-test on per-seed differences: the same seed means the same init and data order,
    so pairing removes most of the seed-to-seed noise both arms share."""
    if len(baseline) != len(variant):
        raise ValueError(f"{metric}: {len(baseline)} baseline vs {len(variant)} variant seeds")
    diffs = [v - b for b, v in zip(baseline, variant, strict=True)]
    diff = summarize(diffs, 1 - alpha)
    n = len(diffs)
    if n < 2:
        return Comparison(metric, diff, math.nan, math.nan, "n/a (1 seed)")
    if diff.std == 0.0:  # identical runs, or a constant shift: the t statistic is degenerate
        t = 0.0 if diff.mean == 0.0 else math.copysign(math.inf, diff.mean)
        p = 1.0 if diff.mean == 0.0 else 0.0
    else:
        t = diff.mean / (diff.std / math.sqrt(n))
        p = t_two_sided_p(t, n - 1)
    lower = lower_is_better(metric) if lower_better is None else lower_better
    if p >= alpha:
        verdict = "within noise"
    else:
        verdict = "better" if (diff.mean < 0) == lower else "worse"
    return Comparison(metric, diff, t, p, verdict)
