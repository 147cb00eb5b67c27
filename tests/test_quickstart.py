"""The main job end to end (shortened), and the commands a user runs on its output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from crucible.quickstart import quickstart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_cache) -> Path:
    out = tmp_path_factory.mktemp("qs")
    return quickstart(
        [
            "train.steps=12",
            "train.val_every=6",
            "checkpoint.every=6",
            "data.max_corpus_mb=1",
            f"data.cache_dir={data_cache}",
            "train.tensorboard=false",
        ],
        out_dir=str(out),
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "crucible", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out


def test_quickstart_outputs(quick_run: Path):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "report.md",
                 "report.html", "tokenizer.json", "hf/config.json", "hf/model.safetensors",
                 "hf/tokenizer.json"):  # fmt: skip
        assert (quick_run / name).is_file(), name
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["step"] == 12 and summary["val_bpb"] > 0
    report = (quick_run / "report.md").read_text()
    assert "bits-per-byte" in report and "## Samples" in report
    assert "## In-loop evaluation" in report  # eval.at_end runs the early-signal tasks
    assert "Python shape" in report and "parses" in report  # the samples from `def `
    assert (quick_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_export_loads_in_transformers_with_its_tokenizer(quick_run: Path):
    model = AutoModelForCausalLM.from_pretrained(quick_run / "hf")
    tok = AutoTokenizer.from_pretrained(quick_run / "hf")
    ids = tok("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_generate_and_export_commands(quick_run: Path, tmp_path: Path):
    out = _cli("generate", str(quick_run), "--prompt", "import ", "--max-new-tokens", "8",
               "--temperature", "0")  # fmt: skip
    assert out.stdout.startswith("import ")
    again = _cli("generate", str(quick_run), "--prompt", "import ", "--max-new-tokens", "8",
                 "--temperature", "0")  # fmt: skip
    assert again.stdout == out.stdout  # greedy decoding is deterministic
    _cli("export", str(quick_run), "--out", str(tmp_path / "exported"))
    _cli("report", str(quick_run))
    assert (tmp_path / "exported" / "model.safetensors").is_file()
