"""Preference optimisation: pair data, reference log-prob cache, and the DPO-family losses.

Losses take summed completion log-probabilities (see `crucible.posttrain.logps.sequence_logps`)
of the policy and of the frozen reference model for each chosen/rejected pair. With
r_c = logp_c - ref_c and r_r = logp_r - ref_r (the log-ratios) and Δ = r_c - r_r:

- sigmoid (DPO): -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ)   (ε = label_smoothing, conservative DPO)
- ipo:           (r_c/n_c - r_r/n_r - 1/(2β))²    (n = completion tokens; TRL's normalisation)
- apo_zero:      (1 - σ(β·r_c)) + σ(β·r_r)
- apo_down:      σ(β·r_c) + (1 - σ(βΔ))

The implicit rewards are β·r_c and β·r_r; accuracy is the share of pairs with β·r_c > β·r_r.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from crucible.config import ConfigError
from crucible.posttrain.logps import SequenceLogps, sequence_logps

__all__ = [
    "LOSS_TYPES",
    "PairProblem",
    "PairBatch",
    "PreferenceLoss",
    "PreferencePair",
    "ReferenceLogps",
    "SequenceLogps",
    "batch_preference_loss",
    "cached_reference_logps",
    "compute_reference_logps",
    "describe_problems",
    "pair_batch",
    "pair_sequence_logps",
    "preference_loss",
    "sequence_logps",
    "validate_pairs",
]

LOSS_TYPES = ("sigmoid", "ipo", "apo_zero", "apo_down")

Message = Mapping[str, Any]


# --------------------------------------------------------------------------- pair data


@dataclass(frozen=True, eq=False)
class PreferencePair:
    """One prompt with a preferred (chosen) and a dispreferred (rejected) answer.

    `chosen` and `rejected` are the assistant message(s) that answer `prompt`. Token ids, once
    rendered with a chat template, go in the `*_ids` fields (see `pair_batch`).
    """

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    index: int = -1  # position of the record in its source
    prompt_ids: tuple[int, ...] | None = None
    chosen_ids: tuple[int, ...] | None = None
    rejected_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PairProblem:
    index: int
    kind: str  # missing_field, empty_prompt, empty_completion, identical, mismatched_prompt
    detail: str


_KIND_TEXT = {
    "missing_field": "missing or malformed field",
    "empty_prompt": "empty prompt",
    "empty_completion": "empty completion",
    "identical": "identical chosen and rejected",
    "mismatched_prompt": "mismatched prompt",
}


def _messages(value: Any, default_role: str) -> tuple[Message, ...] | None:
    if isinstance(value, str):
        return ({"role": default_role, "content": value},)
    if isinstance(value, Mapping) and "content" in value:
        return (value,)
    if isinstance(value, Sequence) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    ):
        return tuple(value)
    return None


def _text(messages: Sequence[Message]) -> str:
    return "".join(str(m.get("content") or "") for m in messages).strip()


def _split_conversation(
    conv: tuple[Message, ...],
) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
    """(prompt, answer): the answer is the trailing run of assistant messages."""
    k = len(conv)
    while k > 0 and conv[k - 1].get("role") == "assistant":
        k -= 1
    return conv[:k], conv[k:]


def _message_key(m: Message) -> tuple[str, ...]:
    """What makes two messages the same: role, text, reasoning and tool calls (whitespace-trimmed)."""
    fields = ("content", "reasoning", "reasoning_content", "tool_calls")
    return (str(m.get("role")), *(str(m.get(f) or "").strip() for f in fields))


def _same(a: Sequence[Message], b: Sequence[Message]) -> bool:
    return [_message_key(m) for m in a] == [_message_key(m) for m in b]


def _parse_pair(index: int, record: Any) -> PreferencePair | PairProblem:
    if not isinstance(record, Mapping):
        return PairProblem(
            index, "missing_field", f"expected a mapping, got {type(record).__name__}"
        )
    for key in ("chosen", "rejected"):
        if key not in record:
            return PairProblem(index, "missing_field", f"no '{key}' field")
    chosen = _messages(record["chosen"], "assistant")
    rejected = _messages(record["rejected"], "assistant")
    if chosen is None or rejected is None:
        bad = "chosen" if chosen is None else "rejected"
        return PairProblem(index, "missing_field", f"'{bad}' is not a string or a message list")
    if "prompt" in record:
        prompt = _messages(record["prompt"], "user")
        if prompt is None:
            return PairProblem(index, "missing_field", "'prompt' is not a string or a message list")
        # Full conversations under an explicit prompt: their prefixes must be the prompt.
        c_prefix, c_answer = _split_conversation(chosen)
        r_prefix, r_answer = _split_conversation(rejected)
        for name, prefix in (("chosen", c_prefix), ("rejected", r_prefix)):
            if prefix and not _same(prefix, prompt):
                return PairProblem(
                    index, "mismatched_prompt", f"'{name}' starts with a different conversation"
                )
        chosen, rejected = c_answer, r_answer
    else:
        prompt, chosen_answer = _split_conversation(chosen)
        r_prompt, rejected_answer = _split_conversation(rejected)
        if not _same(prompt, r_prompt):
            return PairProblem(
                index,
                "mismatched_prompt",
                "chosen and rejected conversations differ before the answer",
            )
        chosen, rejected = chosen_answer, rejected_answer
    if not _text(prompt):
        return PairProblem(index, "empty_prompt", "the prompt has no text")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not _text(answer):
            return PairProblem(index, "empty_completion", f"'{name}' is empty")
    if _same(chosen, rejected):
        return PairProblem(index, "identical", "chosen and rejected are the same")
    return PreferencePair(tuple(prompt), tuple(chosen), tuple(rejected), index=index)


def validate_pairs(
    records: Sequence[Any],
) -> tuple[list[PreferencePair], list[PairProblem]]:
    """Split records into usable pairs and named problems (with their record indices).

    A record is `{"prompt", "chosen", "rejected"}` (strings or message lists) or, with an implicit
    prompt, `{"chosen", "rejected"}` holding whole conversations that must agree up to the final
    assistant turn(s).
    """
    good: list[PreferencePair] = []
    problems: list[PairProblem] = []
    for i, record in enumerate(records):
        parsed = _parse_pair(i, record)
        (problems if isinstance(parsed, PairProblem) else good).append(parsed)
    return good, problems


def describe_problems(problems: Sequence[PairProblem], total: int, source: str = "pairs") -> str:
    """One line: how many pairs were dropped, by kind, with the first record indices of each."""
    if not problems:
        return f"{source}: all {total} preference pairs are usable"
    by_kind: dict[str, list[int]] = {}
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p.index)
    parts = []
    for kind, idx in by_kind.items():
        shown = ", ".join(str(i) for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
        noun = "record" if len(idx) == 1 else "records"
        parts.append(f"{_KIND_TEXT.get(kind, kind)}: {len(idx)} ({noun} {shown})")
    return f"{source}: {len(problems)} of {total} preference pairs skipped: " + "; ".join(parts)


@dataclass(frozen=True)
class PairBatch:
    """Chosen rows first, then rejected rows (TRL's layout), right-padded."""

    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T)
    completion_mask: torch.Tensor  # (2B, T), 1 on answer tokens


