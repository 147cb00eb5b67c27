"""Offline long-context evaluation: passkey retrieval and RULER-style synthetic tasks.

Each sample is a haystack of held-out text from the embedded corpus (the validation half of the
Python standard library, never seen in training) with one or more short "needles" spliced in at
chosen depths, followed by a query. The model is scored by log-likelihood: the right value
against `candidates - 1` wrong ones of the same kind, so even a tiny model that retrieves a
little shows up above chance (1 / candidates) long before it could generate the answer. Each
candidate's score is its log-probability after the prompt minus its log-probability after the
same prompt without the needles (pointwise mutual information with the needles): what the
needles add, not how common the word is. `acc_raw` keeps the plain log-likelihood ranking. Values
are single-token lowercase words of the model's tokenizer (`keys="words"`, the default: every
candidate is one token, so none is favoured by its length) or 5-digit numbers
(`keys="numbers"`, the classic passkey, split by a BPE into uneven pieces). `length` is the
whole sequence in tokens (haystack, needles, query and answer), so a length equal to the
model's max_seq_len fits exactly. `depth` is where the needle sits: 0 right after the start,
1 just before the query.

Tasks:
  needle    passkey retrieval: "The pass key is <v>. Remember it. <v> is the pass key." at
            `depth`; query "What is the pass key? The pass key is". Wrong candidates: random.
  multikey  RULER MK-NIAH: four "The special magic value for <word> is <v>." needles, the
            asked one at
            `depth`, the others at random depths; the wrong candidates include the other
            needles' values (present in the context), so copying any value is not enough.
  vartrack  RULER variable tracking: two chains VAR_A = <v>, VAR_B = VAR_A, VAR_C = VAR_B;
            the asked chain starts at `depth`, its later links and the distractor chain follow
            at random later depths; query "The value of VAR_C is". Wrong candidates include the
            distractor chain's value.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from crucible.evaluate.lm import EvalLM, TextTokenizer
from crucible.evaluate.scoring import score_token_pairs

LONGCTX_TASKS = ("needle", "multikey", "vartrack")
DEFAULT_LENGTHS = (256, 512, 1024)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "gable", "harbor", "iris",
          "jasper", "kelp", "lumen", "maple", "nectar", "orbit", "pebble", "quartz", "raven",
          "saffron", "tundra", "umber", "velvet", "willow", "yarrow", "zephyr")  # fmt: skip


@dataclass
class Sample:
    """Token ids of the prompt, the candidate answers (index `answer` is right), and the same
    prompt without the needles (what the candidates score from prior knowledge alone)."""

    context: list[int]
    candidates: list[list[int]]
    answer: int
    no_needles: list[int]


@dataclass
class _Needle:
    text: str
    depth: float


@cache
def _haystack_text() -> str:
    from crucible.data.corpora import iter_stdlib_documents

    return "\n".join(d.text for d in iter_stdlib_documents("val"))


class Haystack:
    """The held-out corpus as one token stream, with the positions that start a line."""

    def __init__(self, tokenizer: TextTokenizer, text: str | None = None) -> None:
        self.ids = tokenizer.encode(text if text is not None else _haystack_text())
        if len(self.ids) < 64:
            raise ValueError("the haystack text is too short (under 64 tokens)")
        self.newline_ids = {i for i in set(self.ids) if "\n" in tokenizer.decode([i])}
        self.line_start = [i + 1 for i, t in enumerate(self.ids) if t in self.newline_ids]

    def window(self, n: int, rng: random.Random) -> list[int]:
        """n consecutive tokens starting at a random line start (wrapping around)."""
        start = rng.choice(self.line_start) if self.line_start else 0
        reps = (start + n) // len(self.ids) + 1
        return (self.ids * reps)[start : start + n] if reps > 1 else self.ids[start : start + n]


class Keys:
    """The values to retrieve: 5-digit numbers, or whole words that are one token each.

    Numbers are the classic passkey, but a BPE splits them into 2-6 pieces unevenly, so for a
    model that does not copy, log-likelihood among number candidates mostly measures how many
    pieces each has. Single-token words make every candidate one token: without retrieval the
    right one wins only by chance.
    """

    def __init__(self, kind: str = "words", tokenizer: TextTokenizer | None = None) -> None:
        if kind not in ("words", "numbers"):
            raise ValueError(f"--keys must be words or numbers, got {kind!r}")
        self.kind, self.pool = kind, []
        if kind == "words":
            if tokenizer is None:
                raise ValueError("word keys need the tokenizer")
            for i in range(tokenizer.vocab_size):
                text = tokenizer.decode([i])
                if re.fullmatch(r" [a-z]{3,}", text) and tokenizer.encode(text) == [i]:
                    self.pool.append(text[1:])
            if len(self.pool) < 24:
                raise ValueError(
                    f"--keys words: the tokenizer has only {len(self.pool)} single-token "
                    "lowercase words (need 24); use --keys numbers"
                )

    def new(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            k = rng.choice(self.pool) if self.pool else str(rng.randint(10000, 99999))
            if k not in taken:
                taken.add(k)
                return k


def _spec(
    task: str, depth: float, rng: random.Random, keys: Keys, taken: set[str]
) -> tuple[list[_Needle], str, str, list[str]]:
    """(needles, query, answer, wrong answers that occur in the context) for one sample."""
    if task == "needle":
        k = keys.new(rng, taken)
        text = f"\nThe pass key is {k}. Remember it. {k} is the pass key.\n"
        return [_Needle(text, depth)], "\nWhat is the pass key? The pass key is", k, []
    if task == "multikey":
        words = rng.sample(_WORDS, 4)
        values = [keys.new(rng, taken) for _ in words]
        needles = [
            _Needle(f"\nThe special magic value for {w} is {v}.\n", d)
            for w, v, d in zip(words, values, [depth] + [rng.random() for _ in words[1:]])
        ]
        w = words[0]
        query = f"\nWhat is the special magic value for {w}? The special magic value for {w} is"
        return needles, query, values[0], values[1:]
    if task == "vartrack":
        names: list[str] = []
        while len(set(names)) < 6:
            names = ["VAR_" + "".join(rng.choices(string.ascii_uppercase, k=4)) for _ in range(6)]
        values = [keys.new(rng, taken) for _ in range(2)]
        needles = []
        for chain, (value, start) in enumerate(zip(values, [depth, rng.random()])):
            a, b, c = names[3 * chain : 3 * chain + 3]
            later = sorted(rng.uniform(start, 1.0) for _ in range(2))
            needles += [_Needle(f"\n{a} = {value}\n", start), _Needle(f"\n{b} = {a}\n", later[0]),
                        _Needle(f"\n{c} = {b}\n", later[1])]  # fmt: skip
        return needles, f"\nThe value of {names[2]} is", values[0], values[1:]
    raise ValueError(f"unknown long-context task {task!r}; known: {', '.join(LONGCTX_TASKS)}")


def make_sample(
    task: str,
    tokenizer: TextTokenizer,
    haystack: Haystack,
    length: int,
    depth: float,
    rng: random.Random,
    n_candidates: int = 10,
    bos: int | None = None,
    keys: Keys | None = None,
) -> Sample:
    """One sample of exactly `length` tokens including the (longest) answer."""
    keys = keys or Keys("numbers")
    taken: set[str] = set()
    needles, query, answer, in_context = _spec(task, depth, rng, keys, taken)
    wrong = list(in_context)[: n_candidates - 1]
    while len(wrong) < n_candidates - 1:
        wrong.append(keys.new(rng, taken))
    values = [answer, *wrong]
    rng.shuffle(values)
    candidates = [tokenizer.encode(f" {v}") for v in values]
    needle_ids = [tokenizer.encode(n.text) for n in needles]
    query_ids = tokenizer.encode(query)
    prefix = [bos] if bos is not None else []
    budget = length - len(prefix) - sum(map(len, needle_ids)) - len(query_ids)
    budget -= max(map(len, candidates))
    if budget < 8:
        raise ValueError(
            f"--lengths: {length} tokens is too short for task {task} (it needs at least "
            f"{length - budget + 8})"
        )
    hay = haystack.window(budget, rng)
    no_needles = prefix + hay + query_ids
    starts = {i + 1 for i, t in enumerate(hay) if t in haystack.newline_ids}
    # Splice from the deepest needle down, each at the line start nearest its depth.
    placed = sorted(
        (
            (_snap(round(n.depth * budget), starts, budget), ids)
            for n, ids in zip(needles, needle_ids)
        ),
        key=lambda x: x[0],
        reverse=True,
    )
    for pos, ids in placed:
        hay[pos:pos] = ids
    return Sample(prefix + hay + query_ids, candidates, values.index(answer), no_needles)


def _snap(pos: int, starts: set[int], budget: int, reach: int = 48) -> int:
    """The line start nearest to pos within `reach` tokens, else pos itself."""
    for d in range(reach):
        for p in (pos - d, pos + d):
            if 0 <= p <= budget and (p in starts or p in (0, budget)):
                return p
    return max(0, min(pos, budget))


def evaluate_longctx(
    lm: EvalLM,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    trials: int = 10,
    n_candidates: int = 10,
    seed: int = 0,
    haystack: Haystack | None = None,
    keys: str = "words",
) -> dict[str, Any]:
    """Accuracy per (task, depth, length): {task: {"acc": [[...] per depth] per length, ...}}."""
    check_grid(lm, tasks, lengths, depths, n_candidates)
    key_gen = Keys(keys, lm.tokenizer)
    haystack = haystack or Haystack(lm.tokenizer)
    for task in tasks:  # a length too short for a task fails here, before any scoring
        make_sample(task, lm.tokenizer, haystack, min(lengths), 0.5, random.Random(0),
                    n_candidates, bos=lm.prefix_id, keys=key_gen)  # fmt: skip
    out: dict[str, Any] = {}
    for task in tasks:
        grids: dict[str, list[list[float]]] = {
            k: [[0.0] * len(lengths) for _ in depths] for k in ("acc", "acc_raw", "margin")
        }
        for li, length in enumerate(lengths):
            for di, depth in enumerate(depths):
                rng = random.Random(f"{seed}/{task}/{length}/{depth}")
                cell = {"acc": 0.0, "acc_raw": 0.0, "margin": 0.0}
                for _ in range(trials):
                    s = make_sample(task, lm.tokenizer, haystack, length, depth, rng,
                                    n_candidates, bos=lm.prefix_id, keys=key_gen)  # fmt: skip
                    lp = _logprobs(lm, s.context, s.candidates)
                    prior = _logprobs(lm, s.no_needles, s.candidates)
                    pmi = [a - b for a, b in zip(lp, prior)]
                    hit, gap = _beats_all(pmi, s.answer)
                    cell["acc"] += hit / trials
                    cell["margin"] += gap / trials
                    cell["acc_raw"] += _beats_all(lp, s.answer)[0] / trials
                for k, v in cell.items():
                    grids[k][di][li] = round(v, 6)
        acc = grids["acc"]
        out[task] = {
            "lengths": list(lengths),
            "depths": list(depths),
            "acc": acc,  # the answer's log-prob gain from the needles beats every wrong one's
            "acc_raw": grids["acc_raw"],  # plain log-likelihood among the candidates
            "mean_margin": grids["margin"],  # that gain minus the best wrong candidate's
            "acc_by_length": [
                round(sum(row[i] for row in acc) / len(depths), 6) for i in range(len(lengths))
            ],
            "chance": 1 / n_candidates,
            "trials": trials,
            "keys": keys,
        }
    return out


def _logprobs(lm: EvalLM, context: list[int], candidates: list[list[int]]) -> list[float]:
    pairs = [(context, c) for c in candidates]
    return [sc.logprob for sc in score_token_pairs(lm, pairs, share_context=True)]


def _beats_all(scores: list[float], answer: int) -> tuple[bool, float]:
    best_wrong = max(x for i, x in enumerate(scores) if i != answer)
    return scores[answer] > best_wrong, scores[answer] - best_wrong


def check_grid(
    lm: EvalLM, tasks: list[str], lengths: list[int], depths: list[float], n_candidates: int
) -> None:
    """Bad task names, depths, lengths or candidate counts: one clear error before any work."""
    unknown = [t for t in tasks if t not in LONGCTX_TASKS]
    if unknown:
        raise ValueError(
            f"--tasks: unknown {unknown}; long-context tasks: {', '.join(LONGCTX_TASKS)}"
        )
    if not lengths or not depths:
        raise ValueError("--lengths and --depths need at least one value each")
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise ValueError(f"--depths must lie in [0, 1], got {bad}")
    if n_candidates < 2:
        raise ValueError(f"--candidates must be at least 2, got {n_candidates}")
    too_long = [n for n in lengths if n > lm.max_len]
    if too_long:
        raise ValueError(
            f"--lengths {too_long} exceed the model's {lm.max_len} positions: raise it with "
            "--max-seq-len (plain extrapolation) or --rope-scaling TYPE:FACTOR"
        )


def format_longctx(results: dict[str, Any]) -> str:
    lines = []
    for task, r in results.items():
        lines.append(f"{task} (accuracy, chance {r['chance']:.2f}, {r['trials']} trials per cell)")
        lines.append("  depth " + "".join(f"{n:>8}" for n in r["lengths"]))
        for d, row in zip(r["depths"], r["acc"]):
            lines.append(f"  {d:5.2f} " + "".join(f"{a:8.2f}" for a in row))
        lines.append("  mean  " + "".join(f"{a:8.2f}" for a in r["acc_by_length"]))
    return "\n".join(lines)


def plot_longctx(results: dict[str, Any], out: Path, title: str = "") -> Path:
    """Heatmaps of accuracy, depth (rows) x length (columns), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crucible.report.plots import save_figure

    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 1.6 * len(tasks) * 2.2, 3.6))
    axes = [axes] if len(tasks) == 1 else list(axes)
    for ax, task in zip(axes, tasks):
        r = results[task]
        im = ax.imshow(r["acc"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:.2f}" for d in r["depths"]])
        for i, row in enumerate(r["acc"]):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task} (chance {r['chance']:.2f})")
    fig.colorbar(im, ax=axes[-1], fraction=0.08)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)


