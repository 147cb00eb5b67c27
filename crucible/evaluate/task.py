"""Tasks: documents, prompt formulations (CF / MCF), deterministic few-shot, and scoring a task.

Prompt formats (lighteval's, see docs/evaluation.md):
  CF   context = query                      continuations = " " + choice
  MCF  context = stem + "\\n A. c0\\n B. c1 ...\\nAnswer:"   continuations = " A", " B", ...
Few-shot examples are formatted the same way with the gold continuation, joined by "\\n\\n".
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Literal

import torch

from crucible.evaluate.generation import generate_until
from crucible.evaluate.lm import EvalLM
from crucible.evaluate.metrics import answers_match, extract, maj_at_k, mc_metrics, pass_at_k
from crucible.evaluate.scoring import Request, bits_per_byte, loglikelihood

Formulation = Literal["cf", "mcf"]
FEWSHOT_SEP = "\n\n"


class TaskDataError(ValueError):
    """A record that cannot become a document (missing field, answer index out of range...)."""


@dataclass(frozen=True)
class MCDoc:
    query: str  # the CF context, e.g. "Question: ...\nAnswer:"
    choices: list[str]  # answer texts
    gold: int
    stem: str | None = None  # the question as MCF shows it; None: MCF unavailable
    contexts: list[str] | None = None  # per-choice contexts (WinoGrande): then `target` follows
    target: str | None = None
    unconditional: str = "Answer:"  # PMI's context without the question
    delimiter: str = " "  # between context and choice in CF ("" when the context ends a line)

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise TaskDataError(f"needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.gold < len(self.choices):
            raise TaskDataError(f"answer index {self.gold} out of range 0..{len(self.choices) - 1}")
        if any(not str(c).strip() for c in self.choices):
            raise TaskDataError("empty answer choice")


@dataclass(frozen=True)
class GenDoc:
    prompt: str
    answer: str  # the gold answer compared after extraction
    shot: str = ""  # what follows the prompt in a few-shot example (worked solution)
    meta: dict[str, Any] = field(default_factory=dict)


def mc_requests(doc: MCDoc, formulation: Formulation) -> tuple[list[Request], list[str]]:
    """(requests, continuations) of one document, without few-shot examples."""
    if formulation == "mcf":
        if doc.stem is None:
            raise TaskDataError("this task has no MCF form")
        letters = string.ascii_uppercase[: len(doc.choices)]
        options = "".join(f"\n {x}. {c}" for x, c in zip(letters, doc.choices))
        ctx = f"{doc.stem}{options}\nAnswer:"
        conts = [f" {x}" for x in letters]
        return [Request(ctx, c) for c in conts], conts
    if doc.contexts is not None:
        cont = f"{doc.delimiter}{doc.target}"
        return [Request(c, cont) for c in doc.contexts], [cont] * len(doc.contexts)
    conts = [f"{doc.delimiter}{c}" for c in doc.choices]
    return [Request(doc.query, c) for c in conts], conts


def _shot_text(doc: MCDoc | GenDoc, formulation: Formulation) -> str:
    if isinstance(doc, GenDoc):
        return doc.prompt + (doc.shot or f" {doc.answer}")
    reqs, conts = mc_requests(doc, formulation)
    return reqs[doc.gold].context + conts[doc.gold]


def fewshot_prefix(
    pool: list, k: int, seed: int, key: str, exclude: object, formulation: Formulation = "cf"
) -> str:
    """k examples drawn from pool with an RNG seeded by (seed, key): same prompt on every run."""
    if k <= 0 or not pool:
        return ""
    rng = random.Random(f"{seed}:{key}")
    candidates = [d for d in pool if d is not exclude]
    shots = rng.sample(candidates, min(k, len(candidates)))
    return "".join(_shot_text(d, formulation) + FEWSHOT_SEP for d in shots)


@dataclass
class Task:
    """A named set of documents and how to score them."""

    name: str
    kind: Literal["mc", "gen", "bpb"]
    docs: list
    random_baseline: float  # expected main metric of a uniform random guesser
    description: str = ""
    formulation: Formulation = "cf"
    num_fewshot: int = 0
    fewshot_pool: list | None = None  # default: the other documents of the task
    main_metric: str = "acc_norm"
    higher_is_better: bool = True
    pmi: bool = False
    # generative
    extractor: str = "last_number"
    pattern: str | None = None
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 64
    samples: int = 1
    temperature: float = 0.0
    check: Callable[[GenDoc, str], bool] | None = None  # replaces extraction (code execution)
    preflight: Callable[[], object] | None = None  # raises before generation (e.g. no sandbox)
    invalid: int = 0  # records dropped while loading (counted failures)
    invalid_examples: list[str] = field(default_factory=list)

    def subset(self, n: int | None, seed: int = 0) -> list:
        """A fixed random subset: the same documents at every evaluation of a run."""
        if n is None or n >= len(self.docs):
            return list(self.docs)
        idx = sorted(random.Random(f"subset:{seed}:{self.name}").sample(range(len(self.docs)), n))
        return [self.docs[i] for i in idx]


def run_task(
    task: Task, lm: EvalLM, limit: int | None = None, seed: int = 0, batch_size: int = 32
) -> dict[str, Any]:
    """Score one task: {metrics, n, failures, random_baseline, ...}."""
    if task.preflight is not None:
        task.preflight()
    docs = task.subset(limit, seed)
    if task.kind == "mc":
        res = _run_mc(task, lm, docs, seed, batch_size)
    elif task.kind == "gen":
        res = _run_gen(task, lm, docs, seed)
    else:
        res = {"metrics": bits_per_byte(lm, docs, batch_size), "n": len(docs), "failures": 0}
    res["failures"] += task.invalid
    res.update(
        random_baseline=task.random_baseline,
        main_metric=task.main_metric,
        higher_is_better=task.higher_is_better,
        formulation=task.formulation if task.kind == "mc" else None,
        num_fewshot=task.num_fewshot,
    )
    if task.invalid_examples:
        res["failure_examples"] = task.invalid_examples[:3] + res.get("failure_examples", [])
    return res


def _run_mc(task: Task, lm: EvalLM, docs: list, seed: int, batch_size: int) -> dict[str, Any]:
    pool = task.fewshot_pool if task.fewshot_pool is not None else task.docs
    built, failures, examples = [], 0, []
    for i, doc in enumerate(docs):
        try:
            reqs, conts = mc_requests(doc, task.formulation)
            prefix = fewshot_prefix(
                pool, task.num_fewshot, seed, f"{task.name}:{i}", doc, task.formulation
            )
            reqs = [Request(prefix + r.context, r.continuation) for r in reqs]
            if task.pmi:
                reqs += [Request(doc.unconditional, c) for c in conts]
            built.append((doc, reqs, conts))
        except TaskDataError as e:
            failures += 1
            examples.append(f"doc {i}: {e}")
    flat = [r for _, reqs, _ in built for r in reqs]
    scores = loglikelihood(lm, flat, batch_size)
    per_doc: list[dict[str, float]] = []
    pos = 0
    for doc, reqs, conts in built:
        n = len(conts)
        cond = scores[pos : pos + n]
        uncond = scores[pos + n : pos + 2 * n] if task.pmi else None
        pos += len(reqs)
        per_doc.append(mc_metrics(cond, conts, {doc.gold}, uncond))
    metrics = {k: fmean(d[k] for d in per_doc) for k in per_doc[0]} if per_doc else {}
    if per_doc:
        p = metrics[task.main_metric]
        metrics["stderr"] = (p * (1 - p) / max(len(per_doc) - 1, 1)) ** 0.5
    return {"metrics": metrics, "n": len(per_doc), "failures": failures,
            "failure_examples": examples}  # fmt: skip


def _run_gen(task: Task, lm: EvalLM, docs: list, seed: int) -> dict[str, Any]:
    pool = task.fewshot_pool if task.fewshot_pool is not None else task.docs
    gen = torch.Generator().manual_seed(seed)
    k = task.samples
    correct_counts, maj, first, unstopped, failures, examples = [], [], [], 0, 0, []
    records: list[dict[str, Any]] = []  # every sample's outcome, for auditing the metrics
    for i, doc in enumerate(docs):
        prompt = fewshot_prefix(pool, task.num_fewshot, seed, f"{task.name}:{i}", doc) + doc.prompt
        answers, oks, outcomes = [], [], []
        for _ in range(k):
            try:
                g = generate_until(lm, prompt, task.stop, task.max_new_tokens,
                                   task.temperature, gen)  # fmt: skip
            except ValueError as e:
                failures += 1
                examples.append(f"doc {i}: {e}")
                break
            unstopped += not g.stopped
            if task.check is not None:
                ok, ans = task.check(doc, g.text), g.text
            else:
                ans = extract(task.extractor, g.text, task.pattern)
                ok = answers_match(ans, doc.answer)
            answers.append(ans)
            oks.append(ok)
            outcomes.append({"text": g.text, "answer": ans if task.check is None else None,
                             "correct": bool(ok), "stopped": g.stopped})  # fmt: skip
        if len(oks) < k:
            continue
        records.append({"doc": i, "prompt": doc.prompt, "gold": doc.answer, "samples": outcomes})
        correct_counts.append(sum(oks))
        first.append(float(oks[0]))
        maj.append(maj_at_k(answers, doc.answer, k) if task.check is None else float(oks[0]))
    n = len(first)
    metrics: dict[str, float] = {"exact_match": fmean(first)} if n else {}
    if n:  # pass@1 for greedy runs too (k = 1: the share of problems solved)
        for kk in sorted({1, k}):
            metrics[f"pass@{kk}"] = fmean(pass_at_k(k, c, kk) for c in correct_counts)
        if task.check is None and k > 1:
            metrics[f"maj@{k}"] = fmean(maj)
    return {"metrics": metrics, "n": n, "failures": failures, "unstopped": unstopped,
            "failure_examples": examples, "samples": records}  # fmt: skip
