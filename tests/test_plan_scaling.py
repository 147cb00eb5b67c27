"""Scaling-law fits recover the laws that generated synthetic runs."""

import json

import pytest
import yaml

from crucible.plan.scaling import ChinchillaLaw, fit_chinchilla, fit_power_law
from crucible.plan.scaling_runs import fit_runs_report


def test_chinchilla_fit_recovers_a_known_law():
    true = ChinchillaLaw(E=1.8, A=400.0, B=1200.0, alpha=0.33, beta=0.3)
    pts = [(n, d) for n in (1e7, 3e7, 1e8, 3e8) for d in (2e8, 1e9, 5e9)]
    fit = fit_chinchilla(
        [n for n, _ in pts], [d for _, d in pts], [true.loss(n, d) for n, d in pts]
    )
    assert fit.rms_log_error < 1e-3
    for n, d in [(1e9, 2e10), (5e7, 1e9)]:  # extrapolation stays close
        assert fit.law.loss(n, d) == pytest.approx(true.loss(n, d), rel=0.01)


def test_power_law_recovers_exponent():
    xs = [1e7, 1e8, 1e9]
    pl = fit_power_law(xs, [0.01 * x**-0.25 for x in xs])
    assert pl.exponent == pytest.approx(-0.25) and pl.coefficient == pytest.approx(0.01)


def test_fit_from_run_directories(tmp_path):
    true = ChinchillaLaw(E=2.0, A=300.0, B=900.0, alpha=0.3, beta=0.3)
    dirs = []
    for i, (n, d, lr) in enumerate(
        [(1e7, 1e8, 3e-3), (1e7, 1e9, 1e-3), (3e7, 3e8, 2e-3), (1e8, 1e9, 1e-3), (1e8, 3e9, 5e-4),
         (3e8, 2e9, 5e-4)]
    ):  # fmt: skip
        run = tmp_path / f"r{i}"
        run.mkdir()
        (run / "summary.json").write_text(
            json.dumps({"name": run.name, "params": n, "tokens": d, "val_loss": true.loss(n, d)})
        )
        cfg = {"optim": {"lr": lr}, "train": {"global_batch_size": 8, "seq_len": 256}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        dirs.append(run)
    text = fit_runs_report(dirs, plot=str(tmp_path / "fit.png"))
    assert "L(N, D) = 2.0" in text and "best learning rate" in text
    assert (tmp_path / "fit.png").stat().st_size > 0


def test_unfinished_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="summary.json"):
        fit_runs_report([tmp_path])
