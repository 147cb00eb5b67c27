"""Conversations: validation with named, counted issues; JSONL and local HF dataset readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from posttrain_helpers import records

from crucible.config import ConfigError
from crucible.posttrain.conversations import (
    parse_record,
    parse_records,
    read_conversations,
    read_hf_dataset,
    read_jsonl,
    write_jsonl,
)

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# (record, expected kind): one per validation rule the issue names, and a few more.
BROKEN = [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "missing role"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
     "empty content"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "unknown role"),
    ({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "calc", "arguments": "{\"e\": \"2+2\"}"}}]},
        {"role": "assistant", "content": "4"}]}, "tool call without result"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"},
                   {"role": "assistant", "content": "x"}]}, "tool result without call"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"function": {"name": "f", "arguments": "{not json"}}]},
                   {"role": "tool", "content": "1"}, {"role": "assistant", "content": "ok"}]},
     "bad tool call"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "misplaced system"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                   {"role": "assistant", "content": "c"}]}, "unsupported content"),
    ({"text": "not a conversation"}, "no messages"),
    ([1, 2, 3], "not an object"),
]  # fmt: skip


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_reference_records_are_valid() -> None:
    res = parse_records(records(), "refs")
    assert not res.issues, res.summary()
    assert len(res.conversations) == len(records())


def test_broken_records_are_named_counted_and_the_rest_used(tmp_path: Path) -> None:
    lines = [json.dumps(GOOD)]
    for rec, _ in BROKEN:
        lines.append(json.dumps(rec))
    lines.append("{this is not json")
    lines.append(json.dumps(GOOD))
    res = read_jsonl(_write(tmp_path / "chat.jsonl", lines))
    assert len(res.conversations) == 2
    assert res.total == len(lines)
    expected = [kind for _, kind in BROKEN] + ["invalid JSON"]
    assert [i.kind for i in res.issues] == expected
    # Named file:line, line numbers from 1 (the first broken record is on line 2).
    assert [i.record for i in res.issues] == [f"chat.jsonl:{n}" for n in range(2, len(lines))]
    summary = res.summary(show=3)
    assert f"2 of {len(lines)} records used" in summary
    assert "missing role (1)" in summary and "chat.jsonl:2: message 0 has no role" in summary
    assert f"... and {len(expected) - 3} more" in summary


def test_openai_shapes_and_aliases_are_accepted() -> None:
    rec = {
        "id": "ex-7",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\nanswer"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": None, "reasoning": "use f",
             "tool_calls": [{"id": "x", "type": "function",
                             "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "x", "content": "2"},
            {"role": "assistant", "content": "done", "thinking": "ok"},
        ],
    }  # fmt: skip
    conv = parse_record(rec, "f.jsonl:1")
    assert conv.name == "f.jsonl:1 (ex-7)"
    m = conv.messages
    assert m[0].content == "ab"
    assert (m[1].reasoning, m[1].content) == ("hmm", "answer")
    assert m[3].reasoning == "use f" and m[3].tool_calls[0].arguments == {"a": 1}
    assert m[3].tool_calls[0].id == "x" and m[5].reasoning == "ok"
    assert conv.last_assistant == 5


def test_tool_results_must_match_call_ids() -> None:
    def conv(result_ids: list[str]) -> dict:
        calls = [{"id": i, "function": {"name": "f", "arguments": {}}} for i in ("a", "b")]
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls}]
        msgs += [{"role": "tool", "tool_call_id": i, "content": "r"} for i in result_ids]
        return {"messages": [*msgs, {"role": "assistant", "content": "done"}]}

    parse_record(conv(["b", "a"]))  # any order
    for ids, kind in ((["a"], "tool call without result"), (["a", "c"], "tool result without call"),
                      (["a", "b", "b"], "tool result without call")):  # fmt: skip
        with pytest.raises(ValueError) as e:
            parse_record(conv(ids))
        assert e.value.kind == kind  # type: ignore[attr-defined]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    convs = parse_records(records()).conversations
    path = tmp_path / "out" / "chat.jsonl"
    assert write_jsonl(convs, path) == len(convs)
    back = read_conversations(path)
    assert not back.issues
    assert [c.to_record() for c in back.conversations] == [c.to_record() for c in convs]
    # Tool-call arguments are written in the OpenAI shape: a JSON string.
    first = json.loads(path.read_text().splitlines()[3])
    args = first["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(args, str) and json.loads(args) == {"expression": "347 * 29"}


def test_local_hf_datasets(tmp_path: Path) -> None:
    import datasets

    convs = parse_records(records()).conversations
    rows = [c.to_record() for c in convs]
    # Arrow unifies the schema: absent fields come back as None in every other row.
    for r in rows:
        r.setdefault("tools", None)
        r.setdefault("chat_template_kwargs", None)
    rows.append({"messages": [{"role": "user", "content": "q"}], "tools": None,
                 "chat_template_kwargs": None})  # fmt: skip
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dd")
    res = read_hf_dataset(tmp_path / "dd")
    assert len(res.conversations) == len(convs)
    assert [i.record for i in res.issues] == [f"dd[train]:{len(convs)}"]
    assert res.issues[0].kind == "no assistant turn"
    assert [c.to_record() for c in res.conversations] == [c.to_record() for c in convs]
    assert len(read_hf_dataset(tmp_path / "dd", split="test").conversations) == 1
    with pytest.raises(ConfigError, match="no split 'validation'"):
        read_hf_dataset(tmp_path / "dd", split="validation")

    ds.to_parquet(str(tmp_path / "chat.parquet"))
    res = read_conversations(tmp_path / "chat.parquet")
    assert len(res.conversations) == len(convs) and res.issues[0].record.startswith("chat.parquet:")


def test_missing_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="conversations file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="dataset not found"):
        read_conversations(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unknown dataset file type"):
        read_conversations(tmp_path / "x.csv")
