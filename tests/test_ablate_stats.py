"""Ablation statistics: t quantiles against an independent integration, power and false positives."""

import math

import numpy as np
import pytest

from crucible.ablate.stats import paired_test, summarize, t_cdf, t_quantile


def _t_cdf_by_integration(x: float, df: int) -> float:
    """P(T <= x) by Simpson integration of the t density from 0 (independent of betainc)."""
    grid = np.linspace(0.0, abs(x), 20001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    dens = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
    h = grid[1] - grid[0]
    area = h / 3 * (dens[0] + dens[-1] + 4 * dens[1:-1:2].sum() + 2 * dens[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


@pytest.mark.parametrize(
    ("df", "table"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)]
)
def test_t_quantile_matches_table_and_integration(df, table):
    q = t_quantile(0.975, df)
    assert q == pytest.approx(table, abs=1e-3)
    assert _t_cdf_by_integration(q, df) == pytest.approx(0.975, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-q)
    assert t_cdf(0.0, df) == pytest.approx(0.5)


def test_summary_ci_and_single_seed():
    s = summarize([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == 1.0
    assert s.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert math.isnan(summarize([1.0]).ci_low)
    assert paired_test("val_loss", [1.0], [0.9]).verdict.startswith("n/a")


def test_injected_difference_is_detected_in_the_right_direction():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.05, 4)  # shared by both arms of a seed: pairing removes it
    base = 3.0 + seed_effect + rng.normal(0, 0.005, 4)
    better = base - 0.05 + rng.normal(0, 0.005, 4)
    c = paired_test("val_loss", list(base), list(better))
    assert c.verdict == "better" and c.p < 0.01 and c.diff.ci_high < 0
    assert paired_test("val_loss", list(base), list(base + 0.05)).verdict == "worse"
    # Higher is better for accuracies.
    assert paired_test("task/acc_norm", list(base), list(better)).verdict == "worse"


def test_identical_arms_are_within_noise_at_the_stated_rate():
    rng = np.random.default_rng(1)
    trials, alpha, seeds = 2000, 0.05, 3
    seed_effect = rng.normal(0, 0.1, (trials, seeds))
    base = seed_effect + rng.normal(0, 0.02, (trials, seeds))
    var = seed_effect + rng.normal(0, 0.02, (trials, seeds))
    flagged = sum(
        paired_test("val_loss", list(b), list(v), alpha).verdict != "within noise"
        for b, v in zip(base, var, strict=True)
    )
    # Binomial sd at 2000 trials is 0.005; allow four of them.
    assert abs(flagged / trials - alpha) < 0.02
