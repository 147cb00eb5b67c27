"""`crucible quickstart --chat`, after the base: SFT (preset sft-tiny) and a short chat demo."""

from __future__ import annotations

from pathlib import Path

from crucible.posttrain.chat_eval import ChatModel, evaluate_conversation
from crucible.posttrain.conversations import Conversation
from crucible.posttrain.replies import parse_reply
from crucible.posttrain.sft_run import load_sft_config, run_sft
from crucible.posttrain.synthetic import generate
from crucible.train.metrics import console

DEMO_SEED = 7  # held-out prompts of the synthetic test split


def demo_conversations(n_each: int = 1) -> list[Conversation]:
    """Held-out prompts: arithmetic in think and no-think mode, a calculator call, a name."""
    pool = generate("test", 80, seed=DEMO_SEED)
    wanted = [("arithmetic", "think"), ("arithmetic", "no_think"), ("tool_call", None),
              ("name_the_function", None)]  # fmt: skip
    out = []
    for task, mode in wanted:
        hits = [c for c in pool if c.meta["task"] == task and mode in (None, c.meta["mode"])]
        out += hits[:n_each]
    return out


def print_demo(chat: ChatModel, conversations: list[Conversation], max_new_tokens: int = 200):
    for conv in conversations:
        r = evaluate_conversation(chat, conv, max_new_tokens)
        user = next(m.content for m in conv.messages if m.role == "user")
        mark = (
            "" if r.correct is None else ("  [green]correct[/]" if r.correct else "  [red]wrong[/]")
        )
        console.print(f"[bold]user[/] ({r.mode}): {user}{mark}")
        msg = parse_reply(r.text)
        if msg.reasoning:
            console.print(f"  [dim]reasoning: {msg.reasoning}[/]")
        for call in msg.tool_calls:
            console.print(f"  [cyan]tool call[/]: {call.name}({call.arguments})")
        if msg.content:
            console.print(f"  [bold]assistant[/]: {msg.content}")
        if r.followup is not None:
            console.print(
                f"  [bold]assistant[/] (after the tool): {parse_reply(r.followup).content}"
            )
        if not r.ends_with_eot:
            console.print("  [yellow](stopped at the token limit, no end-of-turn)[/]")


def quickstart_chat(base_dir: Path, chat_dir: Path, overrides: list[str] | None = None) -> Path:
    cfg = load_sft_config(
        "sft-tiny",
        [f"sft.base={base_dir}", f"out_dir={chat_dir.parent}", f"name={chat_dir.name}",
         *(overrides or [])],
    )  # fmt: skip
    run_sft(cfg)
    console.rule("[bold]8. chat demo (held-out prompts, greedy)")
    print_demo(ChatModel.from_run(chat_dir), demo_conversations())
    return chat_dir
