"""`crucible eval-chat`: what a chat model does with held-out conversations, measured.

For each conversation, the prompt is everything before its first assistant turn (system prompt,
mode flags, tools), rendered with the run's chat template and the generation prompt; the model
then writes one assistant turn greedily, up to the end-of-turn token or `max_new_tokens`.

Measured on every reply:

* ``ends_with_eot``: the reply stopped on the end-of-turn token (not the token limit, not EOS);
* ``mode_following``: in think mode the reply opens with a ``<think>`` block that is closed and
  non-empty; in no-think mode (where the template has already written an empty block) it has
  no ``<think>`` of its own.

Measured on the synthetic tasks (records whose ``meta.task`` names them, see `synthetic.py`):

* ``arithmetic``: the first "The answer is N." of the reply (reasoning excluded) equals the answer;
* ``tool_call``: the reply calls ``calculator`` with an expression whose value is the answer
  (``tool_call_correct``); then the expression the model wrote is evaluated, its result given
  back as the tool's reply, and the model's second turn must state the answer (``tool_answer``);
* ``name_the_function``: the reply is the function's name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crucible.config import ConfigError
from crucible.model import Transformer
from crucible.model.generate import generate
from crucible.posttrain.chat_template import TEMPLATE_FILE, ChatEncoder, ChatTemplate
from crucible.posttrain.conversations import Conversation, Message
from crucible.posttrain.replies import parse_reply
from crucible.posttrain.synthetic import evaluate_expression, extract_answer
from crucible.tokenizer.train import EOS_TOKEN, load_tokenizer


@dataclass
class Reply:
    record: str
    task: str | None
    mode: str  # "think" or "no_think"
    text: str
    ends_with_eot: bool
    mode_ok: bool
    correct: bool | None = None  # the task's check, where there is one
    tool_call_correct: bool | None = None
    followup: str | None = None  # tool_call: the turn after the tool's result


@dataclass
class ChatEvalResult:
    replies: list[Reply] = field(default_factory=list)
    seconds: float = 0.0

    @staticmethod
    def _share(values: Sequence[bool]) -> dict[str, Any]:
        n = len(values)
        return {"n": n, "share": sum(values) / n if n else None}

    def metrics(self) -> dict[str, Any]:
        r = self.replies
        out: dict[str, Any] = {
            "replies": len(r),
            "ends_with_eot": self._share([x.ends_with_eot for x in r]),
            "mode_following": self._share([x.mode_ok for x in r]),
            "mode_following_think": self._share([x.mode_ok for x in r if x.mode == "think"]),
            "mode_following_no_think": self._share([x.mode_ok for x in r if x.mode == "no_think"]),
        }
        for task in ("arithmetic", "name_the_function"):
            out[f"{task}_accuracy"] = self._share(
                [bool(x.correct) for x in r if x.task == task and x.correct is not None]
            )
        tools = [x for x in r if x.task == "tool_call"]
        out["tool_call_correct"] = self._share([bool(x.tool_call_correct) for x in tools])
        out["tool_answer_accuracy"] = self._share([bool(x.correct) for x in tools])
        out["seconds"] = round(self.seconds, 1)
        return out


def think_mode(conv: Conversation) -> bool:
    """The reasoning mode the built-in template picks for a conversation."""
    think = conv.template_kwargs.get("enable_thinking")
    think = True if think is None else bool(think)
    if conv.messages and conv.messages[0].role == "system":
        sys = conv.messages[0].content
        if "/no_think" in sys:
            return False
        if "/think" in sys:
            return True
    return think


def mode_followed(text: str, think: bool) -> bool:
    if not think:
        return "<think>" not in text
    stripped = text.lstrip()
    if not stripped.startswith("<think>") or "</think>" not in stripped:
        return False
    return parse_reply(text).reasoning is not None


class ChatModel:
    """A model, its tokenizer and chat template, and greedy generation of one assistant turn."""

    def __init__(self, model: Transformer, tokenizer: Any, template: ChatTemplate) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.encoder = ChatEncoder(template, tokenizer)
        self.eot = self.encoder.end_of_turn_id
        eos = tokenizer.token_to_id(EOS_TOKEN)
        self.stop = {self.eot} | ({int(eos)} if eos is not None else set())

    @classmethod
    def from_run(
        cls, run_dir: str | Path, checkpoint: str | None = None, max_seq_len: int = 1024
    ) -> ChatModel:
        """A run directory's model (latest checkpoint), its tokenizer and chat template (the
        built-in one when the run has none, e.g. a base model). The context is raised to
        `max_seq_len` when shorter (RoPE has no learned table; the weights are unchanged)."""
        from crucible.runs import load_run_model

        run_dir = Path(run_dir)
        model, cfg, _ = load_run_model(run_dir, checkpoint)
        if cfg.model.max_seq_len < max_seq_len:
            longer = Transformer(cfg.model.model_copy(update={"max_seq_len": max_seq_len}))
            longer.load_state_dict(model.state_dict())
            model = longer.eval()
        path = run_dir / TEMPLATE_FILE
        template = ChatTemplate.from_file(path) if path.is_file() else ChatTemplate.default()
        return cls(model, load_tokenizer(run_dir / "tokenizer.json"), template)

    def reply(self, conv: Conversation, max_new_tokens: int) -> tuple[str, bool]:
        """Greedy continuation of `conv` (ending before an assistant turn); (text, stopped on
        the end-of-turn token)."""
        prompt = self.encoder.encode(conv, add_generation_prompt=True).ids
        room = self.model.cfg.max_seq_len - len(prompt)
        if room <= 0:
            return "", False
        new = generate(self.model, prompt, min(max_new_tokens, room), temperature=0.0,
                       eos_token_id=self.stop)  # fmt: skip
        eot = bool(new) and new[-1] == self.eot
        if new and new[-1] in self.stop:
            new = new[:-1]
        return self.tokenizer.decode(new, skip_special_tokens=False), eot


def _prompt(conv: Conversation) -> Conversation:
    """The conversation up to its first assistant turn."""
    first = next(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    return replace(conv, messages=conv.messages[:first])


def evaluate_conversation(chat: ChatModel, conv: Conversation, max_new_tokens: int = 256) -> Reply:
    meta = conv.meta or {}
    task = meta.get("task")
    think = think_mode(conv)
    prompt = _prompt(conv)
    text, eot = chat.reply(prompt, max_new_tokens)
    out = Reply(conv.name, task, "think" if think else "no_think", text, eot,
                mode_followed(text, think))  # fmt: skip
    answers = meta.get("answers") or []
    expected = str(answers[0]) if answers else None
    if expected is None:
        return out
    msg = parse_reply(text)
    if task == "arithmetic":
        out.correct = extract_answer(msg.content) == expected
    elif task == "name_the_function":
        out.correct = msg.content.strip().strip("`").strip() == expected
    elif task == "tool_call":
        call = next((c for c in msg.tool_calls if c.name == "calculator"), None)
        expr = call.arguments.get("expression") if call is not None else None
        # The calculator answers "error: ..." to what it cannot evaluate, as the data's does.
        result = evaluate_expression(expr) if isinstance(expr, str) else None
        out.tool_call_correct = result == expected
        out.correct = False
        if call is not None and result is not None:
            turns = (*prompt.messages, msg, Message("tool", result, tool_call_id=call.id))
            follow, _ = chat.reply(replace(prompt, messages=turns), max_new_tokens)
            out.followup = follow
            out.correct = extract_answer(parse_reply(follow).content) == expected
    return out


def evaluate_chat(
    chat: ChatModel,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 256,
    template_kwargs: dict[str, Any] | None = None,
) -> ChatEvalResult:
    t0 = time.perf_counter()
    result = ChatEvalResult()
    for conv in conversations:
        if not any(m.role == "assistant" for m in conv.messages):
            continue
        if template_kwargs:
            conv = replace(conv, template_kwargs={**template_kwargs, **conv.template_kwargs})
        with torch.no_grad():
            result.replies.append(evaluate_conversation(chat, conv, max_new_tokens))
    result.seconds = time.perf_counter() - t0
    return result


def format_metrics(m: dict[str, Any]) -> str:
    lines = []
    for k, v in m.items():
        if isinstance(v, dict):
            share = "n/a" if v["share"] is None else f"{v['share']:.1%}"
            lines.append(f"  {k:<26} {share:>7}  (n={v['n']})")
        else:
            lines.append(f"  {k:<26} {v}")
    return "\n".join(lines)


def load_eval_conversations(path: str | Path, limit: int | None = None) -> list[Conversation]:
    from crucible.posttrain.conversations import read_conversations

    read = read_conversations(path)
    if not read.conversations:
        raise ConfigError(f"{path}: no usable conversations\n{read.summary()}")
    convs = read.conversations
    return convs[:limit] if limit else convs


def write_results(path: str | Path, result: ChatEvalResult, info: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        **info,
        "metrics": result.metrics(),
        "replies": [r.__dict__ for r in result.replies],
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(out)
