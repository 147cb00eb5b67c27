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


def _tiny_suite(tmp_path, small_base, extra: dict, more: tuple = ()) -> str:
    suite = {
        "name": "tiny",
        "baseline": {
            "config": "tiny",
            "overrides": [
                *small_base,
                "train.log_every=1",
                "train.val_every=0",
                "checkpoint.every=0",
                "schedule.warmup_steps=1",
                "train.dtype=fp32",
                *more,
            ],
        },
        "seeds": 1,
        **extra,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


def test_forked_suite_trains_trunk_once_and_arms_from_it(tmp_path, small_base, capsys):
    suite = _tiny_suite(
        tmp_path,
        small_base,
        {
            "fork": {"step": 2},
            "variants": {"cooler": ["schedule.min_lr=1e-4"]},
        },
        ("train.steps=4", "schedule.kind=wsd"),
    )
    out = tmp_path / "suite"
    # With the measured warm-up: it must train from scratch, the trunk does not exist yet.
    assert _ablate([suite, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trunk saved at step 2" in printed and "forked: per seed" in printed
    trunk = out / "runs" / "trunk-s0"
    assert (trunk / "stopped.json").is_file() and not (trunk / "summary.json").exists()
    for arm in ("baseline", "cooler"):
        run = run_dir_of(out, arm, 0)
        events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert events[0]["event"] == "init_from" and "trunk-s0" in events[0]["checkpoint"]
        assert [e["step"] for e in events if e["event"] == "train"] == [3, 4]
    assert "forked at step 2" in (out / "report.md").read_text()
    # Rerun: the trunk and both arms are reused.
    trunk_mtime = (trunk / "stopped.json").stat().st_mtime_ns
    assert _ablate([suite, "--out-dir", str(out), "--no-warmup", "--report-only"]) == 0
    assert _ablate([suite, "--out-dir", str(out), "--no-warmup"]) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 3
    assert (trunk / "stopped.json").stat().st_mtime_ns == trunk_mtime


def test_fork_errors(tmp_path, small_base):
    from crucible.ablate.suite import load_suite, plan_arms
    from crucible.config import ConfigError

    suite = _tiny_suite(tmp_path, small_base, {"fork": {"step": 9}, "variants": {"a": ["seed=1"]}})
    with pytest.raises(ConfigError, match="may not override seed"):
        load_suite(suite)
    at_end = {"fork": {"step": 4}, "variants": {"a": ["optim.lr=1e-3"]}}
    suite = _tiny_suite(tmp_path, small_base, at_end, ("train.steps=4",))
    with pytest.raises(ConfigError, match="fork step 4 must be before"):
        plan_arms(load_suite(suite))
    with pytest.raises(ConfigError, match="fork must be"):
        load_suite(_tiny_suite(tmp_path, small_base, {"fork": 3, "variants": {"a": ["x=1"]}}))


def test_parallel_jobs_match_sequential(tmp_path, small_base, capsys):
    variants = {"variants": {"mqa": ["model.num_kv_heads=1"]}}
    suite = _tiny_suite(tmp_path, small_base, variants, ("train.steps=2",))
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert _ablate([suite, "--out-dir", str(seq), "--no-warmup"]) == 0
    assert _ablate([suite, "--out-dir", str(par), "--no-warmup", "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("val_loss") >= 4
    for arm in ("baseline", "mqa"):
        a = json.loads((run_dir_of(seq, arm, 0) / "summary.json").read_text())
        b = json.loads((run_dir_of(par, arm, 0) / "summary.json").read_text())
        assert a["val_loss"] == b["val_loss"], arm
    # Reuse works across --jobs settings (threads differ, the runs do not).
    assert _ablate([suite, "--out-dir", str(par), "--no-warmup"]) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 2
