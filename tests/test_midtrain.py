"""Mid-training: conversations rendered in plain ChatML as a `chat:PATH` mixture source."""

import json
from pathlib import Path

import numpy as np
import pytest

from crucible.config import load_config
from crucible.data.chat_source import ChatEncoderIds, build_chat_shards, read_chat_jsonl
from crucible.data.prepare import prepare_data
from crucible.data.shards import ShardSet
from crucible.tokenizer.train import load_tokenizer
from crucible.train.trainer import train

RECORD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1234 * 56? Say <|im_end|> if unsure."},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Large numbers: use the tool.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "1234 * 56"}'},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "content": "69104"},
        {"role": "assistant", "content": "The answer is 69104."},
    ]
}
# The same conversation, written out by hand in plain ChatML.
EXPECTED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 1234 * 56? Say <|im_end|> if unsure.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nLarge numbers: use the tool.\n</think>\n<tool_call>\n"
    '{"name": "calculator", "arguments": {"expression": "1234 * 56"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>tool\n69104<|im_end|>\n"
    "<|im_start|>assistant\nThe answer is 69104.<|im_end|>\n"
    "<|endoftext|>"
)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_conversation_renders_to_plain_chatml_ids(tmp_path, small_data):
    tok_path = small_data / "tokenizer.json"
    docs = read_chat_jsonl(_write(tmp_path / "c.jsonl", [RECORD]))
    ids = ChatEncoderIds(tok_path).encode(docs.documents[0])
    tok = load_tokenizer(tok_path)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == EXPECTED
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    # one control token per turn: the "<|im_end|>" the user typed stayed text
    assert (ids == im_start).sum() == 5 and (ids == im_end).sum() == 5
    assert ids[0] == im_start and ids[-1] == tok.token_to_id("<|endoftext|>")


def test_broken_records_are_named_counted_and_left_out(tmp_path):
    path = _write(tmp_path / "c.jsonl", [
        RECORD, "not json", {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}]}, {"text": "no messages"},
    ])  # fmt: skip
    docs = read_chat_jsonl(path)
    assert len(docs.documents) == 1
    assert [w for w, _ in docs.bad] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "robot" in docs.bad[2][1]


def test_shards_hold_the_rendered_conversations_and_are_cached(tmp_path, small_data):
    tok_path = small_data / "tokenizer.json"
    records = [RECORD, {"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello."}]}]  # fmt: skip
    path = _write(tmp_path / "c.jsonl", records)
    root = build_chat_shards(f"chat:{path}", tok_path, tmp_path / "cache", say=lambda *a: None)
    enc = ChatEncoderIds(tok_path)
    expected = np.concatenate([enc.encode(d) for d in read_chat_jsonl(path).documents])
    shards = ShardSet(root)
    assert np.array_equal(shards.read(0, shards.num_tokens), expected)
    assert shards.num_docs == 2
    info = json.loads((root / "chat.json").read_text())
    assert info["conversations"] == 2 and info["left_out"] == []
    calls = []
    assert build_chat_shards(str(path), tok_path, tmp_path / "cache", say=calls.append) == root
    assert calls == []  # reused, not rebuilt
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_chat_shards("chat:/nope.jsonl", tok_path, tmp_path / "cache")


def test_mixture_stage_mid_trains_on_chat(tmp_path, small_overrides):
    from crucible.posttrain.conversations import write_jsonl
    from crucible.posttrain.synthetic import generate

    chat = tmp_path / "reasoning.jsonl"
    think = [c for c in generate("train", 40, seed=1) if c.meta["mode"] == "think"]
    write_jsonl(think, chat)
    overrides = [
        *small_overrides, "name=mid", "train.steps=6", "train.val_every=0",
        f"data.sources={{code: 'stdlib:code', chat: 'chat:{chat}'}}",
        "data.stages=[{name: pre, weights: {code: 1}, steps: 3}, "
        "{name: mid, weights: {code: 0.5, chat: 0.5}}]",
    ]  # fmt: skip
    cfg = load_config("tiny", overrides)
    train(cfg, quiet=True)
    plan = json.loads((cfg.run_dir / "mixture.json").read_text())
    share = {(r["stage"], r["source"]): r["share"] for r in plan}
    assert share[("pre", "chat")] == 0 and share[("mid", "chat")] == pytest.approx(0.5)
    events = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["pre", "mid"]
    # the chat shards use the mixture's tokenizer (the embedded corpus's)
    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, quiet=True)
    assert ShardSet(data.sources["chat"]).num_docs == len(think)
    bad = load_config("tiny", [*small_overrides, "data.sources={chat: 'chat:/nope.jsonl'}",
                               "data.stages=[{name: a, weights: {chat: 1}}]"])  # fmt: skip
    with pytest.raises(ValueError, match="data.sources.chat: chat source chat:/nope.jsonl"):
        prepare_data(bad.data, bad.model.vocab_size, bad.train.seq_len, quiet=True)
