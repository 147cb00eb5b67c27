"""Per-document metrics: multiple-choice log-likelihood accuracies, answer extraction, pass@k.

acc_norm follows lighteval's `LogProbCharNorm`: the log-likelihood divided by the character
length of the continuation *as scored*, i.e. including its leading space (" Paris" counts 6).
lm-evaluation-harness divides by the length of the choice without the delimiter (5); that is
`ignore_first_space=True` here. The two rarely disagree on the argmax, but they can.
Ties go to the lowest index (argmax order), so a model that scores every choice equally is
marked correct only when the gold answer is the first choice.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from crucible.evaluate.scoring import Score


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def char_norm_length(continuation: str, ignore_first_space: bool = False) -> int:
    n = len(continuation)
    if ignore_first_space and continuation.startswith(" "):
        n -= 1
    return max(n, 1)


def mc_metrics(
    scores: Sequence[Score],
    continuations: Sequence[str],
    gold: set[int],
    unconditional: Sequence[Score] | None = None,
    ignore_first_space: bool = False,
) -> dict[str, float]:
    """acc, acc_norm (chars), acc_norm_token, and acc_pmi when unconditional scores are given."""
    lp = [s.logprob for s in scores]
    out = {
        "acc": float(argmax(lp) in gold),
        "acc_norm": float(
            argmax(
                [
                    x / char_norm_length(c, ignore_first_space)
                    for x, c in zip(lp, continuations, strict=True)
                ]
            )
            in gold
        ),
        "acc_norm_token": float(argmax([x / s.n_tokens for x, s in zip(lp, scores)]) in gold),
    }
    if unconditional is not None:
        pmi = [x - u.logprob for x, u in zip(lp, unconditional, strict=True)]
        out["acc_pmi"] = float(argmax(pmi) in gold)
    return out


# --------------------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"[-+]?(?:\d*\.\d+|\d+)")


def last_number(text: str) -> str | None:
    """The last number in text; thousands separators and '$' are removed first (GSM8K style)."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text).replace("$", "")
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def regex_last(pattern: str, text: str, group: int = 1) -> str | None:
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    return m.group(group) if m.re.groups >= group else m.group(0)


def normalize_answer(answer: str | None) -> str | None:
    """Numbers compare by value ("72.0" == "72"), everything else stripped and lower-cased."""
    if answer is None:
        return None
    s = answer.strip().replace(",", "").removeprefix("$").rstrip(".")
    try:
        return format(Decimal(s).normalize(), "f")
    except InvalidOperation:
        return answer.strip().lower()


def extract(kind: str, text: str, pattern: str | None = None) -> str | None:
    if kind == "last_number":
        return last_number(text)
    if kind == "boxed":
        return last_boxed(text)
    if kind == "regex":
        if pattern is None:
            raise ValueError("regex extraction needs a pattern")
        return regex_last(pattern, text)
    if kind == "exact":
        return text.strip()
    raise ValueError(f"unknown answer extractor {kind!r} (last_number, boxed, regex, exact)")


def answers_match(predicted: str | None, gold: str) -> bool:
    return predicted is not None and normalize_answer(predicted) == normalize_answer(gold)


# --------------------------------------------------------------------------- sampling metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers: Sequence[str | None], gold: str, k: int) -> float:
    """1 if the most frequent normalised answer among the first k is correct (ties: first seen)."""
    normed = [normalize_answer(a) for a in answers[:k] if a is not None]
    if not normed:
        return 0.0
    counts = Counter(normed)
    best = max(counts.values())
    winner = next(a for a in normed if counts[a] == best)
    return float(winner == normalize_answer(gold))
