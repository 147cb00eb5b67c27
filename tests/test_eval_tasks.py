"""Benchmark record formats (fixture files in each schema), built-in tasks and the sandbox."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from crucible.evaluate.benchmarks import BENCHMARKS, build_benchmark, read_records
from crucible.evaluate.builtin import BUILTIN, build_builtin
from crucible.evaluate.lm import EvalLM, TextTokenizer
from crucible.evaluate.sandbox import humaneval_check, run_python
from crucible.evaluate.task import GenDoc, Task, mc_requests, run_task

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _task(name: str):
    return build_benchmark(name, read_records(FIXTURES / f"{name}.jsonl"))


# (task, valid documents, invalid records) in the fixture files
COUNTS = {
    "hellaswag": (2, 1), "arc_easy": (2, 1), "arc_challenge": (2, 1), "piqa": (2, 0),
    "winogrande": (2, 1), "commonsense_qa": (2, 0), "openbookqa": (1, 1), "mmlu": (2, 1),
    "mmlu_mcf": (2, 1), "gsm8k": (2, 0), "humaneval": (2, 0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_reads_its_fixture(name):
    task = _task(name)
    assert (len(task.docs), task.invalid) == COUNTS[name]
    assert len(task.invalid_examples) == task.invalid


def test_hellaswag_preprocessing():
    docs = _task("hellaswag").docs
    assert docs[0].query == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, "
        "and a woman wearing winter clothes smiles. Then"
    )
    assert docs[0].gold == 3
    assert docs[1].query == "Baking cookies: A woman mixes flour. and sugar in a bowl. She"
    assert docs[1].choices[2] == "paints the wall blue."
    assert "answer index 7 out of range" in _task("hellaswag").invalid_examples[0]


def test_arc_prompts_labels_and_baseline():
    task = _task("arc_easy")
    reqs, conts = mc_requests(task.docs[0], "cf")
    assert reqs[0].context == "Question: Which two body systems are directly involved in movement?"\
        "\nAnswer:" and conts[0] == " muscular and skeletal"  # fmt: skip
    reqs, conts = mc_requests(task.docs[0], "mcf")
    assert reqs[0].context == (
        "Question: Which two body systems are directly involved in movement?\n A. muscular and "
        "skeletal\n B. digestive and muscular\n C. skeletal and respiratory\n D. respiratory and "
        "digestive\nAnswer:"
    )
    assert conts == [" A", " B", " C", " D"]
    assert task.docs[1].gold == 1  # answerKey "2" among labels "1", "2", "3"
    assert task.random_baseline == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert "missing field 'choices.label'" in task.invalid_examples[0]


def test_winogrande_partial_scoring():
    doc = _task("winogrande").docs[0]
    reqs, conts = mc_requests(doc, "cf")
    assert [r.context for r in reqs] == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert conts == [" always got the harder cases."] * 2 and doc.gold == 0


def test_mmlu_gsm8k_humaneval_fields():
    mcf = _task("mmlu_mcf")
    assert mcf.formulation == "mcf" and mcf.main_metric == "acc"
    reqs, _ = mc_requests(mcf.docs[1], "mcf")
    assert reqs[0].context.startswith(
        "The following are multiple choice questions (with answers) about elementary mathematics."
        "\n\nWhat is 2 + 2?\n A. 3\n B. 4"
    )
    gsm = _task("gsm8k")
    assert gsm.docs[0].answer == "72" and gsm.docs[0].shot.endswith("#### 72")
    assert gsm.num_fewshot == 5
    he = _task("humaneval")
    assert he.docs[0].meta["entry_point"] == "add" and he.check is not None


def test_gzip_and_json_files(tmp_path):
    records = read_records(FIXTURES / "piqa.jsonl")
    gz = tmp_path / "piqa.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (tmp_path / "piqa.json").write_text(json.dumps(records))
    assert read_records(gz) == records == read_records(tmp_path / "piqa.json")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_humaneval_sandbox(monkeypatch):
    # isolated where namespaces work (tests/test_sandbox.py checks the isolation itself)
    monkeypatch.setenv("CRUCIBLE_ALLOW_UNSAFE_CODE", "1")
    he = _task("humaneval")
    for doc in he.docs:
        assert humaneval_check(doc, doc.answer)  # the canonical solutions pass
        assert not humaneval_check(doc, "    return None\n")
    loop = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert loop.status == "timeout" and not loop.passed
    mem = run_python("x = bytearray(2 * 1024**3)\n", memory_mb=256)
    assert not mem.passed and "MemoryError" in mem.output


def test_builtin_tasks_are_deterministic_and_valid():
    for name in BUILTIN:
        a, b = build_builtin(name, 20, seed=0), build_builtin(name, 20, seed=0)
        assert a.docs == b.docs and len(a.docs) > 0, name
    arith = build_builtin("arithmetic", 50)
    for doc in arith.docs:
        expr = doc.query.removeprefix(">>> ").strip()
        assert int(doc.choices[doc.gold]) == eval(expr)  # noqa: S307 - our own arithmetic
        assert len(set(doc.choices)) == 4
    nl = build_builtin("stdlib_next_line", 30)
    for doc in nl.docs:
        assert len(set(doc.choices)) == 4 and doc.delimiter == ""


class _ScriptedLM(EvalLM):
    """Characters as tokens; answers a prompt with its script, repeated for as long as asked."""

    def __init__(self, scripts: dict[str, str]) -> None:
        tok = TextTokenizer(
            encode=lambda s: [ord(c) for c in s],
            decode=lambda ids: "".join(map(chr, ids)),
            vocab_size=128,
            eos_id=0,
        )
        super().__init__(tok, max_len=1024, vocab_size=128, device="cpu")
        self.scripts = scripts

    def _next(self, state: dict) -> torch.Tensor:
        script = next(v for k, v in self.scripts.items() if k in state["prompt"])
        logits = torch.zeros(1, 128)
        logits[0, ord(script[state["n"] % len(script)])] = 1.0
        state["n"] += 1
        return logits

    def logits(self, ids):
        raise AssertionError("generation only: scoring never asks for full logits")

    def begin(self, ids, max_len):
        state = {"prompt": self.tokenizer.decode(ids[0].tolist()), "n": 0}
        return state, self._next(state)

    def extend(self, state, ids):
        return state, self._next(state)[:, None]


def test_a_generation_that_never_stops_is_cut_counted_and_scored():
    docs = [
        GenDoc("Question: 2 + 3?\nAnswer:", "5"),
        GenDoc("Question: loop forever\nAnswer:", "7"),  # " 6 6 6 6 ..." never stops
        GenDoc("Question: 4 + 4?\nAnswer:", "8"),
    ]
    scripts = {"2 + 3": " 5\n\n", "loop": " 6", "4 + 4": " 8\x00"}  # stop string / end of text
    task = Task("toy_gen", "gen", docs, 0.0, main_metric="exact_match", max_new_tokens=40)
    res = run_task(task, _ScriptedLM(scripts))
    assert res["n"] == 3 and res["failures"] == 0 and res["unstopped"] == 1
    assert res["metrics"]["exact_match"] == pytest.approx(2 / 3)  # the others still count
    runaway = res["samples"][1]["samples"][0]
    assert not runaway["stopped"] and not runaway["correct"]
    assert runaway["text"] == " 6" * 20 and runaway["answer"] == "6"  # cut at the 40-token budget
    assert [d["samples"][0]["text"] for d in (res["samples"][0], res["samples"][2])] == [" 5", " 8"]
