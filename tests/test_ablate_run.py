"""An ablation suite end to end: paired runs, reuse and resume, report files, CLI errors."""

import argparse
import json

import pytest
import yaml

from crucible.ablate.commands import register
from crucible.ablate.runner import run_dir_of


def _ablate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ablate", *argv])
    return args.func(args)


def _write_suite(tmp_path, small_base) -> str:
    suite = {
        "name": "e2e",
        "baseline": {
            "config": "tiny",
            "overrides": [
                *small_base,
                "train.steps=3",
                "train.val_every=2",
                "train.log_every=1",
                "checkpoint.every=2",
                "schedule.warmup_steps=1",
            ],
        },
        "seeds": 2,
        "variants": {"mqa": ["model.num_kv_heads=1"]},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


def test_suite_runs_resumes_and_reports(tmp_path, small_base, capsys):
    suite, out = _write_suite(tmp_path, small_base), tmp_path / "suite"
    assert _ablate([suite, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.num_kv_heads: 2 -> 1" in printed and "estimate: 4 runs" in printed
    for arm in ("baseline", "mqa"):
        for seed in (0, 1):
            run = run_dir_of(out, arm, seed)
            assert (run / "summary.json").is_file()
            assert f"seed: {seed}" in (run / "config.yaml").read_text()
    for name in ("report.md", "report.html", "loss_curves.png", "plan.json", "results.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| val_loss | mqa |" in report and "estimated wall time" in report
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    assert results["arms"]["mqa"]["val_loss"]["verdict"] in ("better", "worse", "within noise")
    # Same seed, same data and init where shapes agree: baseline seeds differ from each other.
    assert len(set(results["arms"]["baseline"]["val_loss"]["values"])) == 2

    # Interrupt one run (no summary.json): the rerun reuses three runs and resumes the fourth.
    unfinished = run_dir_of(out, "mqa", 1)
    (unfinished / "summary.json").unlink()
    reused = (run_dir_of(out, "baseline", 0) / "summary.json").stat().st_mtime_ns
    assert _ablate([suite, "--out-dir", str(out), "--no-warmup"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, reused") == 3 and "mqa-s1: resuming" in printed
    assert (unfinished / "summary.json").is_file()
    assert (run_dir_of(out, "baseline", 0) / "summary.json").stat().st_mtime_ns == reused
    assert "resume" in (unfinished / "metrics.jsonl").read_text()


def test_changed_suite_refuses_to_reuse_runs(tmp_path, small_base):
    suite, out = _write_suite(tmp_path, small_base), tmp_path / "suite"
    base_run = run_dir_of(out, "baseline", 0)
    base_run.mkdir(parents=True)
    (base_run / "config.yaml").write_text("model: {hidden_size: 32}\n")
    (base_run / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="different config"):
        _ablate([suite, "--out-dir", str(out), "--no-warmup"])
