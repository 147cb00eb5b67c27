"""Evaluation metrics against hand-computed examples and brute-force implementations."""

import itertools
import math

import pytest

from crucible.evaluate.audit import kendall_tau, spearman
from crucible.evaluate.metrics import (
    answers_match,
    extract,
    last_boxed,
    last_number,
    maj_at_k,
    mc_metrics,
    pass_at_k,
)
from crucible.evaluate.scoring import Score, split_pair
from crucible.evaluate.task import MCDoc, TaskDataError, fewshot_prefix, mc_requests


def test_mc_metrics_hand_computed():
    # choice 0: " a" (2 chars, 1 token), logprob -1.0; choice 1: " abcd" (5 chars, 5 tokens), -3.5
    scores = [Score(-1.0, 1, True), Score(-3.5, 5, False)]
    conts = [" a", " abcd"]
    m = mc_metrics(scores, conts, {0}, unconditional=[Score(-0.5, 1, True), Score(-4.0, 5, True)])
    assert m["acc"] == 1.0  # -1.0 > -3.5
    assert m["acc_norm"] == 1.0  # lighteval: -1/2 = -0.5 > -3.5/5 = -0.7
    assert m["acc_norm_token"] == 0.0  # -1/1 = -1.0 < -3.5/5 = -0.7
    assert m["acc_pmi"] == 0.0  # -1 - -0.5 = -0.5 < -3.5 - -4 = 0.5
    # lm-eval's acc_norm does not count the leading space: -1/1 = -1.0 < -3.5/4 = -0.875
    lm_eval = mc_metrics(scores, conts, {0}, ignore_first_space=True)
    assert lm_eval["acc_norm"] == 0.0


def test_ties_go_to_the_first_choice():
    scores = [Score(-2.0, 1, False)] * 3
    assert mc_metrics(scores, [" x", " y", " z"], {0})["acc"] == 1.0
    assert mc_metrics(scores, [" x", " y", " z"], {2})["acc"] == 0.0


def test_answer_extraction():
    assert last_number("I have 1,234 apples and 5.5 pears") == "5.5"
    assert last_number("so the total is $1,000.") == "1000"
    assert last_number("no digits") is None
    assert last_boxed(r"first \boxed{3} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert extract("regex", "#### 42 and #### 43", r"#### (\d+)") == "43"
    assert extract("exact", "  Paris \n") == "Paris"
    assert answers_match("72.0", "72") and answers_match("1,000", "1000")
    assert not answers_match(None, "1") and not answers_match("71", "72")
    with pytest.raises(ValueError, match="unknown answer extractor"):
        extract("nope", "x")


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (4, 4, 4)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k))


def test_maj_at_k():
    assert maj_at_k(["3", "4", "4.0", None], "4", 4) == 1.0  # "4" and "4.0" agree
    assert maj_at_k(["3", "4", "3"], "4", 3) == 0.0
    assert maj_at_k(["5", "4"], "4", 2) == 0.0  # a tie goes to the first answer seen
    assert maj_at_k(["5", "4", "4"], "4", 1) == 0.0  # only the first k count


def test_rank_statistics_hand_computed():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24))  # sum d^2 = 4
    assert kendall_tau(x, y) == pytest.approx((8 - 2) / 10)  # 2 discordant pairs of 10
    # tau-b with one tie in x: 5 concordant, 0 discordant, denominators 6 and 5
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))


def test_split_pair_moves_trailing_whitespace():
    assert split_pair("Question: x\nAnswer: ", "Paris") == ("Question: x\nAnswer:", " Paris")
    assert split_pair("    x = 1\n    ", "return x") == ("    x = 1", "\n    return x")


def test_formulations_and_bad_documents():
    doc = MCDoc("Question: 2+2?\nAnswer:", ["3", "4"], 1, stem="Question: 2+2?")
    reqs, conts = mc_requests(doc, "cf")
    assert [(r.context, r.continuation) for r in reqs] == [
        ("Question: 2+2?\nAnswer:", " 3"),
        ("Question: 2+2?\nAnswer:", " 4"),
    ]
    reqs, conts = mc_requests(doc, "mcf")
    assert reqs[0].context == "Question: 2+2?\n A. 3\n B. 4\nAnswer:" and conts == [" A", " B"]
    with pytest.raises(TaskDataError, match="out of range"):
        MCDoc("q", ["a", "b"], 2)
    with pytest.raises(TaskDataError, match="at least 2"):
        MCDoc("q", ["a"], 0)


def test_fewshot_is_deterministic_and_excludes_the_document():
    pool = [MCDoc(f"Q{i}:", ["no", "yes"], i % 2) for i in range(6)]
    a = fewshot_prefix(pool, 3, seed=0, key="t:0", exclude=pool[0])
    assert a == fewshot_prefix(pool, 3, seed=0, key="t:0", exclude=pool[0])
    assert "Q0:" not in a and a.count("\n\n") == 3
    shots = {fewshot_prefix(pool, 3, seed=s, key="t:0", exclude=pool[0]) for s in range(8)}
    assert len(shots) > 1  # the seed matters
    assert "Q1: yes\n\n" in fewshot_prefix(pool, 5, 0, "t:0", pool[0])  # gold continuation shown