def pair_batch(pairs: Sequence[PreferencePair], pad_id: int) -> PairBatch:
    """Stack rendered pairs (prompt_ids + chosen_ids / rejected_ids) into one padded batch."""
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            answer = getattr(p, side)
            if p.prompt_ids is None or answer is None:
                raise ValueError(f"pair {p.index} has no rendered token ids ({side})")
            rows.append((p.prompt_ids, answer))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(prompt + answer, dtype=torch.long)
        attn[r, :n] = 1
        comp[r, len(prompt) : n] = 1
    return PairBatch(ids, attn, comp)


# --------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class PreferenceLoss:
    losses: torch.Tensor  # (B,) per-pair loss; the training loss is losses.mean()
    chosen_rewards: torch.Tensor  # (B,) β·(logp_c - ref_c), detached
    rejected_rewards: torch.Tensor  # (B,)
    margins: torch.Tensor  # chosen_rewards - rejected_rewards
    accuracy: torch.Tensor  # (B,) 1.0 where chosen_rewards > rejected_rewards

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.losses.detach().mean()),
            "rewards/chosen": float(self.chosen_rewards.mean()),
            "rewards/rejected": float(self.rejected_rewards.mean()),
            "rewards/margins": float(self.margins.mean()),
            "rewards/accuracies": float(self.accuracy.mean()),
        }


def check_preference_options(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Reject unknown loss types and out-of-range hyperparameters with one clear line."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"beta: must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ConfigError(
            f"label_smoothing: only the sigmoid loss uses it (loss_type is {loss_type!r}); set it to 0"
        )


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PreferenceLoss:
    """Per-pair loss and the logged rewards for one batch of summed log-probs (shape (B,))."""
    check_preference_options(loss_type, beta, label_smoothing)
    ref_chosen_logps = ref_chosen_logps.to(chosen_logps)
    ref_rejected_logps = ref_rejected_logps.to(rejected_logps)
    r_c = chosen_logps - ref_chosen_logps
    r_r = rejected_logps - ref_rejected_logps
    delta = r_c - r_r
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "the ipo loss needs chosen_tokens and rejected_tokens (completion lengths)"
            )
        per_token_delta = r_c / chosen_tokens.to(r_c).clamp(min=1.0) - r_r / rejected_tokens.to(
            r_r
        ).clamp(min=1.0)
        losses = (per_token_delta - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1.0 - torch.sigmoid(beta * r_c)) + torch.sigmoid(beta * r_r)
    else:  # apo_down
        losses = torch.sigmoid(beta * r_c) + (1.0 - torch.sigmoid(beta * delta))
    chosen_rewards = beta * r_c.detach()
    rejected_rewards = beta * r_r.detach()
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float(),
    )


