"""End to end: in-loop eval in training, our checkpoint vs its HF export, the CLI, the audit."""

import argparse
import json
import math
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from crucible.config import load_config
from crucible.evaluate.audit import audit
from crucible.evaluate.commands import register
from crucible.evaluate.load import load_eval_model
from crucible.evaluate.suite import evaluate_tasks
from crucible.model import export_hf
from crucible.pretrain import run_pretraining as train
from crucible.runs import load_run_model

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TASKS = ["arithmetic", "stdlib_next_line", "stdlib_bpb", "arithmetic_gen"]


@pytest.fixture(scope="module")
def run_dir(small_base, tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    out = tmp_path_factory.mktemp("eval-runs")
    cfg = load_config(
        "tiny",
        [*small_base, f"out_dir={out}", "name=evalrun", "train.steps=8", "train.val_every=0",
         "checkpoint.every=4", "checkpoint.keep_last=3", "schedule.warmup_steps=2",
         "eval.every=4", "eval.subset=8", "eval.tasks=[arithmetic,stdlib_next_line,bogus]"],
    )  # fmt: skip
    train(cfg, quiet=True)
    yield cfg.run_dir
    torch.set_num_threads(threads)


def _cli(*args: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sub = ("eval-" + args[0],) if args[0] in ("compare", "audit") else ("eval", args[0])
    ns = parser.parse_args([*sub, *args[1:]])
    return ns.func(ns)


def test_in_loop_eval_is_logged_with_training_metrics(run_dir):
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8]
    assert evals[0]["tokens"] == 4 * 8 * 64
    for e in evals:
        assert 0 <= e["arithmetic/acc"] <= 1 and 0 <= e["stdlib_next_line/acc_norm"] <= 1
    assert not any(k.startswith("bogus") for k in evals[0])  # a bad task did not stop training
    # Each task's random baseline is logged beside its score and shown in the report.
    from crucible.evaluate.builtin import builtin_info
    from crucible.report.run_report import write_run_report

    for task in ("arithmetic", "stdlib_next_line"):
        assert evals[-1][f"{task}/random"] == builtin_info(task)[1]
    write_run_report(run_dir)
    report = (run_dir / "report.md").read_text()
    section = report.split("## In-loop evaluation")[1].split("##")[0]
    assert "| random | 0.250 | 0.250 |" in section


def test_checkpoint_and_hf_export_score_the_same(run_dir, tmp_path):
    model, _, _ = load_run_model(run_dir)
    hf_dir = export_hf(model, tmp_path / "hf", tokenizer_path=run_dir / "tokenizer.json")
    ours, info = load_eval_model(run_dir)
    theirs, hf_info = load_eval_model(hf_dir)  # transformers' own implementation
    assert info["step"] == 8 and type(theirs).__name__ == "HFLM"
    a = evaluate_tasks(ours, TASKS, limit=12)
    b = evaluate_tasks(theirs, TASKS, limit=12)
    for task in TASKS:
        ma, mb = a[task]["metrics"], b[task]["metrics"]
        assert ma.keys() == mb.keys() and a[task]["n"] == b[task]["n"] > 0
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], abs=1e-5), (task, k)


def test_cli_eval_compare_and_bad_input(run_dir, tmp_path, capsys):
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    # A named data file that does not exist is refused before any model is loaded ...
    missing = f"arithmetic,hellaswag={tmp_path / 'nonexistent.jsonl'}"
    with pytest.raises(FileNotFoundError, match="nonexistent.jsonl"):
        _cli(str(run_dir), "--tasks", missing, "--limit", "6", "--out", str(out_a))
    assert not out_a.exists()
    # ... while a task that fails only when it runs (no data found) loses nothing else.
    tasks = f"arithmetic,piqa={FIXTURES / 'piqa.jsonl'},hellaswag"
    rc = _cli(str(run_dir), "--tasks", tasks, "--limit", "6", "--out", str(out_a),
              "--data-dir", str(tmp_path))  # fmt: skip
    assert rc == 1  # one task failed ...
    res = json.loads(out_a.read_text())
    assert res["step"] == 8 and res["checkpoint"] == "step_000008"
    assert res["tasks"]["arithmetic"]["n"] == 6 and res["tasks"]["piqa"]["n"] == 2
    assert "error" in res["tasks"]["hellaswag"]  # ... the others survived
    assert _cli(str(run_dir), "--checkpoint", "step_000004", "--tasks", "arithmetic",
                "--limit", "6", "--out", str(out_b)) == 0  # fmt: skip
    capsys.readouterr()
    assert _cli("compare", str(out_b), str(out_a)) == 0
    table = capsys.readouterr().out
    assert "arithmetic" in table and "step_000004" in table and "delta" in table


