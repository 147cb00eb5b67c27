"""Verifiable rewards: answer checkers, a format reward and code run in the evaluation sandbox.

A verifier is `verifier(completion: str, **sample) -> float`, where `sample` holds the dataset
columns of the prompt (e.g. `answer`, `pattern`, `tests`). Answer extraction is the evaluation
module's (`crucible.evaluate.metrics`), so a reward means the same as the benchmark score.
Reasoning inside `<think>...</think>` is removed before an answer is extracted.

`score_completions` runs a verifier over a batch and turns an exception into an error on that
sample only (reward None plus the message); `crucible.posttrain.grpo.combine_rewards` then
leaves it out of the group statistics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crucible.config import ConfigError
from crucible.evaluate import metrics, sandbox

Verifier = Callable[..., float]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Reasoning in a think block, then a non-empty answer after it.
THINK_THEN_ANSWER = r"<think>(?:(?!</think>).)*</think>\s*\S.*"
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def answer_text(completion: str) -> str:
    """The completion without its reasoning: the text after the last `</think>`.

    An opened but never closed think block has no answer yet (empty string).
    """
    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in completion:
        return ""
    return completion


def _extracted_match(kind: str, completion: str, answer: str, pattern: str | None = None) -> float:
    predicted = metrics.extract(kind, answer_text(completion), pattern)
    return float(metrics.answers_match(predicted, str(answer)))


def last_number_reward(completion: str, answer: str, **_: Any) -> float:
    """1.0 when the last number of the answer equals `answer` (by value)."""
    return _extracted_match("last_number", completion, answer)


def boxed_reward(completion: str, answer: str, **_: Any) -> float:
    """1.0 when the last \\boxed{...} holds `answer`."""
    return _extracted_match("boxed", completion, answer)


def exact_match_reward(completion: str, answer: str, **_: Any) -> float:
    """1.0 when the whole answer text equals `answer` (stripped; numbers by value, else case-folded)."""
    return _extracted_match("exact", completion, answer)


def regex_match_reward(completion: str, answer: str, pattern: str, **_: Any) -> float:
    """1.0 when the last match of `pattern` (its group 1, or the whole match) equals `answer`."""
    return _extracted_match("regex", completion, answer, pattern)


def format_reward(completion: str, format_pattern: str = THINK_THEN_ANSWER, **_: Any) -> float:
    """1.0 when the whole completion matches `format_pattern` (default: think block, then answer)."""
    return float(re.fullmatch(format_pattern, completion.strip(), flags=re.DOTALL) is not None)


def extract_code(completion: str) -> str:
    """The last fenced code block of the answer, or the whole answer when there is none."""
    text = answer_text(completion)
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def code_reward(completion: str, tests: str, timeout_s: float = 10.0, **_: Any) -> float:
    """1.0 when the completion's code followed by `tests` (asserts) runs to exit 0 in the sandbox."""
    program = f"{extract_code(completion)}\n\n{tests}\n"
    return float(sandbox.run_python(program, timeout_s=timeout_s).passed)


VERIFIERS: dict[str, Verifier] = {
    "last_number": last_number_reward,
    "boxed": boxed_reward,
    "exact": exact_match_reward,
    "regex": regex_match_reward,
    "format": format_reward,
    "code": code_reward,
}


def get_verifier(name: str) -> Verifier:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ConfigError(f"verifier: {name!r} is not one of {', '.join(VERIFIERS)}") from None


@dataclass(frozen=True)
class RewardResult:
    reward: float | None  # None when the verifier failed on this sample
    error: str | None = None


def score_completions(
    verifier: Verifier, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]
) -> list[RewardResult]:
    """Run `verifier` on each completion with its sample's columns; a raise marks that sample."""
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    out = []
    for completion, sample in zip(completions, samples, strict=True):
        try:
            out.append(RewardResult(float(verifier(completion, **sample))))
        except Exception as e:  # a verifier bug or bad sample costs one reward, not the run
            out.append(RewardResult(None, f"{type(e).__name__}: {e}"))
    return out
