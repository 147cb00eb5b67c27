"""`crucible grpo`: RL with verifiable rewards on the training loop.

Per optimizer step (global_batch_size completions = prompts x group_size):

    PromptLoader      the step's prompts (a pure function of the step: exact resumes)
    Rollout.on_batches  sample G completions per prompt with the current policy (KV cache,
                      a generator seeded by (seed, step)), score them with the verifiers (a raising
                      verifier marks that sample, not the run), add DAPO's soft overlong penalty,
                      compute group-relative advantages, mask truncated completions, and split
                      the step into micro-batches (with the reference log-probs when beta > 0)
    objective         the GRPO-family loss of `crucible.posttrain.grpo` on each micro-batch

Sampling is on-policy (one update per generation), so the ratio is 1 in value and clipping
acts through the gradient only, as in TRL with num_iterations=1.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.config import ConfigError, GRPOConfig, RunConfig
from crucible.data.loader import StepIterator, epoch_permutation
from crucible.posttrain.grpo import (
    combine_rewards,
    group_advantages,
    mask_truncated,
    policy_loss,
    soft_overlong_penalty,
    truncated,
    validate_group_size,
)
from crucible.posttrain.logps import shifted_token_logps
from crucible.posttrain.loop import load_model_for, make_run, prepare, run_loop
from crucible.posttrain.rewards import get_verifier, score_completions
from crucible.posttrain.rollout import ChatPrompter, sample_completions
from crucible.tokenizer.train import load_tokenizer
from crucible.train.callbacks.base import Callback
from crucible.train.step import Loss
from crucible.train.trainer import TrainResult


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict[str, Any], ...]
    columns: dict[str, Any]  # what the verifiers receive (answer, pattern, tests, ...)
    template_kwargs: dict[str, Any]
    name: str


def synthetic_prompts(split: str, n: int, seed: int, think: bool) -> list[Prompt]:
    """Arithmetic word problems of the chat generator (train or held-out test split)."""
    from crucible.posttrain.synthetic import generate

    out = []
    for conv in generate(split, n, seed=seed, tasks={"arithmetic": 1.0}):  # type: ignore[arg-type]
        msgs = tuple(m.to_template() for m in conv.messages[: conv.last_assistant])
        kwargs = {**conv.template_kwargs, "enable_thinking": think}
        out.append(Prompt(msgs, {"answer": conv.meta["answers"][-1]}, kwargs, conv.name))
    return out


def read_prompts(path: str, think: bool) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grpo.prompts: {p}: no such file")
    out, bad = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompt = rec.pop("prompt")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            bad.append(i + 1)
            continue
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        kwargs = {"enable_thinking": think, **(rec.pop("chat_template_kwargs", None) or {})}
        out.append(Prompt(tuple(msgs), rec, kwargs, f"{p.name}:{i + 1}"))
    if bad:
        shown = ", ".join(map(str, bad[:5]))
        raise ConfigError(
            f"grpo.prompts: {p}: {len(bad)} lines without a JSON `prompt` (lines {shown})"
        )
    if not out:
        raise ConfigError(f"grpo.prompts: {p}: no prompts")
    return out


def with_system(prompts: list[Prompt], system: str | None) -> list[Prompt]:
    """`system` as the first message of every prompt that has no system message."""
    if system is None:
        return prompts
    head = ({"role": "system", "content": system},)
    return [
        p if p.messages and p.messages[0].get("role") == "system"
        else Prompt(head + p.messages, p.columns, p.template_kwargs, p.name)
        for p in prompts
    ]  # fmt: skip


def load_prompts(g: GRPOConfig, seed: int) -> list[Prompt]:
    if not g.prompts:
        raise ConfigError("grpo.prompts: required ('synthetic:arithmetic' or a JSONL file)")
    if g.prompts.startswith("synthetic:"):
        task = g.prompts.split(":", 1)[1]
        if task != "arithmetic":
            raise ConfigError(f"grpo.prompts: synthetic task {task!r}: only 'arithmetic' has "
                              "verifiable prompts")  # fmt: skip
        prompts = synthetic_prompts("train", g.num_prompts, seed, g.enable_thinking)
    else:
        prompts = read_prompts(g.prompts, g.enable_thinking)
    return with_system(prompts, g.system_prompt)


@dataclass
class PromptStep:
    """What the loader gives per step: the prompts; the rollout turns them into micro-batches."""

    prompts: list[Prompt]

    def to(self, device: Any, non_blocking: bool = False) -> PromptStep:
        return self


class PromptLoader(StepIterator):
    def __init__(self, prompts: list[Prompt], per_step: int, seed: int) -> None:
        self.prompts, self.per_step, self.seed, self.step = prompts, per_step, seed, 0

    def step_batches(self, step: int) -> list[PromptStep]:
        n, picks = len(self.prompts), []
        for g in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, pos = divmod(g, n)
            picks.append(self.prompts[int(epoch_permutation(n, self.seed, epoch)[pos])])
        return [PromptStep(picks)]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("prompts") != len(self.prompts):
            raise ConfigError(f"--resume: the run had {state.get('prompts')} prompts, now "
                              f"{len(self.prompts)}; resume with the same grpo.prompts")  # fmt: skip
        self.step = int(state["step"])


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, T) prompt + completion, right-padded
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens that count in the loss
    advantages: torch.Tensor  # (B,)
    ref_logps: torch.Tensor | None  # (B, T - 1) per-token reference log-probs
    num_items: float  # active completion tokens of the whole step (dapo)
    stats: dict[str, float]  # this micro-batch's rollout statistics, logged as averages

    def to(self, device: Any, non_blocking: bool = False) -> RolloutBatch:
        ref = self.ref_logps.to(device) if self.ref_logps is not None else None
        return RolloutBatch(self.input_ids.to(device), self.completion_mask.to(device),
                            self.advantages.to(device), ref, self.num_items, self.stats)  # fmt: skip


@dataclass
class Scored:
    rewards: torch.Tensor  # (N,) combined reward (NaN where every verifier failed)
    correct: list[float | None]  # the first verifier alone
    errors: list[str]


def score(g: GRPOConfig, texts: list[str], prompts: list[Prompt], lengths: list[int]) -> Scored:
    columns = [p.columns for p in prompts]
    per_verifier, errors = [], []
    for name in g.verifiers:
        results = score_completions(get_verifier(name), texts, columns)
        per_verifier.append([r.reward for r in results])
        errors += [f"{name} on {prompts[i].name}: {r.error}" for i, r in enumerate(results)
                   if r.error is not None]  # fmt: skip
    if g.overlong_penalty:
        per_verifier.append(soft_overlong_penalty(lengths, g.max_completion_length,
                                                  g.overlong_cache))  # fmt: skip
    weights = list(g.reward_weights or [1.0] * len(g.verifiers))
    if g.overlong_penalty:
        weights.append(1.0)
    return Scored(combine_rewards(per_verifier, weights), per_verifier[0], errors)


class Rollout(Callback):
    """Turns the step's prompts into scored, advantage-weighted micro-batches (on_batches)."""

    def __init__(self, cfg: RunConfig, prompter: ChatPrompter, ref_model: Any) -> None:
        assert cfg.grpo is not None
        self.cfg, self.g, self.prompter, self.ref_model = cfg, cfg.grpo, prompter, ref_model
        self._ids: dict[str, list[int]] = {}
        self.reported_errors = 0

    def prompt_ids(self, p: Prompt) -> list[int]:
        if p.name not in self._ids:
            self._ids[p.name] = self.prompter.prompt_ids(p.messages, p.template_kwargs,
                                                         name=p.name)  # fmt: skip
        return self._ids[p.name]

    def on_batches(self, run: Any, step: int, batches: list[PromptStep]) -> list[RolloutBatch]:
        g, G = self.g, self.g.group_size
        prompts = [p for b in batches for p in b.prompts]
        ids = [self.prompt_ids(p) for p in prompts]
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        amp = run.amp
        with torch.autocast(run.device.type, dtype=amp) if amp else nullcontext():
            completions = sample_completions(
                run.model, ids, G, g.max_completion_length, self.prompter.stop_ids,
                self.prompter.pad_id, temperature=g.temperature, top_k=g.top_k, generator=gen,
            )  # fmt: skip
        expanded = [p for p in prompts for _ in range(G)]
        texts = [self.prompter.text(c) for c in completions]
        lengths = [len(c) for c in completions]
        scored = score(g, texts, expanded, lengths)
        if scored.errors and self.reported_errors < 3:
            self.reported_errors += 1
            run.say(f"[yellow]grpo:[/] {len(scored.errors)} verifier error(s) at step {step}; "
                    f"first: {scored.errors[0]}")  # fmt: skip
        adv = group_advantages(scored.rewards, G, g.scale_rewards)
        is_trunc = truncated(completions, self.prompter.stop_ids, None)
        full_ids = [ids[i // G] + c for i, c in enumerate(completions)]
        width = max(len(r) for r in full_ids)
        input_ids = torch.full((len(full_ids), width), self.prompter.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, (row, c) in enumerate(zip(full_ids, completions)):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, len(row) - len(c) : len(row)] = 1
        if g.mask_truncated:
            mask = mask_truncated(mask, is_trunc)
        num_items = float(mask[:, 1:].sum())
        micro = self.cfg.train.micro_batch_size
        out = []
        for k in range(0, len(full_ids), micro):
            sl = slice(k, k + micro)
            rows = input_ids[sl]
            used = int((rows != self.prompter.pad_id).any(0).nonzero().max()) + 1
            rows, m = rows[:, : max(used, 2)], mask[sl][:, : max(used, 2)]
            ref = None
            if g.beta > 0:
                with torch.no_grad(), (torch.autocast(run.device.type, dtype=amp) if amp
                                       else nullcontext()):  # fmt: skip
                    logits = self.ref_model(rows.to(run.device)).logits
                ref = shifted_token_logps(logits, rows.to(run.device), g.temperature).cpu()
            r = scored.rewards[sl]
            correct = [x for x in scored.correct[sl] if x is not None]
            stats = {
                "reward": float(torch.nanmean(r)) if not torch.isnan(r).all() else 0.0,
                "accuracy": sum(correct) / len(correct) if correct else 0.0,
                "completion_length": sum(lengths[sl]) / len(lengths[sl]),
                "truncated": float(is_trunc[sl].float().mean()),
                "reward_errors": float(sum(x is None for x in scored.correct[sl])),
            }
            out.append(RolloutBatch(rows, m, adv[sl], ref, num_items, stats))
        return out


def make_objective(g: GRPOConfig):  # type: ignore[no-untyped-def]
    def objective(run: Any, batch: RolloutBatch) -> Loss:
        logits = run.model(batch.input_ids).logits
        logps = shifted_token_logps(logits, batch.input_ids, g.temperature)
        mask = batch.completion_mask[:, 1:]
        out = policy_loss(
            logps, None, batch.advantages.to(logps.dtype), mask, loss_type=g.loss_type,
            epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
            ref_logps=batch.ref_logps, max_completion_length=g.max_completion_length,
            num_items=batch.num_items, grad_accum_steps=1,
        )  # fmt: skip
        # train_step divides every micro-batch loss by the accumulation steps; dapo's num_items
        # already spans the whole step, so it is scaled back.
        loss = out.loss * run.grad_accum if g.loss_type == "dapo" else out.loss
        logged = {"loss": out.loss.detach() * (run.grad_accum if g.loss_type == "dapo" else 1)}
        logged.update({k: torch.tensor(v, dtype=torch.float64) for k, v in batch.stats.items()})
        m = mask.to(logps.dtype)
        n = m.sum().clamp(min=1)
        logged["clip_ratio/low"] = (out.clipped_low.to(m.dtype) * m).sum() / n
        logged["clip_ratio/high"] = (out.clipped_high.to(m.dtype) * m).sum() / n
        if out.per_token_kl is not None:
            logged["kl"] = (out.per_token_kl.detach() * m).sum() / n
        return Loss(loss, logged)

    return objective


def check_grpo(cfg: RunConfig) -> None:
    """Everything checkable before the model is loaded or anything sampled."""
    g = cfg.grpo
    if g is None:
        raise ConfigError("the config has no `grpo:` section (see docs/post-training.md)")
    validate_group_size(cfg.train.global_batch_size, g.group_size)
    for name in g.verifiers:
        get_verifier(name)


def run_grpo(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    check_grpo(cfg)
    p = prepare(cfg, "grpo", resume, quiet)
    cfg, g = p.cfg, p.cfg.grpo
    assert g is not None
    prompts = load_prompts(g, cfg.seed)
    tok = load_tokenizer(p.base.tokenizer_path)
    prompter = ChatPrompter.from_tokenizer(tok, g.template)
    too_long = [pr.name for pr in prompts[:64]
                if len(prompter.prompt_ids(pr.messages, pr.template_kwargs)) >= cfg.model.max_seq_len]  # fmt: skip
    if too_long:
        raise ConfigError(f"grpo.prompts: {too_long[0]} leaves no room for a completion in "
                          f"model.max_seq_len {cfg.model.max_seq_len}")  # fmt: skip
    p.say(f"grpo: {len(prompts)} prompts, {cfg.train.global_batch_size // g.group_size} per "
          f"step x {g.group_size} completions, verifiers {', '.join(g.verifiers)}"
          + (", overlong penalty" if g.overlong_penalty else ""))  # fmt: skip
    ref_model = load_model_for(g.init_from, "grpo.init_from", p.device)[1] if g.beta > 0 else None
    loader = PromptLoader(prompts, cfg.train.global_batch_size // g.group_size, cfg.seed)
    run = make_run(p, loader, make_objective(g))
    return run_loop(run, resume, [Rollout(cfg, prompter, ref_model)])


@torch.no_grad()
def heldout_accuracy(
    model: torch.nn.Module,
    prompter: ChatPrompter,
    prompts: list[Prompt],
    verifier: str = "last_number",
    max_new_tokens: int = 48,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean reward, mean completion length) of `samples` completions of each of `prompts`:
    greedy at temperature 0, else sampled from a generator seeded by `seed` (so two models
    evaluated with one seed are compared on common random numbers)."""
    ids = [prompter.prompt_ids(p.messages, p.template_kwargs) for p in prompts]
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    comps = sample_completions(model, ids, samples, max_new_tokens, prompter.stop_ids,
                               prompter.pad_id, temperature=temperature, generator=gen)  # fmt: skip
    fn = get_verifier(verifier)
    columns = [p.columns for p in prompts for _ in range(samples)]
    rewards = score_completions(fn, [prompter.text(c) for c in comps], columns)
    vals = [r.reward or 0.0 for r in rewards]
    return sum(vals) / len(vals), sum(len(c) for c in comps) / len(comps)
