"""The synthetic chat data: deterministic, valid, verifiable, with disjoint held-out splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crucible.evaluate.builtin import BUILTIN_SIZE, arithmetic_pairs
from crucible.posttrain.conversations import parse_records, read_jsonl
from crucible.posttrain.synthetic import (
    TASKS,
    evaluate_expression,
    extract_answer,
    generate,
    stdlib_functions,
)


@pytest.fixture(scope="module")
def splits():
    return generate("train", 600, seed=0), generate("test", 200, seed=0)


def test_deterministic_and_seeded(splits) -> None:
    train, _ = splits
    again = generate("train", 600, seed=0)
    assert [c.to_record() for c in again] == [c.to_record() for c in train]
    other = generate("train", 600, seed=1)
    assert [c.to_record() for c in other] != [c.to_record() for c in train]


def test_records_are_valid_and_mixed_as_asked(splits) -> None:
    for convs, n in zip(splits, (600, 200)):
        res = parse_records([c.to_record() for c in convs])
        assert not res.issues and len(res.conversations) == n
        counts = {t: sum(c.meta["task"] == t for c in convs) for t in TASKS}
        assert counts == {t: round(n * w) for t, w in TASKS.items()}
        modes = [c.meta["mode"] for c in convs]
        assert 0.35 < modes.count("think") / n < 0.65
        assert all(c.meta["synthetic"] is True for c in convs)
    only = generate("test", 10, seed=0, tasks={"tool_call": 1})
    assert {c.meta["task"] for c in only} == {"tool_call"}
    with pytest.raises(ValueError, match="unknown task"):
        generate("train", 5, tasks={"poetry": 1.0})


def test_train_and_test_are_disjoint(splits) -> None:
    train, test = splits
    keys = [{k for c in convs for k in c.meta["keys"]} for convs in splits]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    questions = [{m.content for c in convs for m in c.messages if m.role == "user"}
                 for convs in splits]  # fmt: skip
    assert not questions[0] & questions[1]
    # Functions of the test split come from held-out stdlib files, disjoint from train's.
    assert not {f.qualname for f in stdlib_functions("train")} & {
        f.qualname for f in stdlib_functions("test")
    }
    # Training data never contains the built-in arithmetic evaluation's expressions.
    builtin = {e for e, _ in arithmetic_pairs(BUILTIN_SIZE, 0)}
    train_keys = {k for c in train for k in c.meta["keys"]}
    assert not builtin & train_keys


def test_answers_are_verifiable(splits) -> None:
    for convs in splits:
        for c in convs:
            assistant = [m for m in c.messages if m.role == "assistant" and not m.tool_calls]
            assert len(assistant) == len(c.meta["answers"])
            for m, expected, key in zip(assistant, c.meta["answers"], c.meta["keys"]):
                if c.meta["task"] in ("arithmetic", "tool_call") or key[0].isdigit():
                    assert extract_answer(m.content) == expected == evaluate_expression(key)
                else:
                    assert expected in m.content
            if c.meta["mode"] == "think":
                assert all(m.reasoning for m in c.messages if m.role == "assistant")
            else:
                assert not any(m.reasoning for m in c.messages)


def test_tool_calls_use_the_calculator_and_its_result(splits) -> None:
    styles = set()
    for c in splits[0]:
        if c.meta["task"] != "tool_call":
            continue
        user, call, result, final = c.messages
        (tc,) = call.tool_calls
        assert tc.name == "calculator" and result.tool_call_id == tc.id
        assert result.content == evaluate_expression(tc.arguments["expression"])
        assert result.content in final.content
        styles.add(c.meta["tool_style"])
    assert styles == {"xml", "tools", "python"}


def test_calculator_evaluates_without_eval() -> None:
    assert evaluate_expression("347 * 29") == "10063"
    assert evaluate_expression("(2 + 3) * -4") == "-20"
    assert evaluate_expression("__import__('os')").startswith("error")
    assert evaluate_expression("2 ** 100").startswith("error")
    assert evaluate_expression("2 +").startswith("error")
    assert extract_answer("So... The answer is 12. Wait, The answer is -3.") == "-3"
    assert extract_answer("no number") is None


def test_chat_data_command_writes_both_splits(tmp_path: Path, capsys) -> None:
    from crucible.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat-data", str(tmp_path), "--train", "20", "--test", "10", "--tasks",
              "arithmetic=2,tool_call"])  # fmt: skip
    assert e.value.code == 0
    train = read_jsonl(tmp_path / "train.jsonl")
    assert len(train.conversations) == 20 and not train.issues
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    tasks = [json.loads(line)["meta"]["task"] for line in lines]
    assert tasks.count("arithmetic") == 13 and tasks.count("tool_call") == 7
    assert len(read_jsonl(tmp_path / "test.jsonl").conversations) == 10
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["chat-data", str(tmp_path), "--tasks", "poetry"])
    assert e.value.code == 2
    assert "unknown task 'poetry'" in capsys.readouterr().err


def test_chat_inspect_reports_broken_records_tokens_and_rows(tmp_path: Path, capsys) -> None:
    from posttrain_helpers import train_small_tokenizer

    from crucible.cli import main
    from crucible.posttrain.conversations import write_jsonl

    tok = train_small_tokenizer(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    write_jsonl(generate("test", 12, seed=0), data)
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["chat-inspect", str(data), "--tokenizer", str(tok), "--seq-len", "1024",
              "--show", "0"])  # fmt: skip
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "12 of 13 records used" in out and "chat.jsonl:13: no assistant message" in out
    assert "--- chat.jsonl:1 (supervised text in [[ ]])" in out and "<|im_end|>]]" in out
    assert "12 of 12 conversations tokenized" in out and "packed rows of 1024" in out
