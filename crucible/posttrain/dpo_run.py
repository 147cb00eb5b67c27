"""`crucible dpo`: preference optimisation (sigmoid DPO, IPO, APO-zero, APO-down) on the loop.

pairs (JSONL) -> validate (problems counted and named) -> render with the chat template
-> reference log-probs (cached in the run directory, or a frozen reference on the fly)
-> the training loop with the preference objective; logged: rewards, margins, accuracy.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from crucible.config import ConfigError, RunConfig
from crucible.data.loader import StepIterator, epoch_permutation
from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate, TemplateRenderError
from crucible.posttrain.conversations import Conversation, Message
from crucible.posttrain.loop import make_run, prepare, run_loop
from crucible.posttrain.preference import (
    PairBatch,
    PreferencePair,
    batch_preference_loss,
    cached_reference_logps,
    describe_problems,
    pair_batch,
    pair_sequence_logps,
    validate_pairs,
)
from crucible.posttrain.rollout import ChatPrompter
from crucible.tokenizer.train import load_tokenizer
from crucible.train.step import Loss
from crucible.train.trainer import TrainResult

REFERENCE_CACHE = "reference_logps.safetensors"


def read_pair_records(paths: list[str]) -> list[Any]:
    """Every JSON line of `paths`, in order (a line that is not JSON is kept as a string, so it
    is reported as a malformed record rather than stopping the read)."""
    if not paths:
        raise ConfigError("dpo.data: no preference files given")
    out: list[Any] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"dpo.data: {path}: no such file")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(line)
    return out


def _msg(m: Any) -> Message:
    return Message(str(m.get("role")), str(m.get("content") or ""),
                   m.get("reasoning_content") or m.get("reasoning"))  # fmt: skip


def render_pair(
    encoder: ChatEncoder, pair: PreferencePair, record: Any, name: str
) -> PreferencePair:
    """Token ids of the prompt (with the generation prompt) and of each answer after it."""
    kwargs = record.get("chat_template_kwargs") or {} if isinstance(record, dict) else {}
    prompt_msgs = [_msg(m) for m in pair.prompt]
    conv = Conversation(tuple(prompt_msgs), None, dict(kwargs), name)
    prompt_ids = encoder.encode(conv, add_generation_prompt=True).ids
    answers = []
    for side in (pair.chosen, pair.rejected):
        full = Conversation(tuple(prompt_msgs + [_msg(m) for m in side]), None, dict(kwargs), name)
        ids = encoder.encode(full).ids
        n = 0
        while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
            n += 1
        answers.append(tuple(ids[len(prompt_ids) :] if n == len(prompt_ids) else ids[n:]))
        if n < len(prompt_ids):  # the template renders history differently: keep its prefix
            prompt_ids = ids[:n]
    return replace(pair, prompt_ids=tuple(prompt_ids), chosen_ids=answers[0],
                   rejected_ids=answers[1])  # fmt: skip


@dataclass
class PreparedPairs:
    pairs: list[PreferencePair]
    report: str
    fingerprint: str


def load_pairs(
    paths: list[str], tokenizer: Any, template: str | None, max_len: int, limit: int | None
) -> PreparedPairs:
    records = read_pair_records(paths)
    good, problems = validate_pairs(records)
    lines = [describe_problems(problems, len(records), ", ".join(paths))]
    tpl = ChatTemplate.default() if template is None else ChatTemplate.from_file(template)
    encoder = ChatEncoder(tpl, tokenizer)
    rendered, too_long, broken = [], [], []
    for pair in good:
        try:
            r = render_pair(encoder, pair, records[pair.index], f"record {pair.index}")
        except TemplateRenderError as e:
            broken.append(f"{pair.index} ({e})")
            continue
        assert r.prompt_ids is not None and r.chosen_ids is not None and r.rejected_ids
        if len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) > max_len:
            too_long.append(pair.index)
            continue
        rendered.append(r)
    if too_long:
        lines.append(f"  {len(too_long)} pairs longer than {max_len} tokens dropped (records "
                     f"{', '.join(map(str, too_long[:5]))}{', ...' if len(too_long) > 5 else ''})")  # fmt: skip
    if broken:
        lines.append(f"  {len(broken)} pairs the template cannot render: {'; '.join(broken[:3])}")
    if limit is not None:
        rendered = rendered[:limit]
    if not rendered:
        raise ConfigError("dpo.data: no usable preference pairs\n" + "\n".join(lines))
    h = hashlib.sha256()
    for p in rendered:
        h.update(json.dumps([p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    lines.append(f"{len(rendered)} pairs for training")
    return PreparedPairs(rendered, "\n".join(lines), h.hexdigest()[:16])


@dataclass
class PairMicroBatch:
    pairs: PairBatch
    indices: torch.Tensor  # record indices of the pairs (rows of the reference cache)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairMicroBatch:
        b = self.pairs
        moved = PairBatch(b.input_ids.to(device), b.attention_mask.to(device),
                          b.completion_mask.to(device))  # fmt: skip
        return PairMicroBatch(moved, self.indices)


class PairLoader(StepIterator):
    """Per step, `global_batch` pairs in micro-batches; a seeded permutation per epoch."""

    def __init__(
        self, pairs: list[PreferencePair], global_batch: int, micro: int, pad_id: int, seed: int
    ) -> None:
        self.pairs, self.global_batch, self.micro = pairs, global_batch, micro
        self.pad_id, self.seed, self.step = pad_id, seed, 0

    def step_batches(self, step: int) -> list[PairMicroBatch]:
        n = len(self.pairs)
        out = []
        start = step * self.global_batch
        picks = []
        for g in range(start, start + self.global_batch):
            epoch, pos = divmod(g, n)
            picks.append(int(epoch_permutation(n, self.seed, epoch)[pos]))
        for k in range(0, len(picks), self.micro):
            chosen = [self.pairs[i] for i in picks[k : k + self.micro]]
            idx = torch.tensor([p.index for p in chosen], dtype=torch.long)
            out.append(PairMicroBatch(pair_batch(chosen, self.pad_id), idx))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pairs") != len(self.pairs):
            raise ConfigError(
                f"--resume: the run was trained on {state.get('pairs')} pairs, the data now has "
                f"{len(self.pairs)}; resume with the same dpo.data"
            )
        self.step = int(state["step"])


def run_dpo(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    p = prepare(cfg, "dpo", resume, quiet)
    cfg, d = p.cfg, p.cfg.dpo
    assert d is not None
    tok = load_tokenizer(p.base.tokenizer_path)
    data = load_pairs(d.data, tok, d.template, cfg.train.seq_len, d.max_pairs)
    p.say(data.report)
    prompter = ChatPrompter.from_tokenizer(tok, d.template)
    loader = PairLoader(data.pairs, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                        prompter.pad_id, cfg.seed)  # fmt: skip
    options = {"loss_type": d.loss_type, "beta": d.beta, "label_smoothing": d.label_smoothing}
    run = make_run(p, loader, None)
    amp = run.amp
    by_index = {pair.index: pair for pair in data.pairs}

    def autocast() -> Any:
        return torch.autocast(run.device.type, dtype=amp) if amp else nullcontext()

    reference = None
    if d.reference == "cached":
        ref_model = p.base.build(p.device).eval()

        def score(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            batch = pair_batch([by_index[i] for i in indices], prompter.pad_id)
            idx = torch.tensor(indices)
            with autocast():
                logits = ref_model(batch.input_ids.to(p.device)).logits
            c, r, _, _ = pair_sequence_logps(logits, PairMicroBatch(batch, idx).to(p.device).pairs)
            return c, r

        h = hashlib.sha256()
        for name, t in sorted(p.base.state.items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        base_id = h.hexdigest()[:16]
        fingerprint = f"{base_id}-{data.fingerprint}-{amp}"
        reference = cached_reference_logps(cfg.run_dir / REFERENCE_CACHE, score,
                                           sorted(by_index), cfg.train.micro_batch_size,
                                           fingerprint)  # fmt: skip
        del ref_model
        p.say(f"reference log-probs of {len(by_index)} pairs cached in {REFERENCE_CACHE}")
    else:
        ref_model = p.base.build(p.device).eval()
        for prm in ref_model.parameters():
            prm.requires_grad_(False)

    def objective(run: Any, batch: PairMicroBatch) -> Loss:
        logits = run.model(batch.pairs.input_ids).logits
        if reference is not None:
            ref_c, ref_r = reference.get(batch.indices)
        else:
            with torch.no_grad():
                ref_c, ref_r, _, _ = pair_sequence_logps(
                    ref_model(batch.pairs.input_ids).logits, batch.pairs
                )
        out = batch_preference_loss(logits, batch.pairs, ref_c.to(logits.device),
                                    ref_r.to(logits.device), **options)  # fmt: skip
        logged = {
            "loss": out.loss.detach(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": out.margins.mean(),
            "rewards/accuracies": out.accuracy.mean(),
        }
        return Loss(out.loss, logged)

    run.objective = objective
    return run_loop(run, resume)
