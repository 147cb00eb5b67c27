import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crucible.data.loader import (
    PretrainLoader,
    doc_ids_from_tokens,
    epoch_permutation,
    eval_batches,
)
from crucible.data.shards import ShardSet

EOS = 0
SEQ = 8


def _write_ds(out: Path, docs_per_shard: list[list[np.ndarray]]) -> np.ndarray:
    """Hand-made .ds shards + dataset.json; returns the concatenated token stream."""
    out.mkdir(parents=True, exist_ok=True)
    stream, shards = [], []
    for i, docs in enumerate(docs_per_shard):
        tokens = np.concatenate(docs).astype("<u2")
        name = f"t_{i:05d}.ds"
        tokens.tofile(out / name)
        np.cumsum([len(d) for d in docs]).astype("<u8").tofile(out / f"{name}.index")
        shards.append({"file": name, "tokens": len(tokens), "docs": len(docs)})
        stream.append(tokens)
    meta = {"vocab_size": 1000, "eos_id": EOS, "dtype": "uint16", "shards": shards}
    (out / "dataset.json").write_text(json.dumps(meta))
    return np.concatenate(stream).astype(np.int64)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[ShardSet, np.ndarray]:
    rng = np.random.default_rng(123)
    shards = []
    for _ in range(3):
        docs = []
        for _ in range(20):
            doc = rng.integers(1, 1000, size=int(rng.integers(1, 30)))
            docs.append(np.append(doc, EOS))
        shards.append(docs)
    out = tmp_path_factory.mktemp("ds")
    stream = _write_ds(out, shards)
    return ShardSet(out), stream


def _rows(batches) -> torch.Tensor:
    return torch.cat([b.tokens for b in batches])


def _chunk_of(row: torch.Tensor, stream: np.ndarray) -> int:
    """Which chunk a row of inputs is (rows are unique for random data)."""
    hits = [
        k
        for k in range((len(stream) - 1) // SEQ)
        if (stream[k * SEQ : k * SEQ + SEQ] == row.numpy()).all()
    ]
    assert len(hits) == 1
    return hits[0]


def test_batches_are_shifted_chunks(data):
    shards, stream = data
    loader = PretrainLoader(shards, SEQ, global_batch_size=8, micro_batch_size=4)
    batches = loader.next_step()
    assert len(batches) == 2
    for b in batches:
        assert b.tokens.shape == b.targets.shape == b.doc_ids.shape == (4, SEQ)
        assert b.tokens.dtype == b.targets.dtype == b.doc_ids.dtype == torch.int64
        for x, y in zip(b.tokens, b.targets):
            k = _chunk_of(x, stream)
            assert (y.numpy() == stream[k * SEQ + 1 : k * SEQ + SEQ + 1]).all()
    assert batches[0].to("cpu").tokens.equal(batches[0].tokens)


def test_deterministic_and_seeded(data):
    shards, _ = data
    a, b = (PretrainLoader(shards, SEQ, 8, 4, seed=1) for _ in range(2))
    c = PretrainLoader(shards, SEQ, 8, 4, seed=2)
    for _ in range(3):
        ra, rb, rc = _rows(a.next_step()), _rows(b.next_step()), _rows(c.next_step())
        assert ra.equal(rb)
    assert not ra.equal(rc)


def test_unshuffled_reads_in_order(data):
    shards, stream = data
    loader = PretrainLoader(shards, SEQ, 4, 2, shuffle=False)
    rows = _rows(loader.next_step())
    assert [_chunk_of(r, stream) for r in rows] == [0, 1, 2, 3]


def test_resume_mid_run_is_identical(data):
    shards, _ = data
    ref = PretrainLoader(shards, SEQ, 8, 2, seed=7)
    for _ in range(5):
        ref.next_step()
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    resumed = PretrainLoader(shards, SEQ, 8, 2, seed=7)
    resumed.load_state_dict(state)
    assert resumed.step == 5 and resumed.tokens_seen == ref.tokens_seen
    for _ in range(30):  # across epoch boundaries too
        assert _rows(ref.next_step()).equal(_rows(resumed.next_step()))


def test_resume_rejects_changed_data(data, tmp_path: Path):
    shards, _ = data
    state = PretrainLoader(shards, SEQ, 8, 2).state_dict()
    rng = np.random.default_rng(0)
    other = _write_ds(tmp_path, [[np.append(rng.integers(1, 9, 200), EOS)]])
    assert len(other) != shards.num_tokens
    loader = PretrainLoader(ShardSet(tmp_path), SEQ, 8, 2)
    with pytest.raises(ValueError, match="n_chunks.*training data changed"):
        loader.load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        PretrainLoader(shards, SEQ * 2, 8, 2).load_state_dict(state)


def test_ranks_partition_the_global_batch(data):
    shards, _ = data
    single = PretrainLoader(shards, SEQ, 12, 6, seed=3)
    ranks = [PretrainLoader(shards, SEQ, 12, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(4):
        whole = _rows(single.next_step())
        parts = [_rows(r.next_step()) for r in ranks]
        assert len(ranks[0].step_batches(0)) == 3  # 12 / 2 ranks / micro 2
        assert torch.cat(parts).equal(whole)


def test_bad_batch_sizes_are_named(data):
    shards, _ = data
    with pytest.raises(
        ValueError, match="global_batch_size 10 .* micro_batch_size 4 x world_size 1"
    ):
        PretrainLoader(shards, SEQ, 10, 4)
    with pytest.raises(ValueError, match="= 8"):
        PretrainLoader(shards, SEQ, 12, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        PretrainLoader(shards, SEQ, 8, 4, rank=2, world_size=2)


def test_doc_ids_hand_made():
    tokens = np.array([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 1, 2, 3, 4, 5, EOS]])
    expected = [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert doc_ids_from_tokens(tokens, EOS).tolist() == expected


def test_doc_ids_in_batches(data):
    shards, _ = data
    for b in PretrainLoader(shards, SEQ, 8, 4).next_step():
        assert (b.doc_ids[:, 0] == 0).all()
        assert b.doc_ids.equal(torch.from_numpy(doc_ids_from_tokens(b.tokens.numpy(), EOS)))


def test_epochs_reshuffle_and_cover_everything(data):
    shards, stream = data
    loader = PretrainLoader(shards, SEQ, 1, 1, seed=5)
    n = loader.n_chunks
    assert n == (len(stream) - 1) // SEQ
    first = loader.chunk_ids(np.arange(n))
    second = loader.chunk_ids(np.arange(n, 2 * n))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)
    assert not np.array_equal(epoch_permutation(n, 5, 0), epoch_permutation(n, 6, 0))
    loader.step = n
    assert loader.epoch == 1 and loader.tokens_seen == n * SEQ


def test_eval_batches_stable_and_spread(data):
    shards, stream = data
    a = eval_batches(shards, SEQ, 4, 2)
    b = eval_batches(shards, SEQ, 4, 2)
    assert len(a) == 2 and all(x.tokens.equal(y.tokens) for x, y in zip(a, b))
    chunks = [_chunk_of(r, stream) for r in _rows(a)]
    n = (len(stream) - 1) // SEQ
    assert chunks == sorted(chunks) and chunks[0] == 0 and chunks[-1] >= n * 3 // 4
    split = [eval_batches(shards, SEQ, 4, 2, rank=r, world_size=2) for r in range(2)]
    assert all(len(s) == 1 for s in split)
    assert torch.cat([_rows(s) for s in split]).equal(_rows(a))
    # more batches than the data holds: capped, never an error
    assert len(eval_batches(shards, SEQ, 4, 10_000)) == n // 4
