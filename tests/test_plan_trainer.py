"""The planner plans what the trainer runs: support marks, --write-config round trip, and the
plan_check event of a run started from a written config."""

import argparse
import json

import pytest

from crucible.config import load_config
from crucible.plan.commands import register
from crucible.plan.hardware import find_accelerator
from crucible.plan.memory import Layout
from crucible.plan.search import Cluster, search_layouts
from crucible.plan.trainer_layouts import config_for, layout_of, trainer_support
from crucible.train.distributed import check_parallel_config


def _plan(argv):
    parser = argparse.ArgumentParser(prog="crucible")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(
    "layout, reason",
    [
        (Layout(dp=2, pp=2), "pipeline"),
        (Layout(dp=2, cp=2), "context"),
        (Layout(dp=4, zero=1), "ZeRO-1"),
        (Layout(dp=4, zero=2), "ZeRO-2"),
        (Layout(dp=2, tp=2, zero=0, vocab_parallel=False), "TP x DDP"),
        (Layout(dp=2, tp=2, zero=3), "vocabulary-parallel"),
        (Layout(tp=4, vocab_parallel=False), "KV heads"),
    ],
)
def test_layouts_the_trainer_cannot_run_say_why(layout, reason):
    cfg = load_config("tiny").model  # 4 heads, 2 KV heads
    assert reason in (trainer_support(cfg, layout) or "")


def test_search_marks_or_drops_what_the_trainer_cannot_run():
    cfg = load_config("smollm3-3b").model
    cluster = Cluster(find_accelerator("h100"), 384)
    every = search_layouts(cfg, cluster, 576, 4096)
    assert {c.unsupported is None for c in every} == {True, False}
    for c in every:
        assert (c.unsupported is None) == (trainer_support(cfg, c.layout) is None)
    only = search_layouts(cfg, cluster, 576, 4096, trainer_only=True)
    assert only and all(c.unsupported is None for c in only)
    # The playbook's DP 192 x TP 2 is runnable as TP x FSDP2 (ZeRO-3), whole embedding per rank.
    best = only[0].layout
    assert (best.pp, best.cp, best.zero, best.vocab_parallel) == (1, 1, 3, False)


def test_write_config_round_trips_to_a_runnable_training_config(tmp_path, capsys):
    out = tmp_path / "chosen.yaml"
    argv = [
        "plan",
        "model",
        "smollm3-3b",
        "--gpu",
        "h100",
        "--gpus",
        "384",
        "--search",
        "--trainer-only",
    ]
    assert _plan([*argv, "--write-config", str(out)]) == 0
    text = capsys.readouterr()
    assert "Best layout `crucible train` runs" in text.out and "torchrun" in text.err
    cfg = load_config(out)
    world = cfg.distributed.dp * cfg.distributed.tp
    assert world == 384
    check_parallel_config(cfg, world, "cpu")  # the trainer accepts it
    cands = search_layouts(
        cfg.model, Cluster(find_accelerator("h100"), 384), 576, 4096,
        precision="autocast", trainer_only=True,
    )  # fmt: skip
    assert layout_of(cfg, world) == cands[0].layout


def test_write_config_refuses_a_layout_the_trainer_cannot_run():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match="not supported by the trainer .pipeline"):
        config_for(cfg, Layout(dp=1, pp=2))


def test_run_from_a_written_config_logs_plan_check(tmp_path, small_base, capsys):
    from crucible.train.trainer import train

    out = tmp_path / "one.yaml"
    assert _plan(["plan", "model", "tiny", *small_base, "--gpus", "1", "--recompute", "selective",
                  "--write-config", str(out)]) == 0  # fmt: skip
    cfg = load_config(out, [f"out_dir={tmp_path / 'runs'}", "train.steps=4", "train.val_every=0",
                            "train.log_every=1", "checkpoint.every=0", "train.threads=1"])  # fmt: skip
    assert cfg.train.activation_checkpointing == "selective"
    result = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    check = [r for r in rows if r["event"] == "plan_check"]
    assert len(check) == 1
    c = check[0]
    assert c["predicted_peak_bytes"] > 0 and c["measured_peak_bytes"] > 0
    assert (
        c["measured_memory"] == "host peak RSS" and c["predicted_tokens_per_s_per_device"] is None
    )
    assert c["measured_tokens_per_s_per_device"] > 0 and c["measured_steps"] == 2  # steps 3-4
    assert "recompute=selective" in c["layout"]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert all(r["data_seconds"] >= 0 for r in train_rows)  # the prefetcher's wait, per step
