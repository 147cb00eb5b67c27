"""Two CPU ranks under torchrun (gloo): DDP and FSDP2 match one process; DCP checkpoints resume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crucible.config import load_config
from crucible.model import Transformer
from crucible.train.checkpoint import list_checkpoints, load_model_weights, verify_checkpoint

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
    _assert_same_weights(
        runs / "full/checkpoints/step_000004", runs / "split/checkpoints/step_000004"
    )


def _assert_same_weights(ckpt_a: Path, ckpt_b: Path) -> None:
    """Both sharded checkpoints are intact and complete (manifest, DCP shards, per-rank RNG and
    the consolidated model.safetensors that read paths load) and hold the same weights."""
    for ckpt in (ckpt_a, ckpt_b):
        assert verify_checkpoint(ckpt) == []
        names = {p.name for p in ckpt.iterdir()}
        assert {"model.safetensors", "manifest.json", "dcp", "rng_rank1.safetensors"} <= names
    cfg = load_config(ckpt_a.parent.parent / "config.yaml")
    a, b = Transformer(cfg.model), Transformer(cfg.model)
    load_model_weights(ckpt_a, a)
    load_model_weights(ckpt_b, b)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name


def test_async_save_writes_the_same_checkpoints_and_resumes(single):
    """checkpoint.async_save: shards written in the background while training goes on; each
    checkpoint appears (manifest, rename) when the next save or the end of training finalizes
    it, holds that step's state, and resumes to the same losses and weights."""
    runs, base = single
    const = [*base, "schedule.kind=constant", "distributed.strategy=fsdp", "train.steps=4"]
    if not (runs / "full").exists():
        _run(["tiny", *const, "name=full"], 2)
    asy = [*const, "name=async", "checkpoint.async_save=true", "checkpoint.every=1",
           "checkpoint.keep_last=4"]  # fmt: skip
    _run(["tiny", *asy], 2)
    ckpts = runs / "async" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts, verify="hash")] == [1, 2, 3, 4]
    assert _losses(runs / "async") == pytest.approx(_losses(runs / "full"), rel=1e-6)
    for step in (3, 4):  # resume from step 2, written while step 3 was training
        shutil.rmtree(ckpts / f"step_{step:06d}")
    out = _run(["tiny", *asy, "--resume"], 2)
    assert "resumed" in out.stdout and "step_000002" in out.stdout
    assert _losses(runs / "async") == pytest.approx(_losses(runs / "full"), rel=1e-6)
    _assert_same_weights(runs / "full/checkpoints/step_000004", ckpts / "step_000004")


_ASYNC_SCRIPT = """
import os, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import crucible.train.checkpoint as C

dist.init_process_group("gloo")
def build():
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    for layer in m:
        fully_shard(layer)
    fully_shard(m)
    return m, torch.optim.AdamW(m.parameters())
torch.manual_seed(0)
m, o = build()
m(torch.randn(4, 32)).sum().backward()
o.step()
before = {n: p.full_tensor().clone() for n, p in m.named_parameters()}
root = Path(sys.argv[1])
path = C.save_checkpoint(root, 1, m, o, {"world_size": 2}, 2, async_save=True)
assert not path.exists()  # not yet: the manifest and the rename wait for finalize_pending
with torch.no_grad():  # training goes on while the shards are written
    for p in m.parameters():
        p.add_(1.0)
assert C.finalize_pending() == path and C.verify_checkpoint(path) == []
m2, o2 = build()
C.load_checkpoint(path, m2, o2)
assert all(torch.equal(before[n], p.full_tensor()) for n, p in m2.named_parameters())
full = C.load_file(str(path / "model.safetensors"))
assert full.keys() == before.keys() and all(torch.equal(before[n], full[n]) for n in full)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def test_async_save_holds_the_state_at_the_save_not_later(tmp_path):
    """The background write (DCP shards and the consolidated model) holds the values at the
    save, though the parameters change before it is finalized; nothing appears before then."""
    script = tmp_path / "async_save.py"
    script.write_text(_ASYNC_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path / "ckpts")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["step_000001"]


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
