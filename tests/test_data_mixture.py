"""Mixtures: exact per-source counts, stage switches, epochs, resume, ranks, the epoch plan."""

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from crucible.data.mixture import MixtureLoader, Stage, plan_epochs, stage_counts
from crucible.data.shards import ShardSet

SEQ = 8


def make_source(path, n_tokens: int, offset: int) -> ShardSet:
    """A one-shard dataset whose token values start at `offset` (so rows name their source)."""
    path.mkdir()
    tokens = (offset + np.arange(n_tokens) % 50).astype("<u2")
    tokens.tofile(path / "s_00000.ds")
    np.array([n_tokens], dtype="<u8").tofile(path / "s_00000.ds.index")
    meta = {"dtype": "uint16", "eos_id": 0, "vocab_size": 4096}
    meta["shards"] = [{"file": "s_00000.ds", "tokens": n_tokens, "docs": 1}]
    (path / "dataset.json").write_text(json.dumps(meta))
    return ShardSet(path)


@pytest.fixture
def sources(tmp_path):
    # a: (81 - 1) // 8 = 10 chunks; b: (161 - 1) // 8 = 20 chunks.
    return {"a": make_source(tmp_path / "a", 81, 100), "b": make_source(tmp_path / "b", 161, 1000)}


STAGES = [
    Stage("s1", {"a": 1.0}, steps=2),
    Stage("s2", {"a": 0.5, "b": 0.5}, steps=2),
    Stage("s3", {"b": 1.0}),
]


def test_stage_counts_by_hand():
    half = [Fraction(1, 2), Fraction(1)]
    assert stage_counts(half, 3).tolist() == [2, 1]  # floor(1.5 + .5) = 2, then 3 - 2
    assert stage_counts(half, 4).tolist() == [2, 2]
    cum = [Fraction(7, 10), Fraction(9, 10), Fraction(1)]
    assert stage_counts(cum, 10).tolist() == [7, 2, 1]
    assert stage_counts(cum, 0).tolist() == [0, 0, 0]


def test_sources_follow_stages(sources):
    loader = MixtureLoader(sources, STAGES, SEQ, global_batch_size=4, micro_batch_size=2)
    per_step = []
    for _ in range(6):
        batches = loader.next_step()
        ids = torch.cat([b.source_ids for b in batches])
        tokens = torch.cat([b.tokens for b in batches])
        # Row values tell the source: a's tokens are 100..149, b's 1000..1049.
        assert ((tokens[ids == 0] >= 100) & (tokens[ids == 0] < 150)).all()
        assert (tokens[ids == 1] >= 1000).all()
        per_step.append(ids.tolist())
    assert per_step[0] == per_step[1] == [0, 0, 0, 0]
    assert sorted(per_step[2] + per_step[3]) == [0] * 4 + [1] * 4  # exactly half in stage 2
    assert per_step[4] == per_step[5] == [1, 1, 1, 1]
    rows = {(r["stage"], r["source"]): r for r in loader.accounting(total_steps=6)}
    assert rows["s1", "a"]["sequences"] == 8 and rows["s1", "a"]["tokens"] == 64
    assert rows["s2", "a"]["sequences"] == 4 and rows["s2", "b"]["sequences"] == 4
    assert rows["s3", "b"]["sequences"] == 8
    assert rows["s2", "a"]["epochs_cumulative"] == 1.2  # 12 draws of 10 chunks
    assert rows["s3", "b"]["epochs_cumulative"] == 0.6  # 12 draws of 20 chunks
    assert loader.state_dict()["sequences_per_source"] == {"a": 12, "b": 12}


def test_each_chunk_once_per_epoch(sources):
    loader = MixtureLoader(sources, [Stage("a", {"a": 1.0})], SEQ, 5, 5)
    seen = [loader.locate(g) for g in range(20)]
    assert sorted(c for _, c in seen[:10]) == list(range(10))
    assert sorted(c for _, c in seen[10:]) == list(range(10))
    assert [c for _, c in seen[:10]] != [c for _, c in seen[10:]]  # a new order per epoch


def test_resume_and_ranks_match(sources):
    full = MixtureLoader(sources, STAGES, SEQ, 4, 2, block_size=3)
    for _ in range(3):
        full.next_step()
    state = full.state_dict()
    expected = [torch.cat([b.tokens for b in full.next_step()]) for _ in range(2)]
    resumed = MixtureLoader(sources, STAGES, SEQ, 4, 2, block_size=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    ranks = [MixtureLoader(sources, STAGES, SEQ, 4, 1, r, 2, block_size=3) for r in range(2)]
    for step, want in zip((3, 4), expected):
        assert torch.equal(torch.cat([b.tokens for b in resumed.next_step()]), want)
        got = torch.cat([b.tokens for r in ranks for b in r.step_batches(step)])
        assert torch.equal(got, want)
    other = MixtureLoader(sources, STAGES, SEQ, 4, 2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_invalid_mixtures(sources):
    with pytest.raises(ValueError, match="not given"):
        MixtureLoader(sources, [Stage("x", {"c": 1.0})], SEQ, 4, 2)
    with pytest.raises(ValueError, match="open-ended"):
        MixtureLoader(sources, [Stage("x", {"a": 1.0}), Stage("y", {"a": 1.0}, 2)], SEQ, 4, 2)
    with pytest.raises(ValueError, match="positive sum"):
        MixtureLoader(sources, [Stage("x", {"a": 0.0})], SEQ, 4, 2)


def test_plan_epochs_smollm3_math():
    # SmolLM3 stage 1: math is 3% of 8T tokens over a 54B-token pool.
    rows = plan_epochs(
        [("stage1", 8e12, {"web": 0.85, "code": 0.12, "math": 0.03})],
        {"web": 5.1e12, "code": 1e12, "math": 54e9},
        max_epochs=5,
    )
    math = next(r for r in rows if r["source"] == "math")
    assert math["epochs_cumulative"] == pytest.approx(240e9 / 54e9)  # 4.44
    assert not math["warning"]
    nine = plan_epochs([("s", 9e12, {"math": 0.03, "web": 0.97})], {"math": 54e9, "web": 1e13}, 5)
    assert nine[0]["epochs_cumulative"] == pytest.approx(5.0)
    assert nine[0]["max_share"] == pytest.approx(0.03)  # 5 x 54B / 9T
    ten = plan_epochs([("s", 540e9, {"math": 1.0})], {"math": 54e9}, 4)
    assert ten[0]["warning"]
