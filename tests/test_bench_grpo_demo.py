"""bench/grpo_demo.py: the held-out split never shares a sum with training, and --merge pairs the
two one-arm processes' results by seed without evaluating again."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "grpo_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("grpo_demo", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["grpo_demo"] = mod
    spec.loader.exec_module(mod)
    return mod


def _sums(rows):
    return {(r["prompt"][0]["content"].split("is ")[-1].rstrip("?"), r["answer"]) for r in rows}


def test_heldout_sums_are_disjoint_from_training(demo, monkeypatch):
    monkeypatch.setattr(demo, "WORDING", "short")
    train, test = demo.problems("train", 12), demo.problems("test", 12)
    # every a + b and a - b (a >= b) with a, b < 12, counted by hand
    assert len(train) + len(test) == 12 * 12 + 12 * 13 // 2
    assert test and not _sums(train) & _sums(test)
    for r in train + test:  # the answer is the expression's value
        a, op, b = r["prompt"][0]["content"].removeprefix("What is ").rstrip("?").split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    reworded = demo.problems("reworded", 12)
    assert [r["answer"] for r in reworded] == [r["answer"] for r in train]
    assert all(r["prompt"][0]["content"].startswith("Compute ") for r in reworded)


def test_merge_pairs_the_two_arms_by_seed(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "plot", lambda results, path: path.write_text("plot"))
    before = {str(s): {"test_reward": 0.2 + s / 100} for s in (0, 1, 2)}
    gains = {"plain": [0.1, 0.2, 0.3], "penalty": [0.05, 0.05, 0.08]}
    for arm, gain in gains.items():
        runs = {f"grpo-{arm}-s{s}": {"seed": s, "penalty": arm == "penalty",
                                     "test_reward": before[str(s)]["test_reward"] + gain[s]}
                for s in (0, 1, 2)}  # fmt: skip
        part = {"before": before, "runs": runs, "grpo_time": {"wall_s": 10.0, "cpu_s": 4.0}}
        (tmp_path / f"results-{arm}.json").write_text(json.dumps(part))
    demo.merge(tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    assert len(r["runs"]) == 6
    assert r["grpo_time"] == {"wall_s": 10.0, "cpu_s": 8.0}  # side by side: longest wall, all CPU
    for arm, gain in gains.items():
        assert r[f"paired_{arm}_test_reward"]["mean_diff"] == pytest.approx(sum(gain) / 3)
    assert (tmp_path / "grpo_length.png").read_text() == "plot"
