"""Verifiable rewards: answer checkers (the evaluation module's extraction), the format reward,
code through the evaluation sandbox, and per-sample errors."""

from __future__ import annotations

import math

import pytest

from crucible.config import ConfigError
from crucible.posttrain.grpo import combine_rewards, group_advantages
from crucible.posttrain.rewards import (
    RewardResult,
    answer_text,
    boxed_reward,
    code_reward,
    exact_match_reward,
    extract_code,
    format_reward,
    get_verifier,
    last_number_reward,
    regex_match_reward,
    score_completions,
)


def test_reasoning_is_removed_before_the_answer_is_read():
    assert answer_text("<think>try 5</think> It is 7.") == " It is 7."
    assert answer_text("<think>a</think>b<think>c</think>d") == "d"
    assert answer_text("<think>never closed 5") == ""
    assert answer_text("no reasoning 3") == "no reasoning 3"


def test_last_number():
    assert last_number_reward("So the total is $1,234.", answer="1234") == 1.0
    assert last_number_reward("It is 72.0", answer="72") == 1.0
    assert last_number_reward("<think>maybe 5</think> The answer is 7", answer="7") == 1.0
    assert last_number_reward("<think>maybe 5</think> The answer is 7", answer="5") == 0.0
    assert last_number_reward("<think>it is 5", answer="5") == 0.0  # no answer after thinking
    assert last_number_reward("no digits here", answer="3") == 0.0


def test_boxed():
    assert boxed_reward(r"thus \boxed{\frac{1}{2}}", answer=r"\frac{1}{2}") == 1.0
    assert boxed_reward(r"\boxed{3} then \boxed{4}", answer="4") == 1.0
    assert boxed_reward(r"\boxed{3} then \boxed{4}", answer="3") == 0.0
    assert boxed_reward("4", answer="4") == 0.0  # no box, no reward


def test_exact_and_regex():
    assert exact_match_reward("  Paris \n", answer="paris") == 1.0
    assert exact_match_reward("Paris, France", answer="Paris") == 0.0
    pattern = r"Answer:\s*(\w+)"
    assert regex_match_reward("Answer: no. Answer: yes", answer="yes", pattern=pattern) == 1.0
    assert regex_match_reward("I think yes", answer="yes", pattern=pattern) == 0.0


def test_format_reward():
    assert format_reward("<think>\nstep 1\n</think>\nThe answer is 4.") == 1.0
    assert format_reward("The answer is 4.") == 0.0
    assert format_reward("<think>only thoughts</think>") == 0.0  # no answer after the block
    assert format_reward("<think>unclosed and 4") == 0.0
    custom = r"<answer>\d+</answer>"
    assert format_reward("<answer>12</answer>", format_pattern=custom) == 1.0
    assert format_reward("<answer>x</answer>", format_pattern=custom) == 0.0


def test_extract_code_takes_the_last_fenced_block_of_the_answer():
    text = "<think>```python\nbad()\n```</think>Here:\n```python\ndef f():\n    return 1\n```\n"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("def g(): pass") == "def g(): pass"


def test_code_reward_runs_the_tests_in_the_sandbox():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    hang = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert code_reward(good, tests=tests) == 1.0
    assert code_reward(bad, tests=tests) == 0.0
    assert code_reward(hang, tests=tests + "\nadd(1, 1)", timeout_s=1.0) == 0.0


def test_a_raising_verifier_marks_only_that_sample():
    completions = ["Answer: 4", "Answer: 5", "Answer: 4"]
    samples = [
        {"answer": "4", "pattern": r"Answer: (\d)"},
        {"answer": "4", "pattern": "("},  # a broken pattern: re.error on this sample only
        {"pattern": r"Answer: (\d)"},  # no answer column
    ]
    results = score_completions(regex_match_reward, completions, samples)
    assert results[0] == RewardResult(1.0)
    assert results[1].reward is None and results[1].error.startswith("error: missing )")
    assert results[2].reward is None and "answer" in results[2].error

    def explode(completion, **_):
        raise RuntimeError("verifier bug")

    failed = score_completions(explode, ["x"], [{}])
    assert failed == [RewardResult(None, "RuntimeError: verifier bug")]
    # Errors stay out of the group statistics: their advantage is 0.
    rewards = combine_rewards([[r.reward for r in results] + [0.0]])
    assert math.isnan(rewards[1].item())
    adv = group_advantages(rewards, group_size=4, scale_rewards="none")
    assert adv.tolist() == pytest.approx([0.5, 0.0, 0.0, -0.5])


def test_verifier_registry():
    assert get_verifier("boxed") is boxed_reward
    with pytest.raises(ConfigError, match="verifier: 'llm_judge' is not one of last_number"):
        get_verifier("llm_judge")
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        score_completions(format_reward, ["a", "b"], [{}])
