"""`crucible distill`: on-policy distillation (GKD) from a teacher with the same tokenizer.

Each step's batch holds the dataset's conversations (the completion is the last assistant turn).
With probability lmbda (a seeded draw per step, so resumes are exact) the student replaces those
completions with its own samples (on-policy); the loss is the generalized Jensen-Shannon
divergence between student and teacher token distributions over the completion tokens
(`crucible.posttrain.distill`).
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import torch

from crucible.config import ConfigError, RunConfig
from crucible.data.loader import Batch
from crucible.model.loss import IGNORE_INDEX
from crucible.posttrain.distill import check_distill_options, generalized_jsd_loss
from crucible.posttrain.loop import load_model_for, make_run, prepare, run_loop
from crucible.posttrain.rollout import ChatPrompter, sample_completions
from crucible.posttrain.sft_data import SFTBatch, SFTLoader
from crucible.posttrain.sft_prepare import load_sft_data
from crucible.tokenizer.train import load_tokenizer
from crucible.train.callbacks.base import Callback
from crucible.train.step import Loss
from crucible.train.trainer import TrainResult


def on_policy_step(lmbda: float, seed: int, step: int) -> bool:
    """Whether the student generates step `step`'s completions (chance lmbda, seeded)."""
    return random.Random(f"gkd:{seed}:{step}").random() < lmbda


class StudentRollout(Callback):
    """On the steps drawn on-policy, swaps each row's completion for the student's own sample."""

    def __init__(self, cfg: RunConfig, prompter: ChatPrompter) -> None:
        assert cfg.distill is not None
        self.cfg, self.d, self.prompter = cfg, cfg.distill, prompter
        self.on_policy = False  # whether the current step's completions are the student's

    def on_batches(self, run: Any, step: int, batches: list[SFTBatch]) -> list[Batch]:
        # `step` is 1-based here (the step being trained)
        self.on_policy = on_policy_step(self.d.lmbda, self.cfg.seed, step)
        if not self.on_policy:
            return batches
        prompts = []
        for b in batches:
            for tokens, targets in zip(b.tokens, b.targets):
                supervised = (targets != IGNORE_INDEX).nonzero()
                # targets[t] is tokens[t + 1]: the completion starts at input position first + 1
                first = int(supervised[0]) + 1 if len(supervised) else int(tokens.numel())
                prompts.append(tokens[:first].tolist())
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        amp = run.amp
        with torch.autocast(run.device.type, dtype=amp) if amp else nullcontext():
            comps = sample_completions(run.model, prompts, 1, self.d.max_new_tokens,
                                       self.prompter.stop_ids, self.prompter.pad_id,
                                       temperature=self.d.temperature, generator=gen)  # fmt: skip
        out, micro = [], self.cfg.train.micro_batch_size
        rows = [p + c for p, c in zip(prompts, comps)]
        for start in range(0, len(rows), micro):
            chunk = rows[start : start + micro]
            width = max(len(r) for r in chunk) - 1
            tokens = torch.full((len(chunk), width), self.prompter.pad_id, dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(chunk):
                n_prompt = len(prompts[start + i])
                tokens[i, : len(row) - 1] = torch.tensor(row[:-1])
                targets[i, n_prompt - 1 : len(row) - 1] = torch.tensor(row[n_prompt:])
            out.append(Batch(tokens, targets, torch.zeros_like(tokens)))
        return out


def check_same_tokenizer(student: Any, teacher: Any, where: str) -> None:
    a, b = student.get_vocab(with_added_tokens=True), teacher.get_vocab(with_added_tokens=True)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))
        raise ConfigError(
            f"{where}: the teacher's tokenizer differs from the student's ({len(a)} vs {len(b)} "
            f"tokens; first difference {diff[0][0]!r}); GKD needs the same tokenizer"
        )


def run_distill(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    d = cfg.distill
    if d is None:
        raise ConfigError("the config has no `distill:` section (see docs/post-training.md)")
    check_distill_options(d.beta, d.temperature, d.lmbda)
    if not d.teacher:
        raise ConfigError("distill.teacher: required (a run directory or an HF directory)")
    p = prepare(cfg, "distill", resume, quiet)
    cfg = p.cfg
    tok = load_tokenizer(p.base.tokenizer_path)
    teacher_base, teacher = load_model_for(d.teacher, "distill.teacher", p.device)
    check_same_tokenizer(tok, load_tokenizer(teacher_base.tokenizer_path), "distill.teacher")
    if teacher_base.model_cfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"distill.teacher: vocab_size {teacher_base.model_cfg.vocab_size} differs "
                          f"from the student's {cfg.model.vocab_size}")  # fmt: skip
    if not d.data:
        raise ConfigError("distill.data: no conversation files given")
    data = load_sft_data(d.data, tok, seq_len=cfg.train.seq_len, loss="completion",
                         template=d.template)  # fmt: skip
    p.say(data.summary())
    loader = SFTLoader(data.examples, cfg.train.seq_len, cfg.train.global_batch_size,
                       cfg.train.micro_batch_size, pad_id=data.pad_id, packing=False,
                       seed=cfg.seed)  # fmt: skip
    prompter = ChatPrompter.from_tokenizer(tok, d.template)
    rollout = StudentRollout(cfg, prompter)

    def objective(run: Any, batch: Batch) -> Loss:
        student = run.model(batch.tokens).logits
        with torch.no_grad():
            teacher_logits = teacher(batch.tokens).logits
        loss = generalized_jsd_loss(student, teacher_logits, batch.targets, beta=d.beta,
                                    temperature=d.temperature)  # fmt: skip
        flag = torch.tensor(float(rollout.on_policy), dtype=torch.float64)
        return Loss(loss, {"loss": loss.detach(), "on_policy": flag})

    run = make_run(p, loader, objective)
    return run_loop(run, resume, [rollout])