def parse_rope_scaling(spec: str) -> tuple[str, float]:
    """'yarn:4' -> ('yarn', 4.0)."""
    kind, _, factor = spec.partition(":")
    try:
        return kind, float(factor)
    except ValueError:
        raise ValueError(
            f"--rope-scaling {spec!r}: expected TYPE:FACTOR, e.g. yarn:4 (types: linear, "
            "dynamic, yarn)"
        ) from None


def extend_context(
    lm: EvalLM,
    max_seq_len: int | None = None,
    rope_scaling: str | None = None,
    original_len: int | None = None,
) -> EvalLM:
    """Our model with more positions and/or RoPE scaling at inference (same weights).

    rope_scaling 'TYPE:FACTOR' scales from `original_len` (default: the model's max_seq_len,
    the length it was trained at) up to `max_seq_len` (default original x factor).
    """
    from pydantic import ValidationError

    from crucible.config import ModelConfig
    from crucible.evaluate.lm import CrucibleLM

    if max_seq_len is None and rope_scaling is None:
        return lm
    if not isinstance(lm, CrucibleLM):
        raise ValueError(
            "--max-seq-len / --rope-scaling apply to crucible models (a run, or an HF directory "
            "with --backend crucible); for transformers models edit config.json instead"
        )
    cfg = lm.cfg.model_dump()
    if rope_scaling is not None:
        kind, factor = parse_rope_scaling(rope_scaling)
        original = original_len or lm.cfg.rope_original_len
        cfg["rope_scaling"] = {"type": kind, "factor": factor}
        if kind != "linear":
            cfg["rope_scaling"]["original_max_position_embeddings"] = original
        cfg["max_seq_len"] = max_seq_len or max(int(original * factor), lm.cfg.max_seq_len)
    else:
        cfg["max_seq_len"] = max_seq_len
    try:
        new_cfg = ModelConfig.model_validate(cfg)
    except ValidationError as e:  # keep the first message only
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"--rope-scaling/--max-seq-len: {msg}") from None
    model = _rebuilt(lm.model, new_cfg)
    return CrucibleLM(model, lm.tokenizer, new_cfg, lm.device, name=lm.name)


