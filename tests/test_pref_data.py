"""Offline preference data (`crucible pref-data`): chosen correct, rejected wrong, problems counted."""

from __future__ import annotations

import json

import pytest
from rl_helpers import cli, train_base

from crucible.config import ConfigError
from crucible.posttrain.grpo_run import synthetic_prompts
from crucible.posttrain.pref_data import Sampled, build_pairs, build_preference_data
from crucible.posttrain.preference import validate_pairs


def _prompts(n: int):
    return synthetic_prompts("train", n, 0, False)


def test_one_model_pairs_a_correct_and_a_wrong_sample():
    prompts = _prompts(4)
    answers = [p.columns["answer"] for p in prompts]
    right = [f"The answer is {a}." for a in answers]
    wrong = [f"The answer is {int(a) + 1}." for a in answers]
    sampled = Sampled(
        texts=[[wrong[0], right[0]], [right[1], right[1]], [wrong[2], wrong[2]], [right[3], wrong[3]]],
        rewards=[[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, None]],
    )  # fmt: skip
    records, skipped = build_pairs(prompts, sampled, None)
    assert [r["chosen"][0]["content"] for r in records] == [right[0]]
    assert records[0]["rejected"][0]["content"] == wrong[0]
    # prompt 1: nothing wrong; 2: nothing correct; 3: the wrong sample's verifier failed
    assert skipped == {"no wrong answer": 2, "no correct answer": 1, "verifier error": 1}
    good, problems = validate_pairs(records)
    assert len(good) == 1 and not problems  # what crucible dpo reads


def test_two_models_take_chosen_from_the_stronger():
    prompts = _prompts(3)
    a = [p.columns["answer"] for p in prompts]
    strong = Sampled([[f"The answer is {x}."] for x in a], [[1.0], [1.0], [0.0]])
    weak = Sampled([[f"The answer is {int(a[0]) - 1}."], [f"The answer is {a[1]}."], ["x"]],
                   [[0.0], [1.0], [0.0]])  # fmt: skip
    records, skipped = build_pairs(prompts, strong, weak)
    assert len(records) == 1 and records[0]["meta"]["rejected_correct"] is False
    assert skipped == {"identical answers": 1, "no correct answer": 1}


def test_the_command_writes_pairs_from_runs(small_base, tmp_path):
    base = train_base(small_base, tmp_path, "base")
    out = tmp_path / "pairs.jsonl"
    n, skipped = build_preference_data(out, str(base), str(base), n=3, samples=2,
                                       max_new_tokens=6)  # fmt: skip
    lines = out.read_text().splitlines()
    assert len(lines) == n and n + sum(v for k, v in skipped.items() if k != "verifier error") == 3
    with pytest.raises(ConfigError, match="--samples"):
        build_preference_data(out, str(base), None, n=3, samples=1)
    bad = cli(["pref-data", str(tmp_path / "x.jsonl"), "--chosen-from", str(tmp_path / "nope")])
    assert bad.returncode == 2 and "--chosen-from" in bad.stderr
    for line in lines:
        assert set(json.loads(line)) >= {"prompt", "chosen", "rejected"}
