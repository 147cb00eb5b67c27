"""Offline preference pairs, the SmolLM3 way, from the chat generator's verifiable arithmetic.

SmolLM3's APO data paired a strong model's answer (chosen) with a weak model's (rejected). Here:

- one model: for each prompt, `samples` answers are drawn; chosen is the first the verifier
  accepts, rejected the first it refuses;
- two models: chosen is the first verifier-accepted answer of the stronger model, rejected the
  first answer of the weaker model that differs from it (a verifier-refused one when there is
  one).

Prompts that give no pair (nothing correct, nothing wrong, identical answers, a verifier error)
are counted by reason. Records are `{prompt, chosen, rejected}` message lists plus
`chat_template_kwargs` and `meta`, the input of `crucible dpo`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.config import ConfigError
from crucible.posttrain.grpo_run import Prompt, synthetic_prompts
from crucible.posttrain.replies import parse_reply
from crucible.posttrain.rewards import get_verifier, score_completions
from crucible.posttrain.rollout import ChatPrompter, sample_completions
from crucible.tokenizer.train import load_tokenizer
from crucible.train.init_from import load_base


@dataclass
class Sampled:
    texts: list[list[str]]  # per prompt, per sample
    rewards: list[list[float | None]]


def sample_and_score(
    model_dir: str,
    prompts: list[Prompt],
    samples: int,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    verifier: str,
    where: str,
) -> tuple[Sampled, Any]:
    base = load_base(model_dir, where)
    model = base.build().eval()
    tok = load_tokenizer(base.tokenizer_path)
    prompter = ChatPrompter.from_tokenizer(tok)
    ids = [prompter.prompt_ids(p.messages, p.template_kwargs) for p in prompts]
    too_long = [p.name for p, i in zip(prompts, ids) if len(i) >= base.model_cfg.max_seq_len]
    if too_long:
        raise ConfigError(f"{where}: prompt {too_long[0]} does not fit max_seq_len "
                          f"{base.model_cfg.max_seq_len}")  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    comps = sample_completions(model, ids, samples, max_new_tokens, prompter.stop_ids,
                               prompter.pad_id, temperature=temperature, generator=gen)  # fmt: skip
    texts = [prompter.text(c) for c in comps]
    columns = [p.columns for p in prompts for _ in range(samples)]
    scored = score_completions(get_verifier(verifier), texts, columns)
    k = samples
    return (
        Sampled([texts[i * k : (i + 1) * k] for i in range(len(prompts))],
                [[r.reward for r in scored[i * k : (i + 1) * k]] for i in range(len(prompts))]),
        tok,
    )  # fmt: skip


def _answer(text: str) -> list[dict[str, Any]]:
    m = parse_reply(text)
    msg: dict[str, Any] = {"role": "assistant", "content": m.content}
    if m.reasoning:
        msg["reasoning_content"] = m.reasoning
    return [msg]


def build_pairs(
    prompts: list[Prompt], strong: Sampled, weak: Sampled | None
) -> tuple[list[dict[str, Any]], Counter[str]]:
    records, skipped = [], Counter()
    for i, p in enumerate(prompts):
        s_texts, s_rewards = strong.texts[i], strong.rewards[i]
        if any(r is None for r in s_rewards):
            skipped["verifier error"] += 1
        chosen = next((t for t, r in zip(s_texts, s_rewards) if r is not None and r > 0), None)
        if chosen is None:
            skipped["no correct answer"] += 1
            continue
        if weak is None:
            pool = list(zip(s_texts, s_rewards))
        else:
            pool = list(zip(weak.texts[i], weak.rewards[i]))
        wrong = [t for t, r in pool if r is not None and r <= 0 and t.strip() != chosen.strip()]
        other = [t for t, _ in pool if t.strip() != chosen.strip()]
        rejected = wrong[0] if wrong else (other[0] if weak is not None and other else None)
        if rejected is None:
            skipped["no wrong answer" if weak is None else "identical answers"] += 1
            continue
        if not _answer(rejected)[0]["content"].strip() or not _answer(chosen)[0]["content"].strip():
            skipped["empty answer"] += 1
            continue
        records.append({
            "prompt": list(p.messages),
            "chosen": _answer(chosen),
            "rejected": _answer(rejected),
            "chat_template_kwargs": p.template_kwargs,
            "meta": {"source": p.name, "answer": p.columns.get("answer"),
                     "rejected_correct": rejected not in wrong},
        })  # fmt: skip
    return records, skipped


def build_preference_data(
    out: str | os.PathLike[str],
    chosen_from: str,
    rejected_from: str | None = None,
    *,
    n: int = 200,
    samples: int = 4,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    verifier: str = "last_number",
    think: bool = False,
) -> tuple[int, Counter[str]]:
    """Write preference pairs to `out` (JSONL, atomically); return (pairs, skipped by reason)."""
    if n < 1 or samples < 1:
        raise ConfigError("--n and --samples must be >= 1")
    if rejected_from is None and samples < 2:
        raise ConfigError("--samples: one model needs at least 2 samples per prompt")
    if not temperature > 0:
        raise ConfigError("--temperature: must be > 0 (pairs need different samples)")
    get_verifier(verifier)
    out = Path(out)
    if not out.parent.exists():
        raise ConfigError(f"{out}: directory {out.parent} does not exist")
    prompts = synthetic_prompts("train", n, seed, think)
    strong, tok = sample_and_score(chosen_from, prompts, samples, seed, max_new_tokens,
                                   temperature, verifier, "--chosen-from")  # fmt: skip
    weak = None
    if rejected_from is not None:
        weak, weak_tok = sample_and_score(rejected_from, prompts, samples, seed + 1,
                                          max_new_tokens, temperature, verifier,
                                          "--rejected-from")  # fmt: skip
        if tok.get_vocab(with_added_tokens=True) != weak_tok.get_vocab(with_added_tokens=True):
            # Pairs are text, so this is allowed; say it, since DPO then trains on the text of
            # another tokenizer's model.
            print("pref-data: note: the two models have different tokenizers")
    records, skipped = build_pairs(prompts, strong, weak)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)
    acc = sum(r > 0 for rs in strong.rewards for r in rs if r is not None)
    total = sum(len(rs) for rs in strong.rewards)
    line = f"wrote {out}: {len(records)} pairs from {n} prompts (chosen model accuracy " \
           f"{acc / total:.1%} over {total} samples)"  # fmt: skip
    if skipped:
        line += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    print(line)
    return len(records), skipped
