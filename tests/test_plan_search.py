"""Parallelism search and Amdahl's law against the playbook's SmolLM3 layout."""

import pytest

from crucible.config import load_config
from crucible.plan.hardware import find_accelerator
from crucible.plan.search import Cluster, amdahl_ceiling, amdahl_speedup, search_layouts


def test_smollm3_search_picks_the_playbooks_layout():
    cfg = load_config("smollm3-3b")
    cands = search_layouts(
        cfg.model, Cluster(find_accelerator("h100"), 384), cfg.train.global_batch_size, 4096
    )
    top = cands[0].layout
    # The playbook's final choice: DP=192, TP=2, PP=1, micro-batch 3, no accumulation, ZeRO-0.
    assert (top.dp, top.tp, top.pp, top.cp, top.micro_batch, top.grad_accum, top.zero) == (
        192, 2, 1, 1, 3, 1, 0,
    )  # fmt: skip
    for c in cands:
        lay = c.layout
        assert lay.world_size == 384
        assert lay.dp * lay.micro_batch * lay.grad_accum == cfg.train.global_batch_size
        assert c.memory.fits(80)
    speeds = [round(c.tokens_per_second_per_gpu, 6) for c in cands]
    assert speeds == sorted(speeds, reverse=True)


def test_no_layout_fits_says_why():
    cfg = load_config("smollm3-3b")
    with pytest.raises(ValueError, match="smallest peak"):
        search_layouts(cfg.model, Cluster(find_accelerator("RTX 3090"), 1), 8, 4096)


def test_amdahl():
    assert amdahl_speedup(0.1, 384) == pytest.approx(1 / (0.1 + 0.9 / 384))
    assert round(amdahl_speedup(0.1, 384), 2) == 9.77  # the playbook's figure
    assert amdahl_ceiling(0.1) == pytest.approx(10)
    assert amdahl_speedup(0.0, 8) == 8