def pair_sequence_logps(
    logits: torch.Tensor, batch: PairBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected, chosen tokens, rejected tokens) from a model's logits over a pair batch.

    For reference log-probs computed on the fly, call it on the reference model's logits under
    `torch.no_grad()`.
    """
    seq = sequence_logps(logits, batch.input_ids, batch.completion_mask)
    chosen, rejected = seq.logps.chunk(2)
    n_c, n_r = seq.n_tokens.chunk(2)
    return chosen, rejected, n_c, n_r


def batch_preference_loss(
    policy_logits: torch.Tensor,
    batch: PairBatch,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    **options: Any,
) -> PreferenceLoss:
    """The loss of a `pair_batch` from the policy's logits over it (chosen rows, then rejected)."""
    chosen, rejected, n_c, n_r = pair_sequence_logps(policy_logits, batch)
    return preference_loss(
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_tokens=n_c,
        rejected_tokens=n_r,
        **options,
    )


# --------------------------------------------------------------------------- reference cache

_CACHE_FORMAT = "crucible-reference-logps-v1"


@dataclass
class ReferenceLogps:
    """Reference-model sequence log-probs of every pair, keyed by record index."""

    index: torch.Tensor  # (N,) int64
    chosen: torch.Tensor  # (N,) float32
    rejected: torch.Tensor  # (N,) float32
    fingerprint: str = ""
    _row: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._row = {int(i): r for r, i in enumerate(self.index.tolist())}
        if len(self._row) != len(self.index):
            raise ValueError("reference log-probs: duplicate record indices")

    def get(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        missing = [i for i in idx if int(i) not in self._row]
        if missing:
            raise KeyError(f"records {missing[:5]} are not in the reference log-prob cache")
        rows = torch.tensor([self._row[int(i)] for i in idx], dtype=torch.long)
        return self.chosen[rows], self.rejected[rows]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {
            "index": self.index.to(torch.int64).contiguous(),
            "chosen": self.chosen.detach().float().cpu().contiguous(),
            "rejected": self.rejected.detach().float().cpu().contiguous(),
        }
        save_file(
            tensors, str(tmp), metadata={"format": _CACHE_FORMAT, "fingerprint": self.fingerprint}
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> ReferenceLogps:
        from safetensors import safe_open

        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error type for a foreign file
            raise ConfigError(f"{path}: not a reference log-prob cache ({e})") from None
        with f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT:
                raise ConfigError(f"{path}: not a reference log-prob cache ({_CACHE_FORMAT})")
            if fingerprint is not None and meta.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{path}: reference log-probs were computed for another model or dataset "
                    f"(fingerprint {meta.get('fingerprint')!r}, expected {fingerprint!r})"
                )
            t = {k: f.get_tensor(k) for k in ("index", "chosen", "rejected")}
        return cls(t["index"], t["chosen"], t["rejected"], meta.get("fingerprint", ""))


def compute_reference_logps(
    score: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    indices: Sequence[int],
    batch_size: int,
    fingerprint: str = "",
) -> ReferenceLogps:
    """Run `score(record_indices) -> (chosen_logps, rejected_logps)` over all records, no grad."""
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    idx = [int(i) for i in indices]
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            c, r = score(idx[start : start + batch_size])
            chosen.append(c.detach().float().cpu().reshape(-1))
            rejected.append(r.detach().float().cpu().reshape(-1))
    empty = torch.zeros(0)
    return ReferenceLogps(
        torch.tensor(idx, dtype=torch.int64),
        torch.cat(chosen) if chosen else empty,
        torch.cat(rejected) if rejected else empty,
        fingerprint,
    )


def cached_reference_logps(
    path: str | Path,
    score: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    indices: Sequence[int],
    batch_size: int,
    fingerprint: str,
) -> ReferenceLogps:
    """Load the cache at `path` when its fingerprint and records match; else compute and save it.

    The fingerprint should identify the reference model and the rendered dataset (e.g. hashes of
    the checkpoint and of the token ids); a mismatch recomputes instead of reusing stale values.
    """
    path = Path(path)
    if path.exists():
        cached = ReferenceLogps.load(path)  # a file that is not a cache is an error, never replaced
        if cached.fingerprint == fingerprint and set(cached._row) >= {int(i) for i in indices}:
            return cached
    ref = compute_reference_logps(score, indices, batch_size, fingerprint)
    ref.save(path)
    return ref
