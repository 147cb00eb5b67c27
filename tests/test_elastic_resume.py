"""Elastic resume: a 2-rank run continues on 1 rank and a 1-rank run on 2 (DDP and FSDP2),
reading exactly the global sequences, in the same order, and reaching the same losses and
weights as an uninterrupted single-process run.

Every process records what it trained on: per step, the hash of each sequence at its position
in the global batch (rank r of W holds positions [r G/W, (r+1) G/W)). The records of the two
halves of an elastic run, merged, must equal the uninterrupted run's.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crucible.config import load_config
from crucible.train.callbacks.base import Callback
from crucible.train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.dist]

STEPS, SPLIT = 4, 2
COMMON = [f"train.steps={STEPS}", "train.log_every=1", "train.val_every=0", "train.dtype=fp32",
          "checkpoint.every=0", "schedule.warmup_steps=1", "train.threads=1",
          "train.global_batch_size=8", "train.micro_batch_size=2"]  # fmt: skip


class BatchRecorder(Callback):
    """Appends, per step, {position in the global batch: sha1 of the sequence} to a file."""

    def on_batches(self, run, step, batches):
        per_rank = run.cfg.train.global_batch_size // run.info.world_size
        rows = [row for b in batches for row in b.tokens]
        base = run.info.rank * per_rank
        seen = {base + i: hashlib.sha1(r.numpy().tobytes()).hexdigest() for i, r in enumerate(rows)}
        path = run.run_dir / f"batches_rank{run.info.rank}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "rows": seen}) + "\n")
        return batches


_SCRIPT = """
import sys
from crucible.config import load_config
from crucible.train.distributed import finish
from crucible.train.trainer import train
from test_elastic_resume import BatchRecorder

resume, overrides = sys.argv[1] == "resume", sys.argv[2:]
train(load_config("tiny", overrides), resume=resume, quiet=True, callbacks=[BatchRecorder()])
finish(0)
"""


def _torchrun(tmp: Path, overrides: list[str], resume: bool) -> None:
    script = tmp / "elastic_run.py"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "resume" if resume else "fresh", *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _pythonpath() -> str:
    """The script imports BatchRecorder from this file, and crucible from this checkout."""
    here, root = Path(__file__).parent, Path(__file__).parent.parent
    return os.pathsep.join([str(here), str(root), os.environ.get("PYTHONPATH", "")])


def _single(overrides: list[str], resume: bool) -> None:
    train(load_config("tiny", overrides), resume=resume, quiet=True, callbacks=[BatchRecorder()])


def _stream(run_dir: Path) -> dict[int, list[str]]:
    """Step -> the hashes of its global batch in order; a replayed step keeps its last record."""
    merged: dict[int, dict[int, str]] = {}
    for path in sorted(run_dir.glob("batches_rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            merged.setdefault(rec["step"], {}).update({int(k): v for k, v in rec["rows"].items()})
    return {s: [rows[i] for i in sorted(rows)] for s, rows in sorted(merged.items())}


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_base):
    """One uninterrupted single-process run, and one stopped at SPLIT (the 1 -> 2 start)."""
    runs = tmp_path_factory.mktemp("elastic")
    base = [*small_base, f"out_dir={runs}", *COMMON]
    _single([*base, "name=ref"], resume=False)
    _single([*base, "name=one", f"train.stop_at={SPLIT}"], resume=False)
    stream = _stream(runs / "ref")
    assert sorted(stream) == list(range(1, STEPS + 1))
    assert all(len(rows) == 8 and len(set(rows)) == 8 for rows in stream.values())
    return runs, base


def _check_same_as_reference(runs: Path, name: str) -> None:
    ref, got = runs / "ref", runs / name
    assert _stream(got) == _stream(ref)  # the same sequences, in the same global order
    a, b = _losses(ref), _losses(got)
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert abs(x - y) / abs(x) < 1e-5, (a, b)
    last = f"checkpoints/step_{STEPS:06d}/model.safetensors"
    wa, wb = load_file(str(ref / last)), load_file(str(got / last))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=2e-5), k
    state = json.loads((got / f"checkpoints/step_{STEPS:06d}/state.json").read_text())
    assert state["loader"]["step"] == STEPS


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_rank_run_resumes_on_two(reference, strategy):
    runs, base = reference
    name = f"one-to-two-{strategy}"
    shutil.copytree(runs / "one", runs / name)
    _torchrun(runs, [*base, f"name={name}", f"distributed.strategy={strategy}"], resume=True)
    rows = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "resume"] == [SPLIT]
    _check_same_as_reference(runs, name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_resumes_on_one(reference, strategy):
    runs, base = reference
    name = f"two-to-one-{strategy}"
    over = [*base, f"name={name}", f"distributed.strategy={strategy}"]
    _torchrun(runs, [*over, f"train.stop_at={SPLIT}"], resume=False)
    assert (runs / name / f"checkpoints/step_{SPLIT:06d}/dcp").is_dir()
    _single(over, resume=True)
    _check_same_as_reference(runs, name)
