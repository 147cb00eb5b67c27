"""`crucible chat`: the terminal REPL, driven through stdin in a subprocess and in-process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_util import chat_run  # noqa: F401  (session fixture)

from crucible.serve.engine import ChatEngine, Sampling, load_engine
from crucible.serve.repl import ChatSession, run_repl

ROOT = Path(__file__).resolve().parents[1]


def _chat(run_dir: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "crucible", "chat", str(run_dir), *flags]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def engine(chat_run) -> ChatEngine:  # noqa: F811
    return load_engine(chat_run)


class Recorder(io.StringIO):
    """Counts writes: a streamed reply arrives in many writes, not one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_repl_in_a_subprocess_commands_and_history(chat_run) -> None:  # noqa: F811
    script = "\n".join(
        [
            "Hello there",
            "/no_think",
            "How are you?",
            "/system Answer in one word.",
            "/reset",
            "/frobnicate",
            "Again",
            "/exit",
            "never read",
        ]
    )
    out = _chat(
        chat_run, script + "\n", "--temperature", "0.9", "--seed", "1", "--max-new-tokens", "6"
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "mode /think" in text.splitlines()[0]
    assert text.count("bot> ") == 3  # three messages got replies; "never read" did not
    assert "(mode /no_think)" in text
    assert "(system prompt: 'Answer in one word.')" in text
    assert "(conversation cleared)" in text
    assert "(unknown command /frobnicate" in text
    assert "Traceback" not in out.stderr


def _main(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    from crucible.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_:
        main(["chat", *argv])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_repl_end_of_input_exits_cleanly(chat_run, monkeypatch, capsys) -> None:  # noqa: F811
    code, out, _ = _main([str(chat_run), "--seed", "0"], "", monkeypatch, capsys)
    assert code == 0 and out.startswith("crucible chat:")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "argument --temperature: must be a number >= 0 (got -1)"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1] (got 0)"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1 (got 0)"),
    ],
)
def test_repl_bad_flags_are_one_line_errors(chat_run, flags, message, monkeypatch, capsys) -> None:  # noqa: F811
    code, _, err = _main([str(chat_run), *flags], "", monkeypatch, capsys)
    # argparse checks the ranges (crucible.argtypes): one line, naming the flag and the range
    assert code == 2
    assert err.strip() == f"crucible chat: error: {message} (see `crucible chat --help`)"


def test_repl_missing_run_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = _main([str(tmp_path / "nope")], "", monkeypatch, capsys)
    assert (
        code == 2
        and err.strip() == f"crucible chat: error: {tmp_path / 'nope'}: no such run directory"
    )


def test_repl_streams_and_keeps_history(engine: ChatEngine) -> None:
    out = Recorder()
    stdin = io.StringIO("Hello\n/no_think\nMore please\n")
    sampling = Sampling(temperature=1.0, seed=5)
    assert run_repl(engine, sampling, 40, system="Be kind.", stdin=stdin, out=out) == 0
    # The same two turns through a session, reply by reply, give the same text.
    session = ChatSession(engine, "Be kind.", thinking=True)
    replies = []
    for text, thinking in (("Hello", True), ("More please", False)):
        session.thinking = thinking
        prepared = session.prepare(text, 40, print)
        reply = "".join(e.content for e in engine.stream(prepared, sampling))
        session.history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    transcript = out.getvalue()
    for reply in replies:
        assert f"bot> {reply}" in transcript
    # Streamed: the longest reply reached the terminal in several writes.
    longest = max(replies, key=len)
    assert len(longest) > 5
    bots = [i for i, w in enumerate(out.writes) if w == "bot> "] + [len(out.writes)]
    k = replies.index(longest)
    pieces = [
        w
        for w in out.writes[bots[k] + 1 : bots[k + 1]]
        if w not in ("\n", "you> ", " [max tokens]")
    ]
    assert "".join(pieces) == longest and len(pieces) > 1
    assert engine.stats.thinking_modes[-2:] == [True, False]


def test_session_drops_oldest_turns_when_the_context_fills(engine: ChatEngine) -> None:
    notes: list[str] = []
    session = ChatSession(engine)
    words = " ".join(f"w{i}" for i in range(150))
    for turn in range(6):
        session.prepare(f"{turn} {words}", 16, notes.append)
        session.history.append({"role": "assistant", "content": "ok"})
    assert notes, "the history should have outgrown the 1,024-token context"
    assert session.history[-2]["content"].startswith("5 ")  # the newest turn is kept
    assert len(session.history) < 12