def _rebuilt(model: Any, cfg: Any) -> Any:
    import torch

    from crucible.model import Transformer

    device = next(model.parameters()).device
    with torch.device("meta"):
        new = Transformer(cfg)
    new.load_state_dict(model.state_dict(), assign=True)
    new.init_buffers()
    return new.to(device).eval()


def loss_by_position(
    lm: EvalLM, length: int, windows: int = 8, seed: int = 0, haystack: Haystack | None = None
) -> dict[str, Any]:
    """Mean next-token loss on held-out text, by position bucket [0, 64), [64, 128), ... .

    The plainest long-context signal: a model that cannot use (or breaks down at) far positions
    shows a loss that stops falling, or rises, past the length it was trained at.
    """
    import torch

    if length > lm.max_len:
        raise ValueError(f"position loss at {length} exceeds the model's {lm.max_len} positions")
    haystack = haystack or Haystack(lm.tokenizer)
    rng = random.Random(f"{seed}/loss/{length}")
    edges = [0, 64]
    while edges[-1] < length - 1:
        edges.append(min(edges[-1] * 2, length - 1))
    sums, counts = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1)
    with lm.eval_mode():
        for _ in range(windows):
            ids = torch.tensor([haystack.window(length, rng)])
            logits = lm.logits(ids[:, :-1])[0]
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            for b in range(len(edges) - 1):
                part = nll[edges[b] : edges[b + 1]]
                sums[b] += float(part.sum())
                counts[b] += part.numel()
    return {
        "length": length,
        "windows": windows,
        "buckets": [[edges[b], edges[b + 1]] for b in range(len(edges) - 1)],
        "loss": [round(s / max(c, 1), 6) for s, c in zip(sums, counts)],
    }


def format_position_loss(r: dict[str, Any]) -> str:
    head = "  ".join(f"{a}-{b}" for a, b in r["buckets"])
    vals = "  ".join(f"{x:.3f}" for x in r["loss"])
    return f"loss by position ({r['windows']} windows of {r['length']}):\n  {head}\n  {vals}"
