"""Two CPU ranks under torchrun (gloo): DDP and FSDP2 match one process; DCP checkpoints resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crucible.config import load_config
from crucible.model import Transformer
from crucible.train.checkpoint import load_model_weights

pytestmark = [pytest.mark.slow, pytest.mark.dist]

COMMON = ["train.steps=5", "train.log_every=1", "train.val_every=0", "train.dtype=fp32",
          "checkpoint.every=0", "schedule.warmup_steps=2", "train.threads=1"]  # fmt: skip
# In-loop evaluation at steps 2, 4 and 5 (at_end): multiple choice, generation (KV cache, a
# different number of tokens per document) and bits-per-byte (a continuous score).
EVAL = ["eval.every=2", "eval.subset=8", "eval.tasks=[arithmetic,arithmetic_gen,stdlib_bpb]"]


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "crucible", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "crucible", "train", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == kind]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _events(run_dir, "train")]


def _eval_scores(run_dir: Path) -> list[dict]:
    drop = ("event", "time", "eval_seconds")
    return [{k: v for k, v in e.items() if k not in drop} for e in _events(run_dir, "eval")]


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_base):
    runs = tmp_path_factory.mktemp("dist-runs")
    base = [*small_base, f"out_dir={runs}", *COMMON]
    _run(["tiny", *base, *EVAL, "name=single"], 1)
    return runs, base


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(single, strategy):
    """Same losses, and the same in-loop evaluation scores, as one process."""
    runs, base = single
    _run(["tiny", *base, *EVAL, f"name={strategy}", f"distributed.strategy={strategy}"], 2)
    ref, got = _losses(runs / "single"), _losses(runs / strategy)
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got):
        assert abs(a - b) / abs(a) < 1e-5, (ref, got)
    ref_eval, got_eval = _eval_scores(runs / "single"), _eval_scores(runs / strategy)
    assert [e["step"] for e in got_eval] == [e["step"] for e in ref_eval] == [2, 4, 5]
    for a, b in zip(ref_eval, got_eval):
        assert a.keys() == b.keys() and "stdlib_bpb/bpb" in a and "arithmetic_gen/exact_match" in a
        for k in a:  # accuracies identical; bits-per-byte and loss within float noise
            continuous = k.endswith(("/bpb", "/token_loss"))
            assert a[k] == (pytest.approx(b[k], rel=1e-5) if continuous else b[k]), k


def test_two_rank_checkpoint_resumes(single):
    runs, base = single
    const = [*base, "schedule.kind=constant", "distributed.strategy=fsdp"]
    _run(["tiny", *const, "name=full", "train.steps=4"], 2)
    _run(["tiny", *const, "name=split", "train.steps=2"], 2)
    out = _run(["tiny", *const, "name=split", "train.steps=4", "--resume"], 2)
    assert "resumed" in out.stdout
    assert _losses(runs / "split") == pytest.approx(_losses(runs / "full"), rel=1e-6)
    cfg = load_config(runs / "full" / "config.yaml")
    a, b = Transformer(cfg.model), Transformer(cfg.model)
    load_model_weights(runs / "full/checkpoints/step_000004", a)
    load_model_weights(runs / "split/checkpoints/step_000004", b)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name


MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_intermediate_size=32",
       "model.moe.bias_update_rate=0.01", "checkpoint.every=5"]  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_moe_two_ranks_match_single_process(single, strategy):
    """MoE losses (balance loss included) match one process, and so does the aux-loss-free
    selection bias: each rank's expert loads are summed over ranks before the update."""
    runs, base = single
    if not (runs / "moe-single").exists():
        _run(["tiny", *base, *MOE, "name=moe-single"], 1)
    _run(["tiny", *base, *MOE, f"name=moe-{strategy}", f"distributed.strategy={strategy}"], 2)
    ref, got = _losses(runs / "moe-single"), _losses(runs / f"moe-{strategy}")
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got):
        assert abs(a - b) / abs(a) < 1e-5, (ref, got)
    cfg = load_config(runs / "moe-single" / "config.yaml")
    a, b = Transformer(cfg.model), Transformer(cfg.model)
    load_model_weights(runs / "moe-single/checkpoints/step_000005", a)
    load_model_weights(runs / f"moe-{strategy}/checkpoints/step_000005", b)
    bias_a, bias_b = a.layers[0].mlp.expert_bias, b.layers[0].mlp.expert_bias
    assert bias_a.abs().sum() > 0 and torch.equal(bias_a, bias_b)
