"""`crucible plan compass`: why -> what -> how, from a short questionnaire to a Markdown decision record.

Why: most projects should not pretrain; if prompting or fine-tuning an existing open model can
work, that is the answer. What: the deployment target decides the model type and size, the
languages the vocabulary, the use the context length. How: the compute budget, minus a reserve
for ablations and debugging, decides tokens and GPU-days through the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crucible.plan.budget import (
    DEFAULT_MFU,
    SMOLLM3_EXPERIMENT_SHARE,
    reserve_for_experiments,
)
from crucible.plan.hardware import find_accelerator
from crucible.plan.scaling import TOKENS_PER_PARAM_RULE

PURPOSES = ("research", "production", "open-source")
TARGETS = ("phone", "laptop", "single-gpu", "server", "cluster")

# Deployment target -> (max parameters, model type advice). A bf16 model needs 2 bytes per
# parameter plus KV cache; on-device targets also want low decode latency (memory-bound).
_TARGET_ADVICE = {
    "phone": (1.5e9, "dense, <= ~1.5B, GQA with few KV heads (small KV cache), quantized to 4 bit"),
    "laptop": (4e9, "dense, 1-4B; GQA; a hybrid (some linear-attention layers) for long contexts"),
    "single-gpu": (3e10, "dense up to ~30B in bf16 on one 80 GB card, or a small MoE"),
    "server": (3e11, "MoE: many experts, few active (cheap tokens, more memory); or dense"),
    "cluster": (2e12, "MoE with expert parallelism, or dense if training simplicity matters"),
}


@dataclass
class Brief:
    """The answers; each field is one question (see QUESTIONS)."""

    existing_model_works: bool = False
    fine_tuning_works: bool = False
    purpose: str = "research"
    target: str = "single-gpu"
    languages: list[str] = field(default_factory=lambda: ["en"])
    code: bool = False
    context_length: int = 4096
    gpu: str = "H100 SXM"
    gpus: int = 8
    days: float = 30.0
    mfu: float = DEFAULT_MFU
    experiment_share: float = SMOLLM3_EXPERIMENT_SHARE


QUESTIONS: list[tuple[str, str]] = [
    ("existing_model_works", "Can an existing open model, prompted well, do the task? (y/n)"),
    ("fine_tuning_works", "Would fine-tuning an existing model on your data be enough? (y/n)"),
    ("purpose", f"Why pretrain: {' / '.join(PURPOSES)}?"),
    ("target", f"Deployment target: {' / '.join(TARGETS)}?"),
    ("languages", "Languages (comma separated ISO codes, e.g. en,fr,zh)?"),
    ("code", "Must it write code? (y/n)"),
    ("context_length", "Longest context it must handle in deployment (tokens)?"),
    ("gpu", "Accelerator you will train on (e.g. H100, A100-80GB)?"),
    ("gpus", "How many of them?"),
    ("days", "Wall-clock days available for training (all of it, ablations included)?"),
]


def _coerce(name: str, raw: Any) -> Any:
    default = getattr(Brief(), name)
    if isinstance(default, bool):
        return raw if isinstance(raw, bool) else str(raw).strip().lower() in ("y", "yes", "true")
    if isinstance(default, list):
        return raw if isinstance(raw, list) else [s.strip() for s in str(raw).split(",") if s]
    return type(default)(raw)


def brief_from_mapping(data: dict[str, Any]) -> Brief:
    known = set(Brief.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown brief keys {unknown}; allowed: {', '.join(sorted(known))}")
    values = {}
    for k, v in data.items():
        try:
            values[k] = _coerce(k, v)
        except (TypeError, ValueError):
            kind = type(getattr(Brief(), k)).__name__
            raise ValueError(f"brief key {k}: {v!r} is not a {kind}") from None
    b = Brief(**values)
    for k in ("gpus", "days", "context_length"):
        if getattr(b, k) <= 0:
            raise ValueError(f"brief key {k}: {getattr(b, k)} must be > 0")
    if not 0 < b.mfu <= 1:
        raise ValueError(f"brief key mfu: {b.mfu} must be in (0, 1]")
    if not 0 <= b.experiment_share < 1:
        raise ValueError(f"brief key experiment_share: {b.experiment_share} must be in [0, 1)")
    if b.purpose not in PURPOSES:
        raise ValueError(f"purpose '{b.purpose}' must be one of {PURPOSES}")
    if b.target not in TARGETS:
        raise ValueError(f"target '{b.target}' must be one of {TARGETS}")
    find_accelerator(b.gpu)  # fail early with the known names
    return b


def load_brief(path: Path) -> Brief:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--brief {path}: no such file")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of answers")
    return brief_from_mapping(data)


def ask(input_fn=input) -> Brief:
    """Interactive questionnaire; an empty answer keeps the default shown in brackets."""
    answers: dict[str, Any] = {}
    defaults = Brief()
    for name, question in QUESTIONS:
        try:
            raw = input_fn(f"{question} [{getattr(defaults, name)}] ").strip()
        except EOFError:
            raise ValueError(
                "compass: standard input closed before the questionnaire ended; answer "
                "interactively or pass --brief FILE.yaml"
            ) from None
        if raw:
            answers[name] = raw
        if name == "fine_tuning_works" and (
            _coerce("existing_model_works", answers.get("existing_model_works", False))
            or _coerce(name, answers.get(name, False))
        ):
            break  # the answer is already "don't pretrain"
    return brief_from_mapping(answers)


def _vocab_advice(b: Brief) -> str:
    non_latin = {"zh", "ja", "ko", "ar", "hi", "ru", "th", "he", "fa", "bn", "ta", "el", "uk"}
    many = len(b.languages) > 1 or bool(non_latin & set(b.languages))
    if many:
        return (
            "multilingual: ~128k-256k tokens (Llama 3: 128k, Gemma: 256k); measure fertility "
            "(tokens per word) on each language and keep the worst within ~1.5x of English"
        )
    return "one Latin-script language: 32k-64k tokens is enough; 128k helps if code is in the mix"


def decide(b: Brief) -> str:
    """The decision record for a brief, as Markdown."""
    out = ["# Decision record (crucible plan compass)", "", "## Why", ""]
    if b.existing_model_works or b.fine_tuning_works:
        how = "prompting" if b.existing_model_works else "fine-tuning"
        out += [
            f"**Do not pretrain.** The brief says {how} an existing model can do the task. "
            "Pretraining costs months and a large budget and will likely end below the open "
            "models you could start from.",
            "",
            "Instead: pick the strongest open model that fits the deployment target; build an "
            "evaluation set for the task first; try prompting (few-shot, retrieval); then "
            "supervised fine-tuning or LoRA on your data; then preference tuning. Revisit "
            "pretraining only if those fail for a reason a new base model would fix (a missing "
            "language or domain, a licence, an architecture the target needs).",
        ]
        return "\n".join(out) + "\n"
    reasons = {
        "research": "research: a controlled base model to study; favour small, well-ablated runs",
        "production": "production: a model no open one matches on your domain, latency or "
        "licence; ship quality per deployment cost",
        "open-source": "strategic open-source: fill a gap in open models; plan for a release "
        "with evaluations, a model card and reproducible recipes",
    }
    out += [f"Pretraining is justified by {reasons[b.purpose]}.", "", "## What", ""]
    max_params, kind = _TARGET_ADVICE[b.target]
    out += [
        f"- deployment target **{b.target}**: {kind}",
        f"- vocabulary: {_vocab_advice(b)}"
        + ("; include code in the tokenizer corpus" if b.code else ""),
        f"- context: train mostly at 4k and extend to {b.context_length:,} in a mid-training "
        "stage (RoPE base increase); NoPE on some layers or doc masking help long context"
        if b.context_length > 4096
        else f"- context: {b.context_length:,} tokens; train at it directly",
    ]
    acc = find_accelerator(b.gpu)
    hours = b.gpus * b.days * 24
    main, reserve = reserve_for_experiments(hours, b.experiment_share)
    flops = main * 3600 * acc.peak_flops("bf16") * b.mfu
    # Compute-optimal (20 tokens/param) is the largest sensible size; deployment caps it.
    n_opt = (flops / (6 * TOKENS_PER_PARAM_RULE)) ** 0.5
    n = min(n_opt, max_params)
    tokens = flops / (6 * n)
    out += [
        "",
        "## How",
        "",
        f"- budget: {b.gpus} x {acc.name} x {b.days:g} days = {hours:,.0f} GPU-hours; "
        f"{b.experiment_share:.0%} ({reserve:,.0f}) reserved for ablations and debugging "
        "(SmolLM3 spent ~161k GPU-hours on those next to ~276k on its main run)",
        f"- main run: {main:,.0f} GPU-hours at {b.mfu:.0%} MFU of the {acc.bf16_dense_tflops:g} "
        f"TFLOP/s dense bf16 peak = {flops:.3g} FLOPs",
        f"- compute-optimal size for that: {n_opt / 1e9:.2f}B parameters on "
        f"{TOKENS_PER_PARAM_RULE * n_opt:.3g} tokens",
        f"- **recommended: ~{n / 1e9:.2f}B parameters on {tokens:.3g} tokens** "
        f"({tokens / n:,.0f} tokens per parameter)"
        + (" (capped by the deployment target: over-train a smaller model, cheaper to serve)"
           if n < n_opt else ""),
        "- next: write a config near that size (start from a preset), check it with "
        "`crucible plan model CONFIG --gpu ... --search`, and run ablations at ~1B scale first",
    ]  # fmt: skip
    return "\n".join(out) + "\n"
