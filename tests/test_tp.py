"""Tensor parallelism on CPU (gloo): DTensor TP and TP x FSDP2 against one process.

Initial weights equal a single process's bit for bit (each TP rank keeps its shard of the
one-process draw, and the shards differ: the SmolLM3 bug would give every rank the same numbers);
one forward-backward and five training steps match; a TP checkpoint resumes bit-exactly.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crucible.config import ConfigError, load_config
from crucible.model import Transformer
from crucible.train.checkpoint import load_model_weights
from crucible.train.distributed import check_parallel_config

SCRIPT = Path(__file__).parent / "dist_scripts" / "layout_check.py"
# In-loop evaluation at steps 2, 4 and 5: multiple choice, generation (KV cache) and bits-per-byte
# run through the TP model on every rank.
EVAL = ["eval.every=2", "eval.subset=4", "eval.tasks=[arithmetic,arithmetic_gen,stdlib_bpb]"]
COMMON = ["train.log_every=1", "train.val_every=0", "train.dtype=fp32", "train.threads=1",
          "schedule.warmup_steps=2", "schedule.kind=constant"]  # fmt: skip


def _torchrun(args: list[str], nproc: int, module: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"]  # fmt: skip
    cmd = [*launcher, "-m", "crucible", "train", *args] if module else [*launcher, *args]
    if nproc == 1 and module:
        cmd = [sys.executable, "-m", "crucible", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == kind]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _events(run_dir, "train")]


@pytest.mark.slow
@pytest.mark.dist
def test_layouts_initialise_and_differentiate_like_one_process():
    layouts = ["distributed.tp=2,distributed.sequence_parallel=true,"
               "train.activation_checkpointing=full",
               "distributed.strategy=fsdp,train.activation_checkpointing=selective,"
               "distributed.fsdp_reshard_after_forward=false,distributed.fsdp_prefetch=2"]  # fmt: skip
    out = _torchrun([str(SCRIPT), *layouts], 2, module=False)
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == len(layouts)
    for r in rows:
        assert r["init_equal"], r  # assembled weights == one process, bit for bit
        assert r["shards_differ"], r  # TP ranks drew different numbers for different shards
        assert r["loss_rel"] < 1e-6, r
        assert r["grad_rel"] < 1e-4, r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_base):
    runs = tmp_path_factory.mktemp("tp-runs")
    base = ["tiny", *small_base, f"out_dir={runs}", *COMMON]
    _torchrun([*base, *EVAL, "name=single", "train.steps=5"], 1)
    return runs, base


@pytest.mark.slow
@pytest.mark.dist
def test_tp_training_matches_one_process_and_resumes_bit_exactly(runs):
    runs, base = runs
    tp = [*base, "distributed.tp=2", "checkpoint.every=3", "checkpoint.keep_last=2"]
    _torchrun([*tp, *EVAL, "name=tp", "train.steps=5"], 2)
    ref, got = _losses(runs / "single"), _losses(runs / "tp")
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got):
        assert abs(a - b) / abs(a) < 1e-5, (ref, got)
    # Final validation and in-loop evaluation agree with one process too.
    ref_sum = json.loads((runs / "single" / "summary.json").read_text())
    got_sum = json.loads((runs / "tp" / "summary.json").read_text())
    assert got_sum["val_loss"] == pytest.approx(ref_sum["val_loss"], rel=1e-5)
    ref_eval, got_eval = _events(runs / "single", "eval"), _events(runs / "tp", "eval")
    assert [e["step"] for e in got_eval] == [e["step"] for e in ref_eval] == [2, 4, 5]
    for a, b in zip(ref_eval, got_eval):
        assert "stdlib_bpb/bpb" in a and "arithmetic_gen/exact_match" in a and a.keys() == b.keys()
        for k in a.keys() - {"event", "time", "eval_seconds"}:  # scores identical, bpb ~1e-5
            continuous = k.endswith(("/bpb", "/token_loss"))
            assert a[k] == (pytest.approx(b[k], rel=1e-5) if continuous else b[k]), k
    # Resume from step 3 with the same layout: steps 4-5 and the final weights are identical.
    shutil.copytree(runs / "tp", runs / "tp_resumed")
    shutil.rmtree(runs / "tp_resumed" / "checkpoints" / "step_000005")
    (runs / "tp_resumed" / "summary.json").unlink()
    out = _torchrun([*tp, *EVAL, "name=tp_resumed", "train.steps=5", "--resume"], 2)
    assert "resumed" in out.stdout
    assert _losses(runs / "tp_resumed") == _losses(runs / "tp")
    cfg = load_config(runs / "tp" / "config.yaml")
    a, b = Transformer(cfg.model), Transformer(cfg.model)
    load_model_weights(runs / "tp/checkpoints/step_000005", a)
    load_model_weights(runs / "tp_resumed/checkpoints/step_000005", b)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow
@pytest.mark.dist
def test_tp_x_fsdp_on_four_ranks_matches_one_process(runs):
    runs, base = runs
    args = [*base, "name=tp2x2", "train.steps=3", "distributed.tp=2",
            "distributed.strategy=fsdp", "distributed.sequence_parallel=true"]  # fmt: skip
    _torchrun(args, 4)
    ref, got = _losses(runs / "single")[:3], _losses(runs / "tp2x2")
    assert len(got) == 3
    for a, b in zip(ref, got):
        assert abs(a - b) / abs(a) < 1e-5, (ref, got)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, world, words",
    [
        (["distributed.tp=3"], 3, "does not divide model.num_heads 4"),
        (["distributed.tp=4"], 4, "does not divide model.num_kv_heads 2"),
        (["distributed.tp=2"], 3, "distributed.tp 2 does not divide the world size 3"),
        (["distributed.tp=2", "distributed.dp=2"], 2, "does not match the world size 2"),
        (["distributed.tp=2", "model.qk_norm=true"], 2, "qk_norm is not supported"),
        (["distributed.tp=2"], 4, "needs distributed.strategy fsdp"),
        (["distributed.sequence_parallel=true"], 2, "needs distributed.tp > 1"),
        (["train.fp8=tensorwise"], 1, "FP8 training needs a CUDA GPU"),
    ],
)
def test_bad_layouts_are_one_clear_line(overrides, world, words):
    cfg = load_config("tiny", ["train.micro_batch_size=1", *overrides])
    with pytest.raises(ConfigError, match=words) as e:
        check_parallel_config(cfg, world, "cpu")
    assert "\n" not in str(e.value)


def test_a_bad_mesh_is_refused_before_joining_the_process_group(monkeypatch):
    """Each rank checks the config against torchrun's WORLD_SIZE first: no rank waits for a
    process group that the others have refused."""
    import torch.distributed as dist

    from crucible.train.distributed import init_distributed

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config("tiny", ["distributed.tp=2", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError, match="distributed.tp 2 does not divide the world size 3"):
        init_distributed(cfg, "cpu")
    assert not dist.is_initialized()


def test_resume_with_another_tp_degree_is_refused(tmp_path):
    from crucible.config import dump_config
    from crucible.train.setup import check_resume

    saved = load_config("tiny", [f"out_dir={tmp_path}", "name=r"])
    run_dir = saved.run_dir
    from crucible.model import Transformer
    from crucible.train.checkpoint import save_weights_checkpoint

    weights = Transformer(saved.model).state_dict()
    save_weights_checkpoint(run_dir / "checkpoints" / "step_000002", weights, {"step": 2})
    (run_dir / "config.yaml").write_text(dump_config(saved))
    changed = load_config("tiny", [f"out_dir={tmp_path}", "name=r", "distributed.tp=2"])
    with pytest.raises(ConfigError, match=r"distributed.tp: 1 -> 2"):
        check_resume(changed, run_dir)
