"""Log-likelihood of continuations given contexts, batched, and bits-per-byte of plain text.

Tokenisation follows lm-evaluation-harness / lighteval: trailing whitespace of the context moves
to the front of the continuation (so " Paris" is one word token, as in training text). Context and
continuation are encoded separately (lighteval's `pairwise` mode), which keeps the context tokens
identical across the choices of one question: the precondition for sharing them.

Two paths give the same numbers:
  * plain: every (context + continuation) is one row; rows sorted by length, right-padded, batched;
  * shared context: the context is run once into a KV cache, copied to each continuation, and
    only the continuations are run (models that support `fork`, i.e. ours). One group is one
    forward pass, so on small models batching many rows beats it; by default it is used only
    when it saves at least SHARE_MIN_TOKENS context tokens (long or few-shot contexts).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from crucible.evaluate.lm import EvalLM

SHARE_MIN_TOKENS = 128


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Score:
    logprob: float  # summed natural-log probability of the continuation tokens
    n_tokens: int
    greedy: bool  # every continuation token was the argmax


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _encode_pair(lm: EvalLM, req: Request) -> tuple[list[int], list[int]]:
    ctx, cont = split_pair(req.context, req.continuation)
    cont_ids = lm.tokenizer.encode(cont)
    if not cont_ids:
        raise ValueError(f"empty continuation for context {req.context[-40:]!r}")
    return lm.tokenizer.encode(ctx) or [lm.prefix_id], cont_ids


def loglikelihood(
    lm: EvalLM, requests: list[Request], batch_size: int = 32, share_context: bool | None = None
) -> list[Score]:
    """Scores of `requests`, in order. share_context None: where it saves enough tokens."""
    pairs = [_encode_pair(lm, r) for r in requests]
    return score_token_pairs(lm, pairs, batch_size, share_context)


def score_token_pairs(
    lm: EvalLM,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int = 32,
    share_context: bool | None = None,
) -> list[Score]:
    share = lm.can_fork and share_context is not False
    min_saved = SHARE_MIN_TOKENS if share_context is None else 1
    out: list[Score | None] = [None] * len(pairs)
    plain: list[int] = []
    if share:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            groups[tuple(ctx)].append(i)
        with lm.eval_mode():
            for ctx, idx in groups.items():
                longest = max(len(pairs[i][1]) for i in idx)
                # Sharing pays when the context would otherwise be run many times over.
                saved = (len(idx) - 1) * len(ctx)
                # Only untruncated groups: truncation must not depend on the other choices.
                fits = len(ctx) + longest - 1 <= lm.max_len
                if len(idx) > 1 and saved >= min_saved and fits:
                    for i, s in zip(idx, _score_shared(lm, list(ctx), [pairs[i][1] for i in idx])):
                        out[i] = s
                else:
                    plain.extend(idx)
    else:
        plain = list(range(len(pairs)))
    for i, s in zip(plain, _score_plain(lm, [pairs[i] for i in plain], batch_size)):
        out[i] = s
    return [s for s in out if s is not None]


def _row_score(logits: torch.Tensor, targets: list[int]) -> Score:
    """logits [n, V] predicting `targets` (n tokens)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(targets, device=logits.device)
    lp = logp.gather(1, t[:, None]).sum().item()
    greedy = bool((logp.argmax(-1) == t).all())
    return Score(lp, len(targets), greedy)


def _score_plain(
    lm: EvalLM, pairs: list[tuple[list[int], list[int]]], batch_size: int
) -> list[Score]:
    rows = []
    for ctx, cont in pairs:
        full = (ctx + cont)[-(lm.max_len + 1) :]  # drop the oldest context tokens if too long
        rows.append((full[:-1], full[-min(len(cont), len(full) - 1) :]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Score | None] = [None] * len(rows)
    with lm.eval_mode():
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            width = len(rows[chunk[0]][0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = lm.logits(ids)
            for r, i in enumerate(chunk):
                inp, target = rows[i]
                n = len(target)
                out[i] = _row_score(logits[r, len(inp) - n : len(inp)], target)
    return [s for s in out if s is not None]


def _score_shared(lm: EvalLM, ctx: list[int], conts: list[list[int]]) -> list[Score]:
    longest = max(len(c) for c in conts)
    state, last = lm.begin(torch.tensor([ctx]), len(ctx) + longest)
    if longest == 1:
        return [_row_score(last, c) for c in conts]
    state = lm.fork(state, len(conts))
    ids = torch.zeros(len(conts), longest - 1, dtype=torch.long)
    for r, c in enumerate(conts):
        ids[r, : len(c) - 1] = torch.tensor(c[:-1])
    _, logits = lm.extend(state, ids)
    out = []
    for r, c in enumerate(conts):
        rows = torch.cat([last[:1], logits[r, : len(c) - 1]])  # prefill predicts the first token
        out.append(_row_score(rows, c))
    return out


def bits_per_byte(lm: EvalLM, texts: list[str], batch_size: int = 32) -> dict[str, float]:
    """Bits-per-byte of texts: disjoint windows of max_len tokens, each after one context token.

    bpb = -sum(log p) / (ln 2 * UTF-8 bytes): comparable across tokenizers.
    """
    pairs = []
    n_bytes = 0
    for text in texts:
        ids = lm.tokenizer.encode(text)
        n_bytes += len(text.encode())
        prev = [lm.prefix_id, *ids]
        for s in range(0, len(ids), lm.max_len):
            pairs.append(([prev[s]], ids[s : s + lm.max_len]))
    scores = score_token_pairs(lm, pairs, batch_size, share_context=False)
    nats = -sum(s.logprob for s in scores)
    tokens = sum(s.n_tokens for s in scores)
    return {
        "bpb": nats / (math.log(2) * max(n_bytes, 1)),
        "token_loss": nats / max(tokens, 1),
        "bytes": float(n_bytes),
    }