def _fake_run(root: Path, name: str, seed: int, curves: dict[str, list[float]]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    lines = []
    for i, tokens in enumerate((100, 200, 300)):
        scores = {f"{t}/{m}": v[i] for t, (m, v) in curves.items()}
        lines.append(json.dumps({"event": "eval", "step": i + 1, "tokens": tokens, **scores}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_audit_statistics_hand_computed(tmp_path, capsys):
    a = _fake_run(
        tmp_path,
        "s0",
        0,
        {
            "arithmetic": ("acc", [0.30, 0.40, 0.50]),
            "stdlib_next_line": ("acc_norm", [0.25, 0.20, 0.30]),
        },
    )
    b = _fake_run(
        tmp_path,
        "s1",
        1,
        {
            "arithmetic": ("acc", [0.32, 0.38, 0.56]),
            "stdlib_next_line": ("acc_norm", [0.30, 0.30, 0.20]),
        },
    )
    stats = audit([a, b])  # fmt: skip
    ar = stats["arithmetic"]
    noise = (0.02 + 0.02 + 0.06) / 3 / 2**0.5  # std of two values = |a - b| / sqrt(2)
    assert ar["monotonicity"] == pytest.approx(1.0)
    assert ar["seed_noise"] == pytest.approx(noise)
    assert ar["snr"] == pytest.approx((0.53 - 0.31) / noise)
    assert ar["above_random"] == pytest.approx(0.53 - 0.25)
    assert ar["consistency"] == pytest.approx(1.0) and ar["keep"]
    nl = stats["stdlib_next_line"]
    # seed pairs of checkpoints: 2 discordant, 1 tied in seed 1 -> tau-b = -2 / sqrt(2 * 3)
    assert nl["consistency"] == pytest.approx(-2 / 6**0.5)
    assert not nl["keep"]
    assert _cli("audit", str(a), str(b), "--plot", str(tmp_path / "audit.png")) == 0
    assert (tmp_path / "audit.png").stat().st_size > 0
    assert "arithmetic" in capsys.readouterr().out


def _cli_main(*args: str) -> int:
    """`crucible eval ...` through the real entry point (which exits)."""
    from crucible.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", *args])
    return exit_.value.code


def _hand_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _hand_majority(answers: list[str | None]) -> Decimal | None:
    """The most frequent answer by value, ties to the first seen."""
    values = [Decimal(a) for a in answers if a is not None]
    return max(values, key=lambda a: (values.count(a), -values.index(a)), default=None)


def test_sampled_generative_run_end_to_end(run_dir, tmp_path):
    k = 6
    records = [json.loads(x) for x in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]

    def run(records: list[dict], out: Path) -> dict:
        data = tmp_path / f"{out.stem}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        rc = _cli_main(str(run_dir), "--tasks", f"gsm8k={data}", "--samples", str(k),
                       "--fewshot", "0", "--seed", "3", "--out", str(out))  # fmt: skip
        assert rc == 0
        res = json.loads(out.read_text())
        assert res["config"]["samples"] == k
        return res["tasks"]["gsm8k"]

    first = run(records, tmp_path / "first.json")
    # The random-ish model rarely writes the gold number. Relabel each problem with an answer it
    # did sample (the zero-shot prompt does not contain the answer, so the generations stay the
    # same), so that some samples are right and some wrong.
    for rec, doc in zip(records, first["samples"], strict=True):
        sampled = [s["answer"] for s in doc["samples"] if s["answer"] is not None]
        assert sampled, doc
        rec["answer"] = rec["answer"].rpartition("####")[0] + f"#### {sampled[-1]}"
    res = run(records, tmp_path / "second.json")
    again = run(records, tmp_path / "third.json")
    del res["seconds"], again["seconds"]
    assert res == again  # seeded sampling: identical results, samples included
    texts = [[s["text"] for s in d["samples"]] for d in res["samples"]]
    assert texts == [[s["text"] for s in d["samples"]] for d in first["samples"]]

    assert res["n"] == len(res["samples"]) == 2 and res["failures"] == 0
    assert len(set(texts[0] + texts[1])) > 1  # sampled, not greedy
    correct = [[s["correct"] for s in d["samples"]] for d in res["samples"]]
    assert all(len(c) == k for c in correct) and 0 < sum(map(sum, correct)) < 2 * k
    assert res["unstopped"] == sum(not s["stopped"] for d in res["samples"] for s in d["samples"])
    m = res["metrics"]
    assert set(m) == {"exact_match", "pass@1", f"pass@{k}", f"maj@{k}"}
    assert m["exact_match"] == sum(c[0] for c in correct) / 2
    assert m["pass@1"] == pytest.approx(sum(sum(c) / k for c in correct) / 2)
    assert m[f"pass@{k}"] == pytest.approx(sum(_hand_pass_at_k(k, sum(c), k) for c in correct) / 2)
    maj = [
        _hand_majority([s["answer"] for s in d["samples"]]) == Decimal(d["gold"])
        for d in res["samples"]
    ]
    assert m[f"maj@{k}"] == sum(maj) / 2
    for d in res["samples"]:  # each recorded verdict is the extracted answer against the gold
        for s in d["samples"]:
            assert s["correct"] == (
                s["answer"] is not None and Decimal(s["answer"]) == Decimal(d["gold"])
            )
